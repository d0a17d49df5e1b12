"""End to end: what one node learned, every node knows (access proofs, public
states, grants, manifests and tags through the object store), and private
images stay exactly as private as on one node.

Node A pulls; node B, with an empty store of its own, pulls the same. Both
are real mitmdump processes sharing one SeaweedFS bucket.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from addon.access import PUBLIC_TTL
from tests.harness.fresh import fresh_layer, unique_seed
from tests.harness.images import push_image
from tests.harness.mirror import Mirror
from tests.harness.upstream import ALICE, BOB
from tests.harness.v2client import PULL_ERRORS, RegistryClient, RegistryError

WAIT = 60
SECRET = "a-cluster-secret-of-some-length\n"
NEW_SECRET = "the-cluster-secret-that-replaces-it\n"


def node(tmp_path, name, upstream, seaweedfs, prefix, secret_lines=SECRET, modes=(), **options) -> Mirror:
    secret = tmp_path / f"{name}.secret"
    secret.write_text(secret_lines)
    secret.chmod(0o600)
    return Mirror(tmp_path / name, [f"reverse:{upstream.url}", *modes], options={
        "s3_bucket": seaweedfs.bucket, "s3_endpoint": seaweedfs.endpoint, "s3_prefix": prefix,
        "s3_timeout": "1", "s3_retry_after": "2", "cluster_secret_file": str(secret), **options,
    }, env=seaweedfs.client_env())


def wait_until(condition, what: str, timeout: float = WAIT) -> None:
    """Poll condition() (bounded): the records go out in the background."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        pause.wait(0.05)


def records(seaweedfs, prefix: str, under: str) -> list[str]:
    client = seaweedfs.client(endpoint=seaweedfs.direct_endpoint)
    base = f"{prefix}records/{under}"
    page = client.list_objects_v2(Bucket=seaweedfs.bucket, Prefix=base)
    return [item["Key"][len(f"{prefix}records/"):] for item in page.get("Contents", [])]


def rewrite(seaweedfs, prefix: str, under: str, value: dict, ending: str = "") -> None:
    """Every record under `under` (whose name ends so) says value now (a node's
    clock ahead, a forged or an old record)."""
    client = seaweedfs.client(endpoint=seaweedfs.direct_endpoint)
    names = [name for name in records(seaweedfs, prefix, under) if name.endswith(ending)]
    assert names
    for name in names:
        client.put_object(Bucket=seaweedfs.bucket, Key=f"{prefix}records/{name}", Body=json.dumps(value).encode())


def image_on(upstream, repo=None):
    seed = unique_seed()
    return push_image(upstream.url, repo or f"shared/img{seed}", f"t{seed}",
                      [fresh_layer(600_000), fresh_layer(200_000)], auth=ALICE)


def pulled_on_a(a: Mirror, seaweedfs, prefix, image, client: RegistryClient) -> None:
    """A pulls image; waits until A knows whether it is public and has shared
    its blobs, the manifest, the tag, the proofs and that state."""
    assert client.pull(image.repo, image.tag).layers == image.layers
    a.wait_for_log(rf"access: .*/{image.repo} is (public|not public)", WAIT)
    for digest, _ in image.blobs:
        a.wait_for_log(rf"object store: uploaded {digest}", WAIT)
    wait_until(lambda: len(records(seaweedfs, prefix, "seen/")) >= len(image.blobs) + 1
               and records(seaweedfs, prefix, "public/") and records(seaweedfs, prefix, "tag/")
               and records(seaweedfs, prefix, "manifest/"), "A's records")


def manifest_gets(upstream) -> int:
    return sum(1 for r in upstream.counters.requests if r.method == "GET" and "/manifests/" in r.path)


def blob_requests(upstream) -> list:
    return [r for r in upstream.counters.requests if "/blobs/" in r.path]


def test_a_second_node_pulls_warm_what_the_first_verified_without_asking_the_upstream_for_it(
        tmp_path, upstream, seaweedfs, s3_prefix):
    image = image_on(upstream)
    with node(tmp_path, "a", upstream, seaweedfs, s3_prefix) as a:
        pulled_on_a(a, seaweedfs, s3_prefix, image, RegistryClient(a.url))
    upstream.reset_counters()
    with node(tmp_path, "b", upstream, seaweedfs, s3_prefix) as b:
        result = RegistryClient(b.url).pull(image.repo, image.tag)
        assert result.manifest_digest == image.digest and result.layers == image.layers
    # The tag was checked with a HEAD (it stays fresh); the manifest, the
    # proofs and the repository's public state came from A, the blobs from
    # the object store: no manifest GET (a pull, to Docker Hub), no blob request.
    assert manifest_gets(upstream) == 0
    assert blob_requests(upstream) == []
    assert upstream.counters.blob_bytes == 0


