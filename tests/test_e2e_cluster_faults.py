"""End to end: a cluster of real mitmdump nodes when things go wrong. An owner
is killed mid-fill; the object store goes away or hangs; a node joins or
leaves; a blob URL made by one node is brought to another."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import requests

from addon.cluster import parse_members, rank
from addon.store import DiskBlobStore
from tests.harness.cluster import Cluster, pull_everywhere
from tests.harness.downloads import stalled_downloaders
from tests.harness.fresh import fresh_image
from tests.harness.v2client import RegistryClient

WAIT = 60


def token_holding_client(url, image) -> RegistryClient:
    client = RegistryClient(url)
    client.get_manifest(image.repo, image.tag)
    return client


def rank_of(cluster: Cluster, digest: str) -> list[int]:
    """The nodes' indexes in rendezvous order for digest: the owner first."""
    return [cluster.blob_ports.index(m.port) for m in rank(parse_members(cluster.members), digest)]


def in_bucket(seaweedfs, prefix, digest) -> bytes | None:
    client = seaweedfs.client(endpoint=seaweedfs.direct_endpoint)
    try:
        return client.get_object(Bucket=seaweedfs.bucket, Key=f"{prefix}blobs/sha256/{digest[7:]}")["Body"].read()
    except client.exceptions.NoSuchKey:
        return None


def test_an_owner_killed_mid_fill_costs_the_other_nodes_clients_nothing_and_leaves_nothing_partial(
        tmp_path, upstream, seaweedfs, s3_prefix, record_figure):
    image = fresh_image(upstream, 6_000_000)
    (digest, size), = image.layers
    expected = open(upstream.blob_path(digest), "rb").read()
    with Cluster(tmp_path, upstream, 3, seaweedfs, s3_prefix) as cluster:
        owner, second, third = rank_of(cluster, digest)
        others = [token_holding_client(cluster.nodes[i].url, image) for i in (second, third) for _ in range(2)]
        own = token_holding_client(cluster.nodes[owner].url, image)
        downloaders = stalled_downloaders(upstream, [own, *others], image.repo, digest, size)
        for d in downloaders:
            assert d.started.wait(WAIT) and d.error is None  # bytes on every node while it runs
        cluster.nodes[owner].kill()  # SIGKILL, mid-blob
        upstream.clear_faults()
        upstream.release_stalls()
        victim, *survivors = downloaders
        for d in downloaders:
            d.join(WAIT)
        # The other nodes' clients saw a pause, not an error; the dead node's client a cut body.
        for d in survivors:
            assert d.error is None and d.data == expected, cluster.log_text()
        assert victim.error is not None or len(victim.data) < size
        # ... and it gets the blob from another node when it tries again.
        retry = token_holding_client(cluster.nodes[second].url, image)
        assert retry.get_blob_bytes(image.repo, digest) == expected
        for i in (second, third):
            cluster.nodes[i].wait_stored([digest], WAIT)
        cluster.nodes[second].wait_for_log(rf"object store: uploaded {digest}", WAIT)
        gets = [r for r in upstream.counters.requests if r.method == "GET" and digest[7:] in r.path]
        log = cluster.log_text()
    # The owner's one GET, parked half-way; then the next in rank went on from
    # the byte it had (the third followed it): the rest, once.
    assert len(gets) == 2, log
    first, resumed = gets
    start = int(resumed.range.removeprefix("bytes=").split("-")[0])
    assert size // 3 < start and resumed.bytes == size - start, log
    record_figure(f"owner killed mid-fill: the next owner fetched bytes {start}-{size - 1} only "
                  f"({(start + resumed.bytes) / size:.2f} copies received upstream in all)")
    # Nothing partial anywhere: the dead node's store holds no such blob (its
    # part file is swept when it opens again), the object store a whole one.
    store = DiskBlobStore(cluster.nodes[owner].cache_dir, 1 << 30)
    try:
        assert store.open(digest) is None
        assert not list((cluster.nodes[owner].cache_dir / "fills").glob("*.part"))
    finally:
        store.close()
    assert in_bucket(seaweedfs, s3_prefix, digest) == expected


