"""Issue #13: an office machine that reaches ONLY the mirror.

Every client here runs in a network namespace (tests/harness/netns.py) whose
only way out is the host address the mirror listens on: skopeo (``ip netns
exec``), containerd (daemon AND ``ctr`` inside; CRI pulls by the daemon
itself) and Docker (dockerd inside). The harness upstream, its token server
and its CDN listen on the host's 127.0.0.1, out of the office's reach
(tests/test_netns.py proves that). So these pulls work only if the mirror:

1. answers every 401 with a Bearer challenge whose realm is on the mirror's
   own address (scheme, host and port the client used; the path and query are
   the mirror's choice: these tests follow whatever the challenge says);
2. relays token requests to that realm (GET with or without Basic
   credentials; containerd's POST form with its credentials) to the
   upstream's token server, so the upstream still decides who may pull what;
3. answers manifests on warm pulls from its store: 0 manifest GETs reach the
   upstream (HEADs are counted and reported, not asserted);
4. never serves a private image to a client the upstream refuses, with the
   image in its store (no credentials, or bob's);
5. never connects to a host taken from a client's request: the tamper test.

Marked ``office``: ``scripts/test -m office`` runs only these.
"""

from __future__ import annotations

import collections
import re
import socket
import time
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import pytest
import requests

from tests.harness import containerd as ctd
from tests.harness import docker as dkr
from tests.harness import netns
from tests.harness.canary import Canary
from tests.harness.containerd import Containerd, write_hosts_dir
from tests.harness.docker import Docker, DockerError
from tests.harness.mirror import Mirror
from tests.harness.netns import Office
from tests.harness.skopeo import make_skopeo_home, skopeo_copy, verify_dir_image
from tests.harness.upstream import ALICE, BOB

_missing = netns.available() or ctd.available() or dkr.available()
pytestmark = [pytest.mark.office, pytest.mark.skipif(_missing is not None, reason=_missing or "")]

WAIT = 60
_namespaces = iter(range(1, 10_000))
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def office():
    with Office() as o:
        yield o


@pytest.fixture
def mirror(tmp_path, office, upstream_redirect, closed_port, monkeypatch):
    """The mirror on the office's host address, in front of the upstream (which
    redirects blobs to its CDN, as Docker Hub does). Image references name a
    closed port as their registry (skopeo's and ctr's fallback goes nowhere);
    containerd's ?ns= names it, so it is listed as the upstream too."""
    monkeypatch.setenv("COLUMNS", "300")
    registries = f"{closed_port}={upstream_redirect.url},docker.io={upstream_redirect.url}"
    with Mirror(tmp_path / "mirror", [f"reverse:{upstream_redirect.url}"],
                listen_host=office.host_address, options={"registries": registries}) as m:
        yield m


@pytest.fixture(scope="module")
def containerd(office, tmp_path_factory):
    """One containerd daemon inside the office; each pull uses a namespace of its
    own (isolated content: a fresh namespace is a fresh machine)."""
    with Containerd(tmp_path_factory.mktemp("containerd"), netns=office) as daemon:
        yield daemon


@pytest.fixture
def hosts_dir(tmp_path, mirror, closed_port):
    base = tmp_path / "certs.d"
    write_hosts_dir(base, closed_port, mirror.url)
    return base


@pytest.fixture
def new_docker(office, mirror):
    """Start a fresh dockerd in the office (a new machine: dockerd keeps manifests
    after `docker rmi`); all are stopped at teardown."""
    daemons = []

    def start() -> Docker:
        daemons.append(Docker(mirrors=[mirror.url], netns=office).start())
        return daemons[-1]

    try:
        yield start
    finally:
        for daemon in daemons:
            daemon.stop()


# ----------------------------------------------------------------------------- helpers
def new_namespace() -> str:
    return f"office{next(_namespaces)}"


def warm_cost(upstream) -> str:
    c = upstream.counters
    return f"{c.manifest_gets} manifest GET, {c.manifest_heads} manifest HEAD"