def test_a_private_image_stays_private_on_the_second_node(tmp_path, upstream, seaweedfs, s3_prefix):
    image = image_on(upstream, repo="acme/private")
    with node(tmp_path, "a", upstream, seaweedfs, s3_prefix) as a:
        pulled_on_a(a, seaweedfs, s3_prefix, image, RegistryClient(a.url, *ALICE))
    with node(tmp_path, "b", upstream, seaweedfs, s3_prefix) as b:
        digest, _ = image.layers[0]
        for who in [(), BOB]:
            client = RegistryClient(b.url, *who)
            with pytest.raises(RegistryError) as refused:
                client.get_blob(image.repo, digest)
            assert refused.value.status in (401, 403)
            with pytest.raises(RegistryError):
                client.get_manifest(image.repo, image.digest)
        upstream.reset_counters()
        assert RegistryClient(b.url, *ALICE).pull(image.repo, image.tag).layers == image.layers
        assert upstream.counters.blob_bytes == 0


def test_stale_answers_on_the_second_node_while_the_upstream_is_down(tmp_path, upstream, seaweedfs, s3_prefix):
    public = image_on(upstream)
    private = image_on(upstream, repo="acme/private")
    with node(tmp_path, "a", upstream, seaweedfs, s3_prefix) as a:
        pulled_on_a(a, seaweedfs, s3_prefix, public, RegistryClient(a.url))
        alice = RegistryClient(a.url, *ALICE)
        pulled_on_a(a, seaweedfs, s3_prefix, private, alice)
        wait_until(lambda: records(seaweedfs, s3_prefix, "grant/"), "alice's grant")
    upstream.set_down(True)  # registry, token server and all
    with node(tmp_path, "b", upstream, seaweedfs, s3_prefix) as b:
        # A brand-new anonymous client: ping, tag, manifest, blobs, all stale or from the object store.
        result = RegistryClient(b.url).pull(public.repo, public.tag)
        assert result.manifest_digest == public.digest and result.layers == public.layers
        b.wait_for_log(rf"answering GET /v2/{public.repo}/manifests/{public.tag} from the store \(stale\)", WAIT)
        # alice, with the token the upstream accepted on A: her image.
        alice.base_url = b.url
        assert alice.pull(private.repo, private.tag).layers == private.layers
        # Nobody else: no client the upstream never accepted reads it.
        for who in [(), BOB]:
            with pytest.raises(PULL_ERRORS):
                RegistryClient(b.url, *who).pull(private.repo, private.tag)
            with pytest.raises(PULL_ERRORS):
                RegistryClient(b.url, *who).get_blob(private.repo, private.layers[0][0])
    # An outage that lasts: A's "public" is older than a node believes fresh. A
    # would still answer stale from it; so does a node that only read it.
    rewrite(seaweedfs, s3_prefix, "public/", {"public": True, "checked_at": time.time() - 2 * PUBLIC_TTL},
            ending="/" + public.repo)
    with node(tmp_path, "c", upstream, seaweedfs, s3_prefix) as c:
        assert RegistryClient(c.url).pull(public.repo, public.tag).layers == public.layers
        with pytest.raises(PULL_ERRORS):
            RegistryClient(c.url).pull(private.repo, private.tag)


def test_a_grant_another_node_holds_serves_blobs_while_the_upstream_hangs(tmp_path, upstream, seaweedfs, s3_prefix):
    """A hung registry puts a node in its quiet time, where it decides from
    what it knows; what it knows includes what other nodes shared: alice's
    blob request on B (her manifest went to A, behind a load balancer) is
    served from her grant in the bucket, not refused 503."""
    image = image_on(upstream, repo="acme/private")
    with node(tmp_path, "a", upstream, seaweedfs, s3_prefix) as a:
        alice = RegistryClient(a.url, *ALICE)
        pulled_on_a(a, seaweedfs, s3_prefix, image, alice)
        alice.get_manifest(image.repo, image.tag)  # her token, for B too
        wait_until(lambda: records(seaweedfs, s3_prefix, "grant/"), "alice's grant")
    upstream.set_down(True, how="hang")
    with node(tmp_path, "b", upstream, seaweedfs, s3_prefix, upstream_timeout="2") as b:
        with pytest.raises(PULL_ERRORS):  # a request that times out: B's quiet time starts
            RegistryClient(b.url).get_manifest("library/other", "latest")
        b.wait_for_log(r"timed out", WAIT)
        alice.base_url = b.url
        digest, size = image.layers[0]
        assert alice.get_blob(image.repo, digest) == size  # verified against its digest
        for who in [(), BOB]:
            with pytest.raises(PULL_ERRORS):
                RegistryClient(b.url, *who).get_blob(image.repo, digest)


