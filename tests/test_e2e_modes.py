"""End to end: the explicit HTTPS proxy mode, both modes in one process,
serving while the upstream is down, and the marks mitmweb shows."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from addon.flows import HIT_FILTER
from tests.harness._http import LoopbackHTTPServer, QuietHandler
from tests.harness.downloads import assert_one_fetch_streamed_to_all, stalled_downloaders
from tests.harness.fresh import fresh_image, fresh_layer, unique_seed
from tests.harness.images import push_image
from tests.harness.mirror import Mirror
from tests.harness.tlsregistry import TlsRegistry
from tests.harness.upstream import ALICE
from tests.harness.v2client import PULL_ERRORS, RegistryClient

WAIT = 60
RECORDER = Path(__file__).parent / "harness" / "flow_recorder.py"


@pytest.fixture
def https_upstream(upstream_https):
    def reset():
        upstream_https.set_down(False)
        upstream_https.clear_faults()
        upstream_https.redirect_blobs = False
        upstream_https.reset_counters()

    reset()
    yield upstream_https
    reset()


@pytest.fixture
def proxy(tmp_path, upstream_https):
    """The mirror as an explicit proxy that trusts the upstream's CA."""
    with Mirror(tmp_path / "proxy", ["regular"],
                options={"ssl_verify_upstream_trusted_ca": str(upstream_https.ca_cert_path)}) as m:
        yield m


def proxied_client(mirror: Mirror, upstream, port_index: int = 0, **kw) -> RegistryClient:
    """A client that reaches the HTTPS upstream only through the mirror's proxy port."""
    proxy_url = mirror.url_of(port_index)
    return RegistryClient(upstream.url, verify=str(mirror.ca_cert),
                          proxies={"http": proxy_url, "https": proxy_url}, **kw)


@pytest.mark.parametrize("redirect", [False, True], ids=["relay", "cdn-redirect"])
def test_explicit_https_proxy_caches_blobs(https_upstream, proxy, redirect):
    https_upstream.redirect_blobs = redirect
    image = fresh_image(https_upstream, 1_200_000, 400_000, verify=str(https_upstream.ca_cert_path))
    client = proxied_client(proxy, https_upstream)
    statuses = []
    client.session.hooks["response"].append(lambda r, *args, **kwargs: statuses.append(r.status_code))
    result = client.pull(image.repo, image.tag)
    assert result.manifest_digest == image.digest and result.layers == image.layers
    assert not [s for s in statuses if 300 <= s < 400]  # TLS clients are never sent to plain HTTP
    digest, size = image.layers[0]  # the log line names the registry the client named
    proxy.wait_for_log(rf"registry-cache: GET {re.escape(https_upstream.host_port)}/{image.repo} blob {digest} miss 200 ",
                       WAIT)
    assert https_upstream.counters.blob_bytes == image.blob_bytes  # one upstream copy
    if redirect:
        cdn = [r for r in https_upstream.counters.requests if r.server == "cdn"]
        assert https_upstream.counters.cdn_gets == len(image.blobs)
        assert not any(r.authorization for r in cdn)
    https_upstream.reset_counters()
    again = proxied_client(proxy, https_upstream).pull(image.repo, image.tag)
    assert again.layers == image.layers
    assert https_upstream.counters.blob_bytes == 0 and https_upstream.counters.blob_gets == 0
    assert https_upstream.counters.cdn_gets == 0


def test_tls_clients_of_the_https_proxy_share_one_fetch(https_upstream, proxy):
    """TLS clients (never redirected: mitmproxy streams the blob server's
    answer) missing one blob of a registry not on `registries` at once."""
    image = fresh_image(https_upstream, 3_000_000, verify=str(https_upstream.ca_cert_path))
    digest, size = image.layers[0]
    clients = [proxied_client(proxy, https_upstream) for _ in range(4)]
    for client in clients:
        client.get_manifest(image.repo, image.tag)
    downloaders = stalled_downloaders(https_upstream, clients, image.repo, digest, size)
    assert_one_fetch_streamed_to_all(https_upstream, downloaders, digest, size)


