"""Unit tests: what a node takes in from the shared records (addon/access.py
learn_shared, addon/shared_records.py). The object store is a stand-in here
(a dict); tests/test_e2e_shared_records.py runs the same against SeaweedFS
and real mitmdump nodes."""

from __future__ import annotations

import json
import threading

import pytest

from addon import access, shared_records
from addon.access import PUBLIC_TTL, AccessGate, SeenIndex, fingerprint
from addon.cluster_secret import ClusterSecret
from addon.objectstore import Record
from addon.shared_records import SharedRecords
from tests.test_access_manifests import Clock, jwt_with

REGISTRY, REPO, DIGEST = "https://registry-1.docker.io:443", "acme/private", "sha256:" + "4" * 64
OLD, NEW = "the-old-cluster-secret-0123", "the-new-cluster-secret-4567"


class Bucket:
    """An object store's records in a dict; put_record notifies waiters."""

    def __init__(self):
        self.records: dict[str, bytes] = {}
        self.cond = threading.Condition()

    def available(self) -> bool:
        return True

    def get_record(self, name):
        data = self.records.get(name)
        return None if data is None else Record(data, "etag")

    def put_record(self, name, value):
        with self.cond:
            self.records[name] = json.dumps(value).encode()
            self.cond.notify_all()

    def create_record(self, name, value):
        if name not in self.records:
            self.put_record(name, value)

    def list_records(self, prefix=""):
        return iter(sorted(name for name in self.records if name.startswith(prefix)))

    def wait_for(self, prefix: str) -> list[str]:
        with self.cond:
            assert self.cond.wait_for(lambda: list(self.list_records(prefix)), 10), self.records
            return list(self.list_records(prefix))


def secret(tmp_path, name: str, *lines: str) -> ClusterSecret:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(0o600)
    return ClusterSecret(str(path))


class Never:
    """An upstream the gate must not need in these tests."""

    def head(self, url, authorization):
        raise AssertionError(f"asked the upstream: {url}")

    def hung(self, registry):
        return False

    def in_quiet_time(self, registry):
        return False


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(access.time, "time", clock)
    return clock


@pytest.fixture
def node(tmp_path, clock):
    """A node's gate whose shared records hold DIGEST as seen under REPO."""
    bucket = Bucket()
    records = SharedRecords(bucket, secret(tmp_path, "secret", OLD))
    bucket.put_record(records._seen(REGISTRY, REPO, DIGEST), {})
    gate = AccessGate(SeenIndex(tmp_path / "index.sqlite3"), Never())
    gate.shared = records
    yield gate, records, bucket
    records.close()
    gate.close()


def put_grant(records, bucket, authorization, until):
    bucket.put_record(records._grants(authorization, REGISTRY, REPO)[0], {"until": until})


def put_public(records, bucket, public, checked_at):
    bucket.put_record(records._public(REGISTRY, REPO), {"public": public, "checked_at": checked_at})


def test_an_expired_shared_grant_is_not_taken_in(node, clock):
    gate, records, bucket = node
    token = f"Bearer {jwt_with({'exp': clock.now + 300})}"
    put_grant(records, bucket, token, clock.now - 1)
    assert gate.learn_shared(REGISTRY, REPO, DIGEST, token) is None
    # Not even for a stale answer while the upstream is down.
    assert not gate.allowed_offline(REGISTRY, REPO, DIGEST, token)


def test_a_shared_grant_counts_no_longer_than_this_node_would_trust_the_credential(node, clock):
    gate, records, bucket = node
    token = f"Bearer {jwt_with({'exp': clock.now + 100})}"
    put_grant(records, bucket, token, clock.now + 100 + access.CLOCK_SKEW)  # a clock a little ahead
    assert gate.learn_shared(REGISTRY, REPO, DIGEST, token).allowed
    clock.now += 101  # past the token's exp
    assert not gate._granted(fingerprint(token), REGISTRY, REPO, clock.now)
    # Opaque credentials: no longer than OPAQUE_GRANT_TTL from now, however often read again.
    basic = "Basic YWxpY2U6cHc="
    put_grant(records, bucket, basic, clock.now + access.OPAQUE_GRANT_TTL)
    assert gate.learn_shared(REGISTRY, REPO, DIGEST, basic).allowed
    clock.now += access.OPAQUE_GRANT_TTL + 1
    assert gate.learn_shared(REGISTRY, REPO, DIGEST, basic) is None  # the record has expired meanwhile


def test_a_shared_grant_from_further_in_the_future_than_a_clock_may_be_wrong_is_not_believed(node, clock):
    gate, records, bucket = node
    basic = "Basic YWxpY2U6cHc="
    put_grant(records, bucket, basic, clock.now + 86_400)  # a node a day ahead, or a forged record
    assert gate.learn_shared(REGISTRY, REPO, DIGEST, basic) is None
    assert not gate.allowed_offline(REGISTRY, REPO, DIGEST, basic)


def test_a_local_grant_that_expired_does_not_hide_a_newer_shared_one(node, clock):
    gate, records, bucket = node
    basic = "Basic YWxpY2U6cHc="
    with gate._lock:
        gate._keep_grant((fingerprint(basic), REGISTRY, REPO), clock.now - 10)
    put_grant(records, bucket, basic, clock.now + 30)  # another node: the upstream accepted it again
    assert gate.learn_shared(REGISTRY, REPO, DIGEST, basic).allowed


