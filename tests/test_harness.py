"""The upstream harness itself, against the real registry (no mirror involved).

If these fail, mirror test failures mean nothing: they prove that the token
server's JWTs are accepted, that images push and pull with correct digests,
that the front door and the CDN count exactly and relay faithfully, and that
every injected fault does what the harness promises.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import ssl
from urllib.parse import urlsplit

import pytest
import requests
import urllib3

from tests.harness.certs import libtrust_key_id
from tests.harness.images import make_layer, make_layer_file, push_blob, push_image
from tests.harness.skopeo import (
    ClosedPort, SkopeoError, make_skopeo_home, skopeo_copy, skopeo_inspect, verify_dir_image,
)
from tests.harness.tokenserver import decode_jwt, parse_scope
from tests.harness.upstream import ALICE, BOB, Upstream
from tests.harness.v2client import (
    DOCKER_MANIFEST, DOCKER_SCHEMA1_SIGNED, OCI_INDEX, OCI_MANIFEST, RegistryClient,
    RegistryError, TransferError, VerificationError,
)


# ----------------------------------------------------------------------------- helpers
def token_for(u: Upstream, repo: str, auth=None, actions="pull") -> str:
    resp = requests.get(u.token_realm, params={"service": u.service, "scope": f"repository:{repo}:{actions}"},
                        auth=auth, verify=u.ca_cert_path or True)
    resp.raise_for_status()
    return resp.json()["token"]


def raw_get(url: str, headers: dict | None = None, method: str = "GET"):
    """One request with http.client: (status, headers, body, error). Never follows redirects.

    ``error`` is the exception that ended the body early (the body is then
    what had arrived), or that prevented any response.
    """
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, parts.path + ("?" + parts.query if parts.query else ""), headers=headers or {})
        resp = conn.getresponse()
        try:
            body, error = resp.read(), None
        except http.client.IncompleteRead as exc:
            body, error = exc.partial, exc
        return resp.status, resp.headers, body, error
    except (OSError, http.client.HTTPException) as exc:
        return None, None, b"", exc
    finally:
        conn.close()


def blob_content(u: Upstream, digest: str) -> bytes:
    with open(u.blob_path(digest), "rb") as f:
        return f.read()


# ----------------------------------------------------------------------------- tokens
def test_jwt_is_what_distribution_expects(upstream):
    token = token_for(upstream, "library/alpine")
    header, claims = decode_jwt(token)
    kid = upstream.tokens.signing_key.kid
    assert header == {"typ": "JWT", "alg": "RS256", "kid": kid}
    assert re.fullmatch(r"([A-Z2-7]{4}:){11}[A-Z2-7]{4}", kid)
    assert kid == libtrust_key_id(upstream.tokens.signing_key.cert.public_key())
    assert claims["iss"] == upstream.issuer and claims["aud"] == upstream.service
    assert claims["nbf"] <= claims["iat"] < claims["exp"]
    assert claims["access"] == [{"type": "repository", "name": "library/alpine", "actions": ["pull"]}]
    # ... and distribution accepts it.
    status, _, _, _ = raw_get(upstream.url + "/v2/", {"Authorization": f"Bearer {token}"})
    assert status == 200


def test_token_policy(upstream):
    realm, service = upstream.token_realm, upstream.service

    def access(auth=None, scope="repository:acme/private:pull,push"):
        r = requests.get(realm, params={"service": service, "scope": scope}, auth=auth)
        return r.status_code, (decode_jwt(r.json()["token"])[1]["access"] if r.ok else None)

    assert access() == (200, [{"type": "repository", "name": "acme/private", "actions": []}])
    assert access(scope="repository:library/x:pull,push")[1][0]["actions"] == ["pull"]
    assert access(ALICE)[1][0]["actions"] == ["pull", "push"]
    assert access(BOB)[1][0]["actions"] == []
    assert access(BOB, "repository:library/x:pull,push")[1][0]["actions"] == ["pull", "push"]
    assert access(("alice", "wrong"))[0] == 401
    assert access(("mallory", "x"))[0] == 401
    assert parse_scope("repository:127.0.0.1:5000/a/b:pull") == ("repository", "127.0.0.1:5000/a/b", ["pull"])
    assert upstream.tokens_issued == 5


def test_token_post_oauth_and_refresh(upstream):
    realm, service = upstream.token_realm, upstream.service
    scope = "repository:acme/private:pull repository:library/x:push"
    r = requests.post(realm, data={"grant_type": "password", "username": "alice", "password": ALICE[1],
                                   "service": service, "scope": scope, "client_id": "containerd",
                                   "access_type": "offline"})
    assert r.status_code == 200
    body = r.json()
    assert body["token"] == body["access_token"] and body["expires_in"] > 0 and body["issued_at"]
    assert [a["actions"] for a in decode_jwt(body["access_token"])[1]["access"]] == [["pull"], ["push"]]
    refresh = body["refresh_token"]

    r = requests.post(realm, data={"grant_type": "refresh_token", "refresh_token": refresh,
                                   "service": service, "scope": "repository:acme/private:pull"})
    assert r.status_code == 200 and "refresh_token" not in r.json()
    assert decode_jwt(r.json()["access_token"])[1]["sub"] == "alice"

    bad = {"grant_type": "password", "username": "alice", "password": "nope", "service": service}
    assert requests.post(realm, data=bad).status_code == 401
    assert requests.post(realm, data={"grant_type": "refresh_token", "refresh_token": "x"}).status_code == 401
    assert requests.post(realm, data={"grant_type": "client_credentials"}).status_code == 400


# ----------------------------------------------------------------------------- pulls
def test_pull_through_front_door_counts_blob_bytes_exactly(upstream, pushed_images):
    img = pushed_images.alpine
    result = RegistryClient(upstream.url).pull("library/alpine", "latest")
    assert result.digest == img.digest and result.media_type == OCI_MANIFEST
    assert result.config_digest == img.config_digest and result.layers == img.layers

    c = upstream.counters.snapshot()
    assert c["blob_bytes"] == img.blob_bytes
    assert c["blob_bytes_by_digest"] == {d: s for d, s in img.blobs}
    assert c["blob_gets"] == 3 and c["cdn_gets"] == 0
    # Every request counts, the anonymous first try (401) included.
    assert c["manifest_gets_by_ref"] == {"library/alpine:latest": 2}
    assert [r.status for r in c["requests"] if "/manifests/" in r.path] == [401, 200]
    blob_records = [r for r in c["requests"] if "/blobs/" in r.path]
    assert all(r.status == 200 and r.authorization for r in blob_records)
    assert sum(r.bytes for r in blob_records) == img.blob_bytes
    assert upstream.tokens_issued == 1  # one anonymous pull token, reused
    assert upstream.errors() == []


def test_pull_multi_arch_index(upstream, pushed_images):
    client = RegistryClient(upstream.url)
    for index in (pushed_images.multi, pushed_images.dockerlist):
        for platform, image in index.images.items():
            result = client.pull(index.repo, "latest", platform=platform)
            assert result.digest == index.digest and result.media_type == index.media_type
            assert result.manifest_digest == image.digest
            assert result.layers == image.layers
            assert (result.config["os"], result.config["architecture"]) == platform[:2]


def test_head_manifest_and_counters(upstream, pushed_images):
    client = RegistryClient(upstream.url)
    head = client.head_manifest("library/multi", "latest")
    assert (head.media_type, head.digest) == (OCI_INDEX, pushed_images.multi.digest)
    assert head.size == len(pushed_images.multi.manifest)
    body, media_type, digest = client.get_manifest("library/multi", pushed_images.multi.digest)
    assert body == pushed_images.multi.manifest
    c = upstream.counters.snapshot()
    assert (c["manifest_heads"], c["manifest_gets"]) == (2, 1)  # 401 + 200, then 200
    assert c["manifest_gets_by_ref"] == {f"library/multi:{pushed_images.multi.digest}": 1}


def test_client_detects_wrong_manifest_digest(upstream, pushed_images):
    other = pushed_images.schema2.digest
    with pytest.raises(RegistryError) as err:  # distribution: unknown digest in this repo
        RegistryClient(upstream.url).get_manifest("library/alpine", other)
    assert err.value.status == 404 and err.value.codes == ["MANIFEST_UNKNOWN"]


def test_repeated_accept_lines_reach_distribution(upstream, pushed_images):
    """A schema2 image stays schema2 only if the second Accept line gets through."""
    token = token_for(upstream, "library/schema2")
    port = int(upstream.host_port.split(":")[1])

    def get(accept_lines):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.putrequest("GET", "/v2/library/schema2/manifests/latest")
            conn.putheader("Authorization", f"Bearer {token}")
            for line in accept_lines:
                conn.putheader("Accept", line)
            conn.endheaders()
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, resp.getheader("Content-Type"), "sha256:" + hashlib.sha256(body).hexdigest()
        finally:
            conn.close()

    status, ctype, digest = get([OCI_MANIFEST, DOCKER_MANIFEST])
    assert (status, ctype, digest) == (200, DOCKER_MANIFEST, pushed_images.schema2.digest)
    # Control: with the first line only, distribution down-converts to schema1.
    status, ctype, digest = get([OCI_MANIFEST])
    assert status == 200 and ctype == DOCKER_SCHEMA1_SIGNED and digest != pushed_images.schema2.digest


def test_private_repo_needs_credentials(upstream, pushed_images):
    with pytest.raises(RegistryError) as err:
        RegistryClient(upstream.url).pull("acme/private", "latest")
    assert err.value.status == 401 and err.value.codes == ["UNAUTHORIZED"]
    with pytest.raises(RegistryError) as err:
        RegistryClient(upstream.url, *BOB).pull("acme/private", "latest")
    assert err.value.status == 401
    with pytest.raises(RegistryError) as err:
        RegistryClient(upstream.url, "alice", "wrong").pull("acme/private", "latest")
    assert err.value.status == 401  # from the token server
    result = RegistryClient(upstream.url, *ALICE).pull("acme/private", "latest")
    assert result.digest == pushed_images.private.digest
    # Anonymous clients may not push.
    with pytest.raises(RegistryError) as err:
        push_blob(upstream.url, "library/alpine", b"anonymous")
    assert err.value.status == 401


def test_push_streams_big_file_and_chunked_bodies(upstream, tmp_path):
    layer = make_layer_file(str(tmp_path / "layer.tgz"), 5 * 1024 * 1024, seed=42)
    assert open(layer.path, "rb").read() == make_layer(5 * 1024 * 1024, 42)
    digest, size = push_blob(upstream.url, "test/bigpush", layer, auth=ALICE, chunk_size=2 * 1024 * 1024)
    assert (digest, size) == (layer.digest, layer.size)
    assert RegistryClient(upstream.url).get_blob("test/bigpush", digest) == size

    # A Transfer-Encoding: chunked request body is relayed too.
    client = RegistryClient(upstream.url, *ALICE)
    data = os.urandom(300_000)
    resp = client.request("POST", "/v2/test/bigpush/blobs/uploads/")
    assert resp.status_code == 202
    resp = client.request("PATCH", resp.headers["Location"], repo="test/bigpush",
                          data=(data[i:i + 70_000] for i in range(0, len(data), 70_000)))
    assert resp.status_code == 202, resp.text
    want = "sha256:" + hashlib.sha256(data).hexdigest()
    resp = client.request("PUT", resp.headers["Location"], params={"digest": want}, data=b"",
                          repo="test/bigpush")
    assert resp.status_code == 201 and resp.headers["Docker-Content-Digest"] == want
    assert client.get_blob("test/bigpush", want) == len(data)


# ----------------------------------------------------------------------------- skopeo
def test_skopeo_pulls_directly(upstream, pushed_images, tmp_path):
    home = make_skopeo_home(str(tmp_path / "home"), primary=upstream.host_port)
    dest = tmp_path / "alpine"
    skopeo_copy(f"{upstream.host_port}/library/alpine:latest", str(dest), home)
    got = verify_dir_image(str(dest))
    img = pushed_images.alpine
    assert got["manifest_digest"] == img.digest
    assert got["blobs"] == {d: s for d, s in img.blobs}
    assert upstream.counters.blob_bytes == img.blob_bytes

    # An index resolves to the requested platform.
    dest = tmp_path / "multi-arm64"
    skopeo_copy(f"{upstream.host_port}/library/multi:latest", str(dest), home, override_arch="arm64")
    assert verify_dir_image(str(dest))["manifest_digest"] == pushed_images.multi.images[("linux", "arm64", "v8")].digest

    # --all copies the index and every platform.
    dest = tmp_path / "multi-all"
    skopeo_copy(f"{upstream.host_port}/library/multi:latest", str(dest), home, all=True)
    got = verify_dir_image(str(dest))
    assert got["manifest_digest"] == pushed_images.multi.digest
    assert set(got["manifests"]) == {i.digest for i in pushed_images.multi.images.values()}

    # skopeo sends one Accept line per type: the schema2 image stays schema2.
    raw = skopeo_inspect(f"{upstream.host_port}/library/schema2:latest", home)
    assert "sha256:" + hashlib.sha256(raw.encode()).hexdigest() == pushed_images.schema2.digest


def test_skopeo_private_repo(upstream, pushed_images, tmp_path):
    home = make_skopeo_home(str(tmp_path / "home"), primary=upstream.host_port)
    ref = f"{upstream.host_port}/acme/private:latest"
    with pytest.raises(SkopeoError) as err:
        skopeo_copy(ref, str(tmp_path / "anon"), home)
    assert "unauthorized" in err.value.stderr.lower() or "denied" in err.value.stderr.lower()
    skopeo_copy(ref, str(tmp_path / "alice"), home, src_creds=ALICE)
    assert verify_dir_image(str(tmp_path / "alice"))["manifest_digest"] == pushed_images.private.digest


def test_skopeo_mirror_config_falls_to_closed_primary(upstream, pushed_images, tmp_path):
    """With the mirror (here: the front door) down, skopeo's fallback hits a closed port."""
    with ClosedPort() as primary:
        home = make_skopeo_home(str(tmp_path / "home"), primary=primary.host_port, mirror=upstream.host_port)
        ref = f"{primary.host_port}/library/alpine:latest"
        skopeo_copy(ref, str(tmp_path / "ok"), home)
        assert verify_dir_image(str(tmp_path / "ok"))["manifest_digest"] == pushed_images.alpine.digest
        upstream.set_down(True)
        with pytest.raises(SkopeoError) as err:
            skopeo_copy(ref, str(tmp_path / "down"), home, timeout=60)
        assert "connection refused" in err.value.stderr