def test_one_process_serves_a_mirror_port_and_a_proxy_port(tmp_path, https_upstream):
    """The README's combined form: --mode reverse:URL@PORT1 --mode regular@PORT2."""
    ca = str(https_upstream.ca_cert_path)
    image = fresh_image(https_upstream, 800_000, verify=ca)
    with Mirror(tmp_path / "both", [f"reverse:{https_upstream.url}", "regular"],
                options={"ssl_verify_upstream_trusted_ca": ca}) as mirror:
        # Reverse port: a plain-HTTP mirror in front of the HTTPS upstream.
        mirrored = RegistryClient(mirror.url_of(0), verify=ca)
        assert mirrored.pull(image.repo, image.tag).layers == image.layers
        assert https_upstream.counters.blob_bytes == image.blob_bytes
        https_upstream.reset_counters()
        # Proxy port: the same store answers.
        assert proxied_client(mirror, https_upstream, 1).pull(image.repo, image.tag).layers == image.layers
        assert https_upstream.counters.blob_bytes == 0


def test_a_bad_blob_from_an_https_upstream_is_never_stored(tmp_path, https_upstream):
    """Over TLS the fill reads a body record by record, gathered into large
    pieces (fill.ArrivedBytes): a corrupt body still fails, and the next
    fetch stores the good one."""
    ca = str(https_upstream.ca_cert_path)
    image = fresh_image(https_upstream, 3_000_000, verify=ca)
    digest, size = image.layers[0]
    with Mirror(tmp_path / "m", [f"reverse:{https_upstream.url}"],
                options={"ssl_verify_upstream_trusted_ca": ca}) as mirror:
        client = RegistryClient(mirror.url, verify=ca)
        client.get_manifest(image.repo, image.tag)  # a token for the repository
        https_upstream.set_fault(digest, "corrupt")
        with pytest.raises(PULL_ERRORS):
            client.get_blob(image.repo, digest, expected_size=size)
        mirror.wait_for_log(rf"fill: {digest} failed", WAIT)
        https_upstream.clear_faults()
        assert client.get_blob(image.repo, digest, expected_size=size) == size
        mirror.wait_stored([digest], WAIT)
        https_upstream.reset_counters()
        assert client.get_blob(image.repo, digest, expected_size=size) == size
        assert https_upstream.counters.blob_gets == 0


def test_a_cut_blob_from_an_https_upstream_is_resumed(tmp_path, https_upstream):
    """A TLS connection cut mid-body (the records gathered before the cut
    kept): the fill goes on from there, and the client sees nothing of it."""
    ca = str(https_upstream.ca_cert_path)
    image = fresh_image(https_upstream, 3_000_000, verify=ca)
    digest, size = image.layers[0]
    with Mirror(tmp_path / "m", [f"reverse:{https_upstream.url}"],
                options={"ssl_verify_upstream_trusted_ca": ca}) as mirror:
        client = RegistryClient(mirror.url, verify=ca)
        client.get_manifest(image.repo, image.tag)
        https_upstream.reset_counters()
        https_upstream.set_fault(digest, "cut", at=size // 2, times=1)
        assert client.get_blob(image.repo, digest, expected_size=size) == size
        mirror.wait_stored([digest], WAIT)
        assert https_upstream.counters.blob_bytes_for(digest) == size  # one copy


def _blob_get(client: RegistryClient, repo: str, digest: str, size: int) -> int:
    return client.get_blob(repo, digest, expected_size=size)


def test_stored_blobs_are_served_while_the_upstream_is_down(tmp_path, upstream, https_upstream):
    plain = fresh_image(upstream, 600_000)
    ca = str(https_upstream.ca_cert_path)
    secure = fresh_image(https_upstream, 600_000, verify=ca)
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}", "regular"],
                options={"ssl_verify_upstream_trusted_ca": ca}) as mirror:
        reverse_client = RegistryClient(mirror.url_of(0))
        proxy_client = proxied_client(mirror, https_upstream, 1)
        reverse_client.pull(plain.repo, plain.tag)  # fills the store, holds a token
        proxy_client.pull(secure.repo, secure.tag)
        upstream.set_down(True)
        https_upstream.set_down(True)
        for client, image in ((reverse_client, plain), (proxy_client, secure)):
            for digest, size in image.blobs:
                assert _blob_get(client, image.repo, digest, size) == size
            # The upstream really is gone: the tag is answered from the store, marked stale.
            r = client.request("GET", f"/v2/{image.repo}/manifests/{image.tag}",
                               headers={"Accept": image.media_type})
            assert r.status_code == 200 and r.headers["X-Registry-Cache"] == "stale"
        # A blob the store does not hold gets a clean error, not a hang.
        r = requests.get(f"{mirror.url_of(0)}/v2/{plain.repo}/blobs/sha256:{'0' * 64}", timeout=WAIT)
        assert r.status_code in (502, 503)
        assert r.json()["errors"][0]["code"] == "UNAVAILABLE"


