"""Shared pytest fixtures."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

# =============================================================================
# Strict skips: with REGISTRY_CACHE_STRICT=1 (scripts/test sets it; CI runs
# scripts/test as root with every tool installed) a skipped test, or a skipped
# test module, counts as a failure naming the skip's reason, so a missing tool
# or privilege cannot pass silently. xfail is not a skip. A test that may skip
# on purpose even then carries @pytest.mark.allow_skip.
# =============================================================================
STRICT_ENV = "REGISTRY_CACHE_STRICT"


def _strict_skips() -> bool:
    return os.environ.get(STRICT_ENV) == "1"


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, lineno, "Skipped: reason")
        path, lineno, reason = longrepr
        reason = reason.removeprefix("Skipped: ")
        return f"{reason} ({path}:{lineno})" if lineno is not None else f"{reason} ({path})"
    return str(longrepr)


def _fail_skip(report) -> None:
    report.outcome = "failed"
    report.longrepr = f"skipped, which {STRICT_ENV}=1 forbids: {_skip_reason(report)}"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"allow_skip: this test may skip even with {STRICT_ENV}=1")
    config.addinivalue_line(
        "markers", "office: clients in a network namespace that reaches only the mirror (scripts/test -m office)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if (report.skipped and not hasattr(report, "wasxfail") and _strict_skips()
            and item.get_closest_marker("allow_skip") is None):
        _fail_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if report.skipped and _strict_skips():  # e.g. pytest.skip(allow_module_level=True)
        _fail_skip(report)
    return report

# ============================ end of strict skips ============================


# =============================================================================
# Upstream registry harness fixtures (tests/harness/*)
#
#   upstream_session  session  the running Upstream (distribution + token
#                              server + front door + CDN); its state is shared
#   upstream          function the same Upstream, reset for this test: relay
#                              mode, no faults, up, counters at zero
#   upstream_redirect function the same, with blob GETs redirected to the CDN
#   upstream_https    session  a separate Upstream served over HTTPS
#                              (upstream_https.ca_cert_path is the CA)
#   pushed_images     session  standard images pushed once to upstream_session
#   closed_port       session  a loopback host:port that refuses connections
#                              (skopeo's primary location in mirror tests)
#
# Every process and server started here is stopped at teardown.
# =============================================================================
from tests.harness.images import PushedImage, PushedIndex, make_layer, push_image, push_index
from tests.harness.mirror import Mirror
from tests.harness.skopeo import ClosedPort
from tests.harness.upstream import ALICE, Upstream


def _reset_upstream(u: Upstream, *, redirect: bool) -> None:
    u.set_down(False)
    u.clear_faults()
    u.redirect_blobs = redirect
    u.reset_counters()


@pytest.fixture(scope="session")
def upstream_session():
    u = Upstream()
    u.start()
    try:
        yield u
    finally:
        u.stop()


@pytest.fixture
def upstream(upstream_session):
    _reset_upstream(upstream_session, redirect=False)
    try:
        yield upstream_session
    finally:
        _reset_upstream(upstream_session, redirect=False)


@pytest.fixture
def upstream_redirect(upstream_session):
    _reset_upstream(upstream_session, redirect=True)
    try:
        yield upstream_session
    finally:
        _reset_upstream(upstream_session, redirect=False)


@pytest.fixture(scope="session")
def upstream_https():
    u = Upstream(https=True)
    u.start()
    try:
        yield u
    finally:
        u.stop()


@pytest.fixture(scope="session")
def second_upstream():
    """Another registry, as ghcr.io is beside docker.io."""
    with Upstream() as u:
        yield u


@pytest.fixture
def second(second_upstream):
    second_upstream.clear_faults()
    second_upstream.reset_counters()
    return second_upstream


@dataclass
class PushedImages:
    """The standard images on upstream_session (all layers distinct)."""

    alpine: PushedImage  # library/alpine:latest, OCI manifest, 2 layers
    multi: PushedIndex  # library/multi:latest, OCI index: linux/amd64, linux/arm64/v8
    schema2: PushedImage  # library/schema2:latest, Docker schema2 manifest, 1 layer
    dockerlist: PushedIndex  # library/dockerlist:latest, Docker manifest list: amd64, arm/v7
    private: PushedImage  # acme/private:latest, only alice may pull it


@pytest.fixture(scope="session")
def pushed_images(upstream_session) -> PushedImages:
    url = upstream_session.url
    return PushedImages(
        alpine=push_image(url, "library/alpine", "latest",
                          [make_layer(512 * 1024, 1), make_layer(1536 * 1024, 2)], auth=ALICE),
        multi=push_index(url, "library/multi", "latest", {
            ("linux", "amd64"): [make_layer(300 * 1024, 3)],
            ("linux", "arm64", "v8"): [make_layer(400 * 1024, 4)],
        }, auth=ALICE),
        schema2=push_image(url, "library/schema2", "latest", [make_layer(200 * 1024, 5)],
                           auth=ALICE, fmt="docker"),
        dockerlist=push_index(url, "library/dockerlist", "latest", {
            ("linux", "amd64"): [make_layer(100 * 1024, 6)],
            ("linux", "arm", "v7"): [make_layer(100 * 1024, 7)],
        }, auth=ALICE, fmt="docker"),
        private=push_image(url, "acme/private", "latest", [make_layer(256 * 1024, 8)], auth=ALICE),
    )


@pytest.fixture(scope="session")
def closed_port():
    port = ClosedPort()
    try:
        yield port.host_port
    finally:
        port.close()

# ============================ end of harness fixtures ========================


# =============================================================================
# Mirror fixtures
#
#   mirror        function  mitmdump with the addon, reverse mode in front of
#                           upstream_session, its own empty store
#   any_upstream  function  parametrized: the upstream relaying blobs itself,
#                           then redirecting them to its CDN (as Docker Hub does)
# =============================================================================
@pytest.fixture
def mirror(tmp_path, upstream_session):
    with Mirror(tmp_path / "mirror", [f"reverse:{upstream_session.url}"]) as m:
        yield m


@pytest.fixture(params=["relay", "redirect"])
def any_upstream(request):
    return request.getfixturevalue("upstream" if request.param == "relay" else "upstream_redirect")


# =============================================================================
# Figures a test measured (timings, request counts) that are reported, not
# asserted: `record_figure("warm pull: 1 manifest GET")` adds a line to a
# "figures measured" section at the end of the run.
# =============================================================================
_FIGURES = pytest.StashKey[list]()


@pytest.fixture
def record_figure(request):
    figures = request.config.stash.setdefault(_FIGURES, [])

    def record(text: str) -> None:
        figures.append(f"{request.node.name}: {text}")

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    figures = config.stash.get(_FIGURES, [])
    if figures:
        terminalreporter.section("figures measured")
        for line in figures:
            terminalreporter.write_line(line)


# =============================================================================
# Object store fixtures
#
#   seaweedfs_session  session   a real S3 object store (SeaweedFS weed mini,
#                                tests/harness/seaweedfs.py) with one bucket
#   seaweedfs          function  the same, its front door up and moving;
#                                tests keep to keys under their own prefix
#   s3_prefix          function  a key prefix no other test uses
# =============================================================================
from tests.harness.seaweedfs import SeaweedFS


@pytest.fixture(scope="session")
def seaweedfs_session():
    with SeaweedFS() as store:
        yield store


@pytest.fixture
def seaweedfs(seaweedfs_session):
    seaweedfs_session.set_down(False)
    seaweedfs_session.set_stalled(False)
    try:
        yield seaweedfs_session
    finally:
        seaweedfs_session.set_down(False)
        seaweedfs_session.set_stalled(False)


@pytest.fixture
def s3_prefix(request):
    import secrets
    return f"t/{request.node.name[:40]}-{secrets.token_hex(4)}/"
