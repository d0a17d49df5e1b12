"""Filling the store from the upstream: one fetch per blob, shared by every client.

A `Fill` runs in its own thread, independent of the client that caused it: if
that client goes away the fetch still completes and lands in the store. It
writes the upstream body into a part file while hashing it; clients that want
the blob meanwhile ("followers", each with a `Cursor`) read the part file
behind the writer, so they all start receiving bytes while the fetch runs.

The blob's LAST byte is withheld from followers until the whole body has been
verified (sha256 and length), so a corrupt or truncated upstream body never
reaches a client as a complete response, and never enters the store.

When the disk fills up mid-fill, the fill first evicts old blobs to make room;
if that is not enough it stops writing and carries on in memory ("spills"):
the followers it has still get every byte, through a bounded window that
advances as the slowest of them reads. The blob is then not stored.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import hashlib
import logging
import os
import queue
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import requests

from .store import BlobStore, PartFile

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_ERROR_BODY = 64 * 1024
WINDOW_LIMIT = 16 << 20  # bytes a spilled fill holds in memory for its followers
SLOW_FOLLOWER_TIMEOUT = 60.0  # a follower this far behind a spilled fill is dropped
RECENT_FAILURE = 300.0  # seconds a failed fill is remembered (as long as a blob URL lives)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class State(enum.Enum):
    CONNECTING = "connecting"  # waiting for the upstream's response headers
    STREAMING = "streaming"  # body arriving; followers may read
    VERIFIED = "verified"  # every byte is in and matches the digest
    FAILED = "failed"  # fetch or verification failed: followers abort


class FillFailed(Exception):
    pass


@dataclass
class UpstreamAnswer:
    """A non-200 upstream response to a blob GET (401, 404, 429...), relayed as is."""

    status: int
    headers: list[tuple[bytes, bytes]]  # as mitmproxy's Response.make takes them
    body: bytes
    from_redirect: bool = False  # a CDN's answer, after the registry redirected the client there

    @classmethod
    def from_response(cls, response: requests.Response) -> "UpstreamAnswer":
        body = response.raw.read(MAX_ERROR_BODY, decode_content=True) or b""
        keep = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in response.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")
        ]
        return cls(response.status_code, keep, body, getattr(response, "redirected", False))


Opener = Callable[[], requests.Response]


@dataclass
class Fill:
    digest: str
    store: BlobStore
    opener: Opener  # performs the upstream GET (redirects followed)
    on_finished: Callable[["Fill"], None] = lambda fill: None
    # Runs in the fill's thread once the bytes are verified, before any client
    # can have the last byte (the access gate records its proof here).
    on_verified: Callable[[], None] | None = None
    max_stored_size: int | None = None  # larger blobs are streamed, not stored
    refetch: bool = False  # fetch even if the store has it (a registry proving it holds it)
    # The unlisted registry it fetches from ("": one the operator chose). Fills
    # of different sources never mix, so a host a proxy client named cannot
    # feed, stall or fail the fill other clients wait on.
    source: str = ""

    state: State = State.CONNECTING
    size: int | None = None  # from the upstream's Content-Length
    written: int = 0  # bytes received (on disk below spill_at, in memory above)
    answer: UpstreamAnswer | None = None  # set when the upstream refused
    error: str = ""
    finished: bool = False  # the fill thread is done (stored, or failed)
    already_stored: bool = False  # committed by an earlier fill meanwhile: no fetch
    spill_at: int | None = None  # disk full: bytes from here on are only in memory
    started_at: float = field(default_factory=time.monotonic)
    progressed_at: float = field(default_factory=time.monotonic)  # when bytes last arrived
    _read_fd: int | None = None
    _tried_making_room: bool = False
    _window: deque = field(default_factory=deque)  # (offset, bytes) past spill_at
    _window_bytes: int = 0
    _cursors: set = field(default_factory=set)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _waiters: list = field(default_factory=list)

    # -- the fetch (runs in the fill's own thread) --------------------------

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"fill-{self.digest[7:19]}", daemon=True).start()

    def _run(self) -> None:
        part: PartFile | None = None
        committed = False
        # The fill's outcome is logged last, once its part file is gone: when
        # the line shows, the fill is over, counted, and the fills dir is clean.
        last_words: tuple = ()
        try:
            # A registry nobody chose gets its own bytes, never the store's
            # (the blob server would follow this fill for its clients).
            if not self.refetch and not self.source and self._found_in_store():
                return
            with self.opener() as response:
                if response.status_code != 200:
                    self.answer = UpstreamAnswer.from_response(response)
                    self._finish(State.FAILED, f"upstream answered {response.status_code}")
                    last_words = (logging.INFO, "fill: %s %s: upstream answered %d", self.digest,
                                  "refused" if self.refused else "failed", response.status_code)
                    return
                part = self._begin_streaming(response)
                with PipelinedSha256() as hasher:
                    self._copy(response, part, hasher)
            self._verify(hasher)
            if self.on_verified is not None:
                try:
                    self.on_verified()
                except Exception:  # noqa: BLE001 - the bytes are good whatever the callback does
                    log.exception("fill: after verifying %s", self.digest)
            self._set_state(State.VERIFIED)
            if self.spill_at is not None:
                last_words = (logging.WARNING, "fill: served %s (%d bytes) to its clients but did not store it: %s",
                              self.digest, self.written, self.error)
            else:
                self.store.commit(self.digest, part, self.written)
                committed = True
                last_words = (logging.INFO, "fill: stored %s (%d bytes) in %.2fs",
                              self.digest, self.written, time.monotonic() - self.started_at)
        except Exception as exc:  # noqa: BLE001 - every failure ends the fill cleanly
            reason = exc.args[0] if isinstance(exc, FillFailed) else f"{type(exc).__name__}: {exc}"
            if self.state is State.VERIFIED:
                # Followers already have good bytes; only the store missed out.
                last_words = (logging.ERROR, "fill: verified %s but could not store it: %s", self.digest, reason)
            else:
                last_words = (logging.WARNING, "fill: %s failed: %s", self.digest, reason)
                self._finish(State.FAILED, reason)
        finally:
            if part is not None:
                if not committed:
                    self.store.discard_part(part)
                os.close(part.fd)
            self.on_finished(self)
            self._end()
            if last_words:
                log.log(*last_words)

    @property
    def refused(self) -> bool:
        """The registry said no to this client (no token yet, no access, no
        such blob): its answer goes to the client; nothing failed. (A CDN's
        403 or 404 after the registry said yes is a failure.)"""
        return self.answer is not None and self.answer.status in (401, 403, 404) and not self.answer.from_redirect

    def _found_in_store(self) -> bool:
        """Close the race with a fill that committed this digest just before
        we were started (the caller's store lookup predates that commit)."""
        blob = self.store.open(self.digest)
        if blob is None:
            return False
        with blob.file, self._cond:
            self.size = self.written = blob.size
            self._read_fd = os.dup(blob.file.fileno())
            self.already_stored = True
        self._set_state(State.VERIFIED)
        return True

    def _begin_streaming(self, response: requests.Response) -> PartFile | None:
        length = response.headers.get("Content-Length")
        size = int(length) if length and length.isdigit() else None
        part = None
        if size is not None and self.max_stored_size is not None and size > self.max_stored_size:
            self._spill(f"{size} bytes is more than the store may hold")
        else:
            try:
                part = self.store.new_part(self.digest)
            except OSError as exc:
                if exc.errno not in DISK_FULL:
                    raise
                self._spill("disk full")
        read_fd = None
        if part is not None:
            try:
                read_fd = os.open(part.path, os.O_RDONLY)
            except OSError:  # e.g. out of file descriptors: _run cannot clean up a part it never got
                self.store.discard_part(part)
                os.close(part.fd)
                raise
        with self._cond:
            self.size = size
            self._read_fd = read_fd
        self._set_state(State.STREAMING)
        return part

    def _copy(self, response: requests.Response, part: PartFile | None, hasher) -> None:
        arrived = ArrivedBytes(response.raw)
        while True:
            chunk = arrived.read(CHUNK)
            if not chunk:
                return
            hasher.update(chunk)
            view = memoryview(chunk)
            if self.spill_at is None and self.max_stored_size is not None and \
                    self.written + len(view) > self.max_stored_size:
                # Only a body without Content-Length gets here (see _begin_streaming).
                self._spill(f"more than the {self.max_stored_size} bytes the store may hold")
            if self.spill_at is None and self.store.disk_space_left() < len(view):
                if not (self._make_room() and self.store.disk_space_left() >= len(view)):
                    self._spill("disk full")
            while view and self.spill_at is None:
                try:
                    # pwrite: followers share the file, never the write offset.
                    done = os.pwrite(part.fd, view, self.written)
                except OSError as exc:
                    if exc.errno not in DISK_FULL:
                        raise
                    if not self._make_room():
                        self._spill("disk full")
                    continue
                view = view[done:]
                with self._cond:
                    self.written += done
                    self.progressed_at = time.monotonic()
                    self._cond.notify_all()
            if view:
                self._hold_in_window(bytes(view))
            if self.size is not None and self.written > self.size:
                raise FillFailed(f"upstream sent more than its Content-Length {self.size}")

    def _make_room(self) -> bool:
        """Disk full: evict old blobs once, as much as this one still needs."""
        if self._tried_making_room:
            return False
        self._tried_making_room = True
        needed = (self.size - self.written) if self.size is not None else 64 * CHUNK
        freed = self.store.make_room(needed, certain=self.size is not None)
        log.warning("fill: disk full while filling %s; evicted %d blob(s) to make room", self.digest, freed)
        return freed > 0

    def _spill(self, why: str) -> None:
        with self._cond:
            self.spill_at = self.written
            self.error = why
        log.warning("fill: %s: %s goes on to its clients from memory and will not be stored", why, self.digest)

    def _hold_in_window(self, data: bytes) -> None:
        """Append to the in-memory window, waiting for slow followers to make room."""
        with self._cond:
            deadline = time.monotonic() + SLOW_FOLLOWER_TIMEOUT
            while True:
                self._trim_window()
                if not self._window or self._window_bytes + len(data) <= WINDOW_LIMIT:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if not self._cursors:
                        raise FillFailed("nobody is reading a blob that cannot be stored")
                    self._drop_slowest_follower()
                    deadline = time.monotonic() + SLOW_FOLLOWER_TIMEOUT
                    continue
                self._cond.wait(remaining)
            self._window.append((self.written, data))
            self._window_bytes += len(data)
            self.written += len(data)
            self.progressed_at = time.monotonic()
            self._cond.notify_all()

    def _trim_window(self) -> None:
        """Forget window bytes every follower has passed (caller holds _cond).

        With no follower yet, nothing is forgotten: the client that caused
        the fill may still be on its way to the blob server."""
        if not self._cursors:
            return
        low = min(c.pos for c in self._cursors)
        while self._window and self._window[0][0] + len(self._window[0][1]) <= low:
            self._window_bytes -= len(self._window.popleft()[1])

    def _drop_slowest_follower(self) -> None:
        slowest = min(self._cursors, key=lambda c: c.pos)
        slowest.dropped = True
        self._cursors.discard(slowest)
        self._cond.notify_all()  # it may be waiting in readable_until
        log.warning("fill: dropped a client too far behind %s", self.digest)

    def _verify(self, hasher) -> None:
        if self.size is not None and self.written != self.size:
            raise FillFailed(f"truncated body: {self.written} of {self.size} bytes")
        actual = "sha256:" + hasher.hexdigest()
        if actual != self.digest:
            raise FillFailed(f"digest mismatch: upstream sent {actual}")
        with self._cond:
            self.size = self.written

    def _finish(self, state: State, error: str) -> None:
        self.error = error
        self._set_state(state)

    def _set_state(self, state: State) -> None:
        with self._cond:
            self.state = state
        self._notify()

    def _notify(self) -> None:
        """Wake followers, and event-loop waiters whose condition now holds."""
        with self._cond:
            self._cond.notify_all()
            ready, waiting = [], []
            for waiter in self._waiters:
                (ready if waiter[2]() else waiting).append(waiter)
            self._waiters = waiting
        for loop, future, _ in ready:
            loop.call_soon_threadsafe(_resolve, future)

    def _end(self) -> None:
        """Finished, and no new follower gets the part file: one step, so
        follow() never sees a fill without its file but not yet finished."""
        with self._cond:
            fd, self._read_fd = self._read_fd, None
            self.finished = True
        if fd is not None:
            os.close(fd)
        self._notify()

    # -- for the event loop --------------------------------------------------

    async def wait_started(self) -> None:
        """Return once the upstream has answered (or the fill failed)."""
        await self._wait_until(lambda: self.state is not State.CONNECTING)

    async def wait_finished(self) -> None:
        """Return once the fill is over: stored, or failed."""
        await self._wait_until(lambda: self.finished)

    async def _wait_until(self, condition: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if condition():
                return
            self._waiters.append((loop, future, condition))
        await future

    # -- for followers (blob server threads) -----------------------------------

    def follow(self, start: int = 0) -> "Cursor | None":
        """A cursor for a client reading from `start`, or None once the fill
        is over (the blob is then in the store, or gone)."""
        with self._cond:
            if self.finished or (self._read_fd is None and self.spill_at is None):
                return None
            fd = os.dup(self._read_fd) if self._read_fd is not None else None
            cursor = Cursor(self, fd, start)
            self._cursors.add(cursor)
            return cursor

    def readable_until(self, offset: int, timeout: float, end: int | None = None,
                       cursor: "Cursor | None" = None) -> int:
        """Block until bytes past `offset` may be sent; return the limit.

        The last byte a client asked for (`end`, exclusive: a Range; else the
        whole blob) becomes readable only once the blob is verified, so no
        response is complete before its bytes are known good.
        Raises FillFailed if the fill failed, if `cursor` was dropped (too
        far behind a fill that cannot be stored), or if no bytes arrived
        from the upstream for `timeout` (an idle bound: a Range far ahead of
        the writer, or one whose last byte waits for the whole blob, may
        wait as long as the upstream keeps sending).
        """
        called_at = time.monotonic()
        with self._cond:
            while True:
                if self.state is State.FAILED:
                    raise FillFailed(self.error)
                if cursor is not None and cursor.dropped:
                    raise FillFailed("client fell too far behind a fill that could not be stored")
                if self.state is State.VERIFIED:
                    return self.written
                limit = self.written
                held = end if end is not None else self.size
                if held is not None:
                    limit = min(limit, held - 1)
                if limit > offset:
                    return limit
                remaining = max(called_at, self.progressed_at) + timeout - time.monotonic()
                if remaining <= 0:
                    raise FillFailed(f"no data from the upstream for {timeout:.0f}s")
                self._cond.wait(remaining)


class Cursor:
    """One follower's position in a fill. Bytes below the fill's spill point
    are read from the part file (sendfile), bytes above it from memory."""

    def __init__(self, fill: Fill, fd: int | None, pos: int):
        self.fill = fill
        self.fd = fd
        self.pos = pos
        self.dropped = False

    def readable_until(self, offset: int, timeout: float, end: int | None = None) -> int:
        return self.fill.readable_until(offset, timeout, end, self)

    def on_disk_until(self) -> int | None:
        """Bytes below this offset are in the part file (None: all are)."""
        return self.fill.spill_at

    def read_memory(self, offset: int, count: int) -> bytes:
        """Bytes at offset (above the spill point), at most count."""
        fill = self.fill
        with fill._cond:
            for start, data in fill._window:
                if start <= offset < start + len(data):
                    return data[offset - start: offset - start + count]
        raise FillFailed("those bytes are no longer held (the blob could not be stored)")

    def advance(self, pos: int) -> None:
        with self.fill._cond:
            self.pos = pos
            self.fill._cond.notify_all()

    def close(self) -> None:
        with self.fill._cond:
            self.fill._cursors.discard(self)
            self.fill._cond.notify_all()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ArrivedBytes:
    """Reads whatever has arrived of a body, up to a limit: followers on a
    slow link see bytes as they come, not a megabyte at a time.

    Over HTTPS one read1 returns at most one TLS record (16 KB), and each
    piece costs the fill a write, a hand-off to the hasher and a wake-up of
    its followers; a read1 also allocates all it is asked for. One piece per
    record made a cold pull from an HTTPS upstream on loopback 6.6x slower
    than pulling directly (scripts/bench.py --https). So read1 is repeated
    while the socket already holds more (poll, not select: descriptors pass
    1024 under load), for at most GATHER_FOR: poll also sees the start of a
    record whose rest is still on its way, and read1 then waits for it, so
    on a slow link an unbounded loop gathered a whole megabyte (5 s at
    200 KB/s) before followers saw any of it."""

    GATHER_FOR = 0.01  # seconds

    def __init__(self, raw):
        self._raw = raw
        self._poll: select.poll | None = None
        try:
            fd = raw.fileno()
        except (OSError, ValueError, AttributeError):  # no socket to ask: one read1 at a time
            return
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def read(self, limit: int) -> bytes:
        piece = self._raw.read1(limit, decode_content=False)
        if not piece or len(piece) >= limit or self._poll is None:
            return piece
        pieces, size = [piece], len(piece)
        until = time.monotonic() + self.GATHER_FOR
        while size < limit and time.monotonic() < until and self._poll.poll(0):
            piece = self._raw.read1(limit - size, decode_content=False)
            if not piece:
                break
            pieces.append(piece)
            size += len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)


class PipelinedSha256:
    """sha256 computed in a thread of its own, beside the receive-and-write loop.

    Hashing is the largest CPU cost of a fill; hashlib and the socket and
    file calls all release the GIL, so on a fast link the two run on two
    cores instead of one after the other. A small queue bounds the memory.
    """

    def __init__(self, depth: int = 8):
        self._hash = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="fill-sha256", daemon=True)
        self._digest: str | None = None

    def __enter__(self) -> "PipelinedSha256":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._hash.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        """Only after the with-block has ended (every chunk hashed)."""
        assert not self._thread.is_alive()
        return self._hash.hexdigest()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Fills:
    """The fills in flight, by digest (and source, see Fill.source): the coalescing point."""

    def __init__(self, store: BlobStore, max_stored_size: int | None = None,
                 on_finished: Callable[[Fill], None] = lambda fill: None):
        self.store = store
        self.max_stored_size = max_stored_size
        self.on_finished = on_finished  # e.g. metrics; runs in the fill's thread
        self._lock = threading.Lock()
        self._running: dict[tuple[str, str], Fill] = {}  # (digest, source) -> fill
        self._failed: dict[tuple[str, str], tuple[float, str]] = {}  # -> (when, why), recent only

    def get(self, digest: str, source: str = "") -> Fill | None:
        with self._lock:
            return self._running.get((digest, source))

    def start_or_join(self, digest: str, opener: Opener, on_verified: Callable[[], None] | None = None,
                      refetch: bool = False, source: str = "") -> tuple[Fill, bool]:
        """The running fill for digest from source, or a new one started with
        opener (on_verified and refetch apply only to a new one)."""
        with self._lock:
            fill = self._running.get((digest, source))
            if fill is not None and fill.state is not State.FAILED:
                return fill, False
            fill = Fill(digest, self.store, opener, on_finished=self._forget, on_verified=on_verified,
                        max_stored_size=self.max_stored_size, refetch=refetch, source=source)
            self._running[(digest, source)] = fill
        try:
            fill.start()
        except RuntimeError as exc:  # "can't start new thread": a pids/TasksMax limit
            log.error("fill: could not start a fill for %s: %s", digest, exc)
            fill._finish(State.FAILED, f"could not start: {exc}")
            fill.on_finished(fill)  # _forget: the next request starts afresh
            fill._end()
        return fill, True

    def _forget(self, fill: Fill) -> None:
        self.on_finished(fill)  # first: once it is gone from in_flight(), it is counted
        now = time.monotonic()
        key = (fill.digest, fill.source)
        with self._lock:
            if self._running.get(key) is fill:
                del self._running[key]
            if fill.state is State.FAILED or fill.spill_at is not None:  # failed, or served unstored
                self._failed[key] = (now, fill.error)
            self._failed = {k: f for k, f in self._failed.items() if now - f[0] < RECENT_FAILURE}

    def recent_failure(self, digest: str, source: str = "") -> str | None:
        """Why the last fill of digest failed (or could not store it), if that
        was recent: a client that arrives after it should hear "try again",
        not "unknown blob"."""
        with self._lock:
            failed = self._failed.get((digest, source))
        return failed[1] if failed and time.monotonic() - failed[0] < RECENT_FAILURE else None

    def in_flight(self) -> int:
        with self._lock:
            return len(self._running)

    def running(self) -> list[Fill]:
        with self._lock:
            return list(self._running.values())
