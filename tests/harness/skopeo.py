"""Run skopeo (Debian's 1.9) as a real client, directly or through a mirror.

skopeo 1.9 only reads mirrors from ``$HOME/.config/containers/registries.conf``
(it ignores CONTAINERS_REGISTRIES_CONF), so every run gets its own HOME with
its own registries.conf, auth file and signature policy: nothing leaks in from
the machine's configuration. When a mirror fails, skopeo silently falls back
to the primary location; tests make the primary a closed loopback port (see
:class:`ClosedPort`) so that a pull can only succeed through the mirror.
Credentials for a mirror must be in the auth file under the MIRROR's host:port
(skopeo never sends --src-creds to a mirror). ``netns=`` (an Office, see
netns.py) runs skopeo inside that network namespace.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import subprocess
from dataclasses import dataclass

SKOPEO = "skopeo"


class SkopeoError(RuntimeError):
    def __init__(self, message: str, proc: subprocess.CompletedProcess):
        super().__init__(message)
        self.proc = proc
        self.stderr = proc.stderr


class ClosedPort:
    """A loopback port that is bound but not listening: connecting is refused.

    Holding the bound socket keeps the kernel from giving the port to anyone
    else while the test runs. Close it (or use it as a context manager) after.
    """

    def __init__(self):
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.host_port = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "ClosedPort":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class SkopeoHome:
    """A private HOME for skopeo runs."""

    home: str
    registries_conf: str
    authfile: str
    policy: str

    def env(self, extra: dict | None = None) -> dict:
        env = {
            "HOME": self.home,
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "XDG_CONFIG_HOME": os.path.join(self.home, ".config"),
            "XDG_RUNTIME_DIR": os.path.join(self.home, "run"),
            "REGISTRY_AUTH_FILE": self.authfile,
            "TMPDIR": os.path.join(self.home, "tmp"),
            "LANG": "C.UTF-8",
        }
        env.update(extra or {})
        return env


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string here


def make_skopeo_home(base_dir: str, *, primary: str, mirror: str | None = None,
                     insecure: bool = True, mirror_insecure: bool = True,
                     auth: dict[str, tuple[str, str]] | None = None) -> SkopeoHome:
    """Create a HOME under ``base_dir`` for skopeo.

    ``primary`` and ``mirror`` are host:port locations; with ``mirror`` None
    the registries.conf has no mirror (skopeo talks to ``primary`` directly).
    ``auth`` maps host:port (the MIRROR's, for pulls through it) to (user, password).
    """
    home = os.path.abspath(base_dir)
    conf_dir = os.path.join(home, ".config", "containers")
    for d in (conf_dir, os.path.join(home, "run"), os.path.join(home, "tmp")):
        os.makedirs(d, exist_ok=True)

    lines = [
        "unqualified-search-registries = []",
        "",
        "[[registry]]",
        f"location = {_toml_str(primary)}",
        f"insecure = {'true' if insecure else 'false'}",
    ]
    if mirror:
        lines += [
            "",
            "[[registry.mirror]]",
            f"location = {_toml_str(mirror)}",
            f"insecure = {'true' if mirror_insecure else 'false'}",
        ]
    registries_conf = os.path.join(conf_dir, "registries.conf")
    with open(registries_conf, "w") as f:
        f.write("\n".join(lines) + "\n")

    authfile = os.path.join(conf_dir, "auth.json")
    auths = {
        host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        for host, (user, password) in (auth or {}).items()
    }
    with open(authfile, "w") as f:
        json.dump({"auths": auths}, f)
    os.chmod(authfile, 0o600)

    policy = os.path.join(conf_dir, "policy.json")
    with open(policy, "w") as f:
        json.dump({"default": [{"type": "insecureAcceptAnything"}]}, f)
    return SkopeoHome(home, registries_conf, authfile, policy)


def _docker_ref(image_ref: str) -> str:
    return image_ref if image_ref.startswith("docker://") else "docker://" + image_ref


def _run(args: list[str], home: SkopeoHome, timeout: float, env_extra: dict | None,
         check: bool, netns=None) -> subprocess.CompletedProcess:
    cmd = [SKOPEO, "--policy", home.policy] + args
    if netns is not None:
        cmd = netns.command(cmd)
    proc = subprocess.run(cmd, env=home.env(env_extra), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, cwd=home.home)
    if check and proc.returncode != 0:
        raise SkopeoError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}", proc)
    return proc


def skopeo_copy(image_ref: str, dest_dir: str, home: SkopeoHome, *, authfile: str | None = None,
                src_creds: tuple[str, str] | None = None, override_arch: str | None = None,
                override_os: str | None = None, override_variant: str | None = None,
                all: bool = False, dest_format: str = "dir", timeout: float = 120,
                extra_args: list[str] | tuple = (), env_extra: dict | None = None,
                check: bool = True, netns=None) -> subprocess.CompletedProcess:
    """``skopeo copy --src-tls-verify=false docker://IMAGE dir:DEST`` (or ``oci:DEST``).

    ``authfile`` defaults to the home's auth file. ``src_creds`` is only used
    for the primary registry, never for a mirror (that is how skopeo works).
    Raises :class:`SkopeoError` (with stderr) on failure unless ``check`` is False.
    """
    if dest_format not in ("dir", "oci"):
        raise ValueError("dest_format must be 'dir' or 'oci'")
    args = []
    if override_arch:
        args += ["--override-arch", override_arch]
    if override_os:
        args += ["--override-os", override_os]
    if override_variant:
        args += ["--override-variant", override_variant]
    args += ["copy", "--src-tls-verify=false", "--src-authfile", authfile or home.authfile]
    if src_creds:
        args += ["--src-creds", f"{src_creds[0]}:{src_creds[1]}"]
    if all:
        args.append("--all")
    args += list(extra_args)
    args += [_docker_ref(image_ref), f"{dest_format}:{dest_dir}"]
    return _run(args, home, timeout, env_extra, check, netns)


def skopeo_inspect(image_ref: str, home: SkopeoHome, *, raw: bool = True, authfile: str | None = None,
                   src_creds: tuple[str, str] | None = None, timeout: float = 60,
                   env_extra: dict | None = None, netns=None) -> str:
    """``skopeo inspect [--raw]``: the manifest as served (raw) or skopeo's summary JSON."""
    args = ["inspect", "--tls-verify=false", "--authfile", authfile or home.authfile]
    if raw:
        args.append("--raw")
    if src_creds:
        args += ["--creds", f"{src_creds[0]}:{src_creds[1]}"]
    args.append(_docker_ref(image_ref))
    return _run(args, home, timeout, env_extra, True, netns).stdout


_HEX = re.compile(r"^([0-9a-f]{64})(\.manifest\.json)?$")


def verify_dir_image(dest_dir: str) -> dict:
    """Check a ``dir:`` copy: every blob and manifest file's sha256 equals its name.

    Returns {"manifest_digest": digest of manifest.json, "manifest": parsed,
    "blobs": {digest: size}, "manifests": {digest: size}}. With ``--all``,
    manifest.json is the index and each platform's manifest is a
    ``<hex>.manifest.json`` file (listed under "manifests").
    """
    with open(os.path.join(dest_dir, "manifest.json"), "rb") as f:
        manifest_bytes = f.read()
    blobs, manifests = {}, {}
    for name in os.listdir(dest_dir):
        m = _HEX.match(name)
        if not m:
            continue
        hasher = hashlib.sha256()
        size = 0
        with open(os.path.join(dest_dir, name), "rb") as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
                size += len(chunk)
        if hasher.hexdigest() != m.group(1):
            raise AssertionError(f"{dest_dir}/{name}: content has sha256 {hasher.hexdigest()}")
        (manifests if m.group(2) else blobs)["sha256:" + m.group(1)] = size
    return {
        "manifest_digest": "sha256:" + hashlib.sha256(manifest_bytes).hexdigest(),
        "manifest": json.loads(manifest_bytes),
        "blobs": blobs,
        "manifests": manifests,
    }