def test_a_shared_grant_is_looked_for_while_the_registry_is_in_its_quiet_time(node, clock):
    """It timed out moments ago: the gate decides from what it knows, which
    includes what other nodes learned (not a 503 before looking)."""
    gate, records, bucket = node
    gate.upstream = Quiet()
    token = f"Bearer {jwt_with({'exp': clock.now + 300})}"
    put_grant(records, bucket, token, clock.now + 300)
    assert gate.learn_shared(REGISTRY, REPO, DIGEST, token).allowed
    assert not gate.learn_shared(REGISTRY, REPO, DIGEST, "Bearer someone-else").allowed


class Quiet(Never):
    def in_quiet_time(self, registry):
        return True


def test_grants_taken_in_are_bounded_like_this_nodes_own(node, clock, monkeypatch):
    monkeypatch.setattr(access, "MAX_GRANTS", 10)
    gate, records, bucket = node
    tokens = [f"Bearer {jwt_with({'exp': clock.now + 100 + i})}" for i in range(25)]
    for token in tokens:
        put_grant(records, bucket, token, clock.now + 100)
        assert gate.learn_shared(REGISTRY, REPO, DIGEST, token).allowed
    assert len(gate._grants) <= 10
    assert gate._granted(fingerprint(tokens[-1]), REGISTRY, REPO, clock.now)


@pytest.mark.parametrize("age", [PUBLIC_TTL + 1, 365 * 86_400.0])
def test_an_old_shared_public_state_ages_as_this_nodes_own(node, clock, age):
    """Not fresh: the upstream is asked again when it can be. While it cannot,
    it counts as "was public", as on the node that checked (stale answers on
    every node)."""
    gate, records, bucket = node
    put_public(records, bucket, True, clock.now - age)
    assert gate.learn_shared(REGISTRY, REPO, DIGEST, None) is None  # ask the registry
    assert not gate.known_public(REGISTRY, REPO)
    assert gate.allowed_offline(REGISTRY, REPO, DIGEST, None)
    assert gate.index.public_states() == {(REGISTRY, REPO): (True, clock.now - age)}


def test_a_shared_public_state_from_the_future_counts_as_checked_now_or_not_at_all(node, clock):
    gate, records, bucket = node
    put_public(records, bucket, True, clock.now + 86_400)  # a node a day ahead, or a forged record
    assert gate.learn_shared(REGISTRY, REPO, DIGEST, None) is None
    assert not gate.allowed_offline(REGISTRY, REPO, DIGEST, None)
    put_public(records, bucket, True, clock.now + access.CLOCK_SKEW)  # a little ahead: as of now
    assert gate.learn_shared(REGISTRY, REPO, DIGEST, None).allowed
    clock.now += PUBLIC_TTL + 1
    assert not gate.known_public(REGISTRY, REPO)  # believed PUBLIC_TTL from now, no longer


def test_a_fresh_shared_public_state_is_taken_in_and_kept(node, clock):
    gate, records, bucket = node
    put_public(records, bucket, True, clock.now - 10)
    assert gate.learn_shared(REGISTRY, REPO, DIGEST, None).allowed
    assert gate.index.public_states() == {(REGISTRY, REPO): (True, clock.now - 10)}


def test_a_grant_written_under_another_line_of_the_secret_is_found_while_it_rotates(tmp_path):
    """Rotation: a node that already signs with the new line writes the grant
    under it; one that still signs with the old line finds it, and the
    other way round."""
    bucket = Bucket()
    nodes = {"old first": SharedRecords(bucket, secret(tmp_path, "a", OLD, NEW)),
             "new first": SharedRecords(bucket, secret(tmp_path, "b", NEW, OLD)),
             "old only": SharedRecords(bucket, secret(tmp_path, "c", OLD)),
             "new only": SharedRecords(bucket, secret(tmp_path, "d", NEW))}
    try:
        for writer, token, until in (("new first", "Bearer one", 1000.0), ("old first", "Bearer two", 2000.0)):
            nodes[writer].note_grant(token, REGISTRY, REPO, until)
            bucket.wait_for(nodes[writer]._grants(token, REGISTRY, REPO)[0])
            assert nodes["old first"].grant(token, REGISTRY, REPO) == until
            assert nodes["new first"].grant(token, REGISTRY, REPO) == until
            assert nodes["old only"].grant("Bearer another", REGISTRY, REPO) is None
        assert nodes["old only"].grant("Bearer one", REGISTRY, REPO) is None  # written under NEW
        assert nodes["new only"].grant("Bearer two", REGISTRY, REPO) is None  # written under OLD
    finally:
        for records in nodes.values():
            records.close()


def test_tags_remembered_are_bounded_the_latest_kept(monkeypatch):
    monkeypatch.setattr(shared_records, "MAX_TAGS", 5)
    bucket = Bucket()
    records = SharedRecords(bucket)
    try:
        for i in range(20):
            records.note_tag(REGISTRY, REPO, f"v{i}", "sha256:" + f"{i:064x}")
        bucket.put_record(records._tag(REGISTRY, REPO, "read"), {"digest": DIGEST})
        assert records.tag(REGISTRY, REPO, "read") == DIGEST
        assert len(records._tags) == 5
        assert records._tag(REGISTRY, REPO, "read") in records._tags
        assert records._tag(REGISTRY, REPO, "v19") in records._tags
    finally:
        records.close()
