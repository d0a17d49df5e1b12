"""Filling the store from the upstream: one fetch per blob, shared by every client.

A `Fill` runs in its own thread, independent of the client that caused it: if
that client goes away the fetch still completes and lands in the store. It
writes the upstream body into a part file while hashing it; clients that want
the blob meanwhile ("followers", each with a `Cursor`) read the part file
behind the writer, so they all start receiving bytes while the fetch runs.
Followers read up to `written`, the prefix of the blob that is on disk with
no hole below it.

The blob's LAST byte is withheld from followers until the whole body has been
verified (sha256 and length), so a corrupt or truncated upstream body never
reaches a client as a complete response, and never enters the store.

A large blob is fetched as ranges over several connections (`FetchPolicy`):
on a long or shaped line one TCP connection carries a fraction of what the
line can. The first GET asks for the first `first_request` bytes; the 206
says how large the blob is, and a small blob is then complete. The rest goes
in `chunk_size` ranges, handed out in order to `connections` threads that
write them into the part file where they belong. The fill's own thread moves
`written` up as the chunks below it complete, and hashes in order behind it
(reading the bytes back from the page cache). An upstream that ignores Range
(200) or answers an odd range is fetched over one connection from `written`.

A transfer that breaks (reset, closed early, silent past the read timeout, a
429 or 5xx) continues with a Range request from the last byte it received,
the hash state kept: up to RESUMES times in a row without progress, with
backoff. Its followers see nothing of it. Only bytes that fail verification,
an upstream that refuses, or resumes that run out fail the fill.

When the disk fills up mid-fill, the fill first evicts old blobs to make room;
if that is not enough it stops writing and carries on in memory ("spills"),
over one connection: the followers it has still get every byte, through a
bounded window that advances as the slowest of them reads. The blob is then
not stored.

Every failure sets `Fill.failure` where it happens; FAILURE_METRICS says how
each reason is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import hashlib
import http.client
import logging
import os
import queue
import re
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import requests
import urllib3.exceptions

from .store import BlobStore, PartFile

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # largest piece read from a socket (and hashed) at once
MAX_ERROR_BODY = 64 * 1024
WINDOW_LIMIT = 16 << 20  # bytes a spilled fill holds in memory for its followers
SLOW_FOLLOWER_TIMEOUT = 60.0  # a follower this far behind a spilled fill is dropped
RECENT_FAILURE = 300.0  # seconds a failed fill is remembered (as long as a blob URL lives)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# A broken transfer is continued up to RESUMES times in a row that each bring
# less than PROGRESS bytes, waiting BACKOFF_FIRST, doubling, at most
# BACKOFF_MAX before each: 0.5+1+2+4+8 = 15.5 s of waiting before giving up.
RESUMES = 5
PROGRESS = CHUNK
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 8.0
RETRYABLE = (408, 429, 500, 502, 503, 504)  # statuses a range request is tried again after
# Errors of a socket or an HTTP exchange: raised by the upstream GET and by
# reading its body, never by the part file (whose errors are this machine's).
NETWORK_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class State(enum.Enum):
    CONNECTING = "connecting"  # waiting for the upstream's response headers
    STREAMING = "streaming"  # body arriving; followers may read
    VERIFIED = "verified"  # every byte is in and matches the digest
    FAILED = "failed"  # fetch or verification failed: followers abort


class FailureReason(enum.Enum):
    """Why a fill ended without a verified blob (Fill.failure). A refusal by
    the registry (401/403/404 to this client) is its answer, not a failure."""

    UNAVAILABLE = "unavailable"  # the upstream answered 429 or 5xx (after every resume)
    ANSWERED = "answered"  # another error status: a CDN's 403/404 after the registry said yes
    CONNECTION = "connection"  # no connection, or it broke or went silent (after every resume)
    VERIFICATION = "verification"  # bytes that do not match the digest, or more than announced
    LOCAL = "local"  # this machine: the disk (EIO, EACCES), file descriptors, threads


# The one table of how failures are counted: reason -> (label in
# fill_failures_total, label in upstream_errors_total or None). "{status}" is
# the upstream's HTTP status. Local faults are never the upstream's errors.
FAILURE_METRICS: dict[FailureReason, tuple[str, str | None]] = {
    FailureReason.UNAVAILABLE: ("upstream {status}", "{status}"),
    FailureReason.ANSWERED: ("upstream {status}", None),
    FailureReason.CONNECTION: ("connection", "connection"),
    FailureReason.VERIFICATION: ("verification", None),
    FailureReason.LOCAL: ("local", None),
}


def failure_labels(reason: FailureReason, status: int | None) -> tuple[str, str | None]:
    """(fill_failures_total label, upstream_errors_total label or None)."""
    failed, upstream = FAILURE_METRICS[reason]
    return failed.format(status=status), upstream and upstream.format(status=status)


def _status_reason(status: int) -> FailureReason:
    return FailureReason.UNAVAILABLE if status == 429 or status >= 500 else FailureReason.ANSWERED


class FillFailed(Exception):
    """The fill failed (raised to followers too); `reason` and `status` say why."""

    def __init__(self, message: str, reason: FailureReason = FailureReason.VERIFICATION,
                 status: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.status = status


class _Broken(Exception):
    """A transfer broke or an answer was not yet the bytes: resume (with backoff)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _RangeNotServed(Exception):
    """The upstream answered a chunk's Range with something other than the 206
    asked for (a 200, another range): fetch the rest over one connection."""


