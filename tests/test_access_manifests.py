"""Unit tests: credential lifetimes, the seen-index, manifest verification."""

import base64
import hashlib
import json
import time

import requests

from addon import access
from addon.access import (MAX_GRANT_TTL, OPAQUE_GRANT_TTL, AccessGate, SeenIndex, credential_expiry,
                          fingerprint)
from addon.manifests import ManifestStore, StoredManifest, accepts, verified_manifest
from addon.registries import origin_of


def jwt_with(claims: dict) -> str:
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def test_credential_expiry_reads_jwt_exp_and_caps_it():
    now = time.time()
    assert credential_expiry(f"Bearer {jwt_with({'exp': now + 120})}", now) == now + 120
    assert credential_expiry(f"Bearer {jwt_with({'exp': now + 10**9})}", now) == now + MAX_GRANT_TTL
    assert credential_expiry("Bearer opaque-token", now) == now + OPAQUE_GRANT_TTL
    assert credential_expiry("Basic YWxpY2U6cHc=", now) == now + OPAQUE_GRANT_TTL
    assert credential_expiry(None, now) == now + OPAQUE_GRANT_TTL
    assert fingerprint(None) == "" and fingerprint("a") != fingerprint("b")


def test_seen_index_persists(tmp_path):
    index = SeenIndex(tmp_path / "a.sqlite3")
    index.record("http://r", "library/alpine", "sha256:" + "1" * 64)
    index.record_public("http://r", "library/alpine", True, 123.0)
    index.close()
    again = SeenIndex(tmp_path / "a.sqlite3")
    try:
        assert again.contains("http://r", "library/alpine", "sha256:" + "1" * 64)
        assert not again.contains("http://r", "library/other", "sha256:" + "1" * 64)
        assert again.repos_of("sha256:" + "1" * 64) == [("http://r", "library/alpine")]
        assert again.public_states() == {("http://r", "library/alpine"): (True, 123.0)}
    finally:
        again.close()


class SaysYes:
    """An upstream that confirms every blob HEAD, counting them."""

    def __init__(self):
        self.heads = []

    def head(self, url, authorization):
        self.heads.append(url)
        return 200, {}

    def hung(self, registry):
        return False

    def in_quiet_time(self, registry):
        return False


def test_a_registry_nobody_chose_vouches_only_for_blobs_it_served_itself(tmp_path):
    index = SeenIndex(tmp_path / "a.sqlite3")
    for registry, repo in (("https://ghcr.io:443", "x/y"), ("http://evil:80", "x/z")):
        index.record_public(registry, repo, False, time.time())  # known: no background probe
    upstream = SaysYes()
    gate = AccessGate(index, upstream)
    digest = "sha256:" + "2" * 64
    index.record("https://registry-1.docker.io:443", "corp/secret", digest)  # stored from the real registry
    try:
        decision = gate.check("http://evil:80", "x/y", digest, None, trusted=False)
        assert not decision.allowed and decision.pass_through and upstream.heads == []
        # A listed registry is asked, as before.
        assert gate.check("https://ghcr.io:443", "x/y", digest, "Bearer t", trusted=True).allowed
        assert upstream.heads == [f"https://ghcr.io:443/v2/x/y/blobs/{digest}"]
        # Once the unlisted registry has served the blob itself (a verified fill),
        # its HEAD counts for its other repositories too.
        index.record("http://evil:80", "x/y", digest)
        assert gate.check("http://evil:80", "x/z", digest, "Bearer t", trusted=False).allowed
    finally:
        index.close()


class Answers:
    """An upstream whose blob HEADs answer one status (or raise)."""

    def __init__(self, status):
        self.status = status

    def hung(self, registry):
        return False

    def head(self, url, authorization):
        if isinstance(self.status, Exception):
            raise self.status
        return self.status, {"WWW-Authenticate": "Bearer realm=x"} if self.status == 401 else {}


def test_a_client_may_follow_a_fill_from_a_registry_nobody_chose_if_that_registry_says_so(tmp_path):
    """Its yes lets the client have that registry's own bytes (the fill), and
    is not recorded: the store's copy still needs the verified fill."""
    index = SeenIndex(tmp_path / "a.sqlite3")
    digest = "sha256:" + "3" * 64
    try:
        gate = AccessGate(index, Answers(200))
        assert gate.check("http://evil:80", "x/y", digest, "Bearer t", trusted=False, its_own_fill=True).allowed
        assert not index.served_by("http://evil:80", digest) and not index.knows("http://evil:80")
        assert gate.check("http://evil:80", "x/y", digest, "Bearer t", trusted=False).pass_through
        refused = AccessGate(index, Answers(401)).check("http://evil:80", "x/y", digest, None, trusted=False,
                                                          its_own_fill=True)
        assert not refused.allowed and not refused.pass_through and refused.status == 401
        assert ("WWW-Authenticate", "Bearer realm=x") in refused.headers
        for unsure in (Answers(503), Answers(requests.ConnectionError("down"))):
            decision = AccessGate(index, unsure).check("http://evil:80", "x/y", digest, None, trusted=False,
                                                       its_own_fill=True)
            assert not decision.allowed and decision.pass_through  # that registry answers the client itself
    finally:
        index.close()


