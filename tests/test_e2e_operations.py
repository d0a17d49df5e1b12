"""End to end: several registries in one mirror (containerd's ?ns=), metrics
and stats, and the one-line-per-request log."""

from __future__ import annotations

import re
import signal
import subprocess

import pytest
import requests

from tests.harness.fresh import fresh_layer, unique_seed
from tests.harness.images import push_image
from tests.harness.mirror import Mirror
from tests.harness.upstream import ALICE
from tests.harness.v2client import RegistryClient

WAIT = 60


@pytest.fixture
def mirror(tmp_path, upstream_session, second_upstream):
    registries = f"{upstream_session.host_port}={upstream_session.url},{second_upstream.host_port}={second_upstream.url}"
    with Mirror(tmp_path / "mirror", [f"reverse:{upstream_session.url}"], options={"registries": registries}) as m:
        yield m


def image_on(upstream, repo=None, layers=None):
    seed = unique_seed()
    image = push_image(upstream.url, repo or f"ops/img{seed}", f"t{seed}",
                       layers or [fresh_layer(600_000), fresh_layer(200_000)], auth=ALICE)
    upstream.reset_counters()
    return image


def test_ns_picks_the_registry_and_anything_else_is_refused(upstream, second, mirror):
    first_image, second_image = image_on(upstream), image_on(second)
    via_second = RegistryClient(mirror.url, query={"ns": second.host_port})
    assert via_second.pull(second_image.repo, second_image.tag).layers == second_image.layers
    assert second.counters.blob_bytes == second_image.blob_bytes and upstream.counters.blob_bytes == 0
    via_first = RegistryClient(mirror.url, query={"ns": upstream.host_port})
    assert via_first.pull(first_image.repo, first_image.tag).layers == first_image.layers
    assert upstream.counters.blob_bytes == first_image.blob_bytes
    assert not any("ns=" in r.path for r in upstream.counters.requests + second.counters.requests)
    for ns in ("evil.example", "169.254.169.254", "127.0.0.1:1", "localhost", "docker.io"):
        r = requests.get(f"{mirror.url}/v2/library/alpine/manifests/latest", params={"ns": ns}, timeout=WAIT)
        assert r.status_code == 403 and r.json()["errors"][0]["code"] == "DENIED", ns
    mirror.wait_for_log(r"registry 'evil.example' is not in the registries option", WAIT)


def test_the_store_is_shared_but_access_stays_per_registry(upstream, second, mirror):
    """The same layer public on one registry and private on another: pulled
    from the first, it is not handed out as the second's private blob."""
    shared_layer = fresh_layer(900_000)
    public = image_on(upstream, layers=[shared_layer])
    private = image_on(second, repo="acme/private", layers=[shared_layer])
    digest, size = public.layers[0]
    assert private.layers[0][0] == digest
    RegistryClient(mirror.url, query={"ns": upstream.host_port}).pull(public.repo, public.tag)
    mirror.wait_for_log(rf"fill: stored {digest}", WAIT)
    anonymous = RegistryClient(mirror.url, query={"ns": second.host_port})
    r = anonymous.request("GET", f"/v2/{private.repo}/blobs/{digest}")
    assert r.status_code == 401 and len(r.content) < 10_000
    alice = RegistryClient(mirror.url, *ALICE, query={"ns": second.host_port})
    assert alice.pull(private.repo, private.tag).layers == private.layers
    assert second.counters.blob_bytes_for(digest) == 0  # one store: the second registry never sent it


def stats(mirror) -> dict:
    r = requests.get(mirror.url + "/_registry_cache/stats", timeout=WAIT)
    assert r.status_code == 200
    return r.json()


