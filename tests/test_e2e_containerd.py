"""End to end with a REAL containerd (Debian's 1.6): ``ctr`` pulls through the mirror.

Setup per test: a fresh mirror (mitmdump + addon, reverse mode) in front of the
shared upstream, which redirects blob GETs to its CDN (``upstream_redirect``).
One private containerd daemon serves the whole module; every pull goes into a
namespace of its own, and the daemon isolates namespaces' content (see
tests/harness/containerd.py), so each namespace is like a fresh machine.

The image references name a CLOSED loopback port as their registry host, and
the hosts.toml for that host names the mirror as its only ``[host]``: ctr can
only succeed through the mirror, never by going to the upstream directly (it
does not know the upstream's address at all). As with docker.io in real life,
containerd appends ``?ns=<registry host>`` to every request to the mirror.

The last tests take containerd-snippet.toml as users would copy it: its
hosts.toml with ``ctr``, and its config.toml forms (``config_path``, legacy
``mirrors``, and the two combined) in CRI-enabled daemons of their own, pulled
from the way kubelet pulls (CRI ``PullImage``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import platform
import re
import tomllib
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.harness import containerd as ctd
from tests.harness.containerd import Containerd, write_hosts_dir
from tests.harness.mirror import Mirror
from tests.harness.skopeo import ClosedPort
from tests.harness.upstream import ALICE, BOB

pytestmark = pytest.mark.skipif(ctd.available() is not None, reason=ctd.available() or "")

WAIT = 60
_namespaces = itertools.count(1)
_DO_REQUEST = re.compile(r'msg="do request".* request\.method=(\w+) .*url="([^"]+)"')


@pytest.fixture(scope="module")
def containerd(tmp_path_factory):
    daemon = Containerd(tmp_path_factory.mktemp("containerd"))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def mirror(tmp_path, upstream_redirect, closed_port, monkeypatch):
    # mitmdump shortens each flow's URL to the terminal width, which it takes
    # from COLUMNS when there is no terminal: make room for whole blob URLs.
    monkeypatch.setenv("COLUMNS", "300")
    # containerd names the registry with ?ns=: the images' registry (the closed
    # port) and docker.io (the legacy CRI form) both live at the test upstream.
    registries = f"{closed_port}={upstream_redirect.url},docker.io={upstream_redirect.url}"
    with Mirror(tmp_path / "mirror", [f"reverse:{upstream_redirect.url}"],
                options={"registries": registries}) as m:
        yield m


@pytest.fixture
def hosts_dir(tmp_path, mirror, closed_port):
    """A --hosts-dir whose only entry sends the closed port's images to the mirror."""
    base = tmp_path / "certs.d"
    write_hosts_dir(base, closed_port, mirror.url)
    return base


def new_namespace() -> str:
    return f"e2e{next(_namespaces)}"


def requests_sent(ctr_stderr: str) -> list[tuple[str, str]]:
    """(method, url) of every registry request ctr made (from its --debug log)."""
    return _DO_REQUEST.findall(ctr_stderr)


def assert_holds(containerd: Containerd, namespace: str, blobs) -> None:
    """Every (digest, size) is in the namespace's content store, byte-exact."""
    held = containerd.content_digests(namespace)
    missing = [d for d, _ in blobs if d not in held]
    assert not missing, f"containerd lacks {missing}; it holds {sorted(held)}"
    for digest, size in blobs:
        data = containerd.content_bytes(namespace, digest)
        assert len(data) == size, digest
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest


def assert_no_ns_reached_upstream(upstream) -> None:
    """The mirror takes containerd's ?ns= off before anything goes upstream."""
    leaked = [r.path for r in upstream.counters.requests if "ns=" in r.path]
    assert leaked == []


