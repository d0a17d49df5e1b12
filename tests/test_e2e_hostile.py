"""End to end, property-based: whatever a client sends under /v2/, the mirror
answers it with a 4xx (OCI error JSON where it answers itself) or passes it
on, never a 5xx or a hang, and it keeps serving afterwards."""

from __future__ import annotations

import http.client
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness.mirror import Mirror
from tests.harness.v2client import RegistryClient

WAIT = 30
SEGMENTS = st.sampled_from([
    "library", "alpine", "a", "A", "..", ".", "%2e%2e", "%2f", "%2F", "%00", "blobs", "manifests", "uploads",
    "tags", "list", "sha256:" + "a" * 64, "sha256:" + "A" * 64, "sha512:" + "b" * 128, "sha256:zz", "md5:x",
    "latest", "-x", "x-", "_", "a__b", "a" * 300, "~", "@", "%", "a%20b", "?ns=docker.io", "?ns=", "&",
])


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, upstream_session):
    # Only the test upstream may be named with ?ns= (the default list names
    # public registries this sandbox cannot reach).
    with Mirror(tmp_path_factory.mktemp("hostile"), [f"reverse:{upstream_session.url}"],
                options={"registries": f"{upstream_session.host_port}={upstream_session.url}"}) as m:
        yield m


def send(mirror: Mirror, method: str, path: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", mirror.ports[0], timeout=WAIT)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        conn.close()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "HEAD", "DELETE"]), segments=st.lists(SEGMENTS, min_size=1, max_size=8))
def test_any_path_gets_a_clean_answer(mirror, method, segments):
    path = "/v2/" + "/".join(segments)
    status, body, headers = send(mirror, method, path)
    assert status < 500, (path, status, body[:300])
    if headers.get("Content-Type") == "application/json" and status >= 400 and method != "HEAD":
        assert json.loads(body)["errors"], (path, body[:300])  # an OCI error, ours or the registry's


def test_huge_headers_are_refused(mirror):
    status, body, _ = send(mirror, "GET", "/v2/library/alpine/manifests/latest", {"X-Filler": "x" * 40_000})
    assert status == 431 and json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


def test_the_mirror_still_serves_after_all_that(mirror, upstream, pushed_images):
    # Some of the worst of it again, so this holds when run on its own too.
    for path in ("/v2/..%2f..%2fetc%2fpasswd/blobs/sha256:" + "a" * 64, "/v2/" + "a" * 3000,
                 "/v2/library/alpine/blobs/sha256:" + "A" * 64, "/v2/library/alpine/manifests/%00",
                 "/v2/../../blobs/sha256:" + "a" * 64):
        assert send(mirror, "GET", path)[0] < 500, path
    assert send(mirror, "GET", "/v2/library/alpine/manifests/latest", {"X-Filler": "x" * 40_000})[0] == 431
    image = pushed_images.alpine
    pulled = RegistryClient(mirror.url).pull(image.repo, image.tag)
    assert pulled.layers == image.layers
    mirror.wait_stored(pulled.blobs, WAIT)
    assert list((mirror.cache_dir / "fills").iterdir()) == []


def _get_with_raw_header(mirror: Mirror, path: str, name: str, value: bytes):
    """(status, headers, body) of a GET carrying one header as raw bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", mirror.ports[0], timeout=WAIT)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def test_a_header_value_that_is_not_latin1_is_relayed_not_an_addon_crash(mirror):
    """Bytes a client sends in a header go upstream as they are; before, the
    addon raised on them and mitmproxy answered in its place."""
    status, headers, _ = _get_with_raw_header(mirror, "/v2/", "X-Odd", b"\xff\xfe caf\xc3\xa9")
    assert status == 401 and "WWW-Authenticate" in headers  # the upstream's own challenge
    assert "Addon error" not in mirror.log_text()


def _send_with_body(mirror: Mirror, method: str, path: str, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", mirror.ports[0], timeout=WAIT)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_refused_requests_with_large_bodies_get_their_error_and_the_proxy_goes_on(mirror):
    """A large body on a request the mirror refuses (or answers itself): the
    OCI error as for any other, and no failure in mitmproxy's HTTP layer
    (which streaming turned on for such a body would cause)."""
    start = len(mirror.lines)
    big = b"\0" * (3 << 20)
    status, body = _send_with_body(mirror, "PATCH", "/v2/../x/blobs/uploads/u", big)
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "NAME_INVALID"
    status, body = _send_with_body(mirror, "GET", "/v2/library/alpine/blobs/sha256:" + "A" * 64, big)
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "DIGEST_INVALID"
    assert not re.search(r"mitmproxy has crashed|Traceback", "\n".join(mirror.lines[start:]))
    assert RegistryClient(mirror.url).ping() in (200, 401)


def test_an_authorization_header_that_is_not_ascii_is_a_clean_400(mirror):
    status, _, body = _get_with_raw_header(mirror, "/v2/library/alpine/manifests/latest", "Authorization",
                                           b"Bearer \xff\xfe")
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
    assert "Addon error" not in mirror.log_text()