# ----------------------------------------------------------------------------- redirect + CDN
def test_redirect_to_cdn(upstream_redirect, pushed_images):
    u = upstream_redirect
    digest, size = pushed_images.alpine.layers[1]
    token = token_for(u, "library/alpine")
    status, headers, body, _ = raw_get(f"{u.url}/v2/library/alpine/blobs/{digest}",
                                       {"Authorization": f"Bearer {token}"})
    assert status == 307 and body == b""
    location = headers["Location"]
    assert location.startswith(u.cdn_url + "/")

    # Docker Hub's CDN refuses a request that still carries the registry token.
    status, _, _, _ = raw_get(location, {"Authorization": f"Bearer {token}"})
    assert status == 400
    status, headers, body, _ = raw_get(location)
    assert status == 200 and int(headers["Content-Length"]) == size
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
    status, headers, body, _ = raw_get(location, {"Range": "bytes=100-199"})
    assert status == 206 and headers["Content-Range"] == f"bytes 100-199/{size}"
    assert body == blob_content(u, digest)[100:200]
    status, headers, body, _ = raw_get(location, method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) == size

    # Signatures are checked and expire.
    assert raw_get(location.replace("verify=", "verify=0"))[0] == 403
    assert raw_get(u.cdn_url_for(digest, ttl=-1))[0] == 403
    # Without a token the front door relays distribution's 401, no redirect.
    status, headers, body, _ = raw_get(f"{u.url}/v2/library/alpine/blobs/{digest}")
    assert status == 401 and json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"

    c = u.counters.snapshot()
    # CDN requests refused (Authorization, bad signature) are recorded, not counted.
    assert c["blob_gets"] == 2 and c["cdn_gets"] == 2 and c["cdn_heads"] == 1
    assert [r.status for r in c["requests"] if r.server == "cdn"] == [400, 200, 206, 200, 403, 403]
    assert c["blob_bytes"] == size + 100