def test_pull_single_arch_image_through_the_mirror(containerd, mirror, hosts_dir, closed_port,
                                                   upstream_redirect, pushed_images):
    image = pushed_images.alpine
    ns = new_namespace()
    ref = f"{closed_port}/{image.ref}"
    proc = containerd.ctr_pull(ref, hosts_dir, ns)

    # containerd recorded the image and holds the manifest, config and every layer.
    assert containerd.images(ns) == {ref: image.digest}
    assert_holds(containerd, ns, [(image.digest, len(image.manifest))] + image.blobs)

    # Every request went to the mirror, each carrying ?ns=<the registry host>.
    sent = requests_sent(proc.stderr)
    assert sent, proc.stderr
    ns_query = "ns=" + quote(closed_port, safe="")
    for method, url in sent:
        assert url.startswith(mirror.url + "/v2/"), url
        assert ns_query in url, url
    blob_gets = {url.split("?")[0].rsplit("/", 1)[1] for m, url in sent if m == "GET" and "/blobs/" in url}
    assert blob_gets == {d for d, _ in image.blobs}
    # containerd resolves the tag with a HEAD, then GETs the manifest by digest.
    assert ("HEAD", f"{mirror.url}/v2/{image.repo}/manifests/{image.tag}?{ns_query}") in sent

    # The mirror handled them: the upstream saw no ns=, and each blob was fetched
    # from the CDN exactly once, by the mirror (no client token sent there).
    assert_no_ns_reached_upstream(upstream_redirect)
    counters = upstream_redirect.counters
    assert counters.cdn_gets_by_digest == {d: 1 for d, _ in image.blobs}
    assert counters.blob_bytes == image.blob_bytes
    cdn = [r for r in counters.requests if r.server == "cdn"]
    assert cdn and not any(r.authorization for r in cdn)
    # The token came from the token server directly (its realm is on loopback).
    assert not any(r.path.startswith("/token") for r in counters.requests)
    assert any(f"repository:{image.repo}:pull" in t.scopes and t.status == 200
               for t in upstream_redirect.tokens.requests)
    # The mirror's log shows containerd's blob GETs answered with its 307, and the fills.
    for digest, _ in image.blobs:
        mirror.wait_for_log(rf"GET \S+/v2/{re.escape(image.repo)}/blobs/{digest}", WAIT)
        mirror.wait_for_log(rf"fill: stored {digest}", WAIT)
    log = mirror.log_text()
    assert log.count("<< 307") >= len(image.blobs), log


@pytest.mark.parametrize("platform_arg", ["linux/arm64/v8", None], ids=["arm64-v8", "default"])
@pytest.mark.allow_skip  # on a machine that is neither amd64 nor arm64
def test_pull_one_platform_of_a_multi_arch_index(containerd, mirror, hosts_dir, closed_port,
                                                 upstream_redirect, pushed_images, platform_arg):
    index = pushed_images.multi
    if platform_arg is not None:
        wanted = tuple(platform_arg.split("/"))
    else:
        wanted = {"x86_64": ("linux", "amd64"), "aarch64": ("linux", "arm64", "v8")}.get(platform.machine())
        if wanted is None:
            pytest.skip(f"no image in the index for this machine ({platform.machine()})")
    image = index.images[wanted]
    others = [img for key, img in index.images.items() if key != wanted]
    ns = new_namespace()
    ref = f"{closed_port}/{index.ref}"
    containerd.ctr_pull(ref, hosts_dir, ns, platform=platform_arg)

    assert containerd.images(ns) == {ref: index.digest}
    assert_holds(containerd, ns, [(index.digest, len(index.manifest)),
                                  (image.digest, len(image.manifest))] + image.blobs)
    held = containerd.content_digests(ns)
    for other in others:  # the other platform's layers were not pulled
        assert not {d for d, _ in other.layers} & held
    # Only the wanted platform's blobs went through the mirror, once each.
    counters = upstream_redirect.counters
    assert counters.cdn_gets_by_digest == {d: 1 for d, _ in image.blobs}
    assert counters.blob_bytes == image.blob_bytes
    assert_no_ns_reached_upstream(upstream_redirect)


