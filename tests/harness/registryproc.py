"""Running Debian's docker-registry (CNCF distribution) for the harness: the
upstream registry (upstream.py) and the pull-through peer (peer.py) alike."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable


class RegistryWorkdir:
    """Where a docker-registry keeps its config, storage root (`rootdir`) and
    log: a new temp dir that close() removes unless `keep`, or the caller's
    `given` directory, always kept."""

    def __init__(self, given: str | None, keep: bool, prefix: str):
        self.path = given or tempfile.mkdtemp(prefix=prefix)
        self._remove = not given and not keep
        self.rootdir = os.path.join(self.path, "storage")
        os.makedirs(self.rootdir, exist_ok=True)
        self.config_path = os.path.join(self.path, "config.yml")
        self.log_path = os.path.join(self.path, "registry.log")
        self.log_file = open(self.log_path, "ab")

    def log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def close(self) -> None:
        self.log_file.close()
        if self._remove:
            shutil.rmtree(self.path, ignore_errors=True)


def registry_config(port: int, rootdir: str, log_level: str) -> str:
    """The config both registries share, up to and including the http section
    (callers append their own lines: http options first, then auth or proxy)."""
    q = json.dumps  # a JSON string is a valid YAML double-quoted scalar
    return f"""\
version: 0.1
log:
  level: {log_level}
  formatter: text
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {q(rootdir)}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: {q(secrets.token_hex(16))}
"""


def free_port() -> int:
    """A loopback port free right now (it can be taken before it is used: retry)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_registry(binary: str, config_path: str, config_for_port: Callable[[int], str], *,
                   log_file, log_text: Callable[[], str], env: dict, cwd: str,
                   ready_status: int, timeout: float,
                   ssl_context: ssl.SSLContext | None = None) -> tuple[subprocess.Popen, int]:
    """Start `binary serve config_path` on a free port; (process, port) once
    GET /v2/ answers ready_status. A port taken meanwhile is retried."""
    for _attempt in range(3):
        port = free_port()
        with open(config_path, "w") as f:
            f.write(config_for_port(port))
        proc = subprocess.Popen([binary, "serve", config_path], stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        if wait_ready(proc, port, ready_status, timeout, ssl_context):
            return proc, port
        stop_process(proc)
        if "address already in use" not in log_text():
            break
    raise RuntimeError(f"{binary} did not start; log:\n{log_text()}")


def wait_ready(proc: subprocess.Popen, port: int, status: int, timeout: float,
               ssl_context: ssl.SSLContext | None = None) -> bool:
    """Poll GET /v2/ until it answers `status`, bounded by timeout."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        conn = (http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=ssl_context) if ssl_context
                else http.client.HTTPConnection("127.0.0.1", port, timeout=2))
        try:
            conn.request("GET", "/v2/")
            if conn.getresponse().status == status:
                return True
        except OSError:
            pass
        finally:
            conn.close()
        pause.wait(0.02)
    return False


def stop_process(proc: subprocess.Popen | None, timeout: float = 5.0, group: bool = False) -> None:
    """SIGTERM, then SIGKILL (to its whole process group with `group`) after a bound."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)