def assert_warm(upstream) -> None:
    """A warm pull: no blob and no manifest GET reached the upstream or its CDN.
    Every manifest GET counts, a 401 too: containerd sends its GET by digest
    first without a token (a new connection), and the mirror must answer that
    with its own challenge, not by asking the upstream with a GET."""
    c = upstream.counters
    assert (c.blob_gets, c.cdn_gets, c.blob_bytes) == (0, 0, 0)
    gets = [(r.path, r.status, "with token" if r.authorization else "no token") for r in c.requests
            if r.server == "frontdoor" and r.method == "GET" and "/manifests/" in r.path]
    assert c.manifest_gets == 0, gets


def assert_cold(upstream, image) -> None:
    """Every blob came from the CDN once (fetched by the mirror, without a token)."""
    c = upstream.counters
    assert c.cdn_gets_by_digest == {d: 1 for d, _ in image.blobs}
    assert not any(r.authorization for r in c.requests if r.server == "cdn")


def assert_token_relayed(upstream, user: str | None, repo: str) -> None:
    """The upstream's token server issued this pull's token (so it decided)."""
    assert any(t.username == user and f"repository:{repo}:pull" in t.scopes and t.status == 200
               for t in upstream.tokens.requests), upstream.tokens.requests


def challenge(response: requests.Response) -> dict[str, str]:
    scheme, _, params = response.headers["WWW-Authenticate"].partition(" ")
    assert scheme == "Bearer", response.headers["WWW-Authenticate"]
    return dict(_CHALLENGE_PARAM.findall(params))


def in_office(office: Office, fn):
    """Run fn (which makes HTTP requests) from inside the office."""
    return office.in_namespace(fn, timeout=300)


def office_session() -> requests.Session:
    """A requests session that ignores the environment's proxy settings."""
    session = requests.Session()
    session.trust_env = False
    return session