def read_marks(path: Path) -> dict[str, dict]:
    """The last record per flow."""
    flows: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        flows[record["id"]] = record
    return flows


def test_flows_are_marked_by_outcome(tmp_path, upstream):
    record_file = tmp_path / "flows.jsonl"
    good = fresh_image(upstream, 500_000)
    bad = fresh_image(upstream, 2_000_000)
    bad_digest, _ = bad.layers[0]
    upstream.set_fault(bad_digest, "corrupt")
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"], scripts=[RECORDER],
                options={"flow_record_file": str(record_file)}) as mirror:
        client = RegistryClient(mirror.url)
        client.pull(good.repo, good.tag)  # misses
        client.pull(good.repo, good.tag)  # hits
        with pytest.raises(PULL_ERRORS + (requests.RequestException,)):
            client.pull(bad.repo, bad.tag)
        # Logged after the update hook ran, so the recorder has written it.
        mirror.wait_for_log(rf"marked .* fill-failed: {bad_digest}", WAIT)
        # A malformed request, a refused one, and a stale answer (each recorded
        # before its response is sent, so before the client has it).
        assert requests.get(f"{mirror.url}/v2/{good.repo}/blobs/notadigest", timeout=WAIT).status_code == 400
        private = push_image(upstream.url, "acme/private", f"t{unique_seed()}", [fresh_layer(200_000)], auth=ALICE)
        private_layer, _ = private.layers[0]
        RegistryClient(mirror.url, *ALICE).pull(private.repo, private.tag)
        mirror.wait_stored([private_layer], WAIT)
        assert client.request("GET", f"/v2/{private.repo}/blobs/{private_layer}").status_code == 401
        upstream.answer_everything_with = 503
        try:
            stale = client.request("GET", f"/v2/{good.repo}/manifests/{good.tag}")
            assert stale.headers.get("X-Registry-Cache") == "stale"
        finally:
            upstream.answer_everything_with = None
    flows = read_marks(record_file).values()
    marks = {f["outcome"]: f["marked"] for f in flows}
    assert marks["error"] == ":red_circle:" and marks["denied"] == ":no_entry:"
    assert marks["stale"] == ":yellow_circle:"
    blob_flows = [f for f in flows if "/blobs/" in f["url"]]
    by_outcome: dict[str, list] = {}
    for f in blob_flows:
        by_outcome.setdefault(f["outcome"], []).append(f)
    good_digests = {d for d, _ in good.blobs}
    assert {f["comment"].split()[2] for f in by_outcome["hit"]} == good_digests
    assert all(f["marked"] == ":green_circle:" and f["hit_filter"] for f in by_outcome["hit"])
    assert {f["comment"].split()[2] for f in by_outcome["miss"]} >= good_digests
    assert all(f["marked"] == ":large_blue_circle:" and not f["hit_filter"] for f in by_outcome["miss"])
    failed = by_outcome["fill-failed"]
    assert [f["comment"].split()[2] for f in failed] == [bad_digest]
    assert failed[0]["marked"] == ":red_circle:" and "digest mismatch" in failed[0]["comment"]
    assert all(f"{size} bytes" in f["comment"] for f in by_outcome["hit"] for d, size in good.blobs
               if d in f["comment"])
    manifests = [f for f in flows if "/manifests/" in f["url"] and f["outcome"] not in ("stale", "denied")]
    assert manifests and all((f["outcome"], f["marked"]) in (("pass", ":white_circle:"), ("hit", ":green_circle:"))
                             for f in manifests)


