"""End to end: a stored blob is served only to clients the upstream lets pull
that repository, and only for repositories seen to contain it."""

from __future__ import annotations

import threading

import pytest
import requests

from tests.harness._http import LoopbackHTTPServer, QuietHandler
from tests.harness.fresh import fresh_image, fresh_layer, unique_seed
from tests.harness.images import push_image
from tests.harness.mirror import Mirror
from tests.harness.upstream import ALICE, BOB
from tests.harness.v2client import RegistryClient, RegistryError

WAIT = 60
PRIVATE = "acme/private"  # the harness's token server lets only alice pull it


def private_image(upstream):
    image = push_image(upstream.url, PRIVATE, f"t{unique_seed()}", [fresh_layer(800_000)], auth=ALICE)
    upstream.reset_counters()
    return image


def refused(client: RegistryClient, repo: str, digest: str) -> int:
    """The status a client gets for a blob it must not read (asserting no bytes came)."""
    response = client.request("GET", f"/v2/{repo}/blobs/{digest}")
    assert response.status_code in (401, 403, 404), response.status_code
    assert len(response.content) < 10_000 and response.json()["errors"]  # an error, not the blob
    return response.status_code


def test_private_blobs_stay_private(upstream, mirror, pushed_images):
    image = private_image(upstream)
    layer, size = image.layers[0]
    assert RegistryClient(mirror.url, *ALICE).pull(image.repo, image.tag).layers == image.layers
    mirror.wait_for_log(rf"fill: stored {layer}", WAIT)
    upstream.reset_counters()

    # Anonymous, and a user the upstream does not let pull the repository.
    assert refused(RegistryClient(mirror.url), PRIVATE, layer) == 401
    assert refused(RegistryClient(mirror.url, *BOB), PRIVATE, layer) == 401
    # Probing through a public repository the client may pull: the upstream
    # says that repository has no such blob, so neither does the mirror.
    anonymous = RegistryClient(mirror.url)
    anonymous.get_manifest(pushed_images.alpine.repo, pushed_images.alpine.tag)
    assert refused(anonymous, pushed_images.alpine.repo, layer) == 404
    alice = RegistryClient(mirror.url, *ALICE)
    alice.get_manifest(pushed_images.alpine.repo, pushed_images.alpine.tag)
    assert refused(alice, pushed_images.alpine.repo, layer) == 404
    assert upstream.counters.blob_bytes == 0  # not one byte fetched, not one served

    # Alice, with a new token, gets the blob from the store: the manifest HEAD
    # the mirror makes for her GET by tag (tags stay fresh; a HEAD is no pull)
    # proves her token, so the manifests and blobs cost nothing more.
    upstream.reset_counters()
    fresh = RegistryClient(mirror.url, *ALICE)
    assert fresh.pull(image.repo, image.tag).layers == image.layers
    assert upstream.counters.blob_bytes == 0 and upstream.counters.blob_gets == 0
    assert upstream.counters.blob_heads == 0 and upstream.counters.manifest_gets == 0
    assert upstream.counters.manifest_heads >= 1
    # Without a manifest request first, one blob HEAD with the token proves it
    # (the client's first, token-less try is answered with the upstream's 401).
    upstream.reset_counters()
    direct = RegistryClient(mirror.url, *ALICE)
    direct.get_blob(image.repo, layer, expected_size=size)
    heads = [r for r in upstream.counters.requests if r.method == "HEAD" and "/blobs/" in r.path]
    assert [(r.authorization, r.status) for r in heads] == [(False, 401), (True, 200)]
    assert upstream.counters.blob_bytes == 0
    upstream.reset_counters()
    assert fresh.pull(image.repo, image.tag).layers == image.layers  # same token: remembered
    assert upstream.counters.blob_heads == 0


def test_joining_a_fill_needs_the_same_consent(upstream, mirror):
    """A client arriving while alice's fill runs gets nothing it may not read."""
    image = private_image(upstream)
    layer, size = image.layers[0]
    upstream.set_fault(layer, "stall")
    alice = RegistryClient(mirror.url, *ALICE)
    alice.get_manifest(image.repo, image.tag)
    response = alice.request("GET", f"/v2/{image.repo}/blobs/{layer}", stream=True)
    assert response.status_code == 200 and len(response.raw.read(1000)) == 1000
    upstream.wait_stalled(1, WAIT, digest=layer)
    assert refused(RegistryClient(mirror.url, *BOB), PRIVATE, layer) == 401
    upstream.release_stalls()
    rest = response.raw.read(size)
    assert 1000 + len(rest) == size


