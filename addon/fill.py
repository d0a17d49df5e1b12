"""Filling the store from the upstream: one fetch per blob, shared by every client.

A `Fill` runs in its own thread, independent of the client that caused it: if
that client goes away the fetch still completes and lands in the store. It
writes the upstream body into a part file while hashing it; clients that want
the blob meanwhile ("followers") read the part file behind the writer, so they
all start receiving bytes while the fetch is running.

The blob's LAST byte is withheld from followers until the whole body has been
verified (sha256 and length), so a corrupt or truncated upstream body never
reaches a client as a complete response, and never enters the store.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests

from .store import BlobStore, PartFile

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_ERROR_BODY = 64 * 1024


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
    headers: list[tuple[str, str]]
    body: bytes

    @classmethod
    def from_response(cls, response: requests.Response) -> "UpstreamAnswer":
        body = response.raw.read(MAX_ERROR_BODY, decode_content=True) or b""
        keep = [
            (k, v)
            for k, v in response.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")
        ]
        return cls(response.status_code, keep, body)


Opener = Callable[[], requests.Response]


@dataclass
class Fill:
    digest: str
    store: BlobStore
    opener: Opener  # performs the upstream GET (redirects followed)
    on_finished: Callable[["Fill"], None] = lambda fill: None

    state: State = State.CONNECTING
    size: int | None = None  # from the upstream's Content-Length
    written: int = 0
    answer: UpstreamAnswer | None = None  # set when the upstream refused
    error: str = ""
    upstream_bytes: int = 0
    finished: bool = False  # the fill thread is done (stored, or failed)
    already_stored: bool = False  # committed by an earlier fill meanwhile: no fetch
    started_at: float = field(default_factory=time.monotonic)
    _read_fd: int | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _waiters: list = field(default_factory=list)

    # -- the fetch (runs in the fill's own thread) --------------------------

    def start(self) -> None:
        threading.Thread(target=self._run, name=f"fill-{self.digest[7:19]}", daemon=True).start()

    def _run(self) -> None:
        part: PartFile | None = None
        committed = False
        try:
            if self._found_in_store():
                return
            with self.opener() as response:
                if response.status_code != 200:
                    self.answer = UpstreamAnswer.from_response(response)
                    self._finish(State.FAILED, f"upstream answered {response.status_code}")
                    return
                part = self.store.new_part(self.digest)
                self._begin_streaming(response, part)
                hasher = hashlib.sha256()
                self._copy(response, part, hasher)
            self._verify(hasher)
            self._set_state(State.VERIFIED)
            self.store.commit(self.digest, part, self.written)
            committed = True
            log.info("fill: stored %s (%d bytes) in %.2fs", self.digest, self.written, time.monotonic() - self.started_at)
        except Exception as exc:  # noqa: BLE001 - every failure ends the fill cleanly
            reason = exc.args[0] if isinstance(exc, FillFailed) else f"{type(exc).__name__}: {exc}"
            if self.state is State.VERIFIED:
                # Followers already have good bytes; only the store missed out.
                log.error("fill: verified %s but could not store it: %s", self.digest, reason)
            else:
                log.warning("fill: %s failed: %s", self.digest, reason)
                self._finish(State.FAILED, reason)
        finally:
            if part is not None:
                if not committed:
                    self.store.discard_part(part)
                os.close(part.fd)
            self.on_finished(self)
            self._close_read_fd()
            with self._cond:
                self.finished = True
            self._notify()

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

    def _begin_streaming(self, response: requests.Response, part: PartFile) -> None:
        length = response.headers.get("Content-Length")
        with self._cond:
            self.size = int(length) if length and length.isdigit() else None
            self._read_fd = os.open(part.path, os.O_RDONLY)
        self._set_state(State.STREAMING)

    def _copy(self, response: requests.Response, part: PartFile, hasher) -> None:
        while True:
            # read1: whatever has arrived (up to CHUNK), so followers on a slow
            # link see bytes as they come rather than a megabyte at a time.
            chunk = response.raw.read1(CHUNK, decode_content=False)
            if not chunk:
                return
            hasher.update(chunk)
            view = memoryview(chunk)
            while view:
                # pwrite: followers share the file, never the write offset.
                done = os.pwrite(part.fd, view, self.written)
                view = view[done:]
                with self._cond:
                    self.written += done
                    self.upstream_bytes += done
                    self._cond.notify_all()
            if self.size is not None and self.written > self.size:
                raise FillFailed(f"upstream sent more than its Content-Length {self.size}")

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

    def _close_read_fd(self) -> None:
        with self._cond:
            fd, self._read_fd = self._read_fd, None
        if fd is not None:
            os.close(fd)

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

    def open_reader(self) -> int | None:
        """A private fd on the part file, or None once the fill is over.

        Followers read with explicit offsets (sendfile/pread), never moving the
        shared file position. The caller closes the fd.
        """
        with self._cond:
            if self._read_fd is None:
                return None
            return os.dup(self._read_fd)

    def readable_until(self, offset: int, timeout: float) -> int:
        """Block until bytes past `offset` may be sent; return the limit.

        The last byte of the blob becomes readable only once it is verified.
        Raises FillFailed if the fill failed or nothing arrived within timeout.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self.state is State.FAILED:
                    raise FillFailed(self.error)
                if self.state is State.VERIFIED:
                    return self.written
                limit = self.written
                if self.size is not None:
                    limit = min(limit, self.size - 1)
                if limit > offset:
                    return limit
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FillFailed(f"no data from the upstream for {timeout:.0f}s")
                self._cond.wait(remaining)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Fills:
    """The fills in flight, by digest: the coalescing point."""

    def __init__(self, store: BlobStore):
        self.store = store
        self._lock = threading.Lock()
        self._by_digest: dict[str, Fill] = {}

    def get(self, digest: str) -> Fill | None:
        with self._lock:
            return self._by_digest.get(digest)

    def start_or_join(self, digest: str, opener: Opener) -> tuple[Fill, bool]:
        """The running fill for digest, or a new one started with opener."""
        with self._lock:
            fill = self._by_digest.get(digest)
            if fill is not None and fill.state is not State.FAILED:
                return fill, False
            fill = Fill(digest, self.store, opener, on_finished=self._forget)
            self._by_digest[digest] = fill
        fill.start()
        return fill, True

    def _forget(self, fill: Fill) -> None:
        with self._lock:
            if self._by_digest.get(fill.digest) is fill:
                del self._by_digest[fill.digest]

    def in_flight(self) -> int:
        with self._lock:
            return len(self._by_digest)
