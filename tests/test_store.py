"""Unit tests for the diskcache-backed blob store."""

import fcntl
import hashlib
import os
import pathlib
import tempfile

import pytest

from addon.store import DiskBlobStore


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put(store: DiskBlobStore, data: bytes) -> str:
    digest = digest_of(data)
    part = store.new_part(digest)
    os.write(part.fd, data)
    store.commit(digest, part, len(data))
    os.close(part.fd)
    return digest


def read(store: DiskBlobStore, digest: str) -> bytes | None:
    blob = store.open(digest)
    if blob is None:
        return None
    with blob.file:
        return blob.file.read()


@pytest.fixture
def store(tmp_path):
    s = DiskBlobStore(tmp_path / "cache", size_limit=1 << 30)
    yield s
    s.close()


def test_commit_moves_the_part_file_without_copying(store):
    data = os.urandom(300_000)
    digest = digest_of(data)
    part = store.new_part(digest)
    os.write(part.fd, data)
    inode = os.fstat(part.fd).st_ino
    store.commit(digest, part, len(data))
    os.close(part.fd)
    assert not os.path.exists(part.path)
    blob = store.open(digest)
    with blob.file:
        assert os.fstat(blob.file.fileno()).st_ino == inode  # renamed, not copied
        assert blob.size == len(data)
        assert blob.file.read() == data
    assert store.size_of(digest) == len(data)
    assert list(store.fills_dir.iterdir()) == []


def test_unknown_digest_is_a_miss(store):
    assert store.open(digest_of(b"nope")) is None
    assert store.size_of(digest_of(b"nope")) is None


def test_survives_restart(tmp_path):
    first = DiskBlobStore(tmp_path / "c", size_limit=1 << 30)
    data = os.urandom(50_000)
    digest = put(first, data)
    first.close()
    second = DiskBlobStore(tmp_path / "c", size_limit=1 << 30)
    try:
        assert read(second, digest) == data
        assert second.usage()[1] == 1
    finally:
        second.close()


def test_unfinished_parts_of_a_dead_process_are_swept_but_live_ones_kept(tmp_path):
    first = DiskBlobStore(tmp_path / "c", size_limit=1 << 30)
    live = first.new_part(digest_of(b"live"))  # holds its flock, like a running fill
    dead = first.fills_dir / "sha256-dead.x.part"  # no lock: its process died
    dead.write_bytes(b"half a blob")
    second = DiskBlobStore(tmp_path / "c", size_limit=1 << 30)
    try:
        assert not dead.exists()
        assert os.path.exists(live.path)
        assert second.open(digest_of(b"half a blob")) is None
    finally:
        os.close(live.fd)
        first.close()
        second.close()


def test_a_sweep_unlinks_a_part_only_while_it_holds_its_lock(tmp_path, monkeypatch):
    """Otherwise a fill could lock the file between the sweep's check and its
    unlink, and go on filling a file that no longer has a name."""
    store = DiskBlobStore(tmp_path / "c", size_limit=1 << 30)
    orphan = store.fills_dir / "sha256-dead.x.part"
    orphan.write_bytes(b"half a blob")
    lockable_at_unlink = []
    real_unlink = pathlib.Path.unlink

    def unlink_watched(path, *args, **kwargs):
        fd = os.open(path, os.O_RDONLY)  # a fill trying to take the file now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lockable_at_unlink.append(True)
        except BlockingIOError:
            lockable_at_unlink.append(False)
        finally:
            os.close(fd)
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "unlink", unlink_watched)
    try:
        assert store.sweep_orphaned_parts() == 1
    finally:
        monkeypatch.undo()
        store.close()
    assert lockable_at_unlink == [False] and not orphan.exists()


def test_a_part_swept_before_it_was_locked_is_replaced(store, monkeypatch):
    made = []
    real_mkstemp = tempfile.mkstemp

    def mkstemp_then_swept(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        made.append(path)
        if len(made) == 1:
            os.unlink(path)  # another process's start-up sweep got there first
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_swept)
    part = store.new_part(digest_of(b"x"))
    monkeypatch.undo()
    try:
        assert len(made) == 2 and part.path == made[1] and os.path.exists(part.path)
    finally:
        os.close(part.fd)