def test_client_follows_redirect_without_leaking_token(upstream_redirect, pushed_images):
    u = upstream_redirect
    img = pushed_images.alpine
    result = RegistryClient(u.url).pull("library/alpine", "latest")
    assert result.layers == img.layers
    c = u.counters.snapshot()
    assert c["blob_bytes"] == img.blob_bytes and c["cdn_gets"] == 3 and c["blob_gets"] == 3
    cdn = [r for r in c["requests"] if r.server == "cdn"]
    assert len(cdn) == 3 and not any(r.authorization for r in cdn)
    assert all(r.status == 307 for r in c["requests"] if r.server == "frontdoor" and "/blobs/" in r.path)
    # Pinned to the front door, a fault replaces the redirect.
    u.set_fault(img.layers[0][0], 503, where="frontdoor")
    with pytest.raises(RegistryError) as err:
        RegistryClient(u.url).get_blob("library/alpine", img.layers[0][0])
    assert err.value.status == 503


# ----------------------------------------------------------------------------- faults
def _fetch_blob_raw(u: Upstream, digest: str, token: str):
    """A blob GET as raw as possible: (status, headers, body, error), following one redirect."""
    status, headers, body, error = raw_get(f"{u.url}/v2/library/alpine/blobs/{digest}",
                                           {"Authorization": f"Bearer {token}"})
    if status == 307:
        status, headers, body, error = raw_get(headers["Location"])
    return status, headers, body, error