def metrics(mirror) -> dict[str, float]:
    r = requests.get(mirror.url + "/_registry_cache/metrics", timeout=WAIT)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    values = {}
    for line in r.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_count_what_happened(upstream, mirror):
    image = image_on(upstream)
    blobs = len(image.blobs)
    RegistryClient(mirror.url).pull(image.repo, image.tag)
    for digest, _ in image.blobs:
        mirror.wait_for_log(rf"fill: stored {digest}", WAIT)
    RegistryClient(mirror.url).pull(image.repo, image.tag)
    now = stats(mirror)  # the fills logged "stored" only once over and counted
    assert now["requests"]["blob"]["miss"] == blobs and now["requests"]["blob"]["hit"] == blobs
    assert now["requests"]["manifest"]["pass"] >= 1  # the first pull's, from upstream
    assert now["requests"]["manifest"]["hit"] >= 1  # the second pull's, from the store
    assert now["bytes"]["fetched_upstream"] == image.blob_bytes
    assert sum(now["bytes"]["served"].values()) == 2 * image.blob_bytes
    assert now["bytes"]["served"]["store"] >= image.blob_bytes  # at least the second pull
    assert now["bytes"]["saved"] == image.blob_bytes
    assert now["store"]["blobs"] == blobs and now["store"]["bytes"] >= image.blob_bytes
    prom = metrics(mirror)
    assert prom['registry_cache_requests_total{kind="blob",outcome="hit"}'] == blobs
    assert prom["registry_cache_upstream_blob_bytes_total"] == image.blob_bytes
    assert prom["registry_cache_bytes_saved"] == image.blob_bytes
    assert prom["registry_cache_fills_in_flight"] == 0
    assert prom["registry_cache_store_blobs"] == blobs
    # Upstream trouble is counted by status; these paths never reach it.
    upstream.answer_everything_with = 503
    requests.get(f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}", timeout=WAIT)
    assert stats(mirror)["upstream_errors"]["503"] == 1
    upstream.answer_everything_with = None
    assert not any("_registry_cache" in r.path for r in upstream.counters.requests)


def test_one_log_line_per_registry_request(upstream, mirror):
    image = image_on(upstream)
    RegistryClient(mirror.url).pull(image.repo, image.tag)
    RegistryClient(mirror.url).pull(image.repo, image.tag)
    digest, size = image.layers[0]
    mirror.wait_for_log(rf"registry-cache: GET {re.escape(image.repo)} blob {digest} hit 307 {size} bytes \d+ ms", WAIT)
    mirror.wait_for_log(rf"registry-cache: GET {re.escape(image.repo)} manifest {image.tag} pass 200 \d+ bytes \d+ ms",
                        WAIT)
    mirror.wait_for_log(rf"registry-cache: GET {re.escape(image.repo)} blob {digest} miss 307 {size} bytes", WAIT)


def test_a_running_mirror_evicts_least_recently_used_blobs_to_stay_under_cache_size(tmp_path, upstream):
    """cache_size=3m and three 1.2 MB layers: storing the third evicts the
    one read longest ago (not the one read since), and the metrics say so."""
    images = [image_on(upstream, layers=[fresh_layer(1_200_000)]) for _ in range(3)]
    first, second, third = (image.layers[0][0] for image in images)
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"], options={"cache_size": "3m"}) as small:
        client = RegistryClient(small.url)
        for image in images[:2]:
            client.pull(image.repo, image.tag)
            small.wait_stored([d for d, _ in image.blobs], WAIT)
        client.get_blob(images[0].repo, first)  # read again: now the second is the oldest
        client.pull(images[2].repo, images[2].tag)
        small.wait_stored([d for d, _ in images[2].blobs], WAIT)
        small.wait_for_log(rf"store: evicted {second} to stay under", WAIT)
        assert not re.search(rf"evicted ({first}|{third})", small.log_text())
        now = stats(small)
        assert now["evictions"] >= 1 and now["store"]["bytes"] <= 3 * 2**20
        upstream.reset_counters()
        client.get_blob(images[0].repo, first)
        assert upstream.counters.blob_bytes == 0  # kept: it had been read more recently


@pytest.mark.parametrize("name, value, message", [
    ("cache_size", "lots", "registry-cache: not a size: 'lots'"),
    ("blob_port", "70000", "registry-cache: blob_port out of range"),
    ("upstream_timeout", "0", "registry-cache: upstream_timeout must be"),
    ("registries", "ghcr.io=ftp://x", "registry-cache: registries: not a registry URL"),
    # mitmproxy itself would drop the whole addon without a word over these,
    # and run on as a plain proxy that caches nothing
    ("serve_stale", "maybe", "registry-cache: --set serve_stale=maybe: "),
    ("blob_redirect", "yes", "registry-cache: --set blob_redirect=yes: "),
])
def test_an_unusable_option_stops_mitmdump_at_start_with_a_message(tmp_path, upstream, name, value, message):
    command = Mirror(tmp_path / "m", [f"reverse:{upstream.url}"], options={name: value}).command()
    done = subprocess.run(command, capture_output=True, text=True, timeout=WAIT)
    assert done.returncode != 0
    assert message in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr  # the message, not a stack


