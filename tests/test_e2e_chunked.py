"""End to end: chunked fills (ranges over several connections), fills that
resume after the upstream cuts them, and clients that fetch in chunks
themselves, against the real upstream (distribution, its CDN redirect)."""

from __future__ import annotations

import re
import subprocess
import threading

import pytest
import requests

from tests.harness.downloads import assert_no_complete_body
from tests.harness.fresh import fresh_image
from tests.harness.mirror import Mirror
from tests.harness.v2client import PULL_ERRORS, RegistryClient

WAIT = 60
MIB = 1 << 20
# Small chunks, so that test-sized blobs (6 MB) are fetched in several.
CHUNKED = {"fill_chunk_threshold": "1m", "fill_chunk_size": "1m", "fill_connections": "4"}


@pytest.fixture
def chunked_mirror(tmp_path, upstream_session):
    with Mirror(tmp_path / "mirror", [f"reverse:{upstream_session.url}"], options=CHUNKED) as m:
        yield m


def blob_gets(upstream, digest) -> list:
    """The upstream's answers to GETs of digest's bytes, front door and CDN."""
    hexdigest = digest.split(":", 1)[1]
    return [r for r in upstream.counters.snapshot()["requests"] if r.method == "GET" and hexdigest in r.path]


def one_layer(upstream, size=6_000_000):
    image = fresh_image(upstream, size)
    return image, *image.layers[0]


def test_a_chunked_fill_fetches_one_copy_in_ranges_and_stores_the_right_bytes(any_upstream, chunked_mirror):
    image, digest, size = one_layer(any_upstream)
    expected = open(any_upstream.blob_path(digest), "rb").read()
    client = RegistryClient(chunked_mirror.url)
    client.get_manifest(image.repo, image.tag)
    r = client.request("GET", f"/v2/{image.repo}/blobs/{digest}")
    assert r.status_code == 200 and r.content == expected
    chunked_mirror.wait_for_log(rf"fill: stored {digest} \({size} bytes\) in [\d.]+s \(4 connections\)", WAIT)
    gets = blob_gets(any_upstream, digest)
    bytes_served = [g for g in gets if g.status == 206]
    assert sorted(g.range for g in bytes_served) == sorted(
        [f"bytes=0-{MIB - 1}"] + [f"bytes={s}-{min(s + MIB, size) - 1}" for s in range(MIB, size, MIB)])
    assert any_upstream.counters.blob_bytes_for(digest) == size  # one copy
    if any_upstream.redirect_blobs:  # one redirect, then straight to the CDN, without the token
        assert [g.status for g in gets if g.server == "frontdoor"] == [307]
        assert all(g.server == "cdn" and not g.authorization for g in bytes_served)
    else:  # the registry serves the ranges itself, to the client's token
        assert all(g.server == "frontdoor" and g.authorization for g in bytes_served)
    any_upstream.reset_counters()
    assert client.get_blob(image.repo, digest, expected_size=size) == size
    assert any_upstream.counters.blob_bytes == 0  # stored


