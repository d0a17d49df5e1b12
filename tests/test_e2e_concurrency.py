"""End to end: one upstream fetch per blob, however many clients, and what
happens to the waiting clients when the first one leaves or the fetch fails.

See tests/harness/downloads.py for how "while the fetch is running" is made a state.
"""

from __future__ import annotations

import threading

import requests

from tests.harness.downloads import Downloader, assert_one_fetch_streamed_to_all, stalled_downloaders, upstream_fetches
from tests.harness.fresh import fresh_image
from tests.harness.mirror import Mirror
from tests.harness.v2client import PULL_ERRORS, RegistryClient

WAIT = 60
CLIENTS = 4


def image_with_one_layer(upstream, size=6_000_000):
    image = fresh_image(upstream, size)
    return image, image.layers[0]


def token_holding_client(url, image, proxies=None) -> RegistryClient:
    """A client of url (a mirror, or a registry reached through a proxy)."""
    client = RegistryClient(url, proxies=proxies)
    client.get_manifest(image.repo, image.tag)  # token in hand: no 401 round trip on blobs
    return client


def clients_of(url, image, proxies=None) -> list[RegistryClient]:
    return [token_holding_client(url, image, proxies) for _ in range(CLIENTS)]


def test_concurrent_misses_make_one_upstream_fetch_and_all_stream_during_it(any_upstream, mirror):
    image, (digest, size) = image_with_one_layer(any_upstream)
    downloaders = stalled_downloaders(any_upstream, clients_of(mirror.url, image), image.repo, digest, size)
    assert_one_fetch_streamed_to_all(any_upstream, downloaders, digest, size)


def test_concurrent_misses_from_a_registry_a_proxy_client_names_make_one_fetch(tmp_path, upstream, second):
    """Regular mode, a registry not on `registries`: its clients share one
    fetch too (each asks that registry whether it may have the bytes)."""
    image, (digest, size) = image_with_one_layer(second)
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}", "regular"]) as mirror:
        proxy = {"http": mirror.url_of(1)}
        downloaders = stalled_downloaders(second, clients_of(second.url, image, proxy), image.repo, digest, size)
        assert_one_fetch_streamed_to_all(second, downloaders, digest, size)


def test_the_fill_survives_the_client_that_started_it(upstream, mirror):
    image, (digest, size) = image_with_one_layer(upstream)
    expected = open(upstream.blob_path(digest), "rb").read()
    upstream.set_fault(digest, "stall")
    first = Downloader(token_holding_client(mirror.url, image), image.repo, digest, size, stop_after=1000)
    first.start()
    upstream.wait_stalled(1, WAIT, digest=digest)
    first.join(WAIT)  # the initiator has hung up
    assert first.error is None and len(first.data) == 1000
    second = Downloader(token_holding_client(mirror.url, image), image.repo, digest, size)
    second.start()
    assert second.started.wait(WAIT)
    upstream.release_stalls()
    second.join(WAIT)
    assert second.error is None and second.data == expected
    mirror.wait_for_log(rf"fill: stored {digest}", WAIT)
    upstream.reset_counters()
    assert RegistryClient(mirror.url).get_blob(image.repo, digest, expected_size=size) == size
    assert upstream.counters.blob_bytes == 0


def test_a_failed_fill_errors_its_waiters_and_the_next_request_fetches_again(upstream, mirror):
    image, (digest, size) = image_with_one_layer(upstream)
    downloaders = stalled_downloaders(upstream, clients_of(mirror.url, image), image.repo, digest, size)
    for d in downloaders:
        assert d.started.wait(WAIT)
    upstream.set_down(True)  # the upstream dies mid-body
    for d in downloaders:
        d.join(WAIT)
        assert not d.is_alive()
        # A clean error: the transfer is cut, never a complete (or padded) body.
        assert d.error is not None or len(d.data) < size
    mirror.wait_for_log(rf"fill: {digest} failed", WAIT)
    upstream.set_down(False)
    upstream.clear_faults()
    upstream.reset_counters()
    client = token_holding_client(mirror.url, image)
    assert client.get_blob(image.repo, digest, expected_size=size) == size
    assert len(upstream_fetches(upstream, digest)) == 1


def test_many_clients_pull_a_cold_image_with_one_upstream_copy(any_upstream, mirror):
    image = fresh_image(any_upstream, 3_000_000, 1_000_000)
    results, errors = [], []

    def pull():
        try:
            results.append(RegistryClient(mirror.url).pull(image.repo, image.tag))
        except PULL_ERRORS + (requests.RequestException, AssertionError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not errors and len(results) == 8
    assert all(r.layers == image.layers for r in results)
    for blob_digest, blob_size in image.blobs:
        assert len(upstream_fetches(any_upstream, blob_digest)) == 1
    assert any_upstream.counters.blob_bytes == image.blob_bytes
