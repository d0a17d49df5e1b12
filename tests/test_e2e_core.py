"""End to end: the addon in a real mitmdump, the real registry upstream, real clients.

Every test gets its own mirror process and store; the upstream (distribution
behind token auth, with a counting front door and an optional CDN) is shared
and reset between tests.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os

import pytest
import requests

from addon.store import DiskBlobStore
from tests.harness.downloads import assert_no_complete_body
from tests.harness.fresh import fresh_image
from tests.harness.mirror import Mirror
from tests.harness.skopeo import make_skopeo_home, skopeo_copy, verify_dir_image
from tests.harness.upstream import ALICE
from tests.harness.v2client import PULL_ERRORS, RegistryClient

WAIT = 60


def stored(mirror: Mirror, digest: str) -> bool:
    store = DiskBlobStore(mirror.cache_dir, size_limit=1 << 40)
    try:
        blob = store.open(digest)
        if blob is None:
            return False
        blob.close()
        return True
    finally:
        store.close()


def test_second_pull_costs_no_upstream_blob_bytes(any_upstream, mirror, pushed_images):
    image = pushed_images.alpine
    first = RegistryClient(mirror.url).pull(image.repo, image.tag)
    assert first.manifest_digest == image.digest
    assert first.layers == image.layers
    # Exactly one upstream copy of every blob...
    assert any_upstream.counters.blob_bytes == image.blob_bytes
    for digest, size in image.blobs:
        assert any_upstream.counters.blob_bytes_for(digest) == size
    any_upstream.reset_counters()
    second = RegistryClient(mirror.url).pull(image.repo, image.tag)
    assert second.layers == image.layers
    # ...and none the second time. The tag was checked upstream (fresh tags)
    # with a HEAD, which costs no pull, and the manifests came from the store.
    assert any_upstream.counters.blob_bytes == 0
    assert any_upstream.counters.blob_gets == 0
    assert any_upstream.counters.manifest_heads >= 1 and any_upstream.counters.manifest_gets == 0


def test_redirected_blobs_are_fetched_by_the_mirror_without_the_clients_token(upstream_redirect, mirror):
    image = fresh_image(upstream_redirect, 700_000, 300_000)
    RegistryClient(mirror.url).pull(image.repo, image.tag)
    cdn = [r for r in upstream_redirect.counters.requests if r.server == "cdn"]
    assert upstream_redirect.counters.cdn_gets_by_digest == {d: 1 for d, _ in image.blobs}
    assert not any(r.authorization for r in cdn)  # the CDN would have answered 400
    assert all(r.status == 206 for r in cdn)  # the fill asks for its first chunk: here, each whole blob
    upstream_redirect.reset_counters()
    RegistryClient(mirror.url).pull(image.repo, image.tag)
    assert upstream_redirect.counters.blob_bytes == 0 and upstream_redirect.counters.cdn_gets == 0


def test_multi_arch_index_each_platform(any_upstream, mirror, pushed_images):
    index = pushed_images.multi
    client = RegistryClient(mirror.url)
    for platform, image in index.images.items():
        result = client.pull(index.repo, index.tag, platform=platform)
        assert result.digest == index.digest
        assert result.manifest_digest == image.digest
        assert result.layers == image.layers
    any_upstream.reset_counters()
    for platform in index.images:
        RegistryClient(mirror.url).pull(index.repo, index.tag, platform=platform)
    assert any_upstream.counters.blob_bytes == 0


def test_skopeo_pulls_through_the_mirror(any_upstream, mirror, pushed_images, closed_port, tmp_path):
    # The primary location is a closed port: skopeo cannot fall back around the mirror.
    home = make_skopeo_home(str(tmp_path / "home"), primary=closed_port, mirror=mirror.host_port)
    for image in (pushed_images.alpine, pushed_images.schema2):
        dest = tmp_path / f"first-{image.repo.replace('/', '-')}"
        skopeo_copy(f"{closed_port}/{image.ref}", str(dest), home)
        copied = verify_dir_image(str(dest))
        # Same manifest digest as pushed: every Accept line reached the registry
        # (keeping one would down-convert schema2 to schema1).
        assert copied["manifest_digest"] == image.digest
        assert sorted(copied["blobs"]) == sorted(d for d, _ in image.blobs)
    any_upstream.reset_counters()
    skopeo_copy(f"{closed_port}/{pushed_images.alpine.ref}", str(tmp_path / "second"), home)
    assert any_upstream.counters.blob_bytes == 0
    assert verify_dir_image(str(tmp_path / "second"))["manifest_digest"] == pushed_images.alpine.digest


def test_skopeo_multi_arch(upstream, mirror, pushed_images, closed_port, tmp_path):
    home = make_skopeo_home(str(tmp_path / "home"), primary=closed_port, mirror=mirror.host_port)
    index = pushed_images.dockerlist
    dest = tmp_path / "all"
    skopeo_copy(f"{closed_port}/{index.ref}", str(dest), home, all=True)
    copied = verify_dir_image(str(dest))
    assert copied["manifest_digest"] == index.digest
    expected = {d for image in index.images.values() for d, _ in image.blobs}
    assert expected <= set(copied["blobs"])


def test_manifest_accept_lines_reach_the_upstream(upstream, mirror, pushed_images):
    image = pushed_images.schema2
    token = RegistryClient(upstream.url).fetch_token(upstream.token_realm, upstream.service,
                                                     [f"repository:{image.repo}:pull"])[0]

    def digest_with(accept_lines):
        conn = http.client.HTTPConnection("127.0.0.1", mirror.ports[0], timeout=WAIT)
        conn.putrequest("GET", f"/v2/{image.repo}/manifests/{image.tag}")
        for line in accept_lines:
            conn.putheader("Accept", line)
        conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status == 200
        return "sha256:" + hashlib.sha256(body).hexdigest()

    several = [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
    assert digest_with(several) == image.digest
    # Control: with only the first line the registry down-converts (so this
    # test would catch a proxy that keeps one line).
    assert digest_with(several[:1]) != image.digest


def test_token_flow_and_non_blob_requests_pass_through(upstream, mirror):
    r = requests.get(mirror.url + "/v2/", timeout=WAIT)
    assert r.status_code == 401
    # The challenge names the mirror's token relay (issue #13: clients may
    # reach only the mirror), with the upstream's own service.
    challenge = r.headers["WWW-Authenticate"]
    assert f'realm="{mirror.url}/_registry_cache/token/{upstream.host_port}"' in challenge, challenge
    assert 'service="registry.harness.test"' in challenge
    r = requests.get(mirror.url + "/not-a-registry-path?x=1", timeout=WAIT)
    assert any(rec.path == "/not-a-registry-path?x=1" for rec in upstream.counters.requests)
    issued = upstream.tokens_issued
    assert RegistryClient(mirror.url).ping() == 200
    assert upstream.tokens_issued == issued + 1  # by the upstream's token server, through the mirror


def test_head_and_range_are_answered_from_the_store(upstream, mirror):
    image = fresh_image(upstream, 900_000)
    digest, size = image.layers[0]
    client = RegistryClient(mirror.url)
    assert client.head_manifest(image.repo, image.tag).digest == image.digest
    # A HEAD of a blob not stored goes upstream as a HEAD, never as a GET.
    r = client.request("HEAD", f"/v2/{image.repo}/blobs/{digest}")
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == size
    assert upstream.counters.blob_heads == 1 and upstream.counters.blob_gets == 0
    client.pull(image.repo, image.tag)
    mirror.wait_for_log(rf"access: .*/{image.repo} is public", WAIT)  # its one background check
    mirror.wait_stored([digest], WAIT)  # the check can end before the commit (it starts at verification)
    upstream.reset_counters()
    r = client.request("HEAD", f"/v2/{image.repo}/blobs/{digest}")
    assert r.status_code == 200
    assert int(r.headers["Content-Length"]) == size and r.headers["Docker-Content-Digest"] == digest
    assert r.headers["X-Registry-Cache"] == "hit"
    assert client.get_blob(image.repo, digest, range_=(1000, 1999)) == 1000
    assert client.get_blob(image.repo, digest, range_=(size - 10, None)) == 10
    expected = open(upstream.blob_path(digest), "rb").read()
    r = client.request("GET", f"/v2/{image.repo}/blobs/{digest}", headers={"Range": "bytes=5000-5099"})
    assert r.status_code == 206 and r.content == expected[5000:5100]
    assert upstream.counters.blob_heads == 0 and upstream.counters.blob_bytes == 0


def test_bad_upstream_blob_is_never_stored_nor_completed(any_upstream, mirror):
    """(A body cut short is resumed instead: tests/test_e2e_chunked.py.)"""
    image = fresh_image(any_upstream, 3_000_000)
    digest, size = image.layers[0]
    any_upstream.set_fault(digest, "corrupt")
    client = RegistryClient(mirror.url)
    client.get_manifest(image.repo, image.tag)  # gets a token for the repository
    assert_no_complete_body(client, image.repo, digest, size)
    mirror.wait_for_log(rf"fill: {digest} failed", WAIT)
    assert not stored(mirror, digest)
    # With the upstream healthy again the blob is fetched afresh and verified.
    any_upstream.clear_faults()
    any_upstream.reset_counters()
    assert client.get_blob(image.repo, digest, expected_size=size) == size
    assert any_upstream.counters.blob_bytes_for(digest) == size
    mirror.wait_for_log(rf"fill: stored {digest}", WAIT)
    assert stored(mirror, digest)


def test_store_survives_a_restart(upstream, tmp_path, pushed_images):
    image = pushed_images.alpine
    cache = tmp_path / "cache"
    with Mirror(tmp_path / "one", [f"reverse:{upstream.url}"], cache_dir=cache) as first:
        RegistryClient(first.url).pull(image.repo, image.tag)
        for digest, _ in image.blobs:
            first.wait_for_log(rf"fill: stored {digest}", WAIT)
    upstream.reset_counters()
    with Mirror(tmp_path / "two", [f"reverse:{upstream.url}"], cache_dir=cache) as second:
        RegistryClient(second.url).pull(image.repo, image.tag)
    assert upstream.counters.blob_bytes == 0


def test_killed_mid_fill_leaves_nothing_that_could_be_served(upstream, tmp_path):
    image = fresh_image(upstream, 6_000_000)
    digest, size = image.layers[0]
    cache = tmp_path / "cache"
    upstream.set_fault(digest, "stall")  # half the body, then the upstream waits
    mirror = Mirror(tmp_path / "one", [f"reverse:{upstream.url}"], cache_dir=cache).start()
    try:
        client = RegistryClient(mirror.url)
        client.get_manifest(image.repo, image.tag)
        response = client.request("GET", f"/v2/{image.repo}/blobs/{digest}", stream=True)
        assert response.status_code == 200
        assert len(response.raw.read(1000)) == 1000  # the fill is streaming...
        upstream.wait_stalled(1, WAIT, digest=digest)  # ...and parked half-way
        parts = list((cache / "fills").iterdir())
        assert len(parts) == 1 and 0 < parts[0].stat().st_size < size
    finally:
        mirror.kill()
    try:
        rest = response.raw.read(size)
    except Exception:  # noqa: BLE001 - a reset is one way to see the cut
        rest = b""
    assert len(rest) < size - 1000  # the client's download was cut short
    upstream.clear_faults()
    upstream.reset_counters()
    with Mirror(tmp_path / "two", [f"reverse:{upstream.url}"], cache_dir=cache) as second:
        assert list((cache / "fills").iterdir()) == []  # swept on start
        assert not stored(second, digest)
        assert RegistryClient(second.url).get_blob(image.repo, digest, expected_size=size) == size
        # One new, complete upstream fetch (the killed one may still be winding down).
        fetches = [r for r in upstream.counters.requests
                   if r.method == "GET" and r.path.endswith(digest) and r.status in (200, 206)]
        assert [r.bytes for r in fetches] == [size]


def test_private_repository_needs_the_upstreams_consent(upstream, mirror, pushed_images):
    image = pushed_images.private
    with pytest.raises(PULL_ERRORS):
        RegistryClient(mirror.url).pull(image.repo, image.tag)
    result = RegistryClient(mirror.url, *ALICE).pull(image.repo, image.tag)
    assert result.layers == image.layers


def test_malformed_requests_get_oci_errors_and_the_mirror_keeps_serving(upstream, mirror, pushed_images):
    for path, code in [
        ("/v2/Bad/Name/blobs/sha256:" + "a" * 64, "NAME_INVALID"),
        ("/v2/library/alpine/blobs/sha256:zz", "DIGEST_INVALID"),
        ("/v2/library/alpine/blobs/md5:" + "a" * 32, "DIGEST_INVALID"),
        ("/v2/library/%2e%2e/blobs/sha256:" + "a" * 64, "NAME_INVALID"),
    ]:
        r = requests.get(mirror.url + path, timeout=WAIT)
        assert r.status_code == 400, path
        assert r.json()["errors"][0]["code"] == code
    assert upstream.counters.blob_gets == 0
    image = pushed_images.alpine
    assert RegistryClient(mirror.url).pull(image.repo, image.tag).layers == image.layers


def test_store_holds_exactly_the_verified_bytes(upstream, mirror):
    image = fresh_image(upstream, 2_500_000)
    digest, size = image.layers[0]
    mirror.wait_stored(RegistryClient(mirror.url).pull(image.repo, image.tag).blobs, WAIT)
    store = DiskBlobStore(mirror.cache_dir, size_limit=1 << 40)
    try:
        blob = store.open(digest)
        with blob.file:
            data = blob.file.read()
    finally:
        store.close()
    assert len(data) == size and "sha256:" + hashlib.sha256(data).hexdigest() == digest
    assert data == open(upstream.blob_path(digest), "rb").read()
    assert json.loads(image.manifest)["layers"][0]["digest"] == digest
    assert os.listdir(mirror.cache_dir / "fills") == []


class _BodyThatWaitsForTheUpstream:
    """A pushed layer (random bytes, known length) that, after `pause_at`
    bytes, waits until distribution has received `until` of them. Only a
    proxy that streams the body lets that happen; one that buffers it whole
    forwards nothing until the last byte is in."""

    def __init__(self, size: int, pause_at: int, until: int, upstream):
        self.size, self.pause_at, self.until, self.upstream = size, pause_at, until, upstream
        self.sent = 0
        self.hasher = hashlib.sha256()
        self.upstream_had_bytes_mid_body: bool | None = None

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        if self.sent >= self.pause_at and self.upstream_had_bytes_mid_body is None:
            self.upstream_had_bytes_mid_body = self.upstream.counters.wait_request_body_bytes(self.until, 20)
        n = min(n if n and n > 0 else 1 << 20, 1 << 20, self.size - self.sent)
        data = os.urandom(n)
        self.hasher.update(data)
        self.sent += n
        return data


def test_a_pushed_layer_streams_through_the_mirror(upstream, mirror):
    """Pushes pass through, and are not held in mitmproxy's memory whole (a
    multi-GB layer would cost its size in RAM)."""
    client = RegistryClient(mirror.url, *ALICE)
    repo = "push/streamed"
    started = client.request("POST", f"/v2/{repo}/blobs/uploads/")
    assert started.status_code == 202
    upstream.reset_counters()
    body = _BodyThatWaitsForTheUpstream(24 << 20, pause_at=12 << 20, until=4 << 20, upstream=upstream)
    patched = client.request("PATCH", started.headers["Location"], data=body, repo=repo,
                             headers={"Content-Type": "application/octet-stream", "Content-Length": str(body.size)})
    assert patched.status_code == 202, patched.text[:300]
    assert body.upstream_had_bytes_mid_body is True
    digest = "sha256:" + body.hasher.hexdigest()
    done = client.request("PUT", patched.headers["Location"], params={"digest": digest}, data=b"", repo=repo)
    assert done.status_code == 201 and done.headers["Docker-Content-Digest"] == digest