# ----------------------------------------------------------------------------- the challenge
def test_the_mirrors_challenge_names_a_realm_on_the_mirror(office, mirror, pushed_images):
    image = pushed_images.private

    def ask():
        with office_session() as s:
            return [s.get(mirror.url + "/v2/", timeout=30),
                    s.get(f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}", timeout=30)]

    for answer in in_office(office, ask):
        assert answer.status_code == 401
        realm = urlsplit(challenge(answer)["realm"])
        assert (realm.scheme, realm.netloc) == ("http", mirror.host_port)

    # The realm answers the office with the upstream's token (alice may pull).
    def token():
        params = challenge(ask()[1])
        realm = params.pop("realm")
        with office_session() as s:
            return s.get(realm, params=params, auth=ALICE, timeout=30)

    answer = in_office(office, token)
    assert answer.status_code == 200, answer.text
    assert answer.json().get("token") or answer.json().get("access_token")


# ----------------------------------------------------------------------------- skopeo
def test_skopeo_cold_and_warm_pull(office, mirror, closed_port, upstream_redirect, pushed_images,
                                   tmp_path, record_figure):
    image = pushed_images.alpine
    home = make_skopeo_home(str(tmp_path / "home"), primary=closed_port, mirror=mirror.host_port)
    ref = f"{closed_port}/{image.ref}"
    skopeo_copy(ref, str(tmp_path / "cold"), home, netns=office)
    copied = verify_dir_image(str(tmp_path / "cold"))
    assert copied["manifest_digest"] == image.digest
    assert sorted(copied["blobs"]) == sorted(d for d, _ in image.blobs)
    assert_cold(upstream_redirect, image)
    assert_token_relayed(upstream_redirect, None, image.repo)
    mirror.wait_stored([d for d, _ in image.blobs], WAIT)

    upstream_redirect.reset_counters()
    skopeo_copy(ref, str(tmp_path / "warm"), home, netns=office)
    assert verify_dir_image(str(tmp_path / "warm"))["manifest_digest"] == image.digest
    record_figure(f"skopeo warm pull from the office: {warm_cost(upstream_redirect)}")
    assert_warm(upstream_redirect)


def test_skopeo_private_image_with_and_without_credentials(office, mirror, closed_port, upstream_redirect,
                                                           pushed_images, tmp_path):
    image = pushed_images.private
    ref = f"{closed_port}/{image.ref}"
    anonymous = make_skopeo_home(str(tmp_path / "anon"), primary=closed_port, mirror=mirror.host_port)
    refused = skopeo_copy(ref, str(tmp_path / "refused"), anonymous, netns=office, check=False)
    assert refused.returncode != 0

    # skopeo sends the credentials stored for the MIRROR's host:port to its realm.
    alice = make_skopeo_home(str(tmp_path / "alice"), primary=closed_port, mirror=mirror.host_port,
                             auth={mirror.host_port: ALICE})
    skopeo_copy(ref, str(tmp_path / "alice-copy"), alice, netns=office)
    assert verify_dir_image(str(tmp_path / "alice-copy"))["manifest_digest"] == image.digest
    assert_token_relayed(upstream_redirect, ALICE[0], image.repo)
    mirror.wait_stored([d for d, _ in image.blobs], WAIT)

    # The mirror holds the image now; whom the upstream refuses still gets nothing.
    bob = make_skopeo_home(str(tmp_path / "bob"), primary=closed_port, mirror=mirror.host_port,
                           auth={mirror.host_port: BOB})
    for who, home in (("anonymous", anonymous), ("bob", bob)):
        dest = tmp_path / f"{who}-after"
        proc = skopeo_copy(ref, str(dest), home, netns=office, check=False)
        assert proc.returncode != 0, who
        assert not (dest / "manifest.json").exists(), who


# ----------------------------------------------------------------------------- containerd
def test_ctr_cold_and_warm_pull(office, containerd, mirror, hosts_dir, closed_port, upstream_redirect,
                                pushed_images, record_figure):
    image = pushed_images.alpine
    ref = f"{closed_port}/{image.ref}"
    for attempt in ("cold", "warm"):
        if attempt == "warm":
            mirror.wait_stored([d for d, _ in image.blobs], WAIT)
            upstream_redirect.reset_counters()
        ns = new_namespace()
        containerd.ctr_pull(ref, hosts_dir, ns)
        assert containerd.images(ns) == {ref: image.digest}
        assert containerd.content_digests(ns) >= {image.digest} | {d for d, _ in image.blobs}
        if attempt == "cold":
            assert_cold(upstream_redirect, image)
            assert_token_relayed(upstream_redirect, None, image.repo)
    record_figure(f"ctr warm pull from the office: {warm_cost(upstream_redirect)}")
    assert_warm(upstream_redirect)


def test_ctr_private_image_with_and_without_credentials(office, containerd, mirror, hosts_dir, closed_port,
                                                        upstream_redirect, pushed_images):
    image = pushed_images.private
    ref = f"{closed_port}/{image.ref}"
    refused = containerd.ctr_pull(ref, hosts_dir, new_namespace(), check=False, timeout=WAIT)
    assert refused.returncode != 0
    ns = new_namespace()
    containerd.ctr_pull(ref, hosts_dir, ns, user=ALICE)  # ctr POSTs the credentials to the realm
    assert containerd.images(ns) == {ref: image.digest}
    assert_token_relayed(upstream_redirect, ALICE[0], image.repo)
    mirror.wait_stored([d for d, _ in image.blobs], WAIT)
    for user in (None, BOB):
        ns = new_namespace()
        proc = containerd.ctr_pull(ref, hosts_dir, ns, user=user, check=False, timeout=WAIT)
        assert proc.returncode != 0, user
        assert image.digest not in containerd.content_digests(ns), user


def test_cri_pull_by_a_daemon_in_the_office(office, mirror, closed_port, upstream_redirect, pushed_images,
                                           tmp_path, record_figure):
    """kubelet's way: the daemon itself resolves and fetches (CRI PullImage),
    with hosts.toml from its config_path; a second daemon is the warm machine."""
    image = pushed_images.alpine
    hosts = tmp_path / "certs.d"
    write_hosts_dir(hosts, closed_port, mirror.url)
    config = {"plugins": {ctd.CRI_PLUGIN: {"registry": {"config_path": str(hosts)}}}}
    for attempt in ("cold", "warm"):
        if attempt == "warm":
            mirror.wait_stored([d for d, _ in image.blobs], WAIT)
            upstream_redirect.reset_counters()
        with Containerd(tmp_path / f"cri-{attempt}", cri=True, netns=office, extra_config=config) as daemon:
            assert daemon.cri_pull(f"{closed_port}/{image.ref}", timeout=WAIT) == image.config_digest
            assert image.digest in daemon.content_digests(ctd.CRI_NAMESPACE)
        if attempt == "cold":
            assert_cold(upstream_redirect, image)
    record_figure(f"CRI warm pull from the office: {warm_cost(upstream_redirect)}")
    assert_warm(upstream_redirect)

    # A private image with the puller's credentials (CRI auth), refused without.
    private = pushed_images.private
    with Containerd(tmp_path / "cri-private", cri=True, netns=office, extra_config=config) as daemon:
        with pytest.raises(ctd.CRIError):
            daemon.cri_pull(f"{closed_port}/{private.ref}", timeout=WAIT)
        assert daemon.cri_pull(f"{closed_port}/{private.ref}", auth=ALICE, timeout=WAIT) == private.config_digest


# ----------------------------------------------------------------------------- Docker
def test_docker_cold_and_warm_pull(office, new_docker, mirror, upstream_redirect, pushed_images, record_figure):
    image = pushed_images.alpine
    ref = "alpine:latest"  # docker.io/library/alpine: the mirror answers for Docker Hub
    docker = new_docker()
    started = time.monotonic()
    docker.pull(ref)
    cold = time.monotonic() - started
    assert docker.repo_digests(ref) == [f"alpine@{image.digest}"]
    assert docker.image_id(ref) == image.config_digest
    assert_cold(upstream_redirect, image)
    assert_token_relayed(upstream_redirect, None, image.repo)
    mirror.wait_stored([d for d, _ in image.blobs], WAIT)

    docker = new_docker()
    upstream_redirect.reset_counters()
    started = time.monotonic()
    docker.pull(ref)
    warm = time.monotonic() - started
    assert docker.repo_digests(ref) == [f"alpine@{image.digest}"]
    record_figure(f"Docker from the office: dockerd start-up {docker.startup_seconds:.2f} s, "
                  f"cold {cold:.2f} s, warm {warm:.2f} s; warm pull: {warm_cost(upstream_redirect)}")
    assert_warm(upstream_redirect)


def test_docker_private_image_with_and_without_credentials(office, new_docker, mirror, upstream_redirect,
                                                           pushed_images):
    """Docker sends what it stores for Docker Hub (docker login cannot reach Docker
    Hub from the office, and never logs in through a mirror: see
    tests/test_e2e_docker.py) to the realm the mirror names."""
    image = pushed_images.private
    ref = f"{image.repo}:{image.tag}"
    docker = new_docker()
    with pytest.raises(DockerError):
        docker.pull(ref)
    docker.store_credentials(*ALICE)
    docker.pull(ref)
    assert docker.repo_digests(ref) == [f"{image.repo}@{image.digest}"]
    assert_token_relayed(upstream_redirect, ALICE[0], image.repo)
    mirror.wait_stored([d for d, _ in image.blobs], WAIT)
    for user in (None, BOB):
        docker = new_docker()
        if user is not None:
            docker.store_credentials(*user)
        with pytest.raises(DockerError):
            docker.pull(ref)
        assert not docker.has_image(ref), user


# ----------------------------------------------------------------------------- tampering
# Names a request could carry that a careless relay might connect to.
ADDED_PARAMETERS = ("realm", "url", "ns", "host", "registry", "upstream", "redirect", "target", "service_url")
TAMPER_HEADERS = ("Host", "X-Forwarded-Host", "Forwarded", "X-Original-URL", "Referer")


def canary_forms(address: str) -> list[str]:
    """Ways to name a canary listener in a URL part."""
    return [address, f"http://{address}/token", f"//{address}/token", f"http://user@{address}/"]


def tampered_urls(realm_url: str, addresses: list[str]) -> list[str]:
    """The realm URL with each query value, each path part, and added
    parameters replaced by or naming a canary address."""
    parts = urlsplit(realm_url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    segments = parts.path.split("/")
    urls = []
    for address in addresses:
        for form in canary_forms(address):
            for i, (name, _) in enumerate(query):
                changed = list(query)
                changed[i] = (name, form)
                urls.append(urlunsplit(parts._replace(query=urlencode(changed))))
            for i in range(1, len(segments)):
                for value in (form, quote(form, safe="")):
                    changed = list(segments)
                    changed[i] = value
                    urls.append(urlunsplit(parts._replace(path="/".join(changed))))
            urls.append(urlunsplit(parts._replace(path="/" + quote(form, safe="") + parts.path)))
            for name in ADDED_PARAMETERS:
                urls.append(urlunsplit(parts._replace(query=urlencode(query + [(name, form)]))))
                urls.append(urlunsplit(parts._replace(query=urlencode([(name, form)] + query))))
    return urls


def test_a_tampered_realm_url_never_makes_the_mirror_connect_elsewhere(office, mirror, upstream_redirect,
                                                                      pushed_images):
    """The office asks the mirror's realm with every part of the URL the mirror
    handed out changed to name a canary: listeners of this test on the host's
    loopback, the office's host address and inside the office itself, all
    reachable from the mirror. No request may reach any of them."""
    image = pushed_images.private
    with Canary() as canary:
        addresses = [canary.listen("127.0.0.1"), canary.listen(office.host_address),
                     canary.listen(office.address, office=office)]
        statuses: collections.Counter = collections.Counter()

        def tamper():
            with office_session() as s:
                params = challenge(s.get(f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}", timeout=30))
                realm = params.pop("realm")
                realm_url = realm + ("&" if "?" in realm else "?") + urlencode(params)
                urls = tampered_urls(realm_url, addresses)
                for url in urls:
                    for auth in (None, ALICE):
                        statuses[s.get(url, auth=auth, timeout=30, allow_redirects=False).status_code] += 1
                    statuses[s.post(url, data={"grant_type": "password", "username": ALICE[0],
                                               "password": ALICE[1], "service": params.get("service", ""),
                                               "scope": params.get("scope", "")},
                                    timeout=30, allow_redirects=False).status_code] += 1
                for address in addresses:
                    for header in TAMPER_HEADERS:
                        value = f"for=x;host={address}" if header == "Forwarded" else f"http://{address}/token" \
                            if header in ("X-Original-URL", "Referer") else address
                        statuses[s.get(realm_url, headers={header: value}, timeout=30).status_code] += 1
                    # The realm asked for as a proxy would be: absolute-form naming the canary.
                    statuses[absolute_form(mirror, f"http://{address}{urlsplit(realm_url).path}")] += 1
                # Control: the untampered realm still answers (so the tampered ones were looked at).
                good = s.get(realm_url, auth=ALICE, timeout=30)
                assert good.status_code == 200, good.text
                return len(urls)

        count = in_office(office, tamper)
        assert count > 100
        canary.assert_untouched(grace=2.0)
    assert statuses, "no tampered request was answered"


def absolute_form(mirror: Mirror, target: str) -> int:
    """Send ``GET <absolute URL>`` to the mirror's port; its status (0: no answer)."""
    host, port = mirror.host_port.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {urlsplit(target).netloc}\r\nConnection: close\r\n\r\n"
                     .encode())
        head = sock.recv(4096)
    m = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return int(m.group(1)) if m else 0