def test_second_pull_into_a_fresh_namespace_costs_no_upstream_blob_bytes(
        containerd, mirror, hosts_dir, closed_port, upstream_redirect, pushed_images):
    image = pushed_images.alpine
    ref = f"{closed_port}/{image.ref}"
    containerd.ctr_pull(ref, hosts_dir, new_namespace())
    for digest, _ in image.blobs:
        mirror.wait_for_log(rf"fill: stored {digest}", WAIT)
    assert upstream_redirect.counters.blob_bytes == image.blob_bytes
    upstream_redirect.reset_counters()
    log_start = len(mirror.lines)

    ns = new_namespace()
    proc = containerd.ctr_pull(ref, hosts_dir, ns)

    assert_holds(containerd, ns, [(image.digest, len(image.manifest))] + image.blobs)
    # The fresh namespace really fetched every blob again, from the mirror...
    blob_gets = {url.split("?")[0].rsplit("/", 1)[1]
                 for m, url in requests_sent(proc.stderr) if m == "GET" and "/blobs/" in url}
    assert blob_gets == {d for d, _ in image.blobs}
    # ...which served them all from its store: nothing from the upstream or its CDN.
    counters = upstream_redirect.counters
    assert counters.blob_bytes == 0
    assert counters.cdn_gets == 0
    assert counters.blob_gets == 0
    assert counters.manifest_heads >= 1  # the tag was still resolved upstream
    for digest, _ in image.blobs:  # log lines arrive asynchronously: wait for each blob's own
        mirror.wait_for_log(rf"registry-cache: GET \S+ blob {digest} hit", WAIT, start=log_start)
    new_lines = "\n".join(mirror.lines[log_start:])
    assert not re.search(r"(started|joined) fill|fill: stored", new_lines), new_lines
    assert_no_ns_reached_upstream(upstream_redirect)