def test_evicts_least_recently_used_one_at_a_time(tmp_path):
    mib = 1 << 20
    store = DiskBlobStore(tmp_path / "c", size_limit=3 * mib + 512 * 1024)
    try:
        a = put(store, os.urandom(mib))
        b = put(store, os.urandom(mib))
        c = put(store, os.urandom(mib))
        assert store.usage()[1] == 3
        assert read(store, a) is not None  # a is now more recent than b
        d = put(store, os.urandom(mib))
        assert store.open(b) is None  # least recently used went first...
        assert [read(store, x) is not None for x in (a, c, d)] == [True, True, True]  # ...and only it
        assert store.evictions == 1
        assert store.usage()[0] <= store.size_limit
    finally:
        store.close()


def test_a_blob_being_read_survives_its_eviction(tmp_path):
    store = DiskBlobStore(tmp_path / "c", size_limit=1 << 30)
    try:
        data = os.urandom(100_000)
        digest = put(store, data)
        blob = store.open(digest)
        store.evict_to(0)
        assert store.open(digest) is None
        with blob.file:
            assert blob.file.read() == data
    finally:
        store.close()


def test_indexed_blob_with_missing_file_is_dropped(store):
    data = os.urandom(10_000)
    digest = put(store, data)
    blob = store.open(digest)
    path = os.readlink(f"/proc/self/fd/{blob.file.fileno()}")
    blob.close()
    os.unlink(path)
    assert store.open(digest) is None
    assert store.usage()[1] == 0


def _path_of(store, digest):
    blob = store.open(digest)
    with blob.file:
        return os.readlink(f"/proc/self/fd/{blob.file.fileno()}")


def test_a_flipped_byte_on_disk_is_caught_and_the_entry_dropped(store):
    data = os.urandom(200_000)
    digest = put(store, data)
    path = _path_of(store, digest)
    with open(path, "r+b") as f:
        f.seek(1234)
        f.write(bytes([data[1234] ^ 1]))
    assert store.open(digest) is None  # never served as good
    assert digest not in store and not os.path.exists(path)
    assert put(store, data) == digest and read(store, digest) == data  # a refetch is stored again


def test_a_touched_but_intact_blob_is_still_served(store):
    data = os.urandom(200_000)
    digest = put(store, data)
    path = _path_of(store, digest)
    before = os.stat(path).st_mtime_ns
    os.utime(path, ns=(before, before + 5_000_000_000))
    assert read(store, digest) == data
    assert os.stat(path).st_mtime_ns == before  # verified, and marked clean again


def test_a_blob_that_cannot_be_opened_for_now_is_a_miss_not_deleted(store, monkeypatch):
    """Out of file descriptors, diskcache reports a stored file as missing:
    the store must answer "miss" this time and keep the blob."""
    import errno
    data = os.urandom(10_000)
    digest = put(store, data)
    disk = store._cache._disk

    def no_fds(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(disk, "fetch", no_fds)
    assert store.open(digest) is None
    monkeypatch.undo()
    assert read(store, digest) == data and store.usage()[1] == 1


def test_a_commit_the_index_could_not_record_leaves_no_file_behind(store, monkeypatch):
    """SQLite fails to write (the disk filled up meanwhile): the file moved
    into the store for the entry must not stay there, unindexed, forever."""
    import sqlite3
    kept = os.urandom(5_000)
    kept_digest = put(store, kept)
    data = os.urandom(20_000)
    digest = digest_of(data)
    part = store.new_part(digest)
    os.write(part.fd, data)

    def index_full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store._cache, "_row_insert", index_full)
    with pytest.raises(sqlite3.OperationalError):
        store.commit(digest, part, len(data))
    monkeypatch.undo()
    store.discard_part(part)
    os.close(part.fd)
    files = [p for p in pathlib.Path(store.directory).rglob("*.val")]
    assert [os.path.getsize(p) for p in files] == [len(kept)]  # only the indexed blob
    assert store.open(digest) is None and read(store, kept_digest) == kept


def test_make_room_evicts_nothing_when_emptying_the_store_would_not_be_enough(store, monkeypatch):
    for _ in range(3):
        put(store, os.urandom(1 << 20))
    # Other files have pushed the disk 5 MiB below the reserve: freeing 3 MiB cannot make 1 MiB of room.
    monkeypatch.setattr(store, "disk_space_left", lambda: -(5 << 20))
    assert store.make_room(1 << 20) == 0 and store.usage()[1] == 3
    # A size that is only a guess (a body without Content-Length) still evicts, as much as it says.
    assert store.make_room(64 << 20, certain=False) == 3 and store.usage()[1] == 0
    monkeypatch.undo()
    again = [put(store, os.urandom(1 << 20)) for _ in range(3)]
    assert store.make_room(1 << 20) == 1 and store.size_of(again[0]) is None  # the least recently used