@pytest.mark.parametrize("how", ["refuse", "hang"])
def test_a_cluster_without_its_object_store_serves_every_client_with_one_copy(
        tmp_path, upstream, seaweedfs, s3_prefix, how):
    image = fresh_image(upstream, 9_000_000, 700_000)
    with Cluster(tmp_path, upstream, 3, seaweedfs, s3_prefix) as cluster:
        seaweedfs.set_down(True, how)
        pull_everywhere([node.url for node in cluster.nodes] * 2, image)
        assert upstream.counters.blob_bytes == image.blob_bytes, cluster.log_text()
        seaweedfs.set_down(False)
        for digest, _ in image.blobs:  # caught up once it is back
            cluster.nodes[rank_of(cluster, digest)[0]].wait_for_log(rf"object store: uploaded {digest}", WAIT)


def test_a_node_joining_or_leaving_causes_no_refetches_upstream(tmp_path, upstream, seaweedfs, s3_prefix):
    image = fresh_image(upstream, *[400_000 + i for i in range(12)])
    cluster = Cluster(tmp_path, upstream, 4, seaweedfs, s3_prefix)
    three = ",".join(cluster.members.split(",")[:3])
    # Three nodes at first, listing only themselves; the fourth starts later.
    cluster.nodes[:3] = [cluster.make_node(i, members=three) for i in range(3)]
    try:
        for node in cluster.nodes[:3]:
            node.start()
        pull_everywhere([node.url for node in cluster.nodes[:3]], image)
        assert upstream.counters.blob_bytes == image.blob_bytes
        for digest, _ in image.blobs:
            owner = [cluster.blob_ports.index(m.port) for m in rank(parse_members(three), digest)][0]
            cluster.nodes[owner].wait_for_log(rf"object store: uploaded {digest}", WAIT)
        upstream.reset_counters()
        # A fourth node joins, with an empty store: about a quarter of the digests
        # are its own now, and it finds them in the object store.
        cluster.nodes[3].start()
        moved = sum(1 for d, _ in image.blobs if rank_of(cluster, d)[0] == 3)
        assert 0 < moved < len(image.blobs)
        pull_everywhere([node.url for node in cluster.nodes], image)
        # A node leaves: its digests go to the next in rank.
        cluster.nodes[1].stop()
        pull_everywhere([cluster.nodes[i].url for i in (0, 2, 3)], image)
        assert upstream.counters.blob_bytes == 0, cluster.log_text()
        # ... new ones too: fetched once, by the next in rank, without a client error.
        cold = fresh_image(upstream, *[300_000 + i for i in range(8)])
        pull_everywhere([cluster.nodes[i].url for i in (0, 2, 0, 2)], cold)
        assert upstream.counters.blob_bytes == cold.blob_bytes, cluster.log_text()
        assert any(rank(parse_members(three), d)[0].port == cluster.blob_ports[1] for d, _ in cold.blobs)
    finally:
        cluster.stop()


def test_a_blob_url_one_node_signed_is_honoured_by_another_and_by_no_one_else(tmp_path, upstream):
    image = fresh_image(upstream, 2_000_000)
    (digest, size), = image.layers
    expected = open(upstream.blob_path(digest), "rb").read()
    with Cluster(tmp_path, upstream, 2) as cluster, \
            Cluster(tmp_path / "other", upstream, 1) as stranger:
        a, b = cluster.nodes
        client = token_holding_client(a.url, image)
        redirect = client.request("GET", f"/v2/{image.repo}/blobs/{digest}", allow_redirects=False)
        assert redirect.status_code == 307
        signed = urlsplit(redirect.headers["Location"])
        assert f"node=127.0.0.1%3A{cluster.blob_ports[0]}" in signed.query
        a.wait_stored([digest], WAIT)
        upstream.reset_counters()
        # A load balancer sends the client to B's blob server: B has no copy and
        # no object store; it fills from A, the node that signed.
        at_b = f"http://127.0.0.1:{b.blob_port}{signed.path}?{signed.query}"
        got = requests.get(at_b, timeout=WAIT)
        assert got.status_code == 200 and got.content == expected
        assert upstream.counters.blob_bytes == 0
        # A node with another secret does not honour it, nor a URL tampered with.
        assert requests.get(f"http://127.0.0.1:{stranger.nodes[0].blob_port}{signed.path}?{signed.query}",
                            timeout=WAIT).status_code == 403
        tampered = at_b.replace("expires=", "expires=9")
        assert requests.get(tampered, timeout=WAIT).status_code == 403