def test_remembered_grants_are_bounded_and_the_newest_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(access, "MAX_GRANTS", 10)
    index = SeenIndex(tmp_path / "a.sqlite3")
    index.record_public("http://r:80", "x/y", False, time.time())  # known: no background probe
    gate = AccessGate(index, SaysYes())
    now = time.time()
    tokens = [f"Bearer {jwt_with({'exp': now + 100 + i})}" for i in range(25)]  # each pull, a new token
    try:
        for token in tokens:
            gate.vouch("http://r:80", "x/y", "sha256:" + "3" * 64, token)
        assert len(gate._grants) <= 10
        assert gate._granted(fingerprint(tokens[-1]), "http://r:80", "x/y", now)
        assert not gate._allowed_before(fingerprint(tokens[0]), "http://r:80", "x/y")
    finally:
        index.close()


def test_origin_of_spells_out_the_port():
    assert origin_of("https://registry-1.docker.io") == "https://registry-1.docker.io:443"
    assert origin_of("http://127.0.0.1:5000/") == "http://127.0.0.1:5000"
    assert origin_of("http://Mirror.LAN") == "http://mirror.lan:80"


def test_verified_manifest_checks_the_digest():
    body = b'{"schemaVersion": 2}'
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json", "Docker-Content-Digest": digest}
    m = verified_manifest(body, headers, "latest")
    assert m == StoredManifest(digest, "application/vnd.oci.image.manifest.v1+json", body)
    assert verified_manifest(body, headers, digest) == m
    assert verified_manifest(body, {**headers, "Docker-Content-Digest": "sha256:" + "0" * 64}, "latest") is None
    assert verified_manifest(body, headers, "sha256:" + "0" * 64) is None


def test_accepts():
    oci = "application/vnd.oci.image.manifest.v1+json"
    assert accepts([], oci)
    assert accepts([f"application/x, {oci}"], oci)
    assert accepts(["application/x", f"{oci}; q=0.5"], oci)
    assert accepts(["*/*"], oci)
    assert not accepts(["application/vnd.docker.distribution.manifest.v2+json"], oci)


def test_manifest_store_keeps_manifests_and_tags(tmp_path):
    store = ManifestStore(tmp_path / "m")
    try:
        m = StoredManifest("sha256:" + "2" * 64, "application/json", b"{}")
        store.put(m)
        store.remember_tag("http://r", "a/b", "v1", m.digest)
        assert store.get(m.digest) == m
        assert store.digest_of_tag("http://r", "a/b", "v1") == m.digest
        assert store.digest_of_tag("http://r", "a/b", "v2") is None
    finally:
        store.close()


ACCEPT_ALL = ["application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
              "application/vnd.docker.distribution.manifest.v2+json",
              "application/vnd.docker.distribution.manifest.list.v2+json"]  # one line each, as skopeo sends


def test_manifest_store_remembers_answers_and_looks_up_tags(tmp_path):
    store = ManifestStore(tmp_path / "m")
    try:
        body = b'{"schemaVersion": 2, "x": 1}'
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        headers = {"Content-Type": "application/vnd.oci.image.manifest.v1+json", "Docker-Content-Digest": digest}
        assert store.remember("http://r", "a/b", "v1", body, headers, ACCEPT_ALL) == digest  # GET by tag
        assert store.lookup("http://r", "a/b", "v1").body == body
        assert store.lookup("http://r", "a/b", digest).body == body
        assert store.remember("http://r", "a/b", "v2", b"", headers, ACCEPT_ALL) == digest  # HEAD of a kept one
        assert store.lookup("http://r", "a/b", "v2").digest == digest
        # containerd's order: HEAD by tag first, then GET by digest
        later = b'{"schemaVersion": 2, "x": 2}'
        later_digest = "sha256:" + hashlib.sha256(later).hexdigest()
        head = {"Content-Type": "application/vnd.oci.image.manifest.v1+json", "Docker-Content-Digest": later_digest}
        assert store.remember("http://r", "a/b", "v3", b"", head, ACCEPT_ALL) == later_digest
        assert store.lookup("http://r", "a/b", "v3") is None  # nothing to answer with yet
        assert store.remember("http://r", "a/b", "v1", b"", head, ACCEPT_ALL) == later_digest
        assert store.lookup("http://r", "a/b", "v1").body == body  # v1 keeps answering until...
        assert store.remember("http://r", "a/b", later_digest, later, head, ACCEPT_ALL) == later_digest
        assert store.lookup("http://r", "a/b", "v3").body == later  # ...the manifest it moved to is kept
        assert store.lookup("http://r", "a/b", "v1").body == later
        assert store.lookup("http://r", "other/repo", "v3") is None
        garbage = {"Docker-Content-Digest": "sha256:nope"}
        assert store.remember("http://r", "a/b", "v4", b"", garbage, ACCEPT_ALL) is None
    finally:
        store.close()