class _Stopped(Exception):
    """This chunk's fetch was called off (another failed, or the fill fell back)."""


@dataclass(frozen=True)
class FetchPolicy:
    """How a fill fetches a blob (the fill_* options; see the module docstring)."""

    first_request: int = 8 << 20  # fill_chunk_threshold: smaller blobs come in one request
    chunk_size: int = 8 << 20  # fill_chunk_size
    connections: int = 8  # fill_connections; 1: one connection, no Range but to resume

    @property
    def chunked(self) -> bool:
        return self.connections > 1


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
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding",
                                 "content-range")
        ]
        return cls(response.status_code, keep, body, getattr(response, "redirected", False))


# opener() GETs the whole blob (redirects followed); opener(start, end) bytes
# [start, end), end None: to the last byte (see upstream.BlobSource).
Opener = Callable[..., requests.Response]


class Fill:
    """One blob's fetch into the store, and its followers. A plain class:
    it owns threads and a lock, so equality is identity."""

    def __init__(self, digest: str, store: BlobStore, opener: Opener,
                 on_finished: Callable[["Fill"], None] = lambda fill: None,
                 on_verified: Callable[[], None] | None = None,
                 max_stored_size: int | None = None, refetch: bool = False, source: str = "",
                 policy: FetchPolicy = FetchPolicy(), on_stored: Callable[[], None] | None = None):
        self.digest = digest
        self.store = store
        self.opener = opener
        self.on_finished = on_finished
        # Runs in the fill's thread once the bytes are verified, before any client
        # can have the last byte (the access gate records its proof here).
        self.on_verified = on_verified
        self.on_stored = on_stored  # runs in the fill's thread once the blob is committed
        self.max_stored_size = max_stored_size  # larger blobs are streamed, not stored
        self.refetch = refetch  # fetch even if the store has it (a registry proving it holds it)
        # The unlisted registry it fetches from ("": one the operator chose). Fills
        # of different sources never mix, so a host a proxy client named cannot
        # feed, stall or fail the fill other clients wait on.
        self.source = source
        self.policy = policy

        self.state = State.CONNECTING
        self.size: int | None = None  # the blob's, from the upstream's Content-Length/-Range
        self.written = 0  # bytes with none missing below (on disk below spill_at, in memory above)
        self.fetched = 0  # bytes received from the upstream (a few twice, after a fallback)
        self.answer: UpstreamAnswer | None = None  # set when the upstream refused
        self.error = ""
        self.failure: FailureReason | None = None  # set where the fill failed
        self.failure_status: int | None = None  # the upstream's status, for UNAVAILABLE/ANSWERED
        self.finished = False  # the fill thread is done (stored, or failed)
        self.already_stored = False  # committed by an earlier fill meanwhile: no fetch
        self.spill_at: int | None = None  # disk full: bytes from here on are only in memory
        self.connections = 1  # upstream connections used at once
        self.resumes = 0  # transfers continued after a break
        self.started_at = time.monotonic()
        self.progressed_at = self.started_at  # when bytes last arrived (or a resume began)
        self._read_fd: int | None = None
        self._tried_making_room = False
        self._room_lock = threading.Lock()
        self._window: deque = deque()  # (offset, bytes) past spill_at
        self._window_bytes = 0
        self._cursors: set = set()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._waiters: list = []

    def __repr__(self) -> str:
        size = "?" if self.size is None else self.size
        return f"<Fill {self.digest[:19]} {self.state.value} {self.written}/{size}>"

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
            response, size = self._first_answer()
            with contextlib.closing(response):
                if response.status_code not in (200, 206):
                    self.answer = UpstreamAnswer.from_response(response)
                    status = response.status_code
                    if not self.refused:
                        self.failure, self.failure_status = _status_reason(status), status
                    self._finish(State.FAILED, f"upstream answered {status}")
                    last_words = (logging.INFO, "fill: %s %s: upstream answered %d", self.digest,
                                  "refused" if self.refused else "failed", status)
                    return
                part = self._begin_streaming(size)
                with PipelinedSha256() as hasher:
                    self._fetch(response, part, hasher)
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
                if self.on_stored is not None:
                    try:
                        self.on_stored()
                    except Exception:  # noqa: BLE001 - the blob is stored whatever the callback does
                        log.exception("fill: after storing %s", self.digest)
                last_words = (logging.INFO, "fill: stored %s (%d bytes) in %.2fs (%s)",
                              self.digest, self.written, time.monotonic() - self.started_at, self._how())
        except Exception as exc:  # noqa: BLE001 - every failure ends the fill cleanly
            if isinstance(exc, FillFailed):
                reason, status, why = exc.reason, exc.status, exc.args[0]
            else:
                reason, status, why = _reason_of(exc), None, f"{type(exc).__name__}: {exc}"
            if self.state is State.VERIFIED:
                # Followers already have good bytes; only the store missed out.
                last_words = (logging.ERROR, "fill: verified %s but could not store it: %s", self.digest, why)
            else:
                last_words = (logging.WARNING, "fill: %s failed: %s", self.digest, why)
                self.failure, self.failure_status = reason, status
                self._finish(State.FAILED, why)
        finally:
            if part is not None:
                if not committed:
                    self.store.discard_part(part)
                os.close(part.fd)
            self.on_finished(self)
            self._end()
            if last_words:
                log.log(*last_words)

    def _how(self) -> str:
        resumed = f", {self.resumes} resume{'s' if self.resumes != 1 else ''}" if self.resumes else ""
        return f"{self.connections} connection{'s' if self.connections != 1 else ''}{resumed}"

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

    def _first_answer(self) -> tuple[requests.Response, int | None]:
        """The upstream's answer to the first GET, and the blob's size.

        With chunks allowed, the GET asks for the first `first_request` bytes
        only; the 206 tells the blob's size. Another answer to that Range (a
        416 for an empty blob, a range not asked for) is dropped, and the
        whole blob asked for without one. A 200 (Range ignored) is used as is."""
        if self.policy.chunked:
            response = self.opener(0, self.policy.first_request)
            if response.status_code == 206:
                got = _content_range(response)
                if got is not None and got[0] == 0 and got[2] is not None and \
                        got[1] == min(self.policy.first_request, got[2]) - 1:
                    return response, got[2]
                log.info("fill: %s: odd answer to bytes=0-%d (Content-Range %r); asking for the whole blob",
                         self.digest, self.policy.first_request - 1, response.headers.get("Content-Range"))
            elif response.status_code != 416:
                return response, _content_length(response) if response.status_code == 200 else None
            response.close()
        response = self.opener()
        return response, _content_length(response) if response.status_code == 200 else None

    def _begin_streaming(self, size: int | None) -> PartFile | None:
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

    def _fetch(self, response: requests.Response, part: PartFile | None, hasher) -> None:
        """Every byte into the part file (or the window), hashed in order."""
        first = _content_length(response)
        if (response.status_code == 206 and part is not None and self.size is not None
                and first is not None and first < self.size and self._room_for(self.size)):
            if self._fetch_in_chunks(response, first, part, hasher):
                return
            response = None  # fell back: the rest over one connection, from `written`
        self._receive(self.written, self.size, response,
                      lambda offset, data: self._append(data, part, hasher), whole_ok=True)

    def _room_for(self, size: int) -> bool:
        """Chunks land all over the part file: only a blob the disk has room
        for is fetched in chunks. One that does not fit goes over one
        connection and spills where the disk fills up, as it would anyway."""
        if self.store.disk_space_left() >= size:
            return True
        return self._make_room() and self.store.disk_space_left() >= size

    # -- one stream of bytes, resumed after breaks -----------------------------

    def _receive(self, start: int, end: int | None, response: requests.Response | None,
                 sink: Callable[[int, memoryview], None], whole_ok: bool = False,
                 stop: threading.Event | None = None) -> None:
        """Hand bytes [start, end) of the blob (end None: all the body has) to
        sink(offset, data) in order, reading `response` first (None: a Range
        request at start). A response that ends where it said it would (a
        first range) is followed by a Range request for the rest; one that
        breaks, by one after a backoff (see RESUMES).

        With whole_ok, an upstream that answers a Range with the whole blob
        (200) is read from its start, the bytes already had skipped; without
        it that raises _RangeNotServed. Raises FillFailed when the upstream
        refuses or the resumes run out, _Stopped once `stop` is set."""
        pos = start
        failures = 0
        body = _Body(response, 0, self._count_fetched) if response is not None else None
        try:
            while end is None or pos < end:
                if stop is not None and stop.is_set():
                    raise _Stopped()
                try:
                    if body is None:
                        body = _Body(*self._open_range(pos, end, whole_ok), self._count_fetched)
                    piece = body.read()
                    if piece is None:  # the body is over
                        if not body.complete():
                            raise _Broken(f"body cut short at byte {pos}")
                        if end is None:
                            return
                        if body.expected is None:
                            raise _Broken(f"body ended at byte {pos}, before byte {end}")
                        body.close()  # a first range, whole: on to the rest
                        body = None
                        continue
                except _Broken as exc:
                    if body is not None:
                        if body.delivered >= PROGRESS:
                            failures = 0
                        body.close()
                        body = None
                    failures += 1
                    if failures > RESUMES:
                        reason = FailureReason.CONNECTION if exc.status is None else _status_reason(exc.status)
                        raise FillFailed(f"{exc} (resumed {RESUMES} times in a row without progress)",
                                         reason, exc.status) from None
                    delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1))
                    log.info("fill: %s: %s; resuming at byte %d in %.1fs", self.digest, exc, pos, delay)
                    self._touch()
                    if (stop if stop is not None else threading.Event()).wait(delay):
                        raise _Stopped() from None
                    with self._cond:
                        self.resumes += 1
                    continue
                if end is not None and pos + len(piece) > end:
                    raise FillFailed(f"upstream sent more than the {end} bytes announced")
                sink(pos, piece)
                pos += len(piece)
        finally:
            if body is not None:
                body.close()

    def _open_range(self, start: int, end: int | None, whole_ok: bool) -> tuple[requests.Response, int]:
        """GET bytes [start, end) to go on with: (response, leading bytes to skip)."""
        try:
            response = self.opener(start, end)
        except NETWORK_ERRORS as exc:
            raise _Broken(f"{type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if status == 206:
            got = _content_range(response)
            if got is not None and got[0] == start and (end is None or got[1] == end - 1) and \
                    (self.size is None or got[2] == self.size):
                return response, 0
            why = f"asked for bytes {start}-{'' if end is None else end - 1}, got {response.headers.get('Content-Range')!r}"
        elif status == 200:
            if whole_ok and (self.size is None or _content_length(response) == self.size):
                log.info("fill: %s: the upstream ignored the Range; reading the blob from byte 0 to %d",
                         self.digest, start)
                return response, start
            why = "the upstream answered 200 to a Range request"
        else:
            response.close()
            if status in RETRYABLE:
                raise _Broken(f"upstream answered {status}", status)
            raise FillFailed(f"upstream answered {status} to a Range request", _status_reason(status), status)
        response.close()
        if not whole_ok:
            raise _RangeNotServed(why)
        log.info("fill: %s: %s; asking for the whole blob", self.digest, why)
        return self._whole(start, why)

    def _whole(self, start: int, why: str) -> tuple[requests.Response, int]:
        """The whole blob, to skip what the fill has (one connection, last resort)."""
        try:
            response = self.opener()
        except NETWORK_ERRORS as exc:
            raise _Broken(f"{type(exc).__name__}: {exc}") from exc
        if response.status_code == 200 and (self.size is None or _content_length(response) == self.size):
            return response, start
        status = response.status_code
        response.close()
        if status in RETRYABLE:
            raise _Broken(f"upstream answered {status}", status)
        raise FillFailed(f"no usable answer to go on from byte {start}: {why}, then {status}",
                         _status_reason(status) if status >= 400 else FailureReason.ANSWERED, status)

    def _count_fetched(self, n: int) -> None:
        with self._cond:
            self.fetched += n

    def _touch(self) -> None:
        """The fill is alive (a resume begins): followers' idle clocks restart."""
        with self._cond:
            self.progressed_at = time.monotonic()

    # -- one connection: bytes in order -------------------------------------------

    def _append(self, view: memoryview, part: PartFile | None, hasher) -> None:
        """The next bytes in order: hashed, written at `written` (or held in
        the window once spilled), and offered to followers."""
        hasher.update(view)
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

    # -- several connections: chunks written where they belong -------------------

    def _fetch_in_chunks(self, first: requests.Response, first_length: int, part: PartFile, hasher) -> bool:
        """Fetch the rest of the blob as ranges over several connections, while
        this thread moves `written` up and hashes behind it. False if the
        upstream would not serve ranges (or the disk filled up): then the
        caller fetches the rest over one connection from `written`."""
        run = _ChunkRun(self, part, first, first_length)
        # A source may say how many connections it takes (sources.py: the object store's own setting).
        connections = getattr(first, "connections", None) or self.policy.connections
        for i in range(min(connections, len(run.chunks))):
            try:
                threading.Thread(target=self._chunk_worker, args=(run,), daemon=True,
                                 name=f"fill-{self.digest[7:19]}-{i}").start()
            except RuntimeError:  # "can't start new thread": go on with those that run
                if i == 0:
                    first.close()
                    raise
                log.warning("fill: %s: could start only %d connection threads", self.digest, i)
                break
            run.workers += 1
        with self._cond:
            self.connections = run.workers
        hashed = 0
        try:
            while True:
                with self._cond:
                    run.cond.wait_for(lambda: run.contiguous > self.written or run.over(), 1.0)
                    over = run.over()
                    if over:
                        run.stop()  # no write starts after this: `contiguous` is final
                    if run.contiguous > self.written:
                        self.written = run.contiguous
                        self.progressed_at = time.monotonic()
                        self._cond.notify_all()
                    written = self.written
                while hashed < written:  # in order, from the page cache
                    data = os.pread(part.fd, min(CHUNK, written - hashed), hashed)
                    if not data:
                        raise FillFailed("part file shorter than written", FailureReason.LOCAL)
                    hasher.update(data)
                    hashed += len(data)
                if over:
                    break
        finally:
            run.stop()
        if run.failure is not None:
            raise run.failure
        if run.fallback is None:
            return True
        log.warning("fill: %s: %s; fetching the rest (from byte %d) over one connection",
                    self.digest, run.fallback, self.written)
        with self._cond:
            self.connections = 1
        if run.disk_full:
            self._spill("disk full")
        return False

    def _chunk_worker(self, run: "_ChunkRun") -> None:
        try:
            while (chunk := run.claim()) is not None:
                index, start, end, response = chunk
                self._receive(start, end, response, lambda offset, data: run.write(index, offset, data),
                              stop=run.stopping)
                run.done(index)
        except _Stopped:
            pass
        except _RangeNotServed as exc:
            run.fall_back(str(exc))
        except _DiskFull:
            run.fall_back("disk full", disk_full=True)
        except BaseException as exc:  # noqa: BLE001 - handed to the fill's thread
            run.fail(exc)

    def _make_room(self) -> bool:
        """Disk full: evict old blobs once, as much as this one still needs."""
        with self._room_lock:
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
                        raise FillFailed("nobody is reading a blob that cannot be stored", FailureReason.LOCAL)
                    self._drop_slowest_follower()
                    deadline = time.monotonic() + SLOW_FOLLOWER_TIMEOUT
                    continue
                self._cond.wait(remaining)
            self._window.append((self.written, data))
            self._window_bytes += len(data)
            self.written += len(data)
            self.progressed_at = time.monotonic()
            self._cond.notify_all()

    def _verify(self, hasher) -> None:
        if self.size is not None and self.written != self.size:
            raise FillFailed(f"truncated body: {self.written} of {self.size} bytes")
        actual = "sha256:" + hasher.hexdigest()
        if actual != self.digest:
            raise FillFailed(f"digest mismatch: upstream sent {actual}")
        with self._cond:
            self.size = self.written

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

    def started_within(self, timeout: float) -> bool:
        """Block until the upstream has answered (or the fill failed); False
        if it has not within timeout (for threads: the blob server's)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.state is not State.CONNECTING, timeout)

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



class _DiskFull(Exception):
    """No room for a chunk, even after evicting: the fill goes on spilled."""


class _ChunkRun:
    """The chunks of one fill's blob, who fetches which, and how far the bytes
    with no hole below them reach (`contiguous`). State under the fill's lock;
    `cond` (on that lock) wakes the fill's thread, not its followers."""

    def __init__(self, fill: Fill, part: PartFile, first: requests.Response, first_length: int):
        self.fill = fill
        self.part = part
        size, step = fill.size, fill.policy.chunk_size
        self.chunks = [(0, first_length)] + [(s, min(s + step, size)) for s in range(first_length, size, step)]
        self.received = [0] * len(self.chunks)  # bytes in place from each chunk's start
        self.complete = [False] * len(self.chunks)
        self.head = 0  # the first chunk not complete
        self.contiguous = 0  # bytes in place with none missing below
        self.next = 0  # the next chunk to hand out
        self.first: requests.Response | None = first  # chunk 0's response, already open
        self.cond = threading.Condition(fill._lock)
        self.stopping = threading.Event()
        self.writing = 0  # writes in progress
        self.workers = 0
        self.failure: BaseException | None = None
        self.fallback: str | None = None
        self.disk_full = False

    def claim(self) -> tuple[int, int, int, requests.Response | None] | None:
        """The next chunk in order: (index, start, end, its open response or None)."""
        with self.cond:
            if self.stopping.is_set() or self.next >= len(self.chunks):
                return None
            index = self.next
            self.next += 1
            response, self.first = (self.first, None) if index == 0 else (None, self.first)
            return (index, *self.chunks[index], response)

    def write(self, index: int, offset: int, data: memoryview) -> None:
        """Put a chunk's bytes in place. Never starts once stop() was called:
        the part file may be closed (its descriptor reused) after that."""
        fill = self.fill
        with self.cond:
            if self.stopping.is_set():
                raise _Stopped()
            self.writing += 1
        done = False
        try:
            store = fill.store
            if store.disk_space_left() < len(data) and \
                    not (fill._make_room() and store.disk_space_left() >= len(data)):
                raise _DiskFull()
            at, view = offset, data
            while view:
                try:
                    n = os.pwrite(self.part.fd, view, at)
                except OSError as exc:
                    if exc.errno not in DISK_FULL:
                        raise
                    if not fill._make_room():
                        raise _DiskFull() from exc
                    continue
                view, at = view[n:], at + n
            done = True
        finally:
            with self.cond:
                self.writing -= 1
                if done:
                    start = self.chunks[index][0]
                    self.received[index] = offset + len(data) - start
                    if index == self.head:
                        self.contiguous = offset + len(data)
                    fill.progressed_at = time.monotonic()
                self.cond.notify_all()

    def done(self, index: int) -> None:
        with self.cond:
            self.complete[index] = True
            while self.head < len(self.chunks) and self.complete[self.head]:
                self.head += 1
            if self.head < len(self.chunks):
                self.contiguous = self.chunks[self.head][0] + self.received[self.head]
            else:
                self.contiguous = self.chunks[-1][1]
            self.cond.notify_all()

    def over(self) -> bool:
        return self.failure is not None or self.fallback is not None or self.head >= len(self.chunks)

    def fall_back(self, why: str, disk_full: bool = False) -> None:
        with self.cond:
            if self.fallback is None and self.failure is None:
                self.fallback, self.disk_full = why, disk_full
            self.stopping.set()
            self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.failure is None:
                self.failure = exc
            self.stopping.set()
            self.cond.notify_all()

    def stop(self) -> None:
        """Call the chunks off and wait for writes in progress to end; workers
        still reading a socket give up at their next piece."""
        with self.cond:
            self.stopping.set()
            self.cond.wait_for(lambda: self.writing == 0, 60)
            first, self.first = self.first, None
        if first is not None:
            first.close()



class _Body:
    """One upstream response being read for a fill: what it said it holds,
    what it brought, and the leading bytes to skip (a 200 to a Range)."""

    def __init__(self, response: requests.Response, skip: int, count: Callable[[int], None]):
        self.response = response
        self.skip = skip
        self.count = count  # of every byte received, the skipped too
        self.expected = _content_length(response)
        self.read_bytes = 0
        self.delivered = 0
        self._arrived = ArrivedBytes(response.raw)

    def read(self) -> memoryview | None:
        """The next piece, or None once the body has ended; _Broken if it broke."""
        while True:
            try:
                piece = self._arrived.read(CHUNK)
            except NETWORK_ERRORS as exc:
                raise _Broken(f"{type(exc).__name__}: {exc}") from exc
            if not piece:
                return None
            self.read_bytes += len(piece)
            self.count(len(piece))
            view = memoryview(piece)
            if self.skip:
                dropped = min(self.skip, len(view))
                view, self.skip = view[dropped:], self.skip - dropped
                if not view:
                    continue
            self.delivered += len(view)
            return view

    def complete(self) -> bool:
        """Did it bring all it announced? (Without a length: it ended cleanly.)"""
        return self.expected is None or self.read_bytes >= self.expected

    def close(self) -> None:
        self.response.close()


def _content_length(response: requests.Response) -> int | None:
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def _content_range(response: requests.Response) -> tuple[int, int, int | None] | None:
    """(first, last, total or None) of a 206's Content-Range; None if malformed,
    or if its Content-Length disagrees."""
    match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("Content-Range", "").strip())
    if not match:
        return None
    first, last = int(match[1]), int(match[2])
    total = None if match[3] == "*" else int(match[3])
    length = _content_length(response)
    if last < first or (total is not None and last >= total) or (length is not None and length != last - first + 1):
        return None
    return first, last, total


