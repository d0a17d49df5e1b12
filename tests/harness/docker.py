"""Run a REAL Docker daemon (Debian 12's docker.io, dockerd 20.10) and pull with its CLI.

Everything the daemon owns lives in one private directory (a short one under
/tmp, as its unix sockets need): data root (``vfs`` storage driver, no special
filesystem or mounts), exec root (the containerd dockerd starts for itself
lives there too), its API socket, pid file, key file and log. Its network
settings touch nothing of the host's: ``iptables: false``, ``ip-forward:
false``, ``bridge: none``. The CLI gets a private ``DOCKER_CONFIG``, so
credentials a test stores stay in that directory. (What dockerd 20.10 still
makes outside it: the empty directory /run/docker/plugins.)

Docker uses ``registry-mirrors`` only for Docker Hub images (``docker.io/...``):
tests name the harness upstream's repositories as Docker Hub images
(``library/alpine``), and the mirror, in reverse mode in front of the
harness upstream, answers for "docker.io". If the mirror fails, Docker falls
back to registry-1.docker.io: dockerd runs in a mount namespace of its own
whose /etc/hosts sends Docker Hub's names to 127.0.0.1, so that fallback is
refused at once and goes nowhere; :class:`DockerError` shows what dockerd
logged about the mirror, since the CLI reports only the last endpoint's error.

``netns=`` (an :class:`tests.harness.netns.Office`) starts dockerd inside that
network namespace; the CLI still talks to it over the unix socket.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .containerd import _remove_tree, _short_tmp_dir
from .lifecycle import Service
from .registryproc import stop_process

DOCKERD = "dockerd"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
PULL_TIMEOUT = 120.0
# Docker Hub's names, pinned to 127.0.0.1 for dockerd: a failed mirror's
# fallback is refused on this machine instead of leaving it.
DOCKER_HUB_HOSTS = ("registry-1.docker.io", "index.docker.io", "auth.docker.io", "registry.docker.io",
                    "docker.io", "production.cloudflare.docker.com")
# The key `docker login` (no server) stores Docker Hub credentials under, and
# the one a pull of a docker.io image (through a mirror or not) sends.
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_HOSTS_WRAPPER = 'mount --bind "$0" /etc/hosts && exec "$@"'


class DockerError(RuntimeError):
    def __init__(self, message: str, proc: subprocess.CompletedProcess | None = None):
        super().__init__(message)
        self.proc = proc
        self.stderr = proc.stderr if proc is not None else ""


def docker_cli() -> str | None:
    """The docker CLI of the same package as dockerd (/usr/bin/docker beside
    /usr/sbin/dockerd), else the first on PATH."""
    dockerd = shutil.which(DOCKERD)
    if dockerd:
        for candidate in (Path(dockerd).with_name("docker"), Path("/usr/bin/docker")):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    return shutil.which("docker")


def available() -> str | None:
    """Why Docker tests cannot run here (None: they can)."""
    if shutil.which(DOCKERD) is None or docker_cli() is None:
        return "dockerd not installed (apt-get install docker.io)"
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (util-linux, mount)"
    if os.geteuid() != 0:
        return "dockerd needs root"
    return None


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class Docker(Service):
    """A private dockerd. Context manager, or start()/stop().

    ``mirrors``: its ``registry-mirrors`` (e.g. ``[mirror.url]``); plain-HTTP
    ones are also listed in ``insecure-registries``. ``netns``: an Office to
    run the daemon in. ``startup_seconds`` is how long start() waited for the
    API to answer.
    """

    def __init__(self, *, mirrors: list[str] = (), netns=None, debug: bool = True,
                 start_timeout: float = START_TIMEOUT, stop_timeout: float = STOP_TIMEOUT,
                 extra_config: dict | None = None):
        self.mirrors = list(mirrors)
        self.netns = netns
        self.debug = debug
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.extra_config = dict(extra_config or {})
        self.dir: Path | None = None
        self.socket: str | None = None
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self._log_file = None

    # ------------------------------------------------------------------ lifecycle
    def _start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="dkr-", dir=_short_tmp_dir()))
        self.socket = str(self.dir / "docker.sock")
        (self.dir / "client").mkdir()
        (self.dir / "client" / "config.json").write_text(json.dumps({"auths": {}}))
        hosts = self.dir / "hosts"
        hosts.write_text("127.0.0.1 localhost\n::1 localhost\n"
                         + "".join(f"127.0.0.1 {name}\n" for name in DOCKER_HUB_HOSTS))
        config = {
            "registry-mirrors": self.mirrors,
            "insecure-registries": [m.split("://", 1)[1].rstrip("/") for m in self.mirrors
                                    if m.startswith("http://")],
            "storage-driver": "vfs",
            "iptables": False,
            "ip-forward": False,
            "bridge": "none",
            "debug": self.debug,
            # dockerd 20.10 writes its identity key to /etc/docker/key.json unless told otherwise.
            "deprecated-key-path": str(self.dir / "key.json"),
            **self.extra_config,
        }
        (self.dir / "daemon.json").write_text(json.dumps(config, indent=1))
        cmd = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _HOSTS_WRAPPER,
               str(hosts), DOCKERD, "--config-file", str(self.dir / "daemon.json"),
               "--data-root", str(self.dir / "root"), "--exec-root", str(self.dir / "exec"),
               "-H", f"unix://{self.socket}", "--pidfile", str(self.dir / "dockerd.pid")]
        if self.netns is not None:
            cmd = self.netns.command(cmd, keep_mounts=True)  # dockerd needs the host's cgroup mounts
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        self._log_file = open(self.dir / "dockerd.log", "ab")
        started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, env=env, cwd=self.dir,
                                     start_new_session=True)
        self._wait_ready()
        self.startup_seconds = time.monotonic() - started

    def _ping(self) -> bool:
        conn = _UnixHTTPConnection(self.socket, timeout=5)
        try:
            conn.request("GET", "/_ping")
            resp = conn.getresponse()
            return resp.status == 200 and resp.read() == b"OK"
        except OSError:
            return False
        finally:
            conn.close()

    def _wait_ready(self) -> None:
        """Poll the API's /_ping until it answers OK, bounded."""
        deadline = time.monotonic() + self.start_timeout
        pause = threading.Event()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DockerError(f"dockerd exited ({self.proc.returncode}); log:\n{self.logs()}")
            if os.path.exists(self.socket) and self._ping():
                return
            pause.wait(0.05)
        raise DockerError(f"dockerd not ready in {self.start_timeout}s; log:\n{self.logs()}")

    def stop(self) -> None:
        """SIGTERM, SIGKILL after ``stop_timeout``; the containerd it started is
        stopped with it (killed if it outlives it); then its directory is removed."""
        proc, self.proc = self.proc, None
        stop_process(proc, self.stop_timeout, group=True)
        if self.dir is not None:
            self._kill_own_containerd()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.dir is not None:
            _remove_tree(self.dir)
            self.dir = None

    def _kill_own_containerd(self) -> None:
        """dockerd stops the containerd it started when it stops; if it was
        killed instead, that containerd (whose config is in our dir) is ours to kill."""
        pid_file = self.dir / "exec" / "containerd" / "containerd.pid"
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if str(self.dir).encode() in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def logs(self, start: int = 0) -> str:
        """dockerd's log from byte offset ``start`` (the last 30000 characters)."""
        if self.dir is None or not (self.dir / "dockerd.log").exists():
            return ""
        with open(self.dir / "dockerd.log", "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace")[-30000:]

    def log_size(self) -> int:
        try:
            return (self.dir / "dockerd.log").stat().st_size
        except (OSError, TypeError):
            return 0

    # ------------------------------------------------------------------ CLI
    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update({"DOCKER_HOST": f"unix://{self.socket}", "DOCKER_CONFIG": str(self.dir / "client"),
                    "HOME": str(self.dir / "client")})
        for name in ("DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH"):
            env.pop(name, None)
        return env

    def docker(self, args: list[str], *, timeout: float = 60, check: bool = True,
               input: str | None = None) -> subprocess.CompletedProcess:
        cmd = [docker_cli(), *args]
        proc = subprocess.run(cmd, input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, env=self.env())
        if check and proc.returncode != 0:
            raise DockerError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}", proc)
        return proc

    def pull(self, ref: str, *, timeout: float = PULL_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
        """``docker pull REF``. On failure the error carries what dockerd logged
        during the pull about its endpoints (the mirror's error is there, the
        CLI shows only the fallback's)."""
        start = self.log_size()
        proc = self.docker(["pull", ref], timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise DockerError(f"docker pull {ref} failed ({proc.returncode}):\n{proc.stderr}\n"
                              f"dockerd on its endpoints:\n{self.endpoint_log(start)}", proc)
        return proc

    def endpoint_log(self, start: int = 0) -> str:
        """dockerd's log lines (from ``start``) about registry endpoints and errors."""
        wanted = re.compile(r"endpoint|mirror|Trying to pull|error|level=warn", re.I)
        return "\n".join(line for line in self.logs(start).splitlines() if wanted.search(line))

    def login(self, server: str, user: str, password: str, *, check: bool = True) -> subprocess.CompletedProcess:
        """``docker login SERVER -u USER --password-stdin``: dockerd checks the
        credentials with SERVER's registry, then the CLI stores them."""
        return self.docker(["login", server, "-u", user, "--password-stdin"], input=password,
                           check=check)

    def store_credentials(self, user: str, password: str, key: str = DOCKER_HUB_AUTH_KEY) -> None:
        """Write credentials into the CLI's config.json as ``docker login``
        stores them (default: Docker Hub's key, which docker.io pulls send
        whether they go through a mirror or not)."""
        path = self.dir / "client" / "config.json"
        config = json.loads(path.read_text())
        config.setdefault("auths", {})[key] = {
            "auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        path.write_text(json.dumps(config))
        path.chmod(0o600)

    def forget_credentials(self, key: str = DOCKER_HUB_AUTH_KEY) -> None:
        """Remove stored credentials, as ``docker logout`` would."""
        path = self.dir / "client" / "config.json"
        config = json.loads(path.read_text())
        config.get("auths", {}).pop(key, None)
        path.write_text(json.dumps(config))

    def stored_credentials(self) -> dict:
        return json.loads((self.dir / "client" / "config.json").read_text()).get("auths", {})

    def inspect(self, ref: str) -> dict:
        return json.loads(self.docker(["image", "inspect", ref]).stdout)[0]

    def repo_digests(self, ref: str) -> list[str]:
        """The image's ``RepoDigests`` (``name@sha256:<manifest digest>``)."""
        return self.inspect(ref).get("RepoDigests") or []

    def image_id(self, ref: str) -> str:
        """The image id: its config's digest."""
        return self.inspect(ref)["Id"]

    def has_image(self, ref: str) -> bool:
        return self.docker(["image", "inspect", ref], check=False).returncode == 0

    def remove(self, ref: str) -> None:
        """``docker rmi REF``: its layers go too, so the next pull fetches every blob."""
        self.docker(["rmi", ref])
