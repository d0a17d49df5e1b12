"""A registry that speaks HTTP/2: distribution serving TLS itself.

The harness's Upstream puts a Python front door (HTTP/1.1 only) before
distribution, for token auth and counting. Go's server negotiates HTTP/2 over
TLS, so this one, with no auth and no front door, is the HTTP/2 registry the
tests need. It counts nothing; what an upload has delivered so far is read off
its upload files (`upload_bytes`).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess

from .certs import make_tls_files
from .lifecycle import Service
from .registryproc import RegistryWorkdir, registry_config, start_registry, stop_process


class TlsRegistry(Service):
    def __init__(self, start_timeout: float = 15.0):
        self.start_timeout = start_timeout
        self.ca_cert_path: str | None = None
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._files: RegistryWorkdir | None = None

    def _start(self) -> None:
        self._files = RegistryWorkdir(None, False, "tls-registry-")
        tls = make_tls_files(os.path.join(self._files.path, "tls"))
        self.ca_cert_path = tls.ca_cert_path
        q = json.dumps  # a JSON string is a valid YAML double-quoted scalar

        def config(port: int) -> str:
            return registry_config(port, self._files.rootdir, "warn") + (
                f"  tls:\n    certificate: {q(tls.cert_path)}\n    key: {q(tls.key_path)}\n")

        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self._proc, self.port = start_registry(
            "docker-registry", self._files.config_path, config, log_file=self._files.log_file,
            log_text=self._files.log_text, env=env, cwd=self._files.path, ready_status=200,
            timeout=self.start_timeout, ssl_context=tls.client_context())

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)
        if self._files is not None:
            self._files.close()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def upload_bytes(self, repo: str) -> int:
        """Bytes distribution has written for the uploads in progress to `repo`."""
        pattern = os.path.join(self._files.rootdir, "docker/registry/v2/repositories", repo, "_uploads/*/data")
        total = 0
        for path in glob.glob(pattern):
            try:
                total += os.path.getsize(path)
            except FileNotFoundError:  # the upload just finished
                pass
        return total