@pytest.mark.parametrize("redirect", [False, True], ids=["relay", "cdn"])
def test_faults(upstream_session, pushed_images, redirect):
    u = upstream_session
    u.redirect_blobs = redirect
    try:
        digest, size = pushed_images.alpine.layers[1]
        original = blob_content(u, digest)
        token = token_for(u, "library/alpine")
        client = RegistryClient(u.url)

        u.set_fault(digest, "corrupt")
        status, headers, body, error = _fetch_blob_raw(u, digest, token)
        assert status == 200 and error is None and len(body) == size
        diff = [i for i in range(size) if body[i] != original[i]]
        assert diff == [size // 2]
        with pytest.raises(VerificationError):
            client.get_blob("library/alpine", digest)

        u.set_fault(digest, "truncate")
        status, headers, body, error = _fetch_blob_raw(u, digest, token)
        assert status == 200 and int(headers["Content-Length"]) == size
        assert isinstance(error, http.client.IncompleteRead) and body == original[: size // 2]
        with pytest.raises(TransferError):
            client.get_blob("library/alpine", digest)

        u.set_fault(digest, "close")
        status, _, _, error = _fetch_blob_raw(u, digest, token)
        assert status is None and isinstance(error, http.client.RemoteDisconnected)
        with pytest.raises(requests.ConnectionError):
            client.get_blob("library/alpine", digest)

        for code, error_code in ((429, "TOOMANYREQUESTS"), (500, "UNKNOWN"), (503, "UNAVAILABLE")):
            u.set_fault(digest, code)
            status, headers, body, _ = _fetch_blob_raw(u, digest, token)
            assert status == code and json.loads(body)["errors"][0]["code"] == error_code
            assert (headers.get("Retry-After") is not None) == (code == 429)

        # Limited faults wear off; other blobs are never affected.
        u.set_fault(digest, 503, times=1)
        with pytest.raises(RegistryError):
            client.get_blob("library/alpine", digest)
        assert client.get_blob("library/alpine", digest) == size
        other, other_size = pushed_images.alpine.layers[0]
        u.set_fault(digest, "close")
        assert client.get_blob("library/alpine", other) == other_size
        u.clear_faults()
        assert client.get_blob("library/alpine", digest) == size
        assert u.errors() == []
    finally:
        u.clear_faults()
        u.redirect_blobs = False


def test_range_is_relayed(upstream, pushed_images):
    digest, size = pushed_images.alpine.layers[1]
    client = RegistryClient(upstream.url)
    assert client.get_blob("library/alpine", digest, range_=(size - 1000, None)) == 1000
    assert upstream.counters.blob_bytes == 1000


def test_set_down_cuts_and_restores(upstream, pushed_images):
    client = RegistryClient(upstream.url)
    assert client.ping() == 200
    # A keep-alive connection exists now; going down must cut it too.
    upstream.set_down(True)
    with pytest.raises(requests.ConnectionError):
        client.head_manifest("library/alpine", "latest")
    with pytest.raises(requests.ConnectionError):
        RegistryClient(upstream.url).ping()
    with pytest.raises(requests.ConnectionError):
        requests.get(upstream.token_realm)
    upstream.set_down(False)
    assert client.head_manifest("library/alpine", "latest").digest == pushed_images.alpine.digest


def test_down_mid_transfer(upstream, tmp_path):
    """Going down cuts a transfer in flight (the front door reads 1 MiB at a time)."""
    layer = make_layer_file(str(tmp_path / "l.tgz"), 24 * 1024 * 1024, seed=77)
    push_blob(upstream.url, "test/midway", layer, auth=ALICE)
    client = RegistryClient(upstream.url)
    resp = client.request("GET", f"/v2/test/midway/blobs/{layer.digest}", stream=True)
    first = resp.raw.read(1024 * 1024)
    assert len(first) == 1024 * 1024
    upstream.set_down(True)
    received, error = len(first), None
    try:
        while chunk := resp.raw.read(1024 * 1024):
            received += len(chunk)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        error = exc
    assert error is not None, f"stream ended cleanly after {received} bytes"
    assert received < layer.size
    resp.close()


# ----------------------------------------------------------------------------- https, lifecycle
def test_https_upstream(upstream_https, tmp_path):
    u = upstream_https
    assert u.url.startswith("https://127.0.0.1:") and u.cdn_url.startswith("https://")
    img = push_image(u.url, "library/tls", "v1", [make_layer(64 * 1024, 9)], auth=ALICE, verify=u.ca_cert_path)
    client = RegistryClient(u.url, verify=u.ca_cert_path)
    assert client.pull("library/tls", "v1").digest == img.digest
    u.redirect_blobs = True
    try:
        u.reset_counters()
        assert RegistryClient(u.url, verify=u.ca_cert_path).pull("library/tls", "v1").layers == img.layers
        assert u.counters.cdn_gets == 2
    finally:
        u.redirect_blobs = False
    with pytest.raises(requests.exceptions.SSLError):
        RegistryClient(u.url).ping()
    # The certificate is valid for localhost as well.
    ctx = ssl.create_default_context(cafile=u.ca_cert_path)
    with socket.create_connection(("127.0.0.1", int(u.host_port.split(":")[1])), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="localhost"):
            pass


def test_start_stop_cleans_up():
    u = Upstream(users={}, private_repos={})
    u.start()
    proc, workdir, port = u._proc, u.workdir, int(u.host_port.split(":")[1])
    assert RegistryClient(u.url).ping() == 200
    u.stop()
    assert proc.poll() is not None
    assert not os.path.exists(workdir)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
