"""End to end: the upstream goes away, or rate-limits us, mid-session.

Stored blobs keep being served; manifests by digest come from the manifest
store; a tag resolves to its last known digest, marked stale.
"""

from __future__ import annotations


import pytest
import requests

from tests.harness.fresh import fresh_layer, unique_seed
from tests.harness.images import push_image
from tests.harness.mirror import Mirror
from tests.harness.skopeo import make_skopeo_home, skopeo_copy, verify_dir_image
from tests.harness.upstream import ALICE
from tests.harness.v2client import PULL_ERRORS, RegistryClient

WAIT = 60
MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])


def warm_image(upstream, mirror, repo=None, auth=None):
    """A fresh image pulled once through the mirror; waits until the mirror
    knows whether its repository is public (its one background check)."""
    seed = unique_seed()
    image = push_image(upstream.url, repo or f"offline/img{seed}", f"t{seed}",
                       [fresh_layer(700_000), fresh_layer(300_000)], auth=ALICE)
    client = RegistryClient(mirror.url, *(auth or ()))
    assert client.pull(image.repo, image.tag).layers == image.layers
    mirror.wait_for_log(rf"access: .*/{image.repo} is (public|not public)", WAIT)
    return image, client


def manifest_get(mirror, repo, ref, headers=None):
    return requests.get(f"{mirror.url}/v2/{repo}/manifests/{ref}",
                        headers={"Accept": MANIFEST_TYPES, **(headers or {})}, timeout=WAIT)


@pytest.mark.parametrize("outage", ["down", 429, 500, 502, 503, 504])
def test_a_pull_works_while_the_upstream_is_gone_or_refusing(upstream, mirror, outage):
    image, _ = warm_image(upstream, mirror)
    if outage == "down":
        upstream.set_down(True)  # registry, CDN and token server alike
    else:
        upstream.answer_everything_with = outage
    # A brand-new client, no token: ping, tag, digest, blobs, all from the mirror.
    r = requests.get(mirror.url + "/v2/", timeout=WAIT)
    assert r.status_code == 200 and r.headers["X-Registry-Cache"] == "stale"
    r = manifest_get(mirror, image.repo, image.tag)
    assert r.status_code == 200 and r.content == image.manifest
    assert r.headers["Docker-Content-Digest"] == image.digest
    assert r.headers["X-Registry-Cache"] == "stale" and "110" in r.headers["Warning"]
    r = manifest_get(mirror, image.repo, image.digest)
    assert r.status_code == 200 and r.content == image.manifest
    result = RegistryClient(mirror.url).pull(image.repo, image.tag)
    assert result.manifest_digest == image.digest and result.layers == image.layers
    mirror.wait_for_log(rf"answering GET /v2/{image.repo}/manifests/{image.tag} from the store \(stale\)", WAIT)


def test_skopeo_pulls_through_the_mirror_while_the_upstream_is_down(upstream, mirror, closed_port, tmp_path):
    image, _ = warm_image(upstream, mirror)
    upstream.set_down(True)
    home = make_skopeo_home(str(tmp_path / "home"), primary=closed_port, mirror=mirror.host_port)
    skopeo_copy(f"{closed_port}/{image.repo}:{image.tag}", str(tmp_path / "copy"), home)
    assert verify_dir_image(str(tmp_path / "copy"))["manifest_digest"] == image.digest


def test_unknown_tags_and_private_repositories_are_not_made_up(upstream, mirror):
    image, _ = warm_image(upstream, mirror)
    private, alice = warm_image(upstream, mirror, repo="acme/private", auth=ALICE)
    upstream.set_down(True)
    assert manifest_get(mirror, image.repo, "never-pulled").status_code == 502
    # The private repository: not for a client the upstream never vouched for...
    r = manifest_get(mirror, private.repo, private.tag)
    assert r.status_code == 502 and r.json()["errors"][0]["code"] == "UNAVAILABLE"
    r = requests.get(f"{mirror.url}/v2/{private.repo}/blobs/{private.layers[0][0]}", timeout=WAIT)
    assert r.status_code == 503
    # ...but alice, whose token the upstream accepted, still pulls it.
    assert alice.pull(private.repo, private.tag).layers == private.layers