def test_known_public_repositories_cost_no_extra_round_trip(upstream, mirror):
    image = fresh_image(upstream, 300_000, 200_000)
    RegistryClient(mirror.url).pull(image.repo, image.tag)
    mirror.wait_for_log(rf"access: .*/{image.repo} is public", WAIT)
    upstream.reset_counters()
    for _ in range(3):  # other anonymous clients, each with its own token
        assert RegistryClient(mirror.url).pull(image.repo, image.tag).layers == image.layers
    assert upstream.counters.blob_heads == 0 and upstream.counters.blob_gets == 0


def test_a_private_blob_needs_credentials_even_when_already_stored(upstream, mirror):
    """The HEAD of a stored private blob is refused too (no size or existence leak)."""
    image = private_image(upstream)
    layer, _ = image.layers[0]
    RegistryClient(mirror.url, *ALICE).pull(image.repo, image.tag)
    mirror.wait_stored([layer], WAIT)  # refused although stored, not merely passed through
    anonymous = RegistryClient(mirror.url)
    response = anonymous.request("HEAD", f"/v2/{PRIVATE}/blobs/{layer}")
    assert response.status_code == 401
    assert response.headers.get("Content-Length") in (None, "0")
    with pytest.raises(RegistryError):
        anonymous.get_blob(PRIVATE, layer)


class YesRegistry(QuietHandler):
    """A registry a client runs itself: every blob exists, every GET is junk."""

    def do_HEAD(self):  # noqa: N802 - http.server naming
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()

    def do_GET(self):  # noqa: N802
        self.send_body(200, b"junk from the client's own registry", "application/octet-stream")


def test_a_host_named_in_regular_mode_cannot_vouch_for_a_stored_private_blob(tmp_path, upstream):
    """In regular mode the client names the host. A host of its own that says
    yes to every HEAD must not unlock what the real registry keeps private:
    it has to serve the bytes itself, and it cannot."""
    image = private_image(upstream)
    layer, size = image.layers[0]
    private_bytes = open(upstream.blob_path(layer), "rb").read()
    evil = LoopbackHTTPServer(YesRegistry, name="yes-registry").start()
    try:
        with Mirror(tmp_path / "m", [f"reverse:{upstream.url}", "regular"]) as mirror:
            RegistryClient(mirror.url_of(0), *ALICE).pull(image.repo, image.tag)
            mirror.wait_for_log(rf"fill: stored {layer}", WAIT)
            proxy = {"http": mirror.url_of(1)}
            try:
                got = requests.get(f"{evil.url}/v2/x/y/blobs/{layer}", proxies=proxy, timeout=WAIT).content
            except requests.RequestException:  # a cut body: also not the blob
                got = b""
            assert got != private_bytes and private_bytes[:1000] not in got
            mirror.wait_for_log(rf"fetching {layer} from http://127.0.0.1:{evil.port} although stored", WAIT)
            mirror.wait_for_log(rf"fill: {layer} failed: digest mismatch", WAIT)
            head = requests.head(f"{evil.url}/v2/x/y/blobs/{layer}", proxies=proxy, timeout=WAIT)
            assert "X-Registry-Cache" not in head.headers  # its own answer, not the store's
            # The real registry, through the same proxy port, is still served from the store.
            upstream.reset_counters()
            client = RegistryClient(upstream.url, *ALICE, proxies=proxy)
            assert client.get_blob(image.repo, layer, expected_size=size) == size
            assert upstream.counters.blob_bytes == 0
    finally:
        evil.stop()