def test_without_a_cluster_secret_no_grant_is_shared(tmp_path, upstream, seaweedfs, s3_prefix):
    image = image_on(upstream, repo="acme/private")
    with node(tmp_path, "a", upstream, seaweedfs, s3_prefix, cluster_secret_file="") as a:
        pulled_on_a(a, seaweedfs, s3_prefix, image, RegistryClient(a.url, *ALICE))
    assert records(seaweedfs, s3_prefix, "grant/") == []


def test_a_grant_written_under_the_old_secret_is_found_while_the_secret_rotates(
        tmp_path, upstream, seaweedfs, s3_prefix):
    """A still signs with the old secret; B already signs with the new one
    (the old one its second line). alice's grant, written by A, lets her pull
    on B while the upstream is down; nobody else."""
    image = image_on(upstream, repo="acme/private")
    with node(tmp_path, "a", upstream, seaweedfs, s3_prefix, secret_lines=SECRET) as a:
        alice = RegistryClient(a.url, *ALICE)
        pulled_on_a(a, seaweedfs, s3_prefix, image, alice)
        wait_until(lambda: records(seaweedfs, s3_prefix, "grant/"), "alice's grant")
    upstream.set_down(True)
    with node(tmp_path, "b", upstream, seaweedfs, s3_prefix, secret_lines=NEW_SECRET + SECRET) as b:
        alice.base_url = b.url
        assert alice.pull(image.repo, image.tag).layers == image.layers
        with pytest.raises(PULL_ERRORS):
            RegistryClient(b.url, *BOB).pull(image.repo, image.tag)


def test_an_expired_grant_or_a_public_state_from_the_future_opens_nothing_on_the_second_node(
        tmp_path, upstream, seaweedfs, s3_prefix):
    """What the bucket says counts only while it would on the node that wrote
    it: alice's grant once it expired, or a "public" dated a day ahead (a
    clock ahead, a forged record), let no one read the private image while
    the upstream is down."""
    image = image_on(upstream, repo="acme/private")
    with node(tmp_path, "a", upstream, seaweedfs, s3_prefix) as a:
        alice = RegistryClient(a.url, *ALICE)
        pulled_on_a(a, seaweedfs, s3_prefix, image, alice)
        wait_until(lambda: records(seaweedfs, s3_prefix, "grant/"), "alice's grant")
    now = time.time()
    rewrite(seaweedfs, s3_prefix, "grant/", {"until": now - 1})
    upstream.set_down(True)
    for name, checked_at in (("b", now + 86_400),):
        rewrite(seaweedfs, s3_prefix, "public/", {"public": True, "checked_at": checked_at})
        with node(tmp_path, name, upstream, seaweedfs, s3_prefix) as b:
            alice.base_url = b.url
            for client in (alice, RegistryClient(b.url)):
                with pytest.raises(PULL_ERRORS):
                    client.get_blob(image.repo, image.layers[0][0])
                with pytest.raises(PULL_ERRORS):
                    client.pull(image.repo, image.tag)


def test_manifests_and_tags_of_a_registry_nobody_chose_are_not_shared(tmp_path, upstream, second, seaweedfs,
                                                                      s3_prefix):
    """In regular mode a client names any host: what that host serves stays on
    the node (its own store), and never goes to the bucket the nodes share."""
    seed = unique_seed()
    unlisted = push_image(second.url, f"corp/app{seed}", f"t{seed}", [fresh_layer(300_000)], auth=ALICE)
    listed = image_on(upstream)
    with node(tmp_path, "a", upstream, seaweedfs, s3_prefix, modes=["regular"]) as a:
        proxy = {"http": a.url_of(1)}
        assert RegistryClient(second.url, proxies=proxy).pull(unlisted.repo, unlisted.tag).layers == unlisted.layers
        pulled_on_a(a, seaweedfs, s3_prefix, listed, RegistryClient(a.url_of(0)))
        wait_until(lambda: {f"manifest/{listed.digest}"} <= set(records(seaweedfs, s3_prefix, "manifest/"))
                   and any(name.endswith(f"/{listed.repo}/{listed.tag}") for name in records(seaweedfs, s3_prefix, "tag/")),
                   "the listed registry's manifest and tag")
    names = records(seaweedfs, s3_prefix, "")
    assert f"manifest/{unlisted.digest}" not in names
    assert [name for name in names if unlisted.repo in name] == []
