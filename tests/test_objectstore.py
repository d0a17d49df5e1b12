"""addon/objectstore.py against the real SeaweedFS (tests/harness/seaweedfs.py)."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from addon import objectstore
from addon.objectstore import BadDigest, ObjectStore, ObjectStoreConfig, StoreUnavailable
from addon.shared_records import SharedRecords, registry_part


class Clock:
    """A monotonic clock the test moves (for the store's "down for N s" memory)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def env_credentials(seaweedfs, monkeypatch):
    """Credentials the standard AWS way: here, the environment."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in seaweedfs.client_env().items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def store(seaweedfs, s3_prefix, env_credentials, clock):
    s = ObjectStore(ObjectStoreConfig(bucket=seaweedfs.bucket, endpoint=seaweedfs.endpoint, prefix=s3_prefix,
                                      timeout=1.0, down_for=30.0), clock=clock)
    yield s
    s.close()


def blob_file(tmp_path, size: int, seed: int = 0) -> tuple[str, str]:
    """(digest, path) of a new file of random bytes."""
    data = os.urandom(size) if seed == 0 else hashlib.sha256(str(seed).encode()).digest() * (size // 32)
    path = tmp_path / f"blob-{seed}-{size}"
    path.write_bytes(data)
    return "sha256:" + hashlib.sha256(data).hexdigest(), str(path)


def read_all(blob) -> bytes:
    out = bytearray()
    while chunk := blob.read(1 << 20):
        out.extend(chunk)
    blob.close()
    return bytes(out)


@pytest.mark.parametrize("size", [100_000, 2 * objectstore.PART_SIZE + 12345], ids=["one-put", "multipart"])
def test_blob_upload_read_range_delete(store, seaweedfs, tmp_path, size):
    digest, path = blob_file(tmp_path, size)
    data = open(path, "rb").read()
    assert store.size_of(digest) is None
    assert store.open(digest) is None
    assert store.upload(digest, path) is True
    assert store.upload(digest, path) is False  # already there
    assert store.size_of(digest) == size
    blob = store.open(digest)
    assert (blob.start, blob.end, blob.size) == (0, size, size)
    assert read_all(blob) == data
    blob = store.open(digest, 1000, 2000)
    assert (blob.start, blob.end, blob.size) == (1000, 2000, size)
    assert read_all(blob) == data[1000:2000]
    assert read_all(store.open(digest, size - 10)) == data[-10:]
    assert store.open(digest, size) is None  # past the end
    # Under its digest, with the server checking the sha256 we sent.
    head = seaweedfs.client().head_object(Bucket=seaweedfs.bucket, Key=store.blob_key(digest))
    assert head["ContentLength"] == size
    assert store.delete(digest)
    assert store.size_of(digest) is None
    # No multipart upload left behind.
    assert not seaweedfs.client().list_multipart_uploads(Bucket=seaweedfs.bucket, Prefix=store.config.prefix).get("Uploads")


@pytest.mark.parametrize("size", [100_000, objectstore.PART_SIZE + 1], ids=["one-put", "multipart"])
def test_racing_uploaders_leave_one_right_object(store, seaweedfs, tmp_path, size):
    digest, path = blob_file(tmp_path, size)
    start = threading.Barrier(6, timeout=30)

    def upload(_):
        start.wait()
        return store.upload(digest, path)

    with ThreadPoolExecutor(6) as pool:
        stored = list(pool.map(upload, range(6)))
    assert stored.count(True) >= 1
    if size <= objectstore.PART_SIZE:
        assert stored.count(True) == 1, stored  # If-None-Match: * on a single PUT is exclusive
    assert hashlib.sha256(read_all(store.open(digest))).hexdigest() == digest.split(":")[1]
    assert not seaweedfs.client().list_multipart_uploads(Bucket=seaweedfs.bucket, Prefix=store.config.prefix).get("Uploads")


@pytest.mark.parametrize("size", [100_000, objectstore.PART_SIZE + 1], ids=["one-put", "multipart"])
def test_a_file_that_changed_after_it_verified_is_refused(store, tmp_path, size):
    digest, path = blob_file(tmp_path, size)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\0rot")
    with pytest.raises(BadDigest):
        store.upload(digest, path)
    assert store.size_of(digest) is None
    assert store.available()  # the store is fine; the file was not


def test_a_wrong_object_is_replaced_and_a_bad_one_deleted_only_if_unchanged(store, seaweedfs, tmp_path):
    digest, path = blob_file(tmp_path, 50_000)
    raw = seaweedfs.client()
    raw.put_object(Bucket=seaweedfs.bucket, Key=store.blob_key(digest), Body=b"short and wrong")
    assert store.upload(digest, path) is True  # another size: replaced by the verified file
    assert store.size_of(digest) == 50_000
    # Same size, wrong bytes (bit rot in the store): the reader sees it and deletes what it read.
    rotten = raw.put_object(Bucket=seaweedfs.bucket, Key=store.blob_key(digest), Body=b"x" * 50_000)["ETag"]
    blob = store.open(digest)
    assert hashlib.sha256(read_all(blob)).hexdigest() != digest.split(":")[1]
    assert blob.etag == rotten
    raw.put_object(Bucket=seaweedfs.bucket, Key=store.blob_key(digest), Body=open(path, "rb").read())
    assert store.delete(digest, etag=rotten) is False  # a good copy was put back meanwhile: spared
    assert store.size_of(digest) == 50_000
    good = store.open(digest)
    assert store.delete(digest, etag=good.etag) is True
    good.close()


def test_records_put_if_absent_and_compare_and_swap(store):
    start = threading.Barrier(16, timeout=30)

    def create(i):
        start.wait()
        return store.create_record("lease/sha256-abc", {"owner": i})

    with ThreadPoolExecutor(16) as pool:
        created = [r for r in pool.map(create, range(16)) if r is not None]
    assert len(created) == 1
    record = store.get_record("lease/sha256-abc")
    assert record == created[0] and record.json() == created[0].json()

    start = threading.Barrier(16, timeout=30)

    def swap(i):
        start.wait()
        return store.replace_record("lease/sha256-abc", {"owner": 100 + i}, record.etag)

    with ThreadPoolExecutor(16) as pool:
        swapped = [r for r in pool.map(swap, range(16)) if r is not None]
    assert len(swapped) == 1
    assert store.get_record("lease/sha256-abc").json() == swapped[0].json()
    assert store.replace_record("lease/sha256-abc", {"owner": -1}, record.etag) is None  # stale ETag
    assert store.delete_record("lease/sha256-abc", etag=record.etag) is False
    assert store.delete_record("lease/sha256-abc", etag=swapped[0].etag) is True
    assert store.get_record("lease/sha256-abc") is None
    assert store.replace_record("lease/sha256-abc", {"owner": -1}, record.etag) is None  # gone
    assert store.create_record("lease/sha256-abc", b"raw bytes").data == b"raw bytes"


def test_list_records_by_prefix(store):
    names = [f"access/docker.io/{i:03d}" for i in range(7)]
    for name in names:
        store.put_record(name, {"n": name})
    store.put_record("tags/docker.io/library/alpine/latest", {"digest": "sha256:" + "0" * 64})
    assert list(store.list_records("access/")) == names
    assert list(store.list_records("tags/")) == ["tags/docker.io/library/alpine/latest"]
    assert list(store.list_records("nothing/")) == []
    with pytest.raises(ValueError):
        store.record_key("../escape")


def test_the_lifecycle_rules_in_deploy_expire_grants_only(seaweedfs, env_credentials):
    """deploy/s3-lifecycle.json, as an operator applies it: the object store
    takes it, and with the default s3_prefix its expiry covers the shared
    grants (believed an hour at most) and no other record (public states,
    proofs, manifests and tags make stale answers). (That the server deletes
    them a day later is not seen here.)"""
    rules = json.loads((Path(__file__).parent.parent / "deploy" / "s3-lifecycle.json").read_text())
    bucket = f"lifecycle-{secrets.token_hex(4)}"
    client = seaweedfs.client(endpoint=seaweedfs.direct_endpoint)
    client.create_bucket(Bucket=bucket)
    objects = ObjectStore(ObjectStoreConfig(bucket=bucket, endpoint=seaweedfs.endpoint))
    try:
        client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration=rules)
        kept = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
        expiring = [rule["Filter"]["Prefix"] for rule in kept if "Expiration" in rule]
        names = SharedRecords(objects, secret=None)
        registry, repo, digest = "https://registry-1.docker.io:443", "library/alpine", "sha256:" + "0" * 64
        expired = {f"grant/{'0' * 40}/{registry_part(registry)}/{repo}"}
        kept_for_good = {names._public(registry, repo), names._seen(registry, repo, digest), names._manifest(digest),
                         names._tag(registry, repo, "latest")}
        for name in expired | kept_for_good:
            key = objects.record_key(name)
            assert any(key.startswith(prefix) for prefix in expiring) == (name in expired), name
            objects.put_record(name, {})  # written under the rules, and there to read
            assert objects.get_record(name).json() == {}
        assert any("AbortIncompleteMultipartUpload" in rule and objects.blob_key(digest).startswith(
            rule["Filter"]["Prefix"]) for rule in kept)
        names.close()
    finally:
        objects.close()
        client.delete_bucket_lifecycle(Bucket=bucket)
        for item in client.list_objects_v2(Bucket=bucket).get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])
        client.delete_bucket(Bucket=bucket)


def test_a_down_store_fails_fast_and_is_asked_again_later(store, seaweedfs, tmp_path, clock):
    digest, path = blob_file(tmp_path, 10_000)
    store.upload(digest, path)
    seaweedfs.set_down(True, "refuse")
    with pytest.raises(StoreUnavailable):
        store.size_of(digest)
    assert not store.available()
    accepted = seaweedfs.front.accepted
    seaweedfs.set_down(False)
    # Down for down_for seconds: no call goes to the store, however many are made.
    for _ in range(20):
        with pytest.raises(StoreUnavailable):
            store.get_record("anything")
    assert seaweedfs.front.accepted == accepted
    clock.now += 31
    assert store.available()
    assert store.size_of(digest) == 10_000  # one call asks again, and it answers
    assert store.available()


@pytest.mark.parametrize("how", ["hang", "reset"])
def test_a_hung_or_resetting_store_costs_at_most_the_timeout(store, seaweedfs, tmp_path, how):
    digest, path = blob_file(tmp_path, 10_000)
    store.upload(digest, path)
    seaweedfs.set_down(True, how)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.open(digest)
    assert time.monotonic() - started < 5  # timeout=1 s; bounded, with room for a loaded machine
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.upload(digest, path)
    assert time.monotonic() - started < 0.5  # known down: at once


def test_a_store_that_stalls_mid_blob_fails_the_read(store, seaweedfs, tmp_path):
    digest, path = blob_file(tmp_path, 40 << 20)
    store.upload(digest, path)
    blob = store.open(digest)
    assert blob.read(1 << 20)
    seaweedfs.set_stalled(True)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        while blob.read(1 << 20):
            pass
    assert time.monotonic() - started < 10
    blob.close()
    assert not store.available()


def test_shared_credentials_file_and_profile(seaweedfs, s3_prefix, tmp_path, monkeypatch, clock):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[mirror]\naws_access_key_id = {seaweedfs.access_key}\n"
                           f"aws_secret_access_key = {seaweedfs.secret_key}\n"
                           f"[wrong]\naws_access_key_id = {seaweedfs.access_key}\naws_secret_access_key = nope\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    config = ObjectStoreConfig(bucket=seaweedfs.bucket, endpoint=seaweedfs.endpoint, prefix=s3_prefix)
    good = ObjectStore(ObjectStoreConfig(**{**config.__dict__, "profile": "mirror"}), clock=clock)
    assert good.create_record("hello", {"a": 1}) is not None
    good.check()
    wrong = ObjectStore(ObjectStoreConfig(**{**config.__dict__, "profile": "wrong"}), clock=clock)
    with pytest.raises(StoreUnavailable, match="403"):
        wrong.get_record("hello")


def test_blobs_and_records_survive_a_store_restart(seaweedfs_session, s3_prefix, env_credentials, tmp_path, clock):
    store = ObjectStore(ObjectStoreConfig(bucket=seaweedfs_session.bucket, endpoint=seaweedfs_session.endpoint,
                                          prefix=s3_prefix, timeout=1.0), clock=clock)
    digest, path = blob_file(tmp_path, 20_000)
    store.upload(digest, path)
    store.put_record("manifests/x", b"{}")
    seaweedfs_session.restart()
    clock.now += 100  # whatever failed meanwhile is forgotten
    assert store.size_of(digest) == 20_000
    assert store.get_record("manifests/x").data == b"{}"
