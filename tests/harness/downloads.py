"""Concurrent blob downloads for the coalescing tests: clients that start
while one upstream transfer is parked half-way (the upstream's "stall"
fault), so "while the fetch is running" is a state, not a timing guess."""

from __future__ import annotations

import threading

from tests.harness.v2client import RegistryClient

WAIT = 60


def assert_no_complete_body(client: RegistryClient, repo: str, digest: str, size: int) -> None:
    """GET a blob whose upstream bytes are bad: the client never gets a
    complete, successful body (a cut connection is one correct outcome)."""
    response = client.request("GET", f"/v2/{repo}/blobs/{digest}", stream=True)
    received = b""
    try:
        received = response.raw.read(size + 1, decode_content=False)
    except Exception:  # noqa: BLE001 - the connection cut before the end
        pass
    assert response.status_code != 200 or len(received) < size


def upstream_fetches(upstream, digest) -> list:
    """Successful upstream GETs of digest's bytes (front door or CDN; a 206
    too: a fill asks for the first chunk of a blob, all of a small one)."""
    hexdigest = digest.split(":", 1)[1]
    return [r for r in upstream.counters.requests
            if r.method == "GET" and hexdigest in r.path and r.status in (200, 206)]


class Downloader(threading.Thread):
    """Downloads a blob through the mirror; `started` is set once bytes arrive."""

    def __init__(self, client: RegistryClient, repo: str, digest: str, size: int, stop_after: int | None = None):
        super().__init__(daemon=True)
        self.client, self.repo, self.digest, self.size = client, repo, digest, size
        self.stop_after = stop_after  # hang up after this many bytes
        self.started = threading.Event()
        self.data = b""
        self.error: Exception | None = None

    def run(self):
        try:
            response = self.client.request("GET", f"/v2/{self.repo}/blobs/{self.digest}", stream=True)
            with response:
                assert response.status_code == 200, response.status_code
                first = response.raw.read(1000)
                self.data = first
                self.started.set()
                if self.stop_after is not None:
                    return  # closing the response drops the connection
                while chunk := response.raw.read(1 << 20):
                    self.data += chunk
        except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
            self.error = exc
        finally:
            self.started.set()


def stalled_downloaders(upstream, clients: list[RegistryClient], repo: str, digest: str, size: int) -> list:
    """One downloader per client of one missing blob, started; returns once
    the single upstream transfer is parked half-way."""
    upstream.set_fault(digest, "stall")
    downloaders = [Downloader(client, repo, digest, size) for client in clients]
    for d in downloaders:
        d.start()
    upstream.wait_stalled(1, WAIT, digest=digest)
    return downloaders


def assert_one_fetch_streamed_to_all(upstream, downloaders, digest, size) -> None:
    """Every client has bytes while the single upstream transfer is parked
    half-way, then all of them; one upstream fetch in all."""
    expected = open(upstream.blob_path(digest), "rb").read()
    for d in downloaders:
        assert d.started.wait(WAIT)
        assert d.error is None and 1000 <= len(d.data) <= size // 2
    assert len(upstream_fetches(upstream, digest)) == 1
    upstream.release_stalls()
    for d in downloaders:
        d.join(WAIT)
        assert d.error is None and d.data == expected
    assert len(upstream_fetches(upstream, digest)) == 1
    assert upstream.counters.blob_bytes_for(digest) == size
