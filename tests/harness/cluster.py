"""Several mirror nodes on this machine: real mitmdump processes on their own
ports, each with its own store (or sharing one), one cluster secret, the
members listed statically (127.0.0.1:<blob port> each), and optionally one
SeaweedFS bucket as their shared tier."""

from __future__ import annotations

import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .mirror import Mirror
from .registryproc import free_port
from .v2client import PULL_ERRORS, RegistryClient

PULL_WAIT = 60  # seconds each pull of pull_everywhere may take


class Cluster:
    def __init__(self, workdir: Path, upstream, nodes: int = 3, seaweedfs=None, prefix: str = "",
                 cache_dir: Path | None = None, options: dict[str, str] | None = None,
                 mirror_class=Mirror, s3_endpoint: str | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.secret_file = self.workdir / "cluster-secret"
        self.secret_file.write_text(secrets.token_urlsafe(32) + "\n")
        self.secret_file.chmod(0o600)
        self.upstream = upstream
        self.seaweedfs = seaweedfs
        self.prefix = prefix
        self.cache_dir = cache_dir  # one store for all (processes sharing a directory), else one each
        self.options = dict(options or {})
        self.mirror_class = mirror_class  # (the benchmark's runs a pinned copy of the addon)
        self.s3_endpoint = s3_endpoint  # default: the store's front door (faults apply there)
        self.blob_ports = [free_port() for _ in range(nodes)]
        self.made = 0  # nodes made (a replaced node gets a new, empty directory)
        self.nodes = [self.make_node(i) for i in range(nodes)]

    @property
    def members(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.blob_ports)

    def make_node(self, index: int, members: str | None = None, **options) -> Mirror:
        """Node `index` (not started); `members` overrides the member list."""
        settings = {"blob_port": str(self.blob_ports[index]), "cluster_members": members or self.members,
                    "cluster_secret_file": str(self.secret_file), **self.options, **options}
        env = {}
        if self.seaweedfs is not None:
            settings.update({"s3_bucket": self.seaweedfs.bucket,
                             "s3_endpoint": self.s3_endpoint or self.seaweedfs.endpoint,
                             "s3_prefix": self.prefix, "s3_timeout": "1", "s3_retry_after": "2"})
            env = self.seaweedfs.client_env()
        self.made += 1
        return self.mirror_class(self.workdir / f"node{index}-{self.made}", [f"reverse:{self.upstream.url}"],
                                 cache_dir=self.cache_dir, options=settings, env=env)

    def start(self) -> "Cluster":
        try:
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(lambda node: node.start(), self.nodes))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        return "\n\n".join(f"--- node {i}\n{node.log_text()}" for i, node in enumerate(self.nodes))


def pull_everywhere(urls, image) -> list:
    """One pull per url (a url may repeat), all at once; their results, each
    verified against the image's layers. Any failure fails the caller."""
    results, errors = [], []

    def pull(url):
        try:
            result = RegistryClient(url).pull(image.repo, image.tag)
            assert result.layers == image.layers, f"{url}: other layers than the image's"
            results.append(result)
        except PULL_ERRORS + (AssertionError,) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pull, args=(url,)) for url in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PULL_WAIT)
    assert not any(t.is_alive() for t in threads), f"a pull took more than {PULL_WAIT} s"
    assert not errors, errors
    assert len(results) == len(urls)
    return results