def _reason_of(exc: BaseException) -> FailureReason:
    """The reason of a failure raised as an exception of the libraries."""
    if isinstance(exc, (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                        ConnectionError, TimeoutError)):
        return FailureReason.CONNECTION
    return FailureReason.LOCAL  # the part file, descriptors, threads: this machine's


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
        self._error: Exception | None = None
        self._poll: select.poll | None = None
        try:
            fd = raw.fileno()
        except (OSError, ValueError, AttributeError):  # no socket to ask: one read1 at a time
            return
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def read(self, limit: int) -> bytes:
        if self._error is not None:  # after the bytes that came before it
            error, self._error = self._error, None
            raise error
        piece = self._raw.read1(limit, decode_content=False)
        if not piece or len(piece) >= limit or self._poll is None:
            return piece
        pieces, size = [piece], len(piece)
        until = time.monotonic() + self.GATHER_FOR
        while size < limit and time.monotonic() < until and self._poll.poll(0):
            try:
                piece = self._raw.read1(limit - size, decode_content=False)
            except Exception as exc:  # noqa: BLE001 - raised on the next call: a resume starts after these bytes
                self._error = exc
                break
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
                 on_finished: Callable[[Fill], None] = lambda fill: None, policy: FetchPolicy = FetchPolicy()):
        self.store = store
        self.max_stored_size = max_stored_size
        self.policy = policy  # for fills started from now on
        self.on_finished = on_finished  # e.g. metrics; runs in the fill's thread
        self._lock = threading.Lock()
        self._running: dict[tuple[str, str], Fill] = {}  # (digest, source) -> fill
        self._failed: dict[tuple[str, str], tuple[float, str]] = {}  # -> (when, why), recent only

    def get(self, digest: str, source: str = "") -> Fill | None:
        with self._lock:
            return self._running.get((digest, source))

    def start_or_join(self, digest: str, opener: Opener, on_verified: Callable[[], None] | None = None,
                      refetch: bool = False, source: str = "",
                      on_stored: Callable[[], None] | None = None) -> tuple[Fill, bool]:
        """The running fill for digest from source, or a new one started with
        opener (on_verified, on_stored and refetch apply only to a new one)."""
        with self._lock:
            fill = self._running.get((digest, source))
            if fill is not None and fill.state is not State.FAILED:
                return fill, False
            fill = Fill(digest, self.store, opener, on_finished=self._forget, on_verified=on_verified,
                        max_stored_size=self.max_stored_size, refetch=refetch, source=source, policy=self.policy,
                        on_stored=on_stored)
            self._running[(digest, source)] = fill
        try:
            fill.start()
        except RuntimeError as exc:  # "can't start new thread": a pids/TasksMax limit
            log.error("fill: could not start a fill for %s: %s", digest, exc)
            fill.failure = FailureReason.LOCAL
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
