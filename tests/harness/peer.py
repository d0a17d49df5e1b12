"""The peer the mirror is compared with: CNCF distribution's own pull-through cache.

:class:`DistributionProxy` runs a second ``docker-registry`` (Debian's
distribution 2.8) in proxy mode in front of an upstream (normally the
harness's :class:`~tests.harness.upstream.Upstream`), with its own storage
directory, listening on 127.0.0.1 only. It logs in to the upstream with
``username``/``password`` (the upstream's token auth) and asks nothing of its
own clients: like a pull-through cache configured with credentials, it serves
whatever it has fetched to anyone.

What it does that matters when counting upstream traffic (see
../shared/notes/registry-protocol.md): a cold blob is fetched from the upstream
twice, and the second fetch (the one that fills its store) may still be running
after the client has its bytes. :func:`wait_upstream_quiet` waits for that.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

from .lifecycle import Service
from .registryproc import RegistryWorkdir, registry_config, start_registry, stop_process

class DistributionProxy(Service):
    """``docker-registry serve`` with ``proxy: remoteurl: <remote_url>``.

    Use as a context manager or call :meth:`start`/:meth:`stop`. ``url`` is
    ``http://127.0.0.1:PORT``. The storage directory (``rootdir``) lives in
    ``workdir`` (a temp dir unless given), removed at stop unless
    ``keep_workdir`` or a ``workdir`` was given; with ``rootdir``, that one
    (several instances on one shared storage, as distribution is scaled out).
    """

    def __init__(self, remote_url: str, *, username: str | None = None, password: str | None = None,
                 registry_binary: str = "docker-registry", workdir: str | None = None,
                 keep_workdir: bool = False, log_level: str = "warn", start_timeout: float = 15.0,
                 rootdir: str | None = None):
        self.remote_url = remote_url.rstrip("/")
        self.username = username
        self.password = password
        self.registry_binary = registry_binary
        self.log_level = log_level
        self.start_timeout = start_timeout
        self._workdir_arg = workdir
        self._rootdir_arg = rootdir  # a storage root shared with other instances (instead of its own)
        self._keep_workdir = keep_workdir
        self.workdir: str | None = None
        self.rootdir: str | None = None
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._files: RegistryWorkdir | None = None

    # ------------------------------------------------------------------ lifecycle

    def config(self, port: int) -> str:
        q = json.dumps  # a JSON string is a valid YAML double-quoted scalar
        proxy = f"proxy:\n  remoteurl: {q(self.remote_url)}\n"
        if self.username is not None:
            proxy += f"  username: {q(self.username)}\n  password: {q(self.password or '')}\n"
        return registry_config(port, self.rootdir, self.log_level) + proxy

    def _start(self) -> None:
        self._files = RegistryWorkdir(self._workdir_arg, self._keep_workdir, "peer-")
        self.workdir, self.rootdir = self._files.path, self._rootdir_arg or self._files.rootdir
        # No REGISTRY_* overrides from the environment, no proxies for its upstream fetches.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("REGISTRY_") and not k.lower().endswith("_proxy")}
        self.proc, self.port = start_registry(
            self.registry_binary, self._files.config_path, self.config,
            log_file=self._files.log_file, log_text=self.logs, env=env, cwd=self.workdir,
            ready_status=200,  # a proxy has no auth of its own
            timeout=self.start_timeout,
        )

    def _stop_process(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc)

    def stop(self) -> None:
        self._stop_process()
        files, self._files = self._files, None
        if files is not None:
            files.close()

    # ------------------------------------------------------------------ addresses
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def logs(self) -> str:
        return self._files.log_text() if self._files is not None else ""

    def stored_blob_bytes(self) -> int:
        """Bytes of blob data in its store (what it has committed)."""
        total = 0
        blobs = os.path.join(self.rootdir or "", "docker", "registry", "v2", "blobs")
        for dirpath, _dirs, files in os.walk(blobs):
            if "data" in files:
                total += os.path.getsize(os.path.join(dirpath, "data"))
        return total


def wait_upstream_quiet(upstream, quiet: float = 1.5, timeout: float = 120.0) -> int:
    """Wait until the upstream has sent no blob bytes for ``quiet`` seconds; return its blob_bytes.

    For caches that keep fetching after their clients are served (distribution's
    second, store-filling fetch). Raises TimeoutError if traffic never settles.
    """
    deadline = time.monotonic() + timeout
    last = upstream.counters.blob_bytes
    since = time.monotonic()
    pause = threading.Event()
    while True:
        pause.wait(0.1)
        now = time.monotonic()
        current = upstream.counters.blob_bytes
        if current != last:
            last, since = current, now
        elif now - since >= quiet:
            return current
        if now > deadline:
            raise TimeoutError(f"upstream blob traffic did not settle in {timeout}s ({current} bytes so far)")