def test_a_tag_moves_on_when_the_upstream_is_back(upstream, mirror):
    image, _ = warm_image(upstream, mirror)
    moved = push_image(upstream.url, image.repo, image.tag, [fresh_layer(100_000)], auth=ALICE)
    upstream.set_down(True)
    assert manifest_get(mirror, image.repo, image.tag).headers["Docker-Content-Digest"] == image.digest
    upstream.set_down(False)
    r = RegistryClient(mirror.url).pull(image.repo, image.tag)
    assert r.manifest_digest == moved.digest  # fresh again: tags always ask the upstream first


def test_serve_stale_can_be_turned_off(upstream, tmp_path):
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"], options={"serve_stale": "false"}) as mirror:
        image, client = warm_image(upstream, mirror)
        upstream.set_down(True)
        r = manifest_get(mirror, image.repo, image.tag)
        assert r.status_code == 502 and "X-Registry-Cache" not in r.headers
        assert requests.get(mirror.url + "/v2/", timeout=WAIT).status_code == 502
        with pytest.raises(PULL_ERRORS + (requests.RequestException,)):
            RegistryClient(mirror.url).pull(image.repo, image.tag)
        # Blobs already stored are still served to the client the upstream allowed.
        digest, size = image.layers[0]
        assert client.get_blob(image.repo, digest, expected_size=size) == size


def test_a_tag_resolved_the_containerd_way_is_served_while_the_upstream_is_down(upstream, mirror):
    """containerd resolves a tag with a HEAD, then GETs the manifest by
    digest: one such pull must be enough for the tag to work offline."""
    seed = unique_seed()
    image = push_image(upstream.url, f"offline/ctr{seed}", f"t{seed}", [fresh_layer(200_000)], auth=ALICE)
    client = RegistryClient(mirror.url)
    r = client.request("HEAD", f"/v2/{image.repo}/manifests/{image.tag}", headers={"Accept": MANIFEST_TYPES})
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == image.digest
    r = client.request("GET", f"/v2/{image.repo}/manifests/{image.digest}", headers={"Accept": MANIFEST_TYPES})
    assert r.status_code == 200 and r.content == image.manifest
    mirror.wait_for_log(rf"access: .*/{image.repo} is (public|not public)", WAIT)
    upstream.set_down(True)
    r = manifest_get(mirror, image.repo, image.tag)
    assert r.status_code == 200 and r.content == image.manifest
    assert r.headers["X-Registry-Cache"] == "stale" and r.headers["Docker-Content-Digest"] == image.digest


def test_a_hung_upstream_costs_one_timeout_not_one_per_request(upstream, tmp_path):
    """An upstream that accepts connections and never answers: the request
    that meets it waits upstream_timeout, then the store answers; the pulls
    after it are answered from the store without asking. Once it is back, a
    request the store cannot answer reaches it and ends the quiet time."""
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"], options={"upstream_timeout": "2"}) as mirror:
        image, _ = warm_image(upstream, mirror)
        upstream.set_down(True, how="hang")
        try:
            for _ in range(3):  # each: ping, tag, blobs, as a brand-new client
                result = RegistryClient(mirror.url, timeout=WAIT).pull(image.repo, image.tag)
                assert result.manifest_digest == image.digest and result.layers == image.layers
            assert upstream.held == 1  # only the first request asked
            mirror.wait_for_log(rf"timed out less than 30s ago; answering GET /v2/{image.repo}/manifests/", WAIT)
        finally:
            upstream.set_down(False)
        client = RegistryClient(mirror.url)
        newer = push_image(upstream.url, image.repo, "newer", [fresh_layer(100_000)], auth=ALICE)
        assert client.get_manifest(image.repo, "newer")[2] == newer.digest
        moved = push_image(upstream.url, image.repo, image.tag, [fresh_layer(100_000)], auth=ALICE)
        assert client.get_manifest(image.repo, image.tag)[2] == moved.digest  # asked again, not stale


def test_a_bad_upstream_timeout_stops_the_mirror_at_start(tmp_path):
    with pytest.raises(RuntimeError, match="upstream_timeout"):
        with Mirror(tmp_path / "m", ["regular"], options={"upstream_timeout": "0"}):
            pass


def test_a_mirror_started_while_the_upstream_is_down_answers_its_first_request(tmp_path, upstream):
    """connection_strategy=lazy is set before the proxy accepts clients: set
    in the `running` hook, the first requests of a mirror started during an
    outage were cut (mitmproxy connected upstream first, and failed)."""
    upstream.set_down(True)
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"]) as mirror:
        r = requests.get(mirror.url + "/v2/", timeout=WAIT)
        assert r.status_code == 502 and r.json()["errors"][0]["code"] == "UNAVAILABLE"