def test_a_tag_keeps_its_index_when_a_client_that_takes_no_index_gets_one_platform(tmp_path):
    store = ManifestStore(tmp_path / "m")
    try:
        index = b'{"schemaVersion": 2, "manifests": []}'
        index_digest = "sha256:" + hashlib.sha256(index).hexdigest()
        index_headers = {"Content-Type": "application/vnd.oci.image.index.v1+json"}
        assert store.remember("http://r", "a/b", "latest", index, index_headers, ACCEPT_ALL) == index_digest
        # An old tool that only takes Docker v2 manifests: the registry picks amd64 for it.
        amd64 = b'{"schemaVersion": 2, "amd64": true}'
        amd64_digest = "sha256:" + hashlib.sha256(amd64).hexdigest()
        amd64_headers = {"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"}
        only_v2 = ["application/vnd.docker.distribution.manifest.v2+json"]
        assert store.remember("http://r", "a/b", "latest", amd64, amd64_headers, only_v2) == amd64_digest
        assert store.lookup("http://r", "a/b", "latest").digest == index_digest  # not the amd64 one
        assert store.lookup("http://r", "a/b", amd64_digest).body == amd64  # kept by digest all the same
        # A single-platform tag asked for by the same tool is remembered only if the client took
        # index types too; with none at all (no Accept), it is not.
        assert store.remember("http://r", "a/b", "v9", amd64, amd64_headers, []) == amd64_digest
        assert store.lookup("http://r", "a/b", "v9") is None
    finally:
        store.close()


class Clock:
    """time.time for the access module, moved by the test."""

    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self):
        return self.now


def test_a_grant_lasts_until_the_tokens_exp_then_the_upstream_is_asked_again(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(access.time, "time", clock)
    index = SeenIndex(tmp_path / "a.sqlite3")
    index.record_public("http://r:80", "acme/private", False, clock.now)  # known private: no probe
    upstream = SaysYes()
    gate = AccessGate(index, upstream)
    digest = "sha256:" + "5" * 64
    token = f"Bearer {jwt_with({'exp': clock.now + 300})}"
    try:
        gate.vouch("http://r:80", "acme/private", digest, token)
        assert gate.check("http://r:80", "acme/private", digest, token).allowed and upstream.heads == []
        clock.now += 299
        assert gate.check("http://r:80", "acme/private", digest, token).allowed and upstream.heads == []
        clock.now += 2  # past exp: one HEAD with the token settles it again
        assert gate.check("http://r:80", "acme/private", digest, token).allowed and len(upstream.heads) == 1
        gate.check("http://r:80", "acme/private", digest, "Bearer someone-else")
        assert len(upstream.heads) == 2  # another credential is never covered by this grant
    finally:
        index.close()


def test_public_is_believed_for_ten_minutes_then_checked_again(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(access.time, "time", clock)
    index = SeenIndex(tmp_path / "a.sqlite3")
    digest = "sha256:" + "6" * 64
    index.record("http://r:80", "library/alpine", digest)
    index.record_public("http://r:80", "library/alpine", True, clock.now)
    upstream = SaysYes()
    gate = AccessGate(index, upstream)
    probed = []
    monkeypatch.setattr(gate, "_probe_public", lambda *args: probed.append(args))
    gate._probes = _InlineExecutor()
    try:
        clock.now += access.PUBLIC_TTL - 1
        assert gate.check("http://r:80", "library/alpine", digest, None).allowed and upstream.heads == []
        clock.now += 2  # stale: an anonymous client's HEAD is asked, and a new probe started
        assert gate.check("http://r:80", "library/alpine", digest, None).allowed
        assert len(upstream.heads) == 1 and len(probed) == 1
    finally:
        index.close()


class _InlineExecutor:
    """An executor that runs what it is given at once, in the caller."""

    def submit(self, fn, *args):
        fn(*args)

    def shutdown(self, **kwargs):
        pass


def test_only_registries_the_operator_chose_are_probed_for_public_repositories(tmp_path, monkeypatch):
    index = SeenIndex(tmp_path / "a.sqlite3")
    gate = AccessGate(index, SaysYes())
    probed = []
    monkeypatch.setattr(gate, "_probe_public", lambda *args: probed.append(args[:2]))
    gate._probes = _InlineExecutor()
    try:
        gate.vouch("http://named:80", "x/y", "sha256:" + "7" * 64, None, trusted=False)
        assert probed == [] and index.contains("http://named:80", "x/y", "sha256:" + "7" * 64)
        gate.vouch("https://ghcr.io:443", "x/y", "sha256:" + "7" * 64, None)
        assert probed == [("https://ghcr.io:443", "x/y")]
    finally:
        gate.close()
