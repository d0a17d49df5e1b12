"""The mirror under test: a real `mitmdump -s addon/registry_cache.py` process.

Readiness is taken from mitmdump's own log lines (no sleeps): the addon logs
where its blob server listens, mitmproxy logs each proxy listener.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .registryproc import free_port

ROOT = Path(__file__).resolve().parents[2]
MITMDUMP = Path(sys.executable).with_name("mitmdump")
SCRIPT = ROOT / "addon" / "registry_cache.py"
START_TIMEOUT = 60.0
START_ATTEMPTS = 3
# mitmproxy, when a proxy port is taken: "... failed to listen on 127.0.0.1:PORT with
# [Errno 98] error while attempting to bind on address (...): address already in use"
_LISTEN_FAILED = re.compile(r"failed to listen on [^ ]*:(\d+)\b")


class Mirror:
    """mitmdump with the addon, listening on 127.0.0.1 only (or on `listen_host`).

    `modes` are mitmproxy mode specs without the listen part, e.g.
    ["reverse:http://127.0.0.1:5000"] or ["regular"]; each gets its own port
    (see `ports`). `url` is the first listener's http://HOST:PORT.

    `listen_host` is the one address every listener binds: a test's office
    (tests/harness/netns.py) reaches the mirror at its `host_address`. The
    addon's blob server follows the proxy's listen address, and its 307s name
    the address the client connected to, so office clients reach it too.
    """

    def __init__(self, workdir: Path, modes: list[str], cache_dir: Path | None = None,
                 options: dict[str, str] | None = None, scripts: list[Path] = (),
                 listen_host: str = "127.0.0.1", env: dict[str, str] | None = None):
        self.listen_host = listen_host
        self.env = dict(env or {})  # added to mitmdump's environment (e.g. AWS credentials)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.modes = modes
        self.cache_dir = Path(cache_dir or self.workdir / "cache")
        self.options = dict(options or {})
        self.scripts = list(scripts)
        self.ports = [free_port() for _ in modes]
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.blob_port: int | None = None
        self._output_done = True
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    @property
    def host_port(self) -> str:
        return f"{self.listen_host}:{self.ports[0]}"

    def url_of(self, index: int) -> str:
        return f"http://{self.listen_host}:{self.ports[index]}"

    @property
    def ca_cert(self) -> Path:
        """mitmproxy's CA, which clients of the explicit-proxy mode must trust."""
        return self.workdir / "mitmproxy-conf" / "mitmproxy-ca-cert.pem"

    def command(self) -> list[str]:
        cmd = [str(MITMDUMP), "-s", str(SCRIPT)]
        for script in self.scripts:
            cmd += ["-s", str(script)]
        for mode, port in zip(self.modes, self.ports):
            cmd += ["--mode", f"{mode}@{self.listen_host}:{port}"]
        options = {
            "cache_dir": str(self.cache_dir),
            "confdir": str(self.workdir / "mitmproxy-conf"),
            **self.options,
        }
        for key, value in options.items():
            cmd += ["--set", f"{key}={value}"]
        return cmd

    def start(self) -> "Mirror":
        """Start mitmdump and wait (bounded) until every listener is up. A
        proxy port taken by another process meanwhile is retried with fresh
        ports; on any failure the process is killed and reaped, then the
        error is raised (a context manager's __exit__ never runs then)."""
        for attempt in range(START_ATTEMPTS):
            if attempt:
                self.ports = [free_port() for _ in self.modes]
            try:
                return self._start_once()
            except BaseException:
                self._kill_and_reap()
                if attempt + 1 < START_ATTEMPTS and self._port_was_taken():
                    continue
                raise
        raise AssertionError("unreachable")

    def _start_once(self) -> "Mirror":
        with self._cond:
            self.lines.clear()
            self.blob_port = None
            self._output_done = False
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=env, cwd=self.workdir, start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_output, args=(self.proc,), daemon=True)
        self._reader.start()
        match = self.wait_for_log(r"blob server on [^ ]+:(\d+)", START_TIMEOUT)
        self.blob_port = int(match.group(1))
        for port in self.ports:
            self.wait_for_log(rf"listening at [^ ]*:{port}\b", START_TIMEOUT)
        return self

    def _port_was_taken(self) -> bool:
        """Did mitmproxy fail to bind one of our proxy ports (EADDRINUSE)?"""
        ours = {str(port) for port in self.ports}
        with self._cond:
            lines = list(self.lines)
        for line in lines:
            m = _LISTEN_FAILED.search(line)
            if m and m.group(1) in ours and "address already in use" in line.lower():
                return True
        return False

    def _kill_and_reap(self) -> None:
        """SIGKILL mitmdump's process group (if it still runs), reap it, and
        let the output reader finish so a retry starts with a clean log."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)
        if self._reader is not None:
            self._reader.join(20)

    def _read_output(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._output_done = True
            self._cond.notify_all()

    def wait_for_log(self, pattern: str, timeout: float = 30.0, start: int = 0, count: int = 1) -> re.Match:
        """Wait (bounded) for `count` log lines matching pattern, from line
        `start` on; returns the last of them."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for line in self.lines[start:] if (m := regex.search(line))]
                if len(found) >= count:
                    return found[count - 1]
                if self._output_done:
                    raise RuntimeError(f"mitmdump exited; log:\n{self.log_text()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no log line matching {pattern!r} in {timeout}s; log:\n{self.log_text()}")
                self._cond.wait(min(remaining, 0.5))

    def wait_stored(self, digests, timeout: float = 30.0) -> None:
        """Wait (bounded) until the fill of every digest has committed and
        cleaned up; clients get their last byte before that happens."""
        for digest in digests:
            self.wait_for_log(rf"fill: stored {digest}", timeout)

    def wait_for_output_end(self, timeout: float = 30.0) -> None:
        """Wait (bounded) until mitmdump's output is read to its end (after it exited)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._output_done, timeout):
                raise TimeoutError(f"mitmdump's output did not end in {timeout}s")

    def log_text(self) -> str:
        return "\n".join(self.lines[-200:])

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks run, as when a machine loses power mid-fill."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(20)

    def __enter__(self) -> "Mirror":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