def test_flows_can_be_saved_to_a_file_and_read_back(tmp_path, upstream):
    """mitmdump -w (and mitmweb's save) write flow metadata with a
    serializer that takes plain values only: the mirror's per-flow state in
    flow.metadata made every registry flow fail to save ("unserializable")."""
    image = fresh_image(upstream, 300_000)
    saved = tmp_path / "flows.mitm"
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"], options={"save_stream_file": str(saved)}) as mirror:
        client = RegistryClient(mirror.url)
        client.pull(image.repo, image.tag)
        client.pull(image.repo, image.tag)
        mirror.stop()
    assert "unserializable" not in "\n".join(mirror.lines)
    from mitmproxy import io
    with open(saved, "rb") as f:
        flows = list(io.FlowReader(f).stream())
    outcomes = [f.metadata.get("registry_cache") for f in flows if "/blobs/" in f.request.path]
    assert outcomes.count("hit") == len(image.blobs) and "miss" in outcomes  # the second pull: layers and config


def test_ssl_insecure_is_said_once_not_per_upstream_call(tmp_path, https_upstream):
    ca = str(https_upstream.ca_cert_path)
    image = fresh_image(https_upstream, 300_000, verify=ca)
    with Mirror(tmp_path / "m", [f"reverse:{https_upstream.url}"], options={"ssl_insecure": "true"}) as mirror:
        RegistryClient(mirror.url, verify=ca).pull(image.repo, image.tag)  # the client trusts its token server
        mirror.wait_stored([d for d, _ in image.blobs], WAIT)
    assert "InsecureRequestWarning" not in "\n".join(mirror.lines)
    assert len(re.findall(r"not checked \(ssl_insecure\)", "\n".join(mirror.lines))) == 1


def test_readme_documents_the_hit_filter():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert HIT_FILTER in readme


class NotARegistry(QuietHandler):
    """A web site that happens to have a /v2/ path, and is down for maintenance there."""

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/v2"):
            self.send_body(503, b"maintenance", "text/plain")
        else:
            self.send_body(200, b"the site's own page", "text/plain")


def test_regular_mode_makes_up_no_answer_for_a_site_that_is_no_registry(tmp_path):
    site = LoopbackHTTPServer(NotARegistry, name="not-a-registry").start()
    try:
        with Mirror(tmp_path / "m", ["regular"]) as mirror:
            proxy = {"http": mirror.url}
            assert requests.get(f"{site.url}/", proxies=proxy, timeout=WAIT).text == "the site's own page"
            ping = requests.get(f"{site.url}/v2/", proxies=proxy, timeout=WAIT)
            assert ping.status_code == 503 and "X-Registry-Cache" not in ping.headers  # no made-up 200
            for via in ({}, proxy):  # asked directly, or as a proxied request
                ours = requests.get(f"{mirror.url}/_registry_cache/metrics", proxies=via, timeout=WAIT)
                assert ours.status_code == 200 and "registry_cache_requests_total" in ours.text
    finally:
        site.stop()


