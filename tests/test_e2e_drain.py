"""End to end: the health endpoint, and SIGTERM draining a node (drain.py),
with real mitmdump processes."""

from __future__ import annotations

import signal
import subprocess

import requests

from addon.cluster import parse_members, rank
from tests.harness.cluster import Cluster
from tests.harness.downloads import Downloader, stalled_downloaders
from tests.harness.fresh import fresh_image
from tests.harness.mirror import Mirror
from tests.harness.v2client import RegistryClient

WAIT = 60


def health(node: Mirror) -> tuple[int, dict]:
    r = requests.get(f"{node.url}/_registry_cache/health", timeout=WAIT)
    return r.status_code, r.json()


def token_holding_client(url, image) -> RegistryClient:
    client = RegistryClient(url)
    client.get_manifest(image.repo, image.tag)
    return client


def test_health_reports_a_down_object_store_and_down_members_without_failing(
        tmp_path, upstream, seaweedfs, s3_prefix):
    image = fresh_image(upstream, 500_000)
    with Mirror(tmp_path / "alone", [f"reverse:{upstream.url}"]) as alone:
        assert health(alone) == (200, {"status": "ok", "fills_in_flight": 0, "object_store": "off"})
    with Cluster(tmp_path / "c", upstream, 2, seaweedfs, s3_prefix) as cluster:
        a, b = cluster.nodes
        status, report = health(a)
        assert status == 200 and report["status"] == "ok" and report["object_store"] == "up"
        assert report["cluster"] == {"node": f"127.0.0.1:{cluster.blob_ports[0]}",
                                     "members": sorted(cluster.members.split(",")), "down": []}
        seaweedfs.set_down(True)
        b.stop()
        # Pulls through A meet the store down and B gone (when B owns a blob).
        RegistryClient(a.url).pull(image.repo, image.tag)
        status, report = health(a)
        assert status == 200 and report["status"] == "ok" and report["object_store"] == "down"
        if any(rank(parse_members(cluster.members), d)[0].port == cluster.blob_ports[1] for d, _ in image.blobs):
            assert report["cluster"]["down"] == [f"127.0.0.1:{cluster.blob_ports[1]}"]


def test_sigterm_drains_the_fills_in_progress_then_stops(tmp_path, upstream):
    image = fresh_image(upstream, 6_000_000)
    (digest, size), = image.layers
    expected = open(upstream.blob_path(digest), "rb").read()
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"]) as mirror:
        downloader, = stalled_downloaders(upstream, [token_holding_client(mirror.url, image)], image.repo,
                                          digest, size)
        assert downloader.started.wait(WAIT)
        mirror.proc.send_signal(signal.SIGTERM)
        mirror.wait_for_log(r"SIGTERM: draining \(health answers 503\); stopping once nothing is in progress "
                            r"\(1 fills, 1 blob transfers\)", WAIT)
        # The fill is parked: the node is still there, says it is draining, and still answers.
        assert mirror.proc.poll() is None
        status, report = health(mirror)
        assert status == 503 and report["status"] == "draining"
        assert requests.get(f"{mirror.url}/v2/", timeout=WAIT).status_code in (200, 401)
        upstream.release_stalls()
        downloader.join(WAIT)
        assert downloader.error is None and downloader.data == expected
        assert mirror.proc.wait(WAIT) == 0
        mirror.wait_for_output_end(WAIT)
        assert any("drained in" in line for line in mirror.lines)
        assert any(f"fill: stored {digest}" in line for line in mirror.lines)


def test_sigterm_stops_after_drain_timeout_when_a_fill_does_not_end(tmp_path, upstream):
    image = fresh_image(upstream, 6_000_000)
    (digest, size), = image.layers
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"], options={"drain_timeout": "1"}) as mirror:
        downloader, = stalled_downloaders(upstream, [token_holding_client(mirror.url, image)], image.repo,
                                          digest, size)
        assert downloader.started.wait(WAIT)
        mirror.proc.send_signal(signal.SIGTERM)
        assert mirror.proc.wait(WAIT) == 0  # the transfer stays parked: drain_timeout ends it
        mirror.wait_for_output_end(WAIT)
        assert any("drain_timeout (1 s) is over with" in line for line in mirror.lines)
        downloader.join(WAIT)
        assert len(downloader.data) < size  # cut, never a complete body


def test_a_draining_owner_hands_new_fills_to_the_next_node(tmp_path, upstream):
    with Cluster(tmp_path, upstream, 2) as cluster:
        a, b = cluster.nodes
        members = parse_members(cluster.members)

        def image_owned_by_a():
            for _ in range(40):
                image = fresh_image(upstream, 6_000_000)
                if rank(members, image.layers[0][0])[0].port == cluster.blob_ports[0]:
                    return image
            raise AssertionError("no layer A owns in 40 tries")

        parked, cold = image_owned_by_a(), image_owned_by_a()
        (parked_digest, parked_size), = parked.layers
        downloader, = stalled_downloaders(upstream, [token_holding_client(a.url, parked)], parked.repo,
                                          parked_digest, parked_size)
        assert downloader.started.wait(WAIT)
        a.proc.send_signal(signal.SIGTERM)  # A drains; its parked fill keeps it up
        a.wait_for_log(r"SIGTERM: draining", WAIT)
        # (the parked transfer stays parked: its fault stays set, and concerns its digest only)
        upstream.reset_counters()
        # A cold blob A owns, asked of B: A refuses to start a fill (503), B fetches it itself.
        assert RegistryClient(b.url).pull(cold.repo, cold.tag).layers == cold.layers
        (digest, size), = cold.layers
        assert upstream.counters.blob_bytes_for(digest) == size
        b.wait_for_log(rf"cluster: 127\.0\.0\.1:{cluster.blob_ports[0]} answered 503", WAIT)
        upstream.release_stalls()
        downloader.join(WAIT)
        assert downloader.error is None and len(downloader.data) == parked_size
        assert a.proc.wait(WAIT) == 0
