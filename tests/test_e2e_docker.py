"""End to end with a REAL Docker daemon (Debian's docker.io, dockerd 20.10) pulling through the mirror.

Docker uses ``registry-mirrors`` for Docker Hub images only, so the tests pull
Docker Hub names (``alpine`` is docker.io/library/alpine): the mirror, in
reverse mode in front of the harness upstream, answers for Docker Hub, as it
does in production in front of registry-1.docker.io. The upstream redirects
blob GETs to its CDN, as Docker Hub does. Each test gets a fresh mirror, and
each pull that must behave as a new machine gets a fresh dockerd (it starts in
well under a second): after ``docker rmi``, dockerd 20.10 may still answer the
manifest from its own content store, so a pull after a removal is not a warm
pull as another machine would make it. Docker's fallback to Docker Hub is
pinned to a refused local address (tests/harness/docker.py), so a pull can
only succeed through the mirror.

Figures (reported in the run's "figures measured" section, not asserted):
dockerd start-up, cold and warm pull times, and the upstream manifest GETs
and HEADs a warm pull costs (issue #13 brings those to 0 GETs).
"""

from __future__ import annotations

import re
import time

import pytest

from tests.harness import docker as dkr
from tests.harness.docker import Docker, DockerError
from tests.harness.mirror import Mirror
from tests.harness.skopeo import ClosedPort
from tests.harness.upstream import ALICE, BOB

pytestmark = pytest.mark.skipif(dkr.available() is not None, reason=dkr.available() or "")

WAIT = 60


@pytest.fixture
def mirror(tmp_path, upstream_redirect):
    with Mirror(tmp_path / "mirror", [f"reverse:{upstream_redirect.url}"]) as m:
        yield m


@pytest.fixture
def new_docker(mirror):
    """Start a fresh dockerd using the mirror (a new machine); all are stopped at teardown."""
    daemons = []

    def start() -> Docker:
        daemons.append(Docker(mirrors=[mirror.url]).start())
        return daemons[-1]

    try:
        yield start
    finally:
        for daemon in daemons:
            daemon.stop()


@pytest.fixture
def docker(new_docker):
    return new_docker()


def hub_name(repo: str) -> str:
    """How Docker names a Docker Hub repository locally (library/ dropped)."""
    return repo.removeprefix("library/")


def manifest_requests(upstream) -> tuple[int, int]:
    c = upstream.counters
    return c.manifest_gets, c.manifest_heads


def assert_pulled(docker: Docker, image) -> None:
    """Docker holds the image under its manifest digest, with the pushed config."""
    name = hub_name(image.repo)
    assert docker.repo_digests(f"{name}:{image.tag}") == [f"{name}@{image.digest}"]
    assert docker.image_id(f"{name}:{image.tag}") == image.config_digest


@pytest.mark.parametrize("which", ["alpine", "schema2"], ids=["oci", "docker-schema2"])
def test_cold_then_warm_pull_through_the_mirror(which, docker, new_docker, mirror, upstream_redirect,
                                                pushed_images, record_figure):
    image = getattr(pushed_images, which)
    ref = f"{hub_name(image.repo)}:{image.tag}"
    blobs = {d for d, _ in image.blobs}

    started = time.monotonic()
    docker.pull(ref)
    cold = time.monotonic() - started
    assert_pulled(docker, image)
    # Every blob came from the upstream's CDN exactly once, fetched by the mirror
    # (without Docker's token), and Docker's blob GETs went to the mirror.
    counters = upstream_redirect.counters
    assert counters.cdn_gets_by_digest == {d: 1 for d in blobs}
    assert counters.blob_bytes == image.blob_bytes
    assert not any(r.authorization for r in counters.requests if r.server == "cdn")
    for digest in blobs:
        mirror.wait_for_log(rf"registry-cache: GET {re.escape(image.repo)} blob {digest} miss", WAIT)
    mirror.wait_stored(blobs, WAIT)

    second = new_docker()
    upstream_redirect.reset_counters()
    log_start = len(mirror.lines)
    started = time.monotonic()
    second.pull(ref)
    warm = time.monotonic() - started
    assert_pulled(second, image)
    # The warm pull fetched every blob again, from the mirror's store: no blob
    # request reached the upstream or its CDN.
    for digest in blobs:
        mirror.wait_for_log(rf"registry-cache: GET {re.escape(image.repo)} blob {digest} hit", WAIT,
                            start=log_start)
    assert (counters.blob_gets, counters.cdn_gets, counters.blob_bytes) == (0, 0, 0)
    gets, heads = manifest_requests(upstream_redirect)
    record_figure(f"dockerd start-up {docker.startup_seconds:.2f} s; pull of {ref} "
                  f"({image.blob_bytes} blob bytes): cold {cold:.2f} s, warm {warm:.2f} s; "
                  f"upstream manifest requests per warm pull: {gets} GET, {heads} HEAD")


