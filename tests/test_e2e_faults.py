"""End to end: faults lose nothing. Bad upstream bodies, a full disk, a blob
corrupted on disk after it was stored."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading

import pytest
import requests

from addon.store import DiskBlobStore
from addon.workers import PER_REGISTRY
from tests.harness.fresh import fresh_image
from tests.harness.mirror import Mirror
from tests.harness.tarpit import Tarpit, wait_accepted_total
from tests.harness.v2client import PULL_ERRORS, RegistryClient

WAIT = 60


def successful_fetches(upstream, digest) -> int:
    hexdigest = digest.split(":", 1)[1]
    return sum(1 for r in upstream.counters.requests
               if r.method == "GET" and hexdigest in r.path and r.status in (200, 206))


def store_of(mirror: Mirror) -> DiskBlobStore:
    return DiskBlobStore(mirror.cache_dir, size_limit=1 << 40)


@pytest.mark.parametrize("fault", ["close", 500, 429, 503])
def test_upstream_errors_reach_the_client_cleanly_and_nothing_is_stored(upstream, mirror, fault):
    image = fresh_image(upstream, 1_000_000)
    digest, size = image.layers[0]
    upstream.set_fault(digest, fault)
    client = RegistryClient(mirror.url)
    client.get_manifest(image.repo, image.tag)
    response = client.request("GET", f"/v2/{image.repo}/blobs/{digest}")
    assert response.status_code == (fault if isinstance(fault, int) else 502)
    assert response.json()["errors"]
    if fault == 429:
        assert "Retry-After" in response.headers
    mirror.wait_for_log(rf"fill: {digest} failed", WAIT)
    upstream.clear_faults()
    assert client.get_blob(image.repo, digest, expected_size=size) == size  # the mirror kept serving
    mirror.wait_for_log(rf"fill: stored {digest}", WAIT)


def test_a_blob_corrupted_on_disk_is_dropped_and_fetched_again(upstream, mirror):
    image = fresh_image(upstream, 2_000_000)
    digest, size = image.layers[0]
    client = RegistryClient(mirror.url)
    client.pull(image.repo, image.tag)
    mirror.wait_for_log(rf"fill: stored {digest}", WAIT)
    store = store_of(mirror)
    try:
        blob = store.open(digest)
        with blob.file:
            path = os.readlink(f"/proc/self/fd/{blob.file.fileno()}")
    finally:
        store.close()
    with open(path, "r+b") as f:  # one flipped byte, as bit rot or a stray write would
        f.seek(size // 3)
        byte = f.read(1)
        f.seek(size // 3)
        f.write(bytes([byte[0] ^ 0x01]))
    upstream.reset_counters()
    assert client.get_blob(image.repo, digest, expected_size=size) == size  # good bytes only
    mirror.wait_for_log(rf"store: {digest} was modified on disk", WAIT)
    assert successful_fetches(upstream, digest) == 1  # fetched again...
    mirror.wait_for_log(rf"fill: stored {digest}", WAIT, start=_line_after(mirror, "was modified on disk"))
    upstream.reset_counters()
    assert client.get_blob(image.repo, digest, expected_size=size) == size  # ...and stored again
    assert upstream.counters.blob_bytes == 0


def _line_after(mirror: Mirror, text: str) -> int:
    for i, line in enumerate(mirror.lines):
        if text in line:
            return i
    raise AssertionError(f"no log line with {text!r}")


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB filesystem for the store (a tmpfs; mounting needs root, as CI has)."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mountpoint)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_full_disk_mid_fill_still_delivers_the_blob_and_keeps_the_store_consistent(
        upstream, tmp_path, small_disk):
    small = fresh_image(upstream, 6_000_000)
    big = fresh_image(upstream, 30_000_000)  # more than the whole disk
    after = fresh_image(upstream, 2_000_000)
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"], cache_dir=small_disk / "cache",
                options={"cache_size": "1g"}) as mirror:  # the disk fills long before the limit
        client = RegistryClient(mirror.url)
        client.pull(small.repo, small.tag)
        mirror.wait_for_log(rf"fill: stored {small.layers[0][0]}", WAIT)
        big_digest, big_size = big.layers[0]
        upstream.reset_counters()
        result = client.pull(big.repo, big.tag)  # verifies every byte
        assert result.layers == big.layers
        mirror.wait_for_log(r"did not store it: disk full", WAIT)
        assert upstream.counters.blob_bytes_for(big_digest) == big_size  # one copy
        # Consistent: no part file left, no entry for the blob that did not fit.
        assert os.listdir(small_disk / "cache" / "fills") == []
        store = store_of(mirror)
        try:
            assert store.open(big_digest) is None
        finally:
            store.close()
        # And it keeps working once space is back.
        assert client.pull(after.repo, after.tag).layers == after.layers
        mirror.wait_for_log(rf"fill: stored {after.layers[0][0]}", WAIT)
        upstream.reset_counters()
        client.pull(after.repo, after.tag)
        assert upstream.counters.blob_bytes == 0


def test_malformed_and_hostile_requests_never_reach_the_store(upstream, mirror):
    """Traversal and garbage get OCI errors; the mirror serves on afterwards."""
    image = fresh_image(upstream, 300_000)
    bad = [
        "/v2/../../../etc/passwd/blobs/sha256:" + "a" * 64,
        "/v2/library/alpine/blobs/sha256:" + "a" * 63 + "/../x",
        "/v2/library/alpine/blobs/..%2F..%2Fetc%2Fpasswd",
        "/v2/library/alpine/blobs/sha256%3A" + "a" * 64,
        "/v2/" + "a" * 3000 + "/blobs/sha256:" + "a" * 64,
        "/v2/library/alpine/manifests/" + "x" * 200,
    ]
    for path in bad:  # sent as is (requests would resolve the dot segments first)
        conn = http.client.HTTPConnection("127.0.0.1", mirror.ports[0], timeout=WAIT)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            status, body = response.status, response.read()
        finally:
            conn.close()
        assert status == 400 and json.loads(body)["errors"], (path, status, body[:200])  # the mirror's own
    r = requests.get(mirror.url + "/v2/library/alpine/blobs/sha256:" + "a" * 64,
                     headers={"X-Huge": "x" * 60_000}, timeout=WAIT)
    assert r.status_code == 431 and r.json()["errors"]
    assert upstream.counters.blob_bytes == 0
    pulled = RegistryClient(mirror.url).pull(image.repo, image.tag)
    assert pulled.layers == image.layers
    mirror.wait_stored(pulled.blobs, WAIT)
    store = store_of(mirror)
    try:  # the store holds the image's blobs and nothing else
        assert {entry.digest for entry in store.entries()} == set(pulled.blobs)
    finally:
        store.close()


def test_client_disconnect_mid_fill_loses_nothing(upstream, mirror):
    image = fresh_image(upstream, 5_000_000)
    digest, size = image.layers[0]
    upstream.set_fault(digest, "stall")
    client = RegistryClient(mirror.url)
    client.get_manifest(image.repo, image.tag)
    response = client.request("GET", f"/v2/{image.repo}/blobs/{digest}", stream=True)
    assert len(response.raw.read(1000)) == 1000
    upstream.wait_stalled(1, WAIT, digest=digest)
    response.close()  # the client hangs up mid-fill
    upstream.release_stalls()
    mirror.wait_for_log(rf"fill: stored {digest}", WAIT)
    upstream.reset_counters()
    assert RegistryClient(mirror.url).get_blob(image.repo, digest, expected_size=size) == size
    assert upstream.counters.blob_bytes == 0


def test_pull_errors_are_errors_not_hangs(upstream, mirror):
    """A blob the upstream does not have: a prompt 404, and the mirror goes on."""
    image = fresh_image(upstream, 100_000)
    client = RegistryClient(mirror.url)
    client.get_manifest(image.repo, image.tag)
    with pytest.raises(PULL_ERRORS) as info:
        client.get_blob(image.repo, "sha256:" + "e" * 64)
    assert getattr(info.value, "status", None) == 404
    assert client.pull(image.repo, image.tag).layers == image.layers


def test_hosts_that_never_answer_hold_up_no_one_else(tmp_path, upstream):
    """Manifest GETs hang at four hosts proxy clients name (tarpits): if each
    host had a share of its own, they would hold 4 x PER_REGISTRY threads
    (all there were, once). Stored blobs, a cold pull from the upstream and the metrics are
    served meanwhile: the hosts nobody chose share PER_REGISTRY threads."""
    stored = fresh_image(upstream, 1_500_000)
    cold = fresh_image(upstream, 500_000)
    layer, size = stored.layers[0]
    accepted = threading.Condition()
    tarpits = [Tarpit(accepted) for _ in range(4)]
    hung: list[threading.Thread] = []

    def release():  # the hung requests fail at once, and mitmdump can stop
        for tarpit in tarpits:
            tarpit.stop()
        for t in hung:
            t.join(3 * WAIT)

    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}", "regular"]) as mirror:
        try:
            for tarpit in tarpits:
                tarpit.__enter__()
            RegistryClient(mirror.url_of(0)).pull(stored.repo, stored.tag)
            mirror.wait_stored([layer], WAIT)
            proxy = {"http": mirror.url_of(1)}

            def hang(url):
                try:
                    requests.get(f"{url}/v2/x/y/manifests/latest", proxies=proxy, timeout=3 * WAIT)
                except requests.RequestException:
                    pass  # failed when the tarpit closes: not what this test is about

            hung = [threading.Thread(target=hang, args=(t.url,), daemon=True)
                    for t in tarpits for _ in range(PER_REGISTRY + 1)]
            start = len(mirror.lines)
            for t in hung:
                t.start()
            mirror.wait_for_log(r"client connect", WAIT, start=start, count=len(hung))
            assert wait_accepted_total(tarpits, PER_REGISTRY, WAIT) >= PER_REGISTRY
            # The mirror waits up to upstream_timeout (30 s) for a tarpit; these
            # must not queue behind that, so they get less.
            client = RegistryClient(mirror.url_of(0), timeout=20)
            upstream.reset_counters()
            assert client.get_blob(stored.repo, layer, expected_size=size) == size
            assert upstream.counters.blob_bytes == 0  # from the store
            assert client.pull(cold.repo, cold.tag).layers == cold.layers  # manifests and fills upstream
            assert requests.get(f"{mirror.url_of(0)}/_registry_cache/metrics", timeout=20).status_code == 200
            assert sum(t.accepted for t in tarpits) == PER_REGISTRY  # all still hanging, none past the bound
        finally:
            release()


def test_a_call_queued_for_a_hung_registry_is_not_made_once_its_client_left(tmp_path):
    with Mirror(tmp_path / "m", ["regular"], options={"upstream_timeout": "2"}) as mirror, Tarpit() as tarpit:
        proxy = {"http": mirror.url}

        def give_up_soon():
            try:
                requests.get(f"{tarpit.url}/v2/x/y/manifests/latest", proxies=proxy, timeout=1)
            except requests.RequestException:
                pass  # the client gives up before the mirror does

        clients = [threading.Thread(target=give_up_soon) for _ in range(PER_REGISTRY + 6)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(WAIT)
        mirror.wait_for_log(r"the client left before the registry could be asked", WAIT, count=6)
        assert tarpit.accepted == PER_REGISTRY