def test_content_fetch_of_a_docker_schema2_image(containerd, mirror, hosts_dir, closed_port,
                                                 upstream_redirect, pushed_images):
    """``ctr content fetch`` (no unpack) and Docker media types go the same way."""
    image = pushed_images.schema2
    ns = new_namespace()
    proc = containerd.ctr_pull(f"{closed_port}/{image.ref}", hosts_dir, ns, fetch=True)
    assert_holds(containerd, ns, [(image.digest, len(image.manifest))] + image.blobs)
    assert json.loads(image.manifest)["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert all(url.startswith(mirror.url) for _, url in requests_sent(proc.stderr))
    assert upstream_redirect.counters.cdn_gets_by_digest == {d: 1 for d, _ in image.blobs}
    assert_no_ns_reached_upstream(upstream_redirect)


def test_without_the_mirror_the_pull_fails(containerd, tmp_path, closed_port, pushed_images):
    """Control: the reference's own registry is a closed port, so only the mirror can answer."""
    empty = tmp_path / "no-hosts"
    empty.mkdir()
    proc = containerd.ctr_pull(f"{closed_port}/{pushed_images.alpine.ref}", empty, new_namespace(),
                               check=False, timeout=WAIT)
    assert proc.returncode != 0
    assert "connection refused" in proc.stderr


# ----------------------------------------------------------------------------
# containerd-snippet.toml, as users would copy it, checked with the real daemon
# ----------------------------------------------------------------------------
SNIPPET = Path(__file__).resolve().parents[1] / "containerd-snippet.toml"
SNIPPET_MIRROR = "http://mirror.lan:5000"


def snippet_block(name: str) -> str:
    """The commented-out block between "# BEGIN name" and "# END name", uncommented."""
    lines, inside = [], False
    for line in SNIPPET.read_text().splitlines():
        if line == f"# BEGIN {name}":
            inside = True
        elif line == f"# END {name}":
            return "\n".join(lines) + "\n"
        elif inside:
            assert line == "#" or line.startswith("# "), line
            lines.append(line[2:])
    raise AssertionError(f"no block {name!r} in {SNIPPET}")


def snippet_hosts_toml(hosts_dir: Path, registry_host: str, mirror_url: str) -> Path:
    """The snippet's docker.io hosts.toml, for ``registry_host`` and the test mirror.

    Docker Hub (the snippet's fallback server) becomes the closed port, so a
    failing mirror can never send containerd anywhere else.
    """
    text = snippet_block("hosts.toml")
    assert tomllib.loads(text) == {
        "server": "https://registry-1.docker.io",
        "host": {SNIPPET_MIRROR: {"capabilities": ["pull", "resolve"]}},
    }
    text = text.replace(SNIPPET_MIRROR, mirror_url)
    text = text.replace("https://registry-1.docker.io", f"https://{registry_host}")
    path = hosts_dir / registry_host / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def snippet_config_path_form(config_path: Path) -> dict:
    """Form (a): the snippet's live TOML (config.toml lines) with our config_path."""
    config = tomllib.loads(SNIPPET.read_text())
    assert config == {"version": 2, "plugins": {ctd.CRI_PLUGIN: {"registry": {
        "config_path": "/etc/containerd/certs.d"}}}}
    config["plugins"][ctd.CRI_PLUGIN]["registry"]["config_path"] = str(config_path)
    del config["version"]
    return config


def snippet_legacy_form(registry_host: str, mirror_url: str) -> dict:
    """Form (b): the snippet's legacy mirrors block, for ``registry_host`` and our mirror."""
    config = tomllib.loads(snippet_block("legacy"))
    mirrors = config["plugins"][ctd.CRI_PLUGIN]["registry"]["mirrors"]
    assert mirrors == {"docker.io": {"endpoint": [SNIPPET_MIRROR]}}
    mirrors[registry_host] = {"endpoint": [mirror_url]}
    del mirrors["docker.io"]
    del config["version"]
    return config


def daemon_requests(daemon: Containerd) -> list[tuple[str, str]]:
    """(method, url) of every registry request the daemon (CRI) made."""
    return requests_sent(daemon.logs())


def test_snippet_hosts_toml_sends_ctr_through_the_mirror(containerd, mirror, closed_port, tmp_path,
                                                         upstream_redirect, pushed_images):
    image = pushed_images.alpine
    hosts = tmp_path / "certs.d"
    snippet_hosts_toml(hosts, closed_port, mirror.url)
    ns = new_namespace()
    proc = containerd.ctr_pull(f"{closed_port}/{image.ref}", hosts, ns)
    assert_holds(containerd, ns, [(image.digest, len(image.manifest))] + image.blobs)
    assert all(url.startswith(mirror.url + "/v2/") for _, url in requests_sent(proc.stderr))
    assert upstream_redirect.counters.cdn_gets_by_digest == {d: 1 for d, _ in image.blobs}


def test_snippet_config_path_form_makes_cri_pull_through_the_mirror(mirror, closed_port, tmp_path,
                                                                   upstream_redirect, pushed_images):
    """What kubelet does on a node with form (a): CRI PullImage, hosts.toml via config_path."""
    image = pushed_images.alpine
    hosts = tmp_path / "certs.d"
    snippet_hosts_toml(hosts, closed_port, mirror.url)
    with Containerd(tmp_path / "cri", cri=True, log_level="debug",
                    extra_config=snippet_config_path_form(hosts)) as daemon:
        assert daemon.plugin_status()[ctd.CRI_PLUGIN] == "ok", daemon.logs()
        image_id = daemon.cri_pull(f"{closed_port}/{image.ref}", timeout=WAIT)
        assert image_id == image.config_digest
        assert_holds(daemon, ctd.CRI_NAMESPACE, [(image.digest, len(image.manifest))] + image.blobs)
        sent = daemon_requests(daemon)
    ns_query = "ns=" + quote(closed_port, safe="")
    assert sent and all(url.startswith(mirror.url + "/v2/") and ns_query in url for _, url in sent)
    assert upstream_redirect.counters.cdn_gets_by_digest == {d: 1 for d, _ in image.blobs}
    assert_no_ns_reached_upstream(upstream_redirect)


def test_snippet_legacy_form_makes_cri_pull_through_the_mirror(mirror, closed_port, tmp_path,
                                                              upstream_redirect, pushed_images):
    """Form (b), and its fallback: the registry itself is always tried after the mirrors."""
    image = pushed_images.schema2
    with Containerd(tmp_path / "cri", cri=True, log_level="debug",
                    extra_config=snippet_legacy_form(closed_port, mirror.url)) as daemon:
        assert daemon.plugin_status()[ctd.CRI_PLUGIN] == "ok", daemon.logs()
        assert daemon.cri_pull(f"{closed_port}/{image.ref}", timeout=WAIT) == image.config_digest
        assert_holds(daemon, ctd.CRI_NAMESPACE, [(image.digest, len(image.manifest))] + image.blobs)
        sent = daemon_requests(daemon)
    assert sent and all(url.startswith(mirror.url + "/v2/") for _, url in sent)
    assert any("ns=" in url for _, url in sent)
    assert upstream_redirect.counters.cdn_gets_by_digest == {d: 1 for d, _ in image.blobs}
    assert_no_ns_reached_upstream(upstream_redirect)

    # A dead mirror: containerd goes on to the registry named in the image
    # reference (here the closed port; Docker Hub for docker.io images).
    with ClosedPort() as dead, Containerd(tmp_path / "cri-dead", cri=True, log_level="debug",
                                          extra_config=snippet_legacy_form(closed_port, f"http://{dead.host_port}")) as daemon:
        with pytest.raises(ctd.CRIError):
            daemon.cri_pull(f"{closed_port}/{image.ref}", timeout=WAIT)
        log = daemon.logs()
    assert f"{dead.host_port}/v2/" in log and f"{closed_port}/v2/" in log
    assert log.index(f"{dead.host_port}/v2/") < log.index(f"{closed_port}/v2/")


def test_snippet_forms_cannot_be_combined(tmp_path, closed_port):
    """The snippet's warning: config_path and mirrors together disable CRI (1.6)."""
    both = ctd.merge_config(snippet_config_path_form(tmp_path / "certs.d"),
                            snippet_legacy_form(closed_port, "http://127.0.0.1:9"))
    with Containerd(tmp_path / "cri", cri=True, extra_config=both) as daemon:
        assert daemon.plugin_status()[ctd.CRI_PLUGIN] == "error"
        assert "`mirrors` cannot be set when `config_path` is provided" in daemon.logs()


def test_private_image_needs_the_pullers_credentials(containerd, mirror, hosts_dir, closed_port,
                                                     upstream_redirect, pushed_images):
    """ctr --user: containerd sends the credentials to the token server itself."""
    image = pushed_images.private
    ref = f"{closed_port}/{image.ref}"
    refused = containerd.ctr_pull(ref, hosts_dir, new_namespace(), check=False, timeout=WAIT)
    assert refused.returncode != 0
    ns = new_namespace()
    containerd.ctr_pull(ref, hosts_dir, ns, user=ALICE)
    assert_holds(containerd, ns, [(image.digest, len(image.manifest))] + image.blobs)
    assert any(t.username == ALICE[0] and f"repository:{image.repo}:pull" in t.scopes
               for t in upstream_redirect.tokens.requests)
    # The mirror now stores the image; BOB, whom the upstream refuses, still gets nothing.
    denied = containerd.ctr_pull(ref, hosts_dir, new_namespace(), user=BOB, check=False, timeout=WAIT)
    assert denied.returncode != 0
    assert "401" in denied.stderr or "403" in denied.stderr, denied.stderr