@pytest.mark.parametrize("where", ["start", "middle", "last-byte"])
def test_a_fill_the_upstream_cuts_resumes_and_its_client_sees_nothing(upstream_redirect, chunked_mirror, where):
    image, digest, size = one_layer(upstream_redirect)
    cut = {"start": 0, "middle": size // 2, "last-byte": size - 1}[where]
    upstream_redirect.set_fault(digest, "cut", at=cut, times=1)
    client = RegistryClient(chunked_mirror.url)
    assert client.pull(image.repo, image.tag).layers == image.layers  # verified, uninterrupted
    chunked_mirror.wait_for_log(rf"fill: stored {digest} .*1 resume\)", WAIT)
    assert chunked_mirror.wait_for_log(rf"fill: {digest}: .*; resuming at byte {cut} ", WAIT)
    assert upstream_redirect.counters.blob_bytes_for(digest) == size  # one copy
    cut_request = [g for g in blob_gets(upstream_redirect, digest) if g.fault == "cut"]
    assert len(cut_request) == 1 and cut_request[0].status == 206


def test_a_fill_over_one_connection_resumes_too(upstream_redirect, tmp_path, upstream_session):
    image, digest, size = one_layer(upstream_redirect)
    upstream_redirect.set_fault(digest, "cut", at=size // 2, times=1)
    with Mirror(tmp_path / "m", [f"reverse:{upstream_session.url}"], options={"fill_connections": "1"}) as mirror:
        assert RegistryClient(mirror.url).pull(image.repo, image.tag).layers == image.layers
        mirror.wait_for_log(rf"fill: stored {digest} .*\(1 connection, 1 resume\)", WAIT)
    ranges = [g.range for g in blob_gets(upstream_redirect, digest) if g.status in (200, 206)]
    assert ranges == [None, f"bytes={size // 2}-{size - 1}"]  # no Range but the resume's
    assert upstream_redirect.counters.blob_bytes_for(digest) == size


def test_an_upstream_that_keeps_cutting_fails_the_fill_after_bounded_resumes(upstream, chunked_mirror):
    image, digest, size = one_layer(upstream, 3_000_000)
    upstream.set_fault(digest, "truncate")  # every response: half its bytes, then the connection closes
    client = RegistryClient(chunked_mirror.url)
    client.get_manifest(image.repo, image.tag)
    with pytest.raises(PULL_ERRORS + (requests.RequestException,)):
        client.get_blob(image.repo, digest, expected_size=size)
    chunked_mirror.wait_for_log(rf"fill: {digest} failed: .*resumed 5 times in a row without progress", WAIT)
    assert not re.search(rf"fill: stored {digest}", chunked_mirror.log_text())
    upstream.clear_faults()
    assert client.get_blob(image.repo, digest, expected_size=size) == size
    chunked_mirror.wait_stored([digest], WAIT)


@pytest.mark.parametrize("scope", ["every range", "one chunk"])
def test_an_upstream_that_ignores_ranges_gets_one_connection(upstream_redirect, chunked_mirror, scope):
    """A CDN that answers Range with the whole blob (200): at once (one
    connection, one copy), or only for a later chunk (the rest over one
    connection, what the fill has skipped)."""
    image, digest, size = one_layer(upstream_redirect)
    at = None if scope == "every range" else 3 * MIB + 10
    upstream_redirect.set_fault(digest, "ignore-range", at=at)
    client = RegistryClient(chunked_mirror.url)
    assert client.pull(image.repo, image.tag).layers == image.layers
    chunked_mirror.wait_for_log(rf"fill: stored {digest} .*\(1 connection", WAIT)
    if scope == "every range":
        assert upstream_redirect.counters.blob_bytes_for(digest) == size
        assert [g.status for g in blob_gets(upstream_redirect, digest) if g.server == "cdn"] == [200]
    else:
        chunked_mirror.wait_for_log(rf"fill: {digest}: the upstream answered 200 to a Range request; "
                                    rf"fetching the rest \(from byte \d+\) over one connection", WAIT)


def test_an_expired_cdn_url_is_refreshed_at_the_registry(upstream_redirect, chunked_mirror):
    image, digest, size = one_layer(upstream_redirect)
    upstream_redirect.cdn_url_uses = 2  # each signed URL expires after two GETs
    assert RegistryClient(chunked_mirror.url).pull(image.repo, image.tag).layers == image.layers
    chunked_mirror.wait_stored([digest], WAIT)
    gets = blob_gets(upstream_redirect, digest)
    assert len([g for g in gets if g.server == "frontdoor" and g.status == 307]) >= 3  # fresh redirects
    assert not any(g.authorization for g in gets if g.server == "cdn")
    assert upstream_redirect.counters.blob_bytes_for(digest) == size


def test_a_corrupt_chunk_is_never_stored_nor_completed(upstream_redirect, chunked_mirror):
    image, digest, size = one_layer(upstream_redirect)
    upstream_redirect.set_fault(digest, "corrupt", at=4 * MIB + 7)  # one byte, in the fifth chunk
    client = RegistryClient(chunked_mirror.url)
    client.get_manifest(image.repo, image.tag)
    assert_no_complete_body(client, image.repo, digest, size)
    chunked_mirror.wait_for_log(rf"fill: {digest} failed: digest mismatch", WAIT)
    upstream_redirect.clear_faults()
    upstream_redirect.reset_counters()
    assert client.get_blob(image.repo, digest, expected_size=size) == size  # fetched afresh, verified
    chunked_mirror.wait_stored([digest], WAIT)
    assert upstream_redirect.counters.blob_bytes_for(digest) == size


def fetch_like_containerd_2_1(mirror_url: str, client: RegistryClient, repo: str, digest: str, size: int,
                              chunk: int, parallel: int) -> bytes:
    """A blob read as containerd 2.1's fetcher reads it with
    concurrent_layer_fetch_buffer (core/remotes/docker/fetcher.go, open()):
    `Range: bytes=0-` first (a 206 says the size), then `Range: bytes=N-`
    for each further chunk, `parallel` at a time, each read for `chunk` bytes
    and closed; the parts are joined in order."""
    token = client.request("GET", f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=0-0"})
    headers = {"Authorization": token.request.headers.get("Authorization", "")}
    parts: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def get(offset: int) -> None:
        try:
            with requests.get(f"{mirror_url}/v2/{repo}/blobs/{digest}", stream=True, timeout=WAIT,
                              headers={**headers, "Range": f"bytes={offset}-"}) as r:
                assert r.status_code == 206, r.status_code
                assert r.headers["Content-Range"] == f"bytes {offset}-{size - 1}/{size}"
                parts[offset] = r.raw.read(min(chunk, size - offset))
        except BaseException as exc:  # noqa: BLE001 - judged by the caller
            errors.append(exc)

    offsets = list(range(0, size, chunk))
    for i in range(0, len(offsets), parallel):
        threads = [threading.Thread(target=get, args=(o,)) for o in offsets[i:i + parallel]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
    assert not errors, errors
    return b"".join(parts[o] for o in offsets)


@pytest.mark.parametrize("fill_connections", ["4", "1"])
def test_clients_that_fetch_in_chunks_get_the_right_bytes_cold_and_warm_with_one_copy(
        upstream_redirect, tmp_path, upstream_session, fill_connections):
    image, digest, size = one_layer(upstream_redirect, 8_000_000)
    expected = open(upstream_redirect.blob_path(digest), "rb").read()
    options = {**CHUNKED, "fill_connections": fill_connections}
    with Mirror(tmp_path / "m", [f"reverse:{upstream_session.url}"], options=options) as mirror:
        client = RegistryClient(mirror.url)
        client.get_manifest(image.repo, image.tag)
        # Cold: the fill is held half-way, so most chunk requests wait ahead of it.
        upstream_redirect.set_fault(digest, "stall", at=size // 2, times=1)
        done = []
        reader = threading.Thread(target=lambda: done.append(
            fetch_like_containerd_2_1(mirror.url, client, image.repo, digest, size, 1_500_000, 6)))
        reader.start()
        upstream_redirect.wait_stalled(1, WAIT, digest=digest)
        upstream_redirect.release_stalls()
        reader.join(WAIT)
        assert done == [expected]
        mirror.wait_stored([digest], WAIT)
        assert upstream_redirect.counters.blob_bytes_for(digest) == size  # one copy, however many clients
        upstream_redirect.reset_counters()
        assert fetch_like_containerd_2_1(mirror.url, client, image.repo, digest, size, 1_500_000, 6) == expected
        assert upstream_redirect.counters.blob_bytes == 0  # warm: from the store


@pytest.mark.parametrize("name, value, message", [
    ("fill_connections", "0", "registry-cache: fill_connections must be 1 to 64"),
    ("fill_chunk_size", "lots", "registry-cache: not a size: 'lots'"),
    ("fill_chunk_threshold", "100k", "registry-cache: fill_chunk_threshold and fill_chunk_size must be 1m or more"),
])
def test_an_unusable_fill_option_stops_mitmdump_at_start(tmp_path, upstream, name, value, message):
    command = Mirror(tmp_path / "m", [f"reverse:{upstream.url}"], options={name: value}).command()
    done = subprocess.run(command, capture_output=True, text=True, timeout=WAIT)
    assert done.returncode != 0
    assert message in done.stdout + done.stderr