def test_an_unlisted_registry_that_serves_a_stored_layer_itself_is_then_served_from_the_store(
        tmp_path, upstream, second):
    """The same base layer in a listed registry and in one a proxy client names:
    the second registry's first pull fetches it from there once (its proof),
    later pulls come from the store."""
    shared = fresh_layer(700_000)
    listed = push_image(upstream.url, f"base/img{unique_seed()}", "v1", [shared], auth=ALICE)
    unlisted = push_image(second.url, f"corp/app{unique_seed()}", "v1", [shared], auth=ALICE)
    layer, size = listed.layers[0]
    assert unlisted.layers[0][0] == layer
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}", "regular"]) as mirror:
        RegistryClient(mirror.url_of(0)).pull(listed.repo, listed.tag)
        mirror.wait_for_log(rf"fill: stored {layer}", WAIT)
        proxy = {"http": mirror.url_of(1)}
        second.reset_counters()
        assert RegistryClient(second.url, proxies=proxy).pull(unlisted.repo, unlisted.tag).layers == unlisted.layers
        assert second.counters.blob_bytes_for(layer) == size  # fetched from there once
        mirror.wait_for_log(rf"fetching {layer} from {second.url}:?\d* although stored", WAIT)
        second.reset_counters()
        assert RegistryClient(second.url, proxies=proxy).pull(unlisted.repo, unlisted.tag).layers == unlisted.layers
        assert second.counters.blob_bytes == 0  # now from the store


def test_joining_a_fill_from_an_unlisted_registry_needs_its_consent(tmp_path, upstream, second):
    """A fill from a registry nobody chose is shared only with clients that
    registry lets read the blob."""
    image = push_image(second.url, PRIVATE, f"t{unique_seed()}", [fresh_layer(800_000)], auth=ALICE)
    layer, size = image.layers[0]
    second.reset_counters()
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}", "regular"]) as mirror:
        proxy = {"http": mirror.url_of(1)}
        second.set_fault(layer, "stall")
        alice = RegistryClient(second.url, *ALICE, proxies=proxy)
        alice.get_manifest(image.repo, image.tag)
        # Through the proxy to the blob server: under 1 MB, yet streamed while the fill runs.
        response = alice.request("GET", f"/v2/{image.repo}/blobs/{layer}", stream=True)
        assert response.status_code == 200 and len(response.raw.read(1000)) == 1000
        second.wait_stalled(1, WAIT, digest=layer)
        for intruder in (RegistryClient(second.url, *BOB, proxies=proxy), RegistryClient(second.url, proxies=proxy)):
            assert refused(intruder, PRIVATE, layer) == 401
        second.release_stalls()
        assert 1000 + len(response.raw.read(size)) == size
        # The intruders were answered by the mirror (after a HEAD there), not passed through.
        gets = [r for r in second.counters.requests if r.method == "GET" and layer[7:] in r.path]
        assert len(gets) == 1 and second.counters.blob_bytes_for(layer) == size


class StallingRegistry(QuietHandler):
    """A registry a client runs itself: says yes to every HEAD, and starts
    every blob with junk, then stalls until released."""

    release = threading.Event()
    gets = 0

    def do_HEAD(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "800000")
        self.end_headers()

    def do_GET(self):  # noqa: N802
        if self.headers.get("Range", "bytes=0-").startswith("bytes=0-"):
            type(self).gets += 1  # a fill's first GET (its resumes ask from where they broke)
        self.send_response(200)
        self.send_header("Content-Length", "800000")
        self.end_headers()
        self.wfile.write(b"junk" * 250)
        self.wfile.flush()
        self.release.wait(WAIT)
        self.close_connection = True


