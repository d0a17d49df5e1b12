"""End to end: several mirror nodes, one upstream fetch per blob for all of
them (peers.py). Three real mitmdump processes on this machine, each with
its own store, one cluster secret, real clients spread across them; with
one SeaweedFS bucket as their shared tier where it matters.

"While the one download runs" is a state, not a timing guess: the upstream
transfer is parked half-way (tests/harness/downloads.py).
"""

from __future__ import annotations

import threading

import requests

from tests.harness.cluster import Cluster, pull_everywhere
from tests.harness.downloads import assert_one_fetch_streamed_to_all, stalled_downloaders
from tests.harness.fresh import fresh_image
from tests.harness.skopeo import make_skopeo_home, skopeo_copy, verify_dir_image
from tests.harness.v2client import RegistryClient

WAIT = 60


def token_holding_client(url, image) -> RegistryClient:
    client = RegistryClient(url)
    client.get_manifest(image.repo, image.tag)  # token in hand
    return client


def test_concurrent_cold_pulls_spread_over_three_nodes_cost_one_upstream_copy(
        tmp_path, upstream, seaweedfs, s3_prefix):
    image = fresh_image(upstream, 20_000_000, 6_000_000, 500_000)
    with Cluster(tmp_path, upstream, 3, seaweedfs, s3_prefix) as cluster:
        urls = [cluster.nodes[i % 3].url for i in range(8)]
        pull_everywhere(urls, image)
        for digest, size in image.blobs:
            assert upstream.counters.blob_bytes_for(digest) == size, cluster.log_text()
        assert upstream.counters.blob_bytes == image.blob_bytes
        # Each node keeps its own copy: a second round costs nothing upstream.
        upstream.reset_counters()
        pull_everywhere(urls, image)
        assert upstream.counters.blob_bytes == 0


def test_clients_of_every_node_get_bytes_while_the_one_download_runs(tmp_path, upstream):
    image = fresh_image(upstream, 6_000_000)
    (digest, size), = image.layers
    with Cluster(tmp_path, upstream, 3) as cluster:
        clients = [token_holding_client(node.url, image) for node in cluster.nodes for _ in range(2)]
        downloaders = stalled_downloaders(upstream, clients, image.repo, digest, size)
        assert_one_fetch_streamed_to_all(upstream, downloaders, digest, size)
        # Two nodes filled from the owner, which fetched it: "from 127.0.0.1:<its blob port>".
        owners = {line.split(" from ")[-1] for node in cluster.nodes for line in node.lines
                  if f"cluster: {digest} from " in line}
        assert len(owners) == 1 and owners.pop().strip() in cluster.members.split(","), cluster.log_text()


def test_skopeo_and_other_clients_on_different_nodes_share_one_fetch(tmp_path, upstream, closed_port):
    image = fresh_image(upstream, 3_000_000, 1_000_000)
    with Cluster(tmp_path, upstream, 3) as cluster:
        errors = []

        def with_skopeo():
            try:
                home = make_skopeo_home(str(tmp_path / "home"), primary=closed_port, mirror=cluster.nodes[0].host_port)
                skopeo_copy(f"{closed_port}/{image.repo}:{image.tag}", str(tmp_path / "copy"), home)
            except Exception as exc:  # noqa: BLE001 - judged below
                errors.append(exc)

        skopeo = threading.Thread(target=with_skopeo)
        skopeo.start()
        pull_everywhere([cluster.nodes[1].url, cluster.nodes[2].url], image)
        skopeo.join(WAIT)
        assert not errors, errors
        assert verify_dir_image(str(tmp_path / "copy"))["manifest_digest"] == image.digest
        assert upstream.counters.blob_bytes == image.blob_bytes


def test_two_processes_sharing_one_cache_dir_fetch_once(tmp_path, upstream):
    image = fresh_image(upstream, 8_000_000, 2_000_000)
    with Cluster(tmp_path, upstream, 2, cache_dir=tmp_path / "one-store") as cluster:
        pull_everywhere([cluster.nodes[i % 2].url for i in range(4)], image)
        for digest, size in image.blobs:
            assert upstream.counters.blob_bytes_for(digest) == size, cluster.log_text()


def test_a_node_refuses_requests_not_signed_with_the_cluster_secret(tmp_path, upstream):
    image = fresh_image(upstream, 1_000_000)
    (digest, _), = image.layers
    with Cluster(tmp_path, upstream, 2) as cluster:
        port = cluster.blob_ports[0]
        url = f"http://127.0.0.1:{port}/cluster/blobs/{digest}?registry={upstream.url}&repo={image.repo}"
        for headers in ({}, {"X-Registry-Cache-Node": "127.0.0.1:1",
                             "X-Registry-Cache-Signature": "1700000000:" + "0" * 64}):
            r = requests.get(url, headers=headers, timeout=WAIT)
            assert r.status_code == 403
    assert upstream.counters.blob_bytes == 0
