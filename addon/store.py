"""The blob store: verified blobs keyed by digest, on local disk.

`BlobStore` is the small interface the rest of the mirror uses, so that a
second tier (an S3-compatible object store shared by several mirror nodes) can
slot in behind the same calls. `DiskBlobStore` is the local tier, built on
diskcache:

- A fill writes into a part file under `<cache_dir>/fills/` (same filesystem
  as the cache). Only after its sha256 and size are verified is it committed,
  by renaming it into diskcache's directory: no second copy.
- diskcache's own culling is coarse (it drops up to ten entries at once), so
  it is disabled and the store evicts least-recently-used entries one by one
  until it is under its size limit.
- Part files left behind by a killed process are never referenced by the
  cache database, so they can never be served; they are swept on start.
  Each live part file holds an flock, so a second process sharing the
  directory never sweeps a fill that is still running.
- Each entry remembers its file's mtime at commit. A blob whose file was
  written since (its mtime moved) is re-hashed before it is served; if it no
  longer matches its digest the entry is dropped, so the next request fetches
  it again. (Decay below the filesystem that leaves mtime alone is not seen
  here; a checksumming filesystem or a periodic full verify covers that.)
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import diskcache

from .layout import FILLS_DIR

log = logging.getLogger(__name__)

RESERVE_BYTES = 64 << 20  # free space kept for the index (or 5% of a small disk)
PART_SUFFIX = ".part"


@dataclass
class StoredBlob:
    """An open, committed blob. The file stays readable even if it is evicted
    while being served (POSIX unlink semantics)."""

    file: BinaryIO
    size: int

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class BlobEntry:
    """One committed blob as the index lists it (for admin tools)."""

    digest: str
    size: int
    stored_at: float  # time.time() of the commit
    accessed_at: float  # last read (diskcache's LRU access time)
    path: Path  # the committed file


@dataclass
class PartFile:
    """A fill in progress: an exclusive, locked temp file in the store."""

    path: str
    fd: int


class BlobModified(Exception):
    """A committed blob's file was written after its commit: it must be
    re-hashed before it is served (open() with recheck=True does that)."""


class BlobStore(Protocol):
    def open(self, digest: str, recheck: bool = True) -> StoredBlob | None:
        """The committed blob, opened for reading, or None. A blob whose file
        changed since its commit is re-hashed first (recheck), or raises
        BlobModified (so the caller can re-hash it where that waits for no one)."""

    def size_of(self, digest: str) -> int | None:
        """Size of a committed blob without opening it (for HEAD)."""

    def new_part(self, digest: str) -> PartFile:
        """A temp file to fill; commit() or discard_part() it."""

    def commit(self, digest: str, part: PartFile, size: int) -> None:
        """Make a VERIFIED part file the blob for digest."""

    def discard_part(self, part: PartFile) -> None: ...

    def delete(self, digest: str) -> bool: ...

    def make_room(self, needed: int, certain: bool = True) -> int:
        """Evict least recently used blobs to free about `needed` bytes; returns how many."""

    def disk_space_left(self) -> int:
        """Bytes a fill may still write before the disk counts as full."""

    def usage(self) -> tuple[int, int]:
        """(bytes used, number of blobs)."""


class _CommittedFile:
    """Marker value for RenamingDisk.store: move this verified file in."""

    def __init__(self, path: str, size: int):
        self.path = path
        self.size = size
        self.stored_as: str | None = None  # its name in the store, once moved


class RenamingDisk(diskcache.Disk):
    """diskcache Disk that commits a verified part file by renaming it."""

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if isinstance(value, _CommittedFile):
            filename, full_path = self.filename(key, value)
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            os.rename(value.path, full_path)
            value.stored_as = filename
            return value.size, diskcache.core.MODE_BINARY, filename, None
        return super().store(value, read, key=key)


class DiskBlobStore:
    def __init__(self, directory: str | os.PathLike, size_limit: int):
        self.directory = Path(directory)
        self.size_limit = size_limit
        self.fills_dir = self.directory / FILLS_DIR
        self.fills_dir.mkdir(parents=True, exist_ok=True)
        self._cache = diskcache.Cache(
            str(self.directory),
            disk=RenamingDisk,
            eviction_policy="least-recently-used",
            size_limit=size_limit,
            cull_limit=0,  # we evict ourselves, one entry at a time
            disk_min_file_size=0,
            timeout=60,
        )
        self.evictions = 0
        self.sweep_orphaned_parts()

    # -- reading -----------------------------------------------------------

    def open(self, digest: str, recheck: bool = True) -> StoredBlob | None:
        file, committed_mtime = self._cache.get(digest, read=True, tag=True)
        if file is None and digest in self._cache:
            # diskcache answers "missing" when the row exists but its file
            # does not (deleted behind our back). Look once more, in case the
            # row was committed just now, before dropping it.
            file, committed_mtime = self._cache.get(digest, read=True, tag=True)
            if file is None:
                if self._indexed_file_exists(digest):
                    # diskcache says "missing" for any failed open, e.g. out
                    # of file descriptors: a miss now, not a reason to delete.
                    log.warning("store: could not open %s (out of file descriptors?); answering as a miss", digest)
                    return None
                log.warning("store: %s is indexed but its file is missing; dropping it", digest)
                self._cache.delete(digest)
        if file is None:
            return None
        stat = os.fstat(file.fileno())
        if committed_mtime is not None and stat.st_mtime_ns != committed_mtime:
            if not recheck:
                file.close()
                raise BlobModified(digest)
            if not self._still_intact(digest, file, stat, committed_mtime):
                file.close()
                self._cache.delete(digest)
                return None
        return StoredBlob(file, stat.st_size)

    @staticmethod
    def _still_intact(digest: str, file: BinaryIO, stat: os.stat_result, committed_mtime: int) -> bool:
        """Re-hash a blob whose file changed after commit."""
        hasher = hashlib.sha256()
        offset = 0
        while chunk := os.pread(file.fileno(), 1 << 20, offset):
            hasher.update(chunk)
            offset += len(chunk)
        if "sha256:" + hasher.hexdigest() != digest:
            log.error("store: %s was modified on disk and no longer matches its digest; dropping it", digest)
            return False
        # Intact after all (touched, not changed): back to its committed mtime.
        os.utime(file.fileno(), ns=(stat.st_atime_ns, committed_mtime))
        log.warning("store: %s was touched on disk but is intact", digest)
        return True

    def _indexed_file_exists(self, digest: str) -> bool:
        row = self._cache._sql("SELECT filename FROM Cache WHERE key = ? AND raw = 1", (digest,)).fetchone()
        return bool(row and row[0]) and os.path.exists(os.path.join(self._cache.directory, row[0]))

    def size_of(self, digest: str) -> int | None:
        blob = self.open(digest)
        if blob is None:
            return None
        blob.close()
        return blob.size

    def __contains__(self, digest: str) -> bool:
        return digest in self._cache

    # -- filling -----------------------------------------------------------

    def new_part(self, digest: str) -> PartFile:
        for _attempt in range(3):
            fd, path = tempfile.mkstemp(
                prefix=digest.replace(":", "-") + ".", suffix=PART_SUFFIX, dir=self.fills_dir
            )
            if part := _hold(path, fd):
                return part
        raise OSError(errno.EAGAIN, f"could not hold a part file in {self.fills_dir}")

    def link_part(self, digest: str, source: str | os.PathLike) -> PartFile:
        """A part file that is a hard link to `source` (no bytes copied), for
        seeding the store from another content store on the same filesystem.
        Locked like new_part's, so commit() renames it into place. Raises
        OSError when the link cannot be made (EXDEV: another filesystem;
        EPERM: fs.protected_hardlinks and a file we do not own): copy instead.
        Verify the content through `part.fd` before committing it."""
        for _attempt in range(3):
            path = self.fills_dir / f"{digest.replace(':', '-')}.{os.urandom(8).hex()}{PART_SUFFIX}"
            os.link(source, path)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            if part := _hold(str(path), fd):
                return part
        raise OSError(errno.EAGAIN, f"could not hold a link to {source} in {self.fills_dir}")

    def commit(self, digest: str, part: PartFile, size: int) -> None:
        os.fsync(part.fd)  # a committed entry must survive a crash intact
        mtime = os.fstat(part.fd).st_mtime_ns  # rename keeps it; any later write moves it
        committed = _CommittedFile(part.path, size)
        try:
            self._cache.set(digest, committed, read=True, tag=mtime)
        except BaseException:
            self._remove_if_unindexed(committed.stored_as)
            raise
        self.evict_to(self.size_limit)

    def _remove_if_unindexed(self, filename: str | None) -> None:
        """After a failed commit (e.g. SQLite could not write: disk full),
        diskcache leaves the file it had moved in but never indexed, which
        nothing would ever count or remove."""
        if filename is None:
            return
        try:
            row = self._cache._sql("SELECT 1 FROM Cache WHERE filename = ?", (filename,)).fetchone()
        except sqlite3.Error:
            row = None  # the write failed, so it is not indexed
        if row is None:
            self._cache._disk.remove(filename)

    def discard_part(self, part: PartFile) -> None:
        try:
            os.unlink(part.path)
        except FileNotFoundError:
            pass

    def sweep_orphaned_parts(self) -> int:
        """Remove part files no live fill holds (left by a killed process)."""
        removed = 0
        for path in self.fills_dir.glob("*" + PART_SUFFIX):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if not _try_lock(fd):
                    continue  # a running fill (maybe in another process) owns it
                # Unlinked while locked: a fill that locks this file later
                # finds its path gone (_hold) and makes another.
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)
            removed += 1
        if removed:
            log.info("store: removed %d unfinished fill(s) left by an earlier run", removed)
        return removed

    # -- housekeeping --------------------------------------------------------

    def delete(self, digest: str) -> bool:
        return bool(self._cache.delete(digest))

    def resize(self, size_limit: int) -> None:
        """A new size limit (cache_size changed at run time), evicting to fit."""
        self.size_limit = size_limit
        self._cache.reset("size_limit", size_limit)
        self.evict_to(size_limit)

    def usage(self) -> tuple[int, int]:
        return self._cache.volume(), len(self._cache)

    def make_room(self, needed: int, certain: bool = True) -> int:
        """Evict least recently used blobs to free about `needed` bytes; returns
        how many. When `needed` is `certain` (not a guess) and emptying the
        store would not free that much, nothing is evicted."""
        try:
            volume = self._cache.volume()
            if certain and needed > volume + self.disk_space_left():  # other files may eat into the reserve
                # Emptying the store would not make room: keep what it holds.
                log.warning("store: %d more bytes needed, more than all %d stored; evicting nothing", needed, volume)
                return 0
            return self.evict_to(max(0, volume - needed), f"to make room for {needed} bytes")
        except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
            log.error("store: could not evict to make room: %s", exc)
            return 0

    def disk_space_left(self) -> int:
        """Free space minus a reserve, so the index (SQLite) can always still
        write: a fill that used the very last byte would break every lookup."""
        stat = os.statvfs(self.fills_dir)
        reserve = min(RESERVE_BYTES, stat.f_blocks * stat.f_frsize // 20)
        return stat.f_bavail * stat.f_frsize - reserve

    def evict_to(self, limit: int, why: str = "") -> int:
        """Evict least-recently-used blobs until the store fits in `limit`."""
        why = why or f"to stay under {limit} bytes"
        evicted = 0
        while self._cache.volume() > limit:
            # diskcache has no public "least recently used key" query; the
            # Cache table layout is stable in the pinned 5.6.3.
            row = self._cache._sql("SELECT key FROM Cache ORDER BY access_time LIMIT 1").fetchone()
            if row is None:
                break
            if self._cache.delete(row[0]):
                evicted += 1
                log.info("store: evicted %s %s", row[0], why)
        self.evictions += evicted
        return evicted

    # -- administration (scripts/cachectl.py) --------------------------------

    def entries(self) -> list[BlobEntry]:
        """Every committed blob, least recently used first (eviction order).
        Read from the index alone: no access time changes, no file opened."""
        rows = self._cache._sql(
            "SELECT key, size, store_time, access_time, filename FROM Cache"
            " WHERE filename IS NOT NULL ORDER BY access_time"
        ).fetchall()
        return [BlobEntry(key, size, stored, accessed, self.directory / filename)
                for key, size, stored, accessed, filename in rows]

    def drop(self, entry: BlobEntry, *, unless_read_since: bool = False) -> bool:
        """Delete a blob the caller listed with entries(), but only if its
        index row still names the same file (not committed again since), and
        with unless_read_since, only if it was not read since it was listed.
        True if it was deleted. A client reading it keeps its open file."""
        with self._cache.transact(retry=True):
            row = self._cache._sql(
                "SELECT filename, access_time FROM Cache WHERE key = ? AND raw = 1", (entry.digest,)
            ).fetchone()
            if row is None or self.directory / row[0] != entry.path:
                return False
            if unless_read_since and row[1] != entry.accessed_at:
                return False
            return bool(self._cache.delete(entry.digest, retry=True))

    def close(self) -> None:
        self._cache.close()


def _try_lock(fd: int) -> bool:
    """Take a part file's lock without waiting; False if someone holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        return False
    return True


def _hold(path: str, fd: int) -> PartFile | None:
    """Lock the part file just made at path; or close fd and return None if a
    sweep (another process starting) took it first. A sweep unlinks only
    while it holds the lock, so then we either fail to lock the file or find
    its path gone."""
    try:
        if _try_lock(fd) and _same_file(path, fd):
            return PartFile(path, fd)
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _same_file(path: str | os.PathLike, fd: int) -> bool:
    """Does path still name the file open as fd?"""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