def test_a_request_naming_the_proxy_itself_is_refused_at_once_and_never_loops(tmp_path):
    """A health check or a Docker registry-mirrors entry pointed at the proxy
    port by mistake: the mirror's own calls (ping, manifest, fill) went to
    the host the client named, came back in as new requests, and made more
    (17 connections in 3 s, for minutes). Now: a 508 at once, and no request
    of the mirror's own reaches it, so it never sees more connections than
    the client made (a loop would have made them before this answer)."""
    digest = "sha256:" + "a" * 64
    with Mirror(tmp_path / "m", ["regular"], options={"upstream_timeout": "5"}) as mirror:
        port = mirror.ports[0]
        start = len(mirror.lines)
        proxy = {"http": mirror.url}
        answers = [
            requests.get(f"{mirror.url}/v2/", timeout=WAIT),  # origin form, straight to the proxy port
            requests.get(f"{mirror.url}/v2/library/x/manifests/latest", proxies=proxy, timeout=WAIT),
            requests.get(f"http://localhost:{port}/v2/library/x/blobs/{digest}", proxies=proxy, timeout=WAIT),
        ]
        for answer in answers:
            assert answer.status_code == 508 and "names the mirror itself" in answer.text, answer.text
        # mitmdump logs in order: any connection a loop made comes before these lines
        mirror.wait_for_log(r"registry-cache: GET \S+ \S+ \S+ error 508 ", WAIT, start=start, count=3)
        connects = [line for line in mirror.lines[start:] if "client connect" in line]
        assert len(connects) == len(answers), "\n".join(connects)


def test_with_blob_redirect_off_mitmproxy_relays_every_blob_itself(tmp_path, upstream):
    """blob_redirect=false: no 307 ever reaches the client; misses, hits,
    ranges and HEADs are all answered on the mirror's own port."""
    image = fresh_image(upstream, 1_500_000, 300_000)
    digest, size = image.layers[0]
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"], options={"blob_redirect": "false"}) as mirror:
        client = RegistryClient(mirror.url)
        statuses = []
        client.session.hooks["response"].append(lambda r, *args, **kwargs: statuses.append(r.status_code))
        assert client.pull(image.repo, image.tag).layers == image.layers
        assert upstream.counters.blob_bytes == image.blob_bytes
        mirror.wait_stored([d for d, _ in image.blobs], WAIT)
        upstream.reset_counters()
        assert client.pull(image.repo, image.tag).layers == image.layers
        expected = open(upstream.blob_path(digest), "rb").read()
        r = client.request("GET", f"/v2/{image.repo}/blobs/{digest}", headers={"Range": "bytes=1000-1999"})
        assert r.status_code == 206 and r.content == expected[1000:2000]
        r = client.request("HEAD", f"/v2/{image.repo}/blobs/{digest}")
        assert r.status_code == 200 and int(r.headers["Content-Length"]) == size
        assert upstream.counters.blob_bytes == 0
        assert not [s for s in statuses if 300 <= s < 400], statuses
        mirror.wait_for_log(rf"registry-cache: GET {image.repo} blob {digest} hit", WAIT)


class HalfThenWait(QuietHandler):
    """A large download whose second half waits until the test lets it go."""

    release = threading.Event()

    def do_GET(self):  # noqa: N802
        half = b"x" * (2 << 20)
        self.send_response(200)
        self.send_header("Content-Length", str(2 * len(half)))
        self.end_headers()
        self.wfile.write(half)
        self.wfile.flush()
        self.release.wait(WAIT)
        self.wfile.write(half)


def test_a_large_download_passing_through_is_streamed_not_held_whole(tmp_path):
    """Regular mode, a site that is no registry: the client gets the first
    half while the second has not even been sent (mitmproxy would otherwise
    hold the whole body in memory before passing any of it on)."""
    HalfThenWait.release.clear()
    site = LoopbackHTTPServer(HalfThenWait, name="half-then-wait").start()
    try:
        with Mirror(tmp_path / "m", ["regular"]) as mirror:
            # The site holds the second half back for up to WAIT; a read that
            # waits for it (a buffered body) times out well before.
            with requests.get(f"{site.url}/big.iso", proxies={"http": mirror.url}, stream=True,
                              timeout=(WAIT, WAIT / 4)) as r:
                first = r.raw.read(2 << 20)
                HalfThenWait.release.set()
                rest = r.raw.read()
            assert len(first) == 2 << 20 and len(rest) == 2 << 20
    finally:
        HalfThenWait.release.set()
        site.stop()