def test_clients_joining_a_named_hosts_fill_get_its_bytes_never_the_stored_ones(tmp_path, upstream):
    """The named host's clients share its fill (one GET there), and what they
    follow is that host's junk: the stored private blob of the same digest is
    not theirs, even once the fill has failed."""
    image = private_image(upstream)
    layer, size = image.layers[0]
    private_bytes = open(upstream.blob_path(layer), "rb").read()
    StallingRegistry.release.clear()
    StallingRegistry.gets = 0
    evil = LoopbackHTTPServer(StallingRegistry, name="stalling-registry").start()
    got: list[bytes] = []
    clients: list[threading.Thread] = []
    try:
        with Mirror(tmp_path / "m", [f"reverse:{upstream.url}", "regular"]) as mirror:
            RegistryClient(mirror.url_of(0), *ALICE).pull(image.repo, image.tag)
            mirror.wait_for_log(rf"fill: stored {layer}", WAIT)
            proxy = {"http": mirror.url_of(1)}

            def download():
                data = b""
                try:
                    with requests.get(f"{evil.url}/v2/x/y/blobs/{layer}", proxies=proxy, timeout=WAIT,
                                      stream=True) as response:
                        for chunk in response.iter_content(1 << 16):
                            data += chunk
                except requests.RequestException:
                    pass  # cut when the fill fails: judged by what arrived
                got.append(data)

            for joined in ("started", "joined"):
                start = len(mirror.lines)
                clients.append(threading.Thread(target=download, daemon=True))
                clients[-1].start()
                mirror.wait_for_log(rf"miss {layer}: {joined} fill", WAIT, start=start)
            StallingRegistry.release.set()
            for c in clients:
                c.join(WAIT)
            mirror.wait_for_log(rf"fill: {layer} failed", WAIT)
            assert len(got) == 2 and StallingRegistry.gets == 1
            assert all(data != private_bytes and private_bytes[:1000] not in data for data in got)
    finally:
        StallingRegistry.release.set()
        for c in clients:
            c.join(WAIT)
        evil.stop()


def test_a_fill_from_a_host_a_proxy_client_named_does_not_hold_up_anyone_else(tmp_path, upstream):
    """Fills are not shared across registries nobody chose: clients of the
    real registry get the real bytes while the named host's fill is stalled."""
    image = fresh_image(upstream, 500_000)
    layer, size = image.layers[0]
    StallingRegistry.release.clear()
    evil = LoopbackHTTPServer(StallingRegistry, name="stalling-registry").start()
    stalled_client = None
    try:
        with Mirror(tmp_path / "m", [f"reverse:{upstream.url}", "regular"]) as mirror:
            proxy = {"http": mirror.url_of(1)}

            def start_the_stalled_fill():
                try:
                    requests.get(f"{evil.url}/v2/x/y/blobs/{layer}", proxies=proxy, timeout=WAIT)
                except requests.RequestException:
                    pass  # cut when the named host gives up: not what this test is about

            stalled_client = threading.Thread(target=start_the_stalled_fill, daemon=True)
            stalled_client.start()
            mirror.wait_for_log(rf"miss {layer}: started fill", WAIT)
            client = RegistryClient(mirror.url_of(0), timeout=20)  # joining the stalled fill would hang
            assert client.get_blob(image.repo, layer, expected_size=size) == size
            assert upstream.counters.blob_bytes_for(layer) == size
    finally:
        StallingRegistry.release.set()
        if stalled_client is not None:
            stalled_client.join(WAIT)
        evil.stop()


class LyingManifestRegistry(QuietHandler):
    """A host a proxy client runs itself: any manifest HEAD "is" the digest it
    was told to name; every GET is a 503 (as if down)."""

    digest = ""

    def do_HEAD(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
        self.send_header("Docker-Content-Digest", self.digest)
        self.send_header("Content-Length", "10")
        self.end_headers()

    def do_GET(self):  # noqa: N802
        self.send_body(503, b'{"errors":[{"code":"UNAVAILABLE","message":"down"}]}', "application/json")


def test_a_host_named_in_regular_mode_cannot_claim_a_stored_private_manifest(tmp_path, upstream):
    """A manifest HEAD's Docker-Content-Digest is only a claim. From a host
    nobody chose it must not make the mirror serve that manifest (alice's
    private one) as the host's stale answer to an anonymous client."""
    image = private_image(upstream)
    LyingManifestRegistry.digest = image.digest
    evil = LoopbackHTTPServer(LyingManifestRegistry, name="lying-registry").start()
    try:
        with Mirror(tmp_path / "m", [f"reverse:{upstream.url}", "regular"]) as mirror:
            RegistryClient(mirror.url_of(0), *ALICE).pull(image.repo, image.tag)
            proxy = {"http": mirror.url_of(1)}
            assert requests.head(f"{evil.url}/v2/x/y/manifests/latest", proxies=proxy, timeout=WAIT).status_code == 200
            for ref in (image.digest, "latest"):
                r = requests.get(f"{evil.url}/v2/x/y/manifests/{ref}", proxies=proxy, timeout=WAIT)
                assert r.status_code == 503 and r.content != image.manifest, (ref, r.status_code)
                assert "X-Registry-Cache" not in r.headers
    finally:
        evil.stop()