def test_a_mirror_of_another_registry_takes_containerds_ns_naming_that_registry(tmp_path, upstream):
    """A reverse-mode mirror of registry H, which H's hosts.toml points at:
    containerd adds ?ns=H, and H need not be on the registries list."""
    image = image_on(upstream)
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"]) as mirror:  # default registries list
        client = RegistryClient(mirror.url, query={"ns": upstream.host_port})
        assert client.pull(image.repo, image.tag).layers == image.layers
        mirror.wait_stored([d for d, _ in image.blobs], WAIT)
        upstream.reset_counters()
        assert client.pull(image.repo, image.tag).layers == image.layers
        assert upstream.counters.blob_bytes == 0
        assert not any("ns=" in r.path for r in upstream.counters.requests)
        host = upstream.host_port.split(":")[0]
        for ns in (host, f"{host}:1", "evil.example"):  # H's host on another port is another registry
            r = requests.get(f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}", params={"ns": ns}, timeout=WAIT)
            assert r.status_code == 403, ns


def test_the_upstreams_token_challenge_on_a_blob_is_no_fill_failure(upstream, mirror):
    """A blob GET before the client has its token gets the upstream's 401,
    as it would without the mirror: counted as denied, not as a failure."""
    image = image_on(upstream)
    digest, _ = image.layers[0]
    r = requests.get(f"{mirror.url}/v2/{image.repo}/blobs/{digest}", timeout=WAIT)
    assert r.status_code == 401 and f"{mirror.url}/_registry_cache/token/" in r.headers["WWW-Authenticate"]
    mirror.wait_for_log(rf"fill: {digest} refused: upstream answered 401", WAIT)
    now = stats(mirror)
    assert now["fill_failures"] == {} and now["upstream_errors"] == {}
    assert now["requests"]["blob"] == {"denied": 1}
    mirror.wait_for_log(rf"registry-cache: GET {re.escape(image.repo)} blob {digest} denied 401 ", WAIT)


def test_a_cdns_404_after_the_registry_said_yes_is_a_fill_failure(upstream_redirect, tmp_path):
    """Only the registry's own 401/403/404 is a refusal; the same from the
    CDN it sent the mirror to (an object gone, a signature expired) is a
    failure operators must see."""
    image = image_on(upstream_redirect)
    digest, _ = image.layers[0]
    upstream_redirect.set_fault(digest, 404, where="cdn")
    with Mirror(tmp_path / "m", [f"reverse:{upstream_redirect.url}"]) as mirror:
        client = RegistryClient(mirror.url)
        client.get_manifest(image.repo, image.tag)  # the token
        assert client.request("GET", f"/v2/{image.repo}/blobs/{digest}").status_code == 404
        mirror.wait_for_log(rf"fill: {digest} failed: upstream answered 404", WAIT)
        assert stats(mirror)["fill_failures"] == {"upstream 404": 1}
        # The metrics paths are the mirror's, whatever the request carries.
        r = requests.post(f"{mirror.url}/_registry_cache/stats", data=iter([b"x" * 10]), timeout=WAIT)
        assert r.status_code == 200 and r.json()["fill_failures"] == {"upstream 404": 1}


def test_sigterm_with_open_connections_prints_no_tracebacks(tmp_path, upstream):
    """Python 3.12.1's asyncio printed a CancelledError traceback for each
    client connection still open when mitmdump stopped."""
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"]) as mirror:
        sessions = [requests.Session() for _ in range(4)]
        for session in sessions:  # keep-alive: each connection stays open
            assert session.get(f"{mirror.url}/v2/", timeout=WAIT).status_code in (200, 401)
        mirror.wait_for_log(r"client connect", WAIT, count=len(sessions))
        mirror.proc.send_signal(signal.SIGTERM)
        assert mirror.proc.wait(WAIT) is not None
        mirror.wait_for_output_end(WAIT)
    text = "\n".join(mirror.lines)
    assert "Traceback" not in text and "CancelledError" not in text, text