def test_private_image_needs_credentials(docker, new_docker, mirror, upstream_redirect, pushed_images):
    """Docker sends the credentials stored for Docker Hub to the token server the
    mirror's 401 names; without them, or with a user the upstream refuses, the
    pull fails, also once the mirror holds the image."""
    image = pushed_images.private
    ref = f"{image.repo}:{image.tag}"
    with pytest.raises(DockerError, match="(?s)denied|unauthorized"):
        docker.pull(ref)
    assert not docker.has_image(ref)

    docker.store_credentials(*ALICE)
    docker.pull(ref)
    assert_pulled(docker, image)
    assert any(t.username == ALICE[0] and f"repository:{image.repo}:pull" in t.scopes and t.status == 200
               for t in upstream_redirect.tokens.requests)
    mirror.wait_stored([d for d, _ in image.blobs], WAIT)

    # The mirror holds the image now: machines without alice's credentials still get nothing.
    for user in (None, BOB):  # the upstream lets bob push, not pull acme/private
        other = new_docker()
        if user:
            other.store_credentials(*user)
        with pytest.raises(DockerError, match="(?s)denied|unauthorized"):
            other.pull(ref)
        assert not other.has_image(ref)

    # docker rmi, then the same pull without credentials: refused too.
    docker.remove(ref)
    docker.forget_credentials()
    with pytest.raises(DockerError, match="(?s)denied|unauthorized"):
        docker.pull(ref)
    assert not docker.has_image(ref)


def test_docker_login_for_docker_hub_never_goes_to_a_mirror(docker, mirror, pushed_images):
    """Why the tests store Docker Hub credentials instead of running `docker login`:
    dockerd 20.10 checks a Docker Hub login with registry-1.docker.io only, never
    with a mirror; and a login to the mirror's own address stores credentials
    under that address, which pulls of docker.io images do not send."""
    start = docker.log_size()
    refused = docker.login("docker.io", *ALICE, check=False)
    assert refused.returncode != 0
    assert "registry-1.docker.io" in refused.stderr, refused.stderr
    assert mirror.url.split("://")[1] not in docker.logs(start)
    assert dkr.DOCKER_HUB_AUTH_KEY not in docker.stored_credentials()

    docker.login(mirror.host_port, *ALICE)
    assert list(docker.stored_credentials()) == [mirror.host_port]
    with pytest.raises(DockerError, match="(?s)denied|unauthorized"):
        docker.pull(f"{pushed_images.private.repo}:{pushed_images.private.tag}")


def test_without_a_working_mirror_the_pull_fails_and_goes_nowhere(pushed_images):
    """Control: with the mirror a closed port, dockerd tries it, falls back to
    Docker Hub, whose name is pinned to a refused local address, and fails; the
    error shows both attempts."""
    with ClosedPort() as dead, Docker(mirrors=[f"http://{dead.host_port}"]) as docker:
        with pytest.raises(DockerError) as failed:
            docker.pull(hub_name(pushed_images.alpine.repo))
    message = str(failed.value)
    assert "registry-1.docker.io" in message and "127.0.0.1:443" in message
    assert f"http://{dead.host_port}" in message  # dockerd's own line about the mirror attempt
