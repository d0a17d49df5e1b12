"""Run a REAL containerd daemon (Debian's 1.6) and pull with its ``ctr`` client.

Everything the daemon owns lives under one private work directory: its root
(content store, metadata, snapshots), its state dir, its gRPC socket and its
config. Nothing touches /var/lib/containerd, /run/containerd or
/opt/containerd (the ``opt`` plugin's default, which the config points into
the work directory too).

Plugins that cannot work, or are not needed, in a test sandbox are disabled:
the snapshotters that need a special filesystem or kernel support (aufs,
btrfs, zfs, devmapper), overlayfs (it needs overlay mounts, which many
sandboxes refuse) and, unless ``cri=True``, CRI and everything that runs
containers (runtimes, tasks, the cgroups monitor, restart), which ``ctr``
pulls do not need. What remains is what a pull needs: the content store,
metadata, the images/content/leases/snapshots services, the ``walking``
differ and the ``native`` snapshotter (plain directories and bind mounts).

With ``cri=True`` the CRI plugin loads too (it needs the runtime and tasks
plugins, though it never starts a container here): its snapshotter is
``native``, its CNI directories are empty ones in the work directory (CNI
setup fails, which only matters for pods), its streaming server listens on
127.0.0.1 only. :meth:`Containerd.cri_pull` then asks it to pull the way
kubelet does, over the CRI gRPC API (Debian has no crictl), so the registry
settings of a real config.toml (``config_path``, legacy ``mirrors``) are
exercised by the daemon itself.

Who talks to the registry: with ``ctr images pull`` the *ctr process* is the
registry client (containerd's Go resolver and fetcher run in ctr, which reads
``--hosts-dir`` itself and streams what it fetches into the daemon's content
store over gRPC). The daemon only stores, unpacks and records the image. The
CRI plugin (kubelet's pulls) runs the same resolver inside the daemon and
reads the same hosts.toml files from its ``config_path``.

Unpacking: ``ctr images pull`` in 1.6 always unpacks (it has no
``--skip-unpack``). :meth:`Containerd.ctr_pull` passes ``--snapshotter native``,
whose unpack needs nothing but a bind mount, which works as root here. If a
sandbox refuses even that, ``ctr content fetch`` (``fetch=True``) fetches the
same content and records the image without unpacking, and goes to the
registry the same way.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from .lifecycle import Service
from .registryproc import stop_process

CONTAINERD = "containerd"
CTR = "ctr"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
PULL_TIMEOUT = 120.0
# containerd refuses unix socket paths over 104 bytes ("unix socket path too
# long (> 104)"; sun_path is 104 bytes on BSDs, 108 on Linux), and it listens on
# `<grpc address>.ttrpc` too: the longest path it makes must stay within this.
MAX_SOCKET_PATH = 100
TTRPC_SUFFIX = ".ttrpc"
SOCKET_NAME = "containerd.sock"

CRI_PLUGIN = "io.containerd.grpc.v1.cri"
CRI_NAMESPACE = "k8s.io"  # where the CRI plugin keeps its images
UNUSABLE_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.overlayfs",
)
RUNTIME_PLUGINS = (  # only CRI needs these
    "io.containerd.runtime.v1.linux",
    "io.containerd.runtime.v2.task",
    "io.containerd.monitor.v1.cgroups",
    "io.containerd.service.v1.tasks-service",
    "io.containerd.grpc.v1.tasks",
    "io.containerd.internal.v1.restart",
)
DISABLED_PLUGINS = (CRI_PLUGIN,) + UNUSABLE_PLUGINS + RUNTIME_PLUGINS


def _socket_fits(path: str) -> bool:
    """Can containerd listen on `path` and on `path` + ".ttrpc"?"""
    return len(os.fsencode(path + TTRPC_SUFFIX)) <= MAX_SOCKET_PATH


def _short_tmp_dir() -> str:
    """A temp dir whose ctd-XXXXXXXX/containerd.sock(.ttrpc) fits: $TMPDIR
    (tempfile's choice) when short enough, else /tmp, else /dev/shm."""
    probe = os.path.join("ctd-" + "x" * 8, SOCKET_NAME)  # mkdtemp adds 8 characters
    for candidate in (tempfile.gettempdir(), "/tmp", "/dev/shm"):
        if (_socket_fits(os.path.join(candidate, probe)) and os.path.isdir(candidate)
                and os.access(candidate, os.W_OK | os.X_OK)):
            return candidate
    raise ContainerdError("no temp dir short enough for containerd's unix socket "
                          f"({MAX_SOCKET_PATH} bytes with {TTRPC_SUFFIX!r}); set TMPDIR=/tmp")


class ContainerdError(RuntimeError):
    def __init__(self, message: str, proc: subprocess.CompletedProcess | None = None):
        super().__init__(message)
        self.proc = proc
        self.stderr = proc.stderr if proc is not None else ""


def available() -> str | None:
    """Why containerd tests cannot run here (None: they can)."""
    for binary in (CONTAINERD, CTR):
        if shutil.which(binary) is None:
            return f"{binary} not installed (apt-get install containerd)"
    if os.geteuid() != 0:
        return "containerd needs root"
    return None


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string here


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump_toml(data: dict) -> str:
    """Nested dicts of str/int/bool/lists as TOML (enough for containerd's config)."""
    lines: list[str] = []

    def table(d: dict, path: list[str]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if path and (scalars or not tables):
            lines.append("")
            lines.append("[" + ".".join(_toml_str(k) for k in path) + "]")
        for k, v in scalars.items():
            lines.append(f"{_toml_str(k)} = {_toml_value(v)}")
        for k, v in tables.items():
            table(v, path + [k])

    table(data, [])
    return "\n".join(lines) + "\n"


def merge_config(base: dict, extra: dict) -> dict:
    """``extra`` merged into a copy of ``base``, tables recursively."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_config(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def write_hosts_dir(base: str | os.PathLike, registry_host: str, mirror_url: str, *,
                    server: str | None = None, capabilities=("pull", "resolve"),
                    skip_verify: bool = False) -> Path:
    """Write ``<base>/<registry_host>/hosts.toml`` (containerd 1.5+ format).

    ``registry_host`` is the host[:port] of the image reference (``docker.io``
    in real life; a closed loopback port in tests). ``server`` is the real
    registry, tried after the mirror; default ``https://<registry_host>``
    (``https://registry-1.docker.io`` for docker.io). ``mirror_url`` is the
    mirror, e.g. ``http://127.0.0.1:5000``: its scheme is what makes containerd
    speak plain HTTP to it (no ``--plain-http`` needed). Returns the file.

    containerd looks for ``<base>/<host:port>/hosts.toml``, then (Debian 12's
    1.6.20 does, as do later releases) ``<host>_<port>_`` and ``_default``
    (docs/hosts.md). An empty ``<host:port>`` directory hides ``_default``.
    """
    if server is None:
        server = "https://registry-1.docker.io" if registry_host == "docker.io" else f"https://{registry_host}"
    lines = [
        f"server = {_toml_str(server)}",
        "",
        f"[host.{_toml_str(mirror_url.rstrip('/'))}]",
        "  capabilities = [" + ", ".join(_toml_str(c) for c in capabilities) + "]",
    ]
    if skip_verify:
        lines.append("  skip_verify = true")
    directory = Path(base) / registry_host
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class ContentEntry:
    digest: str
    size: str  # as ctr prints it, e.g. "532.6kB"
    labels: str  # comma-separated key=value


class Containerd(Service):
    """A private containerd daemon. Context manager, or start()/stop().

    ``workdir``: where root/, state/, config.toml and the log go (default: a
    new temp dir, removed on stop). The gRPC socket goes into the work dir,
    or into a short temp dir when that path (or the ``.ttrpc`` one containerd
    adds) would be too long for a unix socket.

    ``content_sharing_policy`` defaults to ``"isolated"``, not containerd's
    ``"shared"``: with "shared", a blob that any namespace already holds is
    linked into a new namespace WITHOUT being fetched again (ctr's writer gets
    "already exists" and skips the HTTP request), so a pull into a fresh
    namespace would never reach the mirror. "isolated" makes every namespace
    behave like a separate machine: it fetches everything it does not hold.

    ``cri=True`` loads the CRI plugin (see the module docstring);
    ``extra_config`` (parsed TOML, e.g. a config.toml snippet) is merged into
    the generated config last, so it can set CRI registry options.

    ``netns`` (a :class:`tests.harness.netns.Office`): the daemon AND every
    ``ctr`` run inside that network namespace (ctr is the registry client of
    ``ctr images pull``, the daemon that of CRI pulls).
    """

    def __init__(self, workdir: str | os.PathLike | None = None, *,
                 start_timeout: float = START_TIMEOUT, stop_timeout: float = STOP_TIMEOUT,
                 log_level: str = "info", content_sharing_policy: str = "isolated",
                 cri: bool = False, extra_config: dict | None = None, netns=None):
        self.netns = netns
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.log_level = log_level
        self.content_sharing_policy = content_sharing_policy
        self.cri = cri
        self.extra_config = extra_config or {}
        self.workdir: Path | None = None
        self.socket: str | None = None
        self.proc: subprocess.Popen | None = None
        self._own_dirs: list[Path] = []
        self._log_file = None
        self.log_path: Path | None = None

    # ------------------------------------------------------------------ lifecycle

    def _start(self) -> None:
        if self._workdir_arg is not None:
            self.workdir = self._workdir_arg
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="containerd-"))
            self._own_dirs.append(self.workdir)
        root, state = self.workdir / "root", self.workdir / "state"
        for d in (root, state, self.workdir / "opt"):
            d.mkdir(parents=True, exist_ok=True)
        self.socket = str(state / SOCKET_NAME)
        if not _socket_fits(self.socket):
            short = Path(tempfile.mkdtemp(prefix="ctd-", dir=_short_tmp_dir()))
            self._own_dirs.append(short)
            self.socket = str(short / SOCKET_NAME)
        config = self.workdir / "config.toml"
        config.write_text(self._config(root, state))
        self.log_path = self.workdir / "containerd.log"
        self._log_file = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        cmd = [CONTAINERD, "--config", str(config), "--log-level", self.log_level]
        if self.netns is not None:
            cmd = self.netns.command(cmd)
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=env, cwd=self.workdir, start_new_session=True,
        )
        self._wait_ready()

    def _config(self, root: Path, state: Path) -> str:
        disabled = list(UNUSABLE_PLUGINS if self.cri else DISABLED_PLUGINS)
        config = {
            "version": 2,
            "root": str(root),
            "state": str(state),
            "disabled_plugins": disabled,
            "grpc": {"address": self.socket},
            "ttrpc": {"address": self.socket + TTRPC_SUFFIX},
            "debug": {"address": ""},
            "metrics": {"address": ""},
            "plugins": {
                "io.containerd.internal.v1.opt": {"path": str(self.workdir / "opt")},
                "io.containerd.metadata.v1.bolt": {"content_sharing_policy": self.content_sharing_policy},
            },
        }
        if self.cri:
            cni = self.workdir / "cni"
            for d in (cni / "bin", cni / "net.d"):
                d.mkdir(parents=True, exist_ok=True)
            config["plugins"][CRI_PLUGIN] = {
                "disable_tcp_service": True,
                "stream_server_address": "127.0.0.1",
                "stream_server_port": "0",
                "containerd": {"snapshotter": "native"},
                "cni": {"bin_dir": str(cni / "bin"), "conf_dir": str(cni / "net.d")},
            }
        return dump_toml(merge_config(config, self.extra_config))

    def plugin_status(self) -> dict[str, str]:
        """``ctr plugins ls``: "type.id" -> "ok", "skip" or "error"."""
        status = {}
        for line in self._ctr(["plugins", "ls"]).stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 4:
                status[f"{parts[0]}.{parts[1]}"] = parts[-1]
        return status

    def _wait_ready(self) -> None:
        """Poll ``ctr version`` (a gRPC round trip) until it answers, bounded."""
        deadline = time.monotonic() + self.start_timeout
        pause = threading.Event()
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ContainerdError(f"containerd exited ({self.proc.returncode}); log:\n{self.logs()}")
            if os.path.exists(self.socket):
                try:
                    proc = self._ctr(["version"], timeout=5, check=False)
                except subprocess.TimeoutExpired:
                    proc = None
                if proc is not None and proc.returncode == 0 and "Server:" in proc.stdout:
                    return
                last = proc.stderr if proc is not None else "ctr version timed out"
            pause.wait(0.05)
        raise ContainerdError(f"containerd not ready in {self.start_timeout}s ({last}); log:\n{self.logs()}")

    def stop(self) -> None:
        """SIGTERM, SIGKILL after ``stop_timeout``; then remove what start() made."""
        proc, self.proc = self.proc, None
        stop_process(proc, self.stop_timeout, group=True)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        for d in self._own_dirs:
            _remove_tree(d)
        self._own_dirs.clear()

    def logs(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-20000:]

    # ------------------------------------------------------------------ ctr
    def _ctr(self, args: list[str], *, namespace: str | None = None, timeout: float = 60,
             check: bool = True, debug: bool = False) -> subprocess.CompletedProcess:
        cmd = [CTR, "--address", self.socket]
        if debug:
            cmd.append("--debug")
        if namespace is not None:
            cmd += ["--namespace", namespace]
        cmd += args
        if self.netns is not None:
            cmd = self.netns.command(cmd)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.pop("CONTAINERD_SNAPSHOTTER", None)
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise ContainerdError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}", proc)
        return proc

    def ctr_pull(self, ref: str, hosts_dir: str | os.PathLike, namespace: str, *,
                 platform: str | None = None, all_platforms: bool = False,
                 user: tuple[str, str] | None = None, fetch: bool = False,
                 timeout: float = PULL_TIMEOUT, check: bool = True, debug: bool = True,
                 extra_args=()) -> subprocess.CompletedProcess:
        """``ctr images pull --hosts-dir DIR [--platform P] [--user U:P] REF``.

        The mirror's ``[host."http://..."]`` entry in hosts.toml is what makes
        ctr use plain HTTP for it; ``--plain-http`` is NOT passed (it only sets
        the scheme for a registry that no hosts.toml describes). The
        reference's registry should be a closed port whose hosts.toml names
        the mirror as its only ``[host]``: if the mirror fails, ctr falls back
        to that ``server`` and gets "connection refused", never the upstream.
        ``--snapshotter native`` keeps the unpack working without overlay
        mounts. ``fetch=True`` runs ``ctr content fetch`` instead (same
        registry traffic, no unpack). ``debug`` (on by default) runs
        ``ctr --debug``, whose stderr then has one ``msg="do request"`` line
        per registry request, with method, URL (query included) and headers.
        ``user`` goes to ``--user``; ctr sends it to the token server (the
        realm), for the mirror's host as for any other.
        """
        if fetch:
            args = ["content", "fetch", "--hosts-dir", str(hosts_dir)]
        else:
            args = ["images", "pull", "--hosts-dir", str(hosts_dir), "--snapshotter", "native"]
        if platform:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        if user:
            args += ["--user", f"{user[0]}:{user[1]}"]
        args += list(extra_args)
        args.append(ref)
        return self._ctr(args, namespace=namespace, timeout=timeout, check=check, debug=debug)

    def cri_pull(self, image: str, *, auth: tuple[str, str] | None = None,
                 timeout: float = PULL_TIMEOUT) -> str:
        """Pull as kubelet does: CRI ``ImageService/PullImage`` over gRPC.

        The daemon's CRI plugin resolves and fetches by itself, with the
        registry settings of its config.toml. Returns the image id (config
        digest). Images land in the ``k8s.io`` namespace. Raises
        :class:`CRIError` with the gRPC status and message on failure.
        """
        spec = _pb_bytes(1, _pb_bytes(1, image.encode()))
        if auth is not None:
            spec += _pb_bytes(2, _pb_bytes(1, auth[0].encode()) + _pb_bytes(2, auth[1].encode()))
        reply = grpc_unary(self.socket, "/runtime.v1.ImageService/PullImage", spec, timeout)
        return _pb_fields(reply).get(1, b"").decode()

    def content_list(self, namespace: str) -> dict[str, ContentEntry]:
        """``ctr content ls``: every blob the namespace holds, by digest.

        ctr prints sizes humanized and lossy (``532.6kB``): use
        :meth:`content_bytes` to check a blob's exact size and digest.
        """
        out = self._ctr(["content", "ls"], namespace=namespace).stdout
        entries = {}
        for line in out.splitlines()[1:]:
            parts = line.split("\t")
            if not parts or not parts[0].startswith("sha256:"):
                continue
            size = parts[1].strip() if len(parts) > 1 else ""
            labels = parts[3].strip() if len(parts) > 3 else ""
            entries[parts[0].strip()] = ContentEntry(parts[0].strip(), size, labels)
        return entries

    def content_digests(self, namespace: str) -> set[str]:
        return set(self._ctr(["content", "ls", "--quiet"], namespace=namespace).stdout.split())

    def content_bytes(self, namespace: str, digest: str) -> bytes:
        """``ctr content get DIGEST``: a blob's bytes as containerd stored them."""
        cmd = [CTR, "--address", self.socket, "--namespace", namespace, "content", "get", digest]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        if proc.returncode != 0:
            raise ContainerdError(f"{' '.join(cmd)} failed: {proc.stderr.decode(errors='replace')}")
        return proc.stdout

    def images(self, namespace: str) -> dict[str, str]:
        """``ctr images ls``: image name -> target digest."""
        out = self._ctr(["images", "ls"], namespace=namespace).stdout
        images = {}
        for line in out.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 3:
                images[parts[0]] = parts[2]
        return images


def ctr_pull(containerd: Containerd, ref: str, hosts_dir, namespace: str, **kw) -> subprocess.CompletedProcess:
    """Module-level form of :meth:`Containerd.ctr_pull`."""
    return containerd.ctr_pull(ref, hosts_dir, namespace, **kw)


class CRIError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"gRPC status {status}: {message}")
        self.status = status
        self.message = message


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_bytes(field: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (string, bytes or message)."""
    return _pb_varint(field << 3 | 2) + _pb_varint(len(data)) + data


def _pb_fields(data: bytes) -> dict[int, bytes]:
    """Top-level length-delimited fields of a protobuf message (others skipped)."""
    fields, pos = {}, 0

    def varint() -> int:
        nonlocal pos
        shift = value = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(data):
        key = varint()
        kind = key & 7
        if kind == 0:
            varint()
        elif kind == 1:
            pos += 8
        elif kind == 5:
            pos += 4
        elif kind == 2:
            length = varint()
            fields[key >> 3] = data[pos:pos + length]
            pos += length
        else:
            raise ValueError(f"unsupported protobuf wire type {kind}")
    return fields


def grpc_unary(socket_path: str, method: str, request: bytes, timeout: float) -> bytes:
    """One unary gRPC call over HTTP/2 on a unix socket (h2 comes with mitmproxy).

    Just enough gRPC for the CRI calls the tests make: no compression, one
    request message, one response message, status from the trailers.
    """
    import h2.config
    import h2.connection
    import h2.events

    deadline = time.monotonic() + timeout
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, [
            (":method", "POST"), (":scheme", "http"), (":path", method), (":authority", "localhost"),
            ("content-type", "application/grpc"), ("te", "trailers"),
            ("grpc-timeout", f"{max(1, int(timeout))}S"),
        ])
        conn.send_data(stream, b"\x00" + struct.pack(">I", len(request)) + request, end_stream=True)
        sock.sendall(conn.data_to_send())
        body, headers, ended = bytearray(), {}, False
        while not ended:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{method}: no answer in {timeout}s")
            sock.settimeout(remaining)
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"{method}: containerd closed the connection")
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    headers.update(dict(event.headers))
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamReset):
                    raise ConnectionError(f"{method}: stream reset ({event.error_code})")
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            sock.sendall(conn.data_to_send())
    status = int(headers.get("grpc-status", "2"))
    if status != 0:
        raise CRIError(status, unquote(headers.get("grpc-message", "")))
    if len(body) < 5 or body[0] != 0:
        raise ValueError(f"{method}: unexpected gRPC body ({len(body)} bytes)")
    (length,) = struct.unpack(">I", bytes(body[1:5]))
    return bytes(body[5:5 + length])


def _remove_tree(path: Path) -> None:
    """rm -r, unmounting first anything the native snapshotter left mounted."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f]
    except OSError:
        mounts = []
    prefix = str(path).rstrip("/") + "/"
    for mountpoint in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", mountpoint], capture_output=True, timeout=10)
    shutil.rmtree(path, ignore_errors=True)