# -- HTTP/2 uploads of unknown size (curl -T -, go-containerregistry's streamed
# layers). mitmproxy passes them to an HTTP/1.1 registry with no framing at all
# unless the mirror adds it; they are streamed once the tunnel's server is known.

class _HeldBackBody:
    """What curl -T - uploads: `size` random bytes. After half of them it waits
    (bounded) until `arrived(size // 4, timeout)` says the registry already
    has a quarter: only a streamed upload gets there before the last byte."""

    def __init__(self, size: int, arrived=None):
        self.size, self.arrived = size, arrived
        self.hasher = hashlib.sha256()
        self.arrived_mid_body: bool | None = None

    @property
    def digest(self) -> str:
        return "sha256:" + self.hasher.hexdigest()

    def feed(self, pipe) -> None:
        try:
            for part in range(2):
                if part and self.arrived:
                    self.arrived_mid_body = self.arrived(self.size // 4, 20)
                data = os.urandom(self.size // 2)
                self.hasher.update(data)
                pipe.write(data)
                pipe.flush()
        except BrokenPipeError:
            pass
        finally:
            pipe.close()


def _curl_http2(mirror: Mirror, tmp_path: Path, transfers: list[list[str]], body: _HeldBackBody | None = None):
    """One curl process sending `transfers` (options ending in a URL) through
    the mirror's proxy port over HTTP/2, reusing its connection; per transfer
    (status, HTTP version, new connections, response headers)."""
    argv = ["curl", "-sS"]
    for i, options in enumerate(transfers):
        argv += (["--next"] if i else []) + [
            "--http2", "-x", mirror.url, "--cacert", str(mirror.ca_cert), "--max-time", str(WAIT),
            "-o", "/dev/null", "-D", str(tmp_path / f"headers-{i}"),
            "-w", "%{http_code} %{http_version} %{num_connects}\\n", *options]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE if body else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    feeder = threading.Thread(target=body.feed, args=(proc.stdin,), daemon=True) if body else None
    if feeder:
        feeder.start()
    output = proc.stdout.read().decode()
    proc.wait(timeout=WAIT)
    if feeder:
        feeder.join(WAIT)
    results = []
    for i, line in enumerate(output.splitlines()[-len(transfers):]):
        status, version, connects = line.split()
        headers = (tmp_path / f"headers-{i}").read_text()
        results.append((int(status), version, int(connects), headers))
    assert len(results) == len(transfers), output
    return results


def _header(headers: str, name: str) -> str:
    return re.search(rf"^{name}: (\S+)", headers, re.M | re.I).group(1)


def _wait_for(condition, timeout: float) -> bool:
    """Poll `condition` (a file growing, which nothing signals) up to `timeout`."""
    deadline, pause = time.monotonic() + timeout, threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.02)
    return True


def _start_upload(client: RegistryClient, repo: str) -> str:
    started = client.request("POST", f"/v2/{repo}/blobs/uploads/")
    assert started.status_code == 202, started.text[:300]
    return client.url_for(started.headers["Location"])


def test_an_http2_upload_of_unknown_size_streams_to_an_http1_registry(https_upstream, proxy, tmp_path):
    """The harness's front door speaks only HTTP/1.1: the mirror adds the
    chunked framing mitmproxy leaves out, and the layer streams through."""
    repo = f"push/h2-to-h1-{unique_seed()}"
    client = RegistryClient(https_upstream.url, *ALICE, verify=str(https_upstream.ca_cert_path))
    location = _start_upload(client, repo)
    auth = ["-H", f"Authorization: {client.authorization_for(repo)}"]
    https_upstream.reset_counters()
    body = _HeldBackBody(24 << 20, https_upstream.counters.wait_request_body_bytes)
    tags, patch = _curl_http2(proxy, tmp_path, [  # tags/list passes through: the tunnel meets its server
        [*auth, f"{https_upstream.url}/v2/{repo}/tags/list"],
        [*auth, "-X", "PATCH", "-T", "-", location],
    ], body)
    assert tags[2] == 1 and patch[1:3] == ("2", 0)  # one HTTP/2 connection for both
    assert patch[0] == 202, patch
    assert _header(patch[3], "range") == f"0-{body.size - 1}"
    assert body.arrived_mid_body is True
    done = client.request("PUT", _header(patch[3], "location"),
                          params={"digest": body.digest}, data=b"", repo=repo)
    assert done.status_code == 201 and done.headers["Docker-Content-Digest"] == body.digest


def test_an_http2_upload_of_unknown_size_streams_after_another_connection_met_the_registry(
        https_upstream, proxy, tmp_path):
    """A script's `curl -X POST`, then `curl -T -`: two connections. The
    second streams on what the first learned about the registry."""
    repo = f"push/h2-script-{unique_seed()}"
    client = RegistryClient(https_upstream.url, *ALICE, verify=str(https_upstream.ca_cert_path))
    location = _start_upload(client, repo)
    auth = ["-H", f"Authorization: {client.authorization_for(repo)}"]
    [tags] = _curl_http2(proxy, tmp_path, [[*auth, f"{https_upstream.url}/v2/{repo}/tags/list"]])
    assert tags[1:3] == ("2", 1)
    https_upstream.reset_counters()
    body = _HeldBackBody(24 << 20, https_upstream.counters.wait_request_body_bytes)
    [patch] = _curl_http2(proxy, tmp_path, [[*auth, "-X", "PATCH", "-T", "-", location]], body)
    assert patch[0] == 202, patch
    assert _header(patch[3], "range") == f"0-{body.size - 1}"
    assert body.arrived_mid_body is True


def test_an_http2_upload_of_unknown_size_first_on_its_connection_arrives_whole(https_upstream, proxy, tmp_path):
    """Before the tunnel has met its server, the upload is buffered, and
    passed on with a Content-Length (mitmproxy 12.3.1 sent none: a 502)."""
    repo = f"push/h2-first-{unique_seed()}"
    client = RegistryClient(https_upstream.url, *ALICE, verify=str(https_upstream.ca_cert_path))
    location = _start_upload(client, repo)
    body = _HeldBackBody(3 << 20)
    [patch] = _curl_http2(proxy, tmp_path, [
        ["-H", f"Authorization: {client.authorization_for(repo)}", "-X", "PATCH", "-T", "-", location]], body)
    assert patch[:2] == (202, "2"), patch
    assert _header(patch[3], "range") == f"0-{body.size - 1}"


def test_an_http2_upload_of_unknown_size_streams_to_an_http2_registry(tmp_path):
    """distribution serving TLS itself speaks HTTP/2: the upload streams
    through as it is, with no framing added."""
    with TlsRegistry() as registry, Mirror(tmp_path / "m", ["regular"],
                                           options={"ssl_verify_upstream_trusted_ca": registry.ca_cert_path}) as m:
        repo = f"push/h2-to-h2-{unique_seed()}"
        client = RegistryClient(registry.url, verify=registry.ca_cert_path)
        location = _start_upload(client, repo)
        body = _HeldBackBody(24 << 20, lambda n, timeout: _wait_for(lambda: registry.upload_bytes(repo) >= n, timeout))
        tags, patch = _curl_http2(m, tmp_path, [
            [f"{registry.url}/v2/{repo}/tags/list"],
            ["-X", "PATCH", "-T", "-", location],
        ], body)
        assert patch[1:3] == ("2", 0)
        assert patch[0] == 202, patch
        assert _header(patch[3], "range") == f"0-{body.size - 1}"
        assert body.arrived_mid_body is True
        done = client.request("PUT", _header(patch[3], "location"),
                              params={"digest": body.digest}, data=b"")
        assert done.status_code == 201 and done.headers["Docker-Content-Digest"] == body.digest
