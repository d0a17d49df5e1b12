"""End to end: the shared tier on a real object store (SeaweedFS, started by
the tests), real mitmdump nodes, real clients.

A node's own store is its first tier; a local miss asks the object store
next, then the upstream. Blobs a node fetched upstream go to the object
store once verified, in the background, and wait while it is down.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading

import pytest
import requests

from tests.harness.downloads import Downloader, upstream_fetches
from tests.harness.fresh import fresh_image, fresh_layer, unique_seed
from tests.harness.images import push_image
from tests.harness.mirror import ROOT, Mirror
from tests.harness.skopeo import make_skopeo_home, skopeo_copy, verify_dir_image
from tests.harness.upstream import ALICE
from tests.harness.v2client import PULL_ERRORS, RegistryClient

WAIT = 60


def s3_node(tmp_path, name, upstream, seaweedfs, prefix, **options) -> Mirror:
    """A mirror node whose shared tier is seaweedfs under prefix (not started)."""
    return Mirror(tmp_path / name, [f"reverse:{upstream.url}"], options={
        "s3_bucket": seaweedfs.bucket, "s3_endpoint": seaweedfs.endpoint, "s3_prefix": prefix,
        "s3_timeout": "1", "s3_retry_after": "2", **options,
    }, env=seaweedfs.client_env())


def wait_uploaded(node: Mirror, digests, start: int = 0) -> None:
    for digest in digests:
        node.wait_for_log(rf"object store: uploaded {digest}", WAIT, start=start)


def in_bucket(seaweedfs, prefix: str, digest: str) -> bytes | None:
    client = seaweedfs.client(endpoint=seaweedfs.direct_endpoint)
    try:
        return client.get_object(Bucket=seaweedfs.bucket, Key=f"{prefix}blobs/sha256/{digest[7:]}")["Body"].read()
    except client.exceptions.NoSuchKey:
        return None


def stats(node: Mirror) -> dict:
    return requests.get(f"{node.url}/_registry_cache/stats", timeout=WAIT).json()


def test_a_node_with_an_empty_store_gets_what_another_verified_from_the_object_store(
        tmp_path, upstream, seaweedfs, s3_prefix):
    image = fresh_image(upstream, 3_000_000, 700_000)
    with s3_node(tmp_path, "a", upstream, seaweedfs, s3_prefix) as a:
        assert RegistryClient(a.url).pull(image.repo, image.tag).layers == image.layers
        wait_uploaded(a, [d for d, _ in image.blobs])
    for digest, size in image.blobs:
        data = in_bucket(seaweedfs, s3_prefix, digest)
        assert data is not None and len(data) == size and "sha256:" + hashlib.sha256(data).hexdigest() == digest
    assert upstream.counters.blob_bytes == image.blob_bytes
    upstream.reset_counters()
    with s3_node(tmp_path, "b", upstream, seaweedfs, s3_prefix) as b:
        assert RegistryClient(b.url).pull(image.repo, image.tag).layers == image.layers
        b.wait_stored([d for d, _ in image.blobs], WAIT)
        assert upstream.counters.blob_bytes == 0 and not any(upstream_fetches(upstream, d) for d, _ in image.blobs)
        figures = stats(b)["bytes"]
        assert figures["fetched_upstream"] == 0
        assert figures["fetched_from_tiers"] == {"object-store": image.blob_bytes}
        assert "object store: uploaded" not in b.log_text()  # they were there already
        # Kept locally: with the object store gone, B still serves them.
        seaweedfs.set_down(True)
        assert RegistryClient(b.url).pull(image.repo, image.tag).layers == image.layers
        assert upstream.counters.blob_bytes == 0


def test_skopeo_pulls_from_a_node_whose_store_is_empty(tmp_path, upstream, seaweedfs, s3_prefix, closed_port):
    image = fresh_image(upstream, 2_000_000)
    with s3_node(tmp_path, "a", upstream, seaweedfs, s3_prefix) as a:
        RegistryClient(a.url).pull(image.repo, image.tag)
        wait_uploaded(a, [d for d, _ in image.blobs])
    upstream.reset_counters()
    with s3_node(tmp_path, "b", upstream, seaweedfs, s3_prefix) as b:
        home = make_skopeo_home(str(tmp_path / "home"), primary=closed_port, mirror=b.host_port)
        skopeo_copy(f"{closed_port}/{image.repo}:{image.tag}", str(tmp_path / "copy"), home)
        assert verify_dir_image(str(tmp_path / "copy"))["manifest_digest"] == image.digest
    assert upstream.counters.blob_bytes == 0


def test_the_object_store_down_costs_no_client_error_and_uploads_catch_up(tmp_path, upstream, seaweedfs, s3_prefix):
    image = fresh_image(upstream, 2_000_000, 500_000)
    digests = [d for d, _ in image.blobs]
    with s3_node(tmp_path, "a", upstream, seaweedfs, s3_prefix) as a:
        seaweedfs.set_down(True, "refuse")
        assert RegistryClient(a.url).pull(image.repo, image.tag).layers == image.layers
        a.wait_stored(digests, WAIT)
        assert all(in_bucket(seaweedfs, s3_prefix, d) is None for d in digests)
        seaweedfs.set_down(False)
        wait_uploaded(a, digests)  # once the store answers again (s3_retry_after: 2 s)
    for digest, size in image.blobs:
        assert len(in_bucket(seaweedfs, s3_prefix, digest)) == size


def test_a_hung_object_store_costs_a_bounded_delay_and_no_client_error(tmp_path, upstream, seaweedfs, s3_prefix):
    image = fresh_image(upstream, 2_000_000)
    with s3_node(tmp_path, "a", upstream, seaweedfs, s3_prefix) as a:
        seaweedfs.set_down(True, "hang")
        assert RegistryClient(a.url).pull(image.repo, image.tag).layers == image.layers
        # s3_timeout is 1 s: the first miss waited that long, the others not at all.
        assert a.log_text().count("object-store unavailable") >= 1
        a.wait_stored([d for d, _ in image.blobs], WAIT)  # a fill is counted as it ends, after its last byte went out
        assert stats(a)["bytes"]["fetched_upstream"] == image.blob_bytes


@pytest.mark.parametrize("connections", ["1", "4"])
def test_an_object_store_that_goes_silent_mid_blob_hands_the_fill_to_the_upstream(
        tmp_path, upstream, seaweedfs, s3_prefix, connections):
    image = fresh_image(upstream, 40_000_000)
    (digest, size), = image.layers
    expected = open(upstream.blob_path(digest), "rb").read()
    with s3_node(tmp_path, "a", upstream, seaweedfs, s3_prefix) as a:
        RegistryClient(a.url).pull(image.repo, image.tag)
        wait_uploaded(a, [digest])
    upstream.reset_counters()
    with s3_node(tmp_path, "b", upstream, seaweedfs, s3_prefix, s3_connections=connections) as b:
        client = RegistryClient(b.url)
        client.get_manifest(image.repo, image.tag)
        seaweedfs.stall_after(3_000_000)  # every object store connection goes quiet after 3 MB
        assert client.get_blob_bytes(image.repo, digest) == expected
        b.wait_stored([digest], WAIT)
        seaweedfs.set_stalled(False)
        figures = stats(b)["bytes"]
    # The upstream sent only what the object store had not: from where it went quiet.
    assert f"({connections} connection" in next(line for line in b.lines if f"fill: stored {digest}" in line)
    assert 0 < figures["fetched_upstream"] < size
    assert 0 < figures["fetched_from_tiers"]["object-store"] < size
    assert upstream.counters.blob_bytes_for(digest) == figures["fetched_upstream"]


def test_a_rotten_object_fails_one_pull_is_deleted_and_the_next_comes_from_the_upstream(
        tmp_path, upstream, seaweedfs, s3_prefix):
    image = fresh_image(upstream, 1_000_000)
    (digest, size), = image.layers
    expected = open(upstream.blob_path(digest), "rb").read()
    raw = seaweedfs.client(endpoint=seaweedfs.direct_endpoint)
    key = f"{s3_prefix}blobs/sha256/{digest[7:]}"
    raw.put_object(Bucket=seaweedfs.bucket, Key=key, Body=b"\0" * size)  # same size, wrong bytes
    with s3_node(tmp_path, "b", upstream, seaweedfs, s3_prefix) as b:
        client = RegistryClient(b.url)
        client.get_manifest(image.repo, image.tag)
        # Cut before its last byte: never a complete wrong body.
        with pytest.raises(PULL_ERRORS + (requests.RequestException,)):
            client.get_blob(image.repo, digest)
        b.wait_for_log(rf"object store: {digest} did not match its digest; deleted it", WAIT)
        assert client.get_blob_bytes(image.repo, digest) == expected
        wait_uploaded(b, [digest])
    assert in_bucket(seaweedfs, s3_prefix, digest) == expected


def test_without_a_bucket_boto3_is_not_even_imported(tmp_path):
    code = ("import sys; from mitmproxy.test import taddons; from addon.mirror import RegistryCache\n"
            "addon = RegistryCache()\n"
            f"with taddons.context(addon) as tctx:\n"
            f"    tctx.configure(addon, cache_dir={str(tmp_path / 'cache')!r}, blob_host='127.0.0.1')\n"
            "    assert addon.services.blobs is not None and addon.services.tiers is None\n"
            "    addon.done()\n"
            "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, 'boto3 imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=WAIT)
