"""Unit tests for fills: verification, coalescing state, followers.

The upstream here is a tiny local HTTP server that can misbehave on purpose
(a fake is fine for a unit test; the end-to-end tests use the real registry).
"""

import errno
import hashlib
import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from addon import fill as fill_module
from addon.fill import ArrivedBytes, FailureReason, FetchPolicy, Fill, FillFailed, Fills, State, failure_labels
from addon.store import DiskBlobStore
from addon.upstream import UpstreamClient
from tests.test_store import put
from tests.test_store import read as read_stored

WAIT = 30  # bound on every wait in this file


class Upstream:
    """Serves `body` for any GET, honouring a single Range (206) unless
    `ranges` is off; `mode` picks how it misbehaves, and `cuts`, `holds` and
    `statuses` break chosen requests (see each)."""

    def __init__(self):
        self.body = b""
        self.mode = "good"
        self.ranges = True  # False: answer every GET with the whole body (200)
        self.ranges_served = None  # int: only that many range requests get a 206, later ones a 200
        self.odd_ranges_after = None  # int: from this many range requests on, a wrong Content-Range
        self.cuts: list[int] = []  # the next response covering offset N sends bytes before N, then closes
        self.holds: list[int] = []  # responses covering offset N stop there until `gate` is set
        self.stalls: list[int] = []  # the next response covering offset N stops there until `gate` is set
        self.statuses: list[int] = []  # the next range requests (not the first) get these statuses
        self.gate = threading.Event()  # cleared: bytes past the middle (or the holds) wait for it
        self.gate.set()
        self.stopped = threading.Event()
        self.requests = []
        self.connections = set()
        self._lock = threading.Lock()
        parent = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with parent._lock:
                    parent.requests.append(dict(self.headers))
                    parent.connections.add(self.client_address)
                    ranged = len([r for r in parent.requests if "Range" in r])
                body, mode = parent.body, parent.mode
                if mode == "404":
                    return self._status(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
                if "Range" in self.headers and ranged > 1 and parent.statuses:
                    return self._status(parent.statuses.pop(0), b"{}")
                if mode == "corrupt":
                    middle = len(body) // 2
                    body = body[:middle] + bytes([body[middle] ^ 1]) + body[middle + 1:]
                if mode == "chunked":  # no Content-Length: the size is known only at the end
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(0, len(body), 1 << 16):
                        piece = body[i:i + (1 << 16)]
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.write(b"0\r\n\r\n")
                    return
                start, end = 0, len(body)
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if match and parent.ranges and (parent.ranges_served is None or ranged <= parent.ranges_served):
                    start = int(match[1])
                    end = min(len(body), int(match[2]) + 1) if match[2] else len(body)
                    if start >= len(body):
                        return self._status(416, b"")
                    shown = start
                    if parent.odd_ranges_after is not None and ranged > parent.odd_ranges_after:
                        shown = start + 1
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {shown}-{shown + end - start - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                if mode == "truncate":  # every response: half its bytes, then the connection closes
                    self.wfile.write(body[start: start + (end - start) // 2])
                    return self._cut()
                with parent._lock:
                    cut = next((n for n in parent.cuts if start <= n < end), None)
                    if cut is not None:
                        parent.cuts.remove(cut)
                    hold = next((n for n in parent.holds if start <= n < end), None)
                    stall = next((n for n in parent.stalls if start <= n < end), None)
                    if stall is not None:
                        parent.stalls.remove(stall)
                if stall is not None:
                    self.wfile.write(body[start:stall])
                    self.wfile.flush()
                    parent.stopped.wait(WAIT)  # silent until the test ends
                    return self._cut()
                if cut is not None:
                    self.wfile.write(body[start:cut])
                    return self._cut()
                if hold is not None:
                    self.wfile.write(body[start:hold])
                    self.wfile.flush()
                    parent.gate.wait(WAIT)
                    self.wfile.write(body[hold:end])
                    return
                if mode == "slow":  # a slow line: never silent for long, slow overall
                    step = max(1, (end - start) // 12)
                    for i in range(start, end, step):
                        self.wfile.write(body[i:min(end, i + step)])
                        self.wfile.flush()
                        time.sleep(0.25)
                    return
                half = len(body) // 2 if not parent.holds else len(body)  # holds replace the pause
                if start < half:
                    self.wfile.write(body[start:min(half, end)])
                    self.wfile.flush()
                if end > half:
                    parent.gate.wait(WAIT)
                    self.wfile.write(body[max(half, start):end])

            def _status(self, status, payload):
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _cut(self):
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v2/x/blobs/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def ranges_asked(self) -> list[str]:
        return [r["Range"] for r in self.requests if "Range" in r]

    def stop(self):
        self.gate.set()
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.stop()


@pytest.fixture
def store(tmp_path):
    s = DiskBlobStore(tmp_path / "cache", size_limit=1 << 30)
    yield s
    s.close()


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """Resumes wait milliseconds here, not seconds."""
    monkeypatch.setattr(fill_module, "BACKOFF_FIRST", 0.01)
    monkeypatch.setattr(fill_module, "BACKOFF_MAX", 0.05)


CHUNKED = FetchPolicy(first_request=1 << 20, chunk_size=1 << 20, connections=4)
ONE_CONNECTION = FetchPolicy(connections=1)


def run_fill(store, upstream, body, digest=None, auth=None, on_verified=None, policy=FetchPolicy()):
    upstream.body = body
    digest = digest or "sha256:" + hashlib.sha256(body).hexdigest()
    client = UpstreamClient()
    finished = threading.Event()
    fill = Fill(digest, store, client.blob_source(upstream.url + digest, auth),
                on_finished=lambda f: finished.set(), on_verified=on_verified, policy=policy)
    fill.start()
    return fill, finished


def follow(fill):
    """Read the fill as a follower does; returns bytes or raises FillFailed."""
    cursor = fill.follow()
    if cursor is None:  # the fill is over: as the blob server does, look in the store
        blob = fill.store.open(fill.digest)
        if blob is None:
            raise FillFailed(fill.error or "fill over, nothing stored")
        with blob.file:
            return blob.file.read()
    out, pos = bytearray(), 0
    try:
        while fill.size is None or pos < fill.size:
            limit = cursor.readable_until(pos, WAIT)
            on_disk = cursor.on_disk_until()
            while pos < limit:
                if on_disk is None or pos < on_disk:
                    end = limit if on_disk is None else min(limit, on_disk)
                    out += os.pread(cursor.fd, end - pos, pos)
                else:
                    out += cursor.read_memory(pos, limit - pos)
                pos = len(out)
            cursor.advance(pos)
    finally:
        cursor.close()
    return bytes(out)


def wait_until(fill, condition):
    """Block (bounded) until condition() holds, woken by the fill's own notifications."""
    with fill._cond:
        assert fill._cond.wait_for(condition, WAIT)


def wait_streaming(fill):
    wait_until(fill, lambda: fill.state is not State.CONNECTING)


def test_good_body_is_verified_stored_and_followed(store, upstream):
    body = os.urandom(3_000_000)
    fill, finished = run_fill(store, upstream, body, auth="Bearer t0ken")
    wait_streaming(fill)
    assert follow(fill) == body
    assert finished.wait(WAIT)
    assert fill.state is State.VERIFIED
    blob = store.open(fill.digest)
    with blob.file:
        assert blob.file.read() == body
    assert upstream.requests[0]["Authorization"] == "Bearer t0ken"


def test_followers_get_bytes_before_the_fetch_ends(store, upstream):
    upstream.gate.clear()  # upstream sends half, then stalls until we say so
    body = os.urandom(2_000_000)
    fill, finished = run_fill(store, upstream, body)
    wait_streaming(fill)
    cursor = fill.follow()
    try:
        limit = cursor.readable_until(0, WAIT)
        assert 0 < limit <= len(body) // 2
        assert os.pread(cursor.fd, limit, 0) == body[:limit]
        assert not finished.is_set()
    finally:
        cursor.close()
        upstream.gate.set()
    assert finished.wait(WAIT)
    assert fill.state is State.VERIFIED


@pytest.mark.parametrize("mode", ["corrupt", "truncate"])
def test_bad_body_is_never_stored_nor_completed(store, upstream, mode):
    body = os.urandom(2_000_000)
    upstream.mode = mode
    fill, finished = run_fill(store, upstream, body)
    wait_streaming(fill)
    with pytest.raises(FillFailed):
        got = follow(fill)
        # A follower must never be handed the whole blob.
        assert len(got) < len(body)
    assert finished.wait(WAIT)
    assert fill.state is State.FAILED
    assert store.open(fill.digest) is None
    assert list(store.fills_dir.iterdir()) == []


def test_last_byte_is_withheld_until_verified(store, upstream):
    body = os.urandom(1_000_000)
    upstream.gate.clear()
    fill, finished = run_fill(store, upstream, body)
    wait_streaming(fill)
    # Whatever has arrived, the limit stays below the full size until verified.
    assert fill.readable_until(0, WAIT) <= len(body) - 1
    upstream.gate.set()
    assert finished.wait(WAIT)
    assert fill.readable_until(0, WAIT) == len(body)


def test_the_last_byte_of_a_range_is_withheld_until_verified_too(store, upstream):
    """Range: bytes=0-999 of a blob whose first half has arrived: 999 bytes
    may go out, the 1000th (completing the 206) only once the blob is good."""
    body = os.urandom(1_000_000)
    upstream.gate.clear()  # the upstream sends half, then waits
    fill, finished = run_fill(store, upstream, body)
    wait_until(fill, lambda: fill.written >= len(body) // 2)
    assert fill.readable_until(0, WAIT, end=1000) == 999
    assert fill.readable_until(2000, WAIT, end=5000) == 4999
    upstream.gate.set()
    assert finished.wait(WAIT)
    assert fill.readable_until(0, WAIT, end=1000) == len(body)  # verified: the caller caps at its end


def test_a_range_of_a_corrupt_fill_is_never_complete(store, upstream):
    upstream.mode = "corrupt"  # a flipped byte in the middle: only the digest tells
    body = os.urandom(1_000_000)
    fill, finished = run_fill(store, upstream, body)
    pos = 0
    with pytest.raises(FillFailed):
        while pos < 1000:  # as the blob server sends bytes=0-999
            pos = min(fill.readable_until(pos, WAIT, end=1000), 1000)
    assert pos < 1000  # the 1000th byte never became readable
    assert finished.wait(WAIT) and fill.state is State.FAILED


def test_upstream_refusal_is_kept_for_the_client(store, upstream):
    upstream.mode = "404"
    fill, finished = run_fill(store, upstream, b"x" * 100)
    assert finished.wait(WAIT)
    assert fill.state is State.FAILED
    assert fill.answer.status == 404 and b"BLOB_UNKNOWN" in fill.answer.body
    assert store.open(fill.digest) is None


def test_unreachable_upstream_fails_cleanly(store):
    with socket.socket() as s:  # bound but not listening: refused, and no one else can take it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        _fail_to_connect(store, port)


def _fail_to_connect(store, port):
    client = UpstreamClient()
    finished = threading.Event()
    digest = "sha256:" + "0" * 64
    fill = Fill(digest, store, client.blob_source(f"http://127.0.0.1:{port}/v2/x/blobs/{digest}", None),
                on_finished=lambda f: finished.set())
    fill.start()
    assert finished.wait(WAIT)
    assert fill.state is State.FAILED and fill.answer is None and "Connection" in fill.error


def test_registry_coalesces_and_restarts_after_failure(store, upstream):
    body = os.urandom(500_000)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    upstream.body = body
    upstream.gate.clear()
    fills = Fills(store)
    client = UpstreamClient()
    opener = client.blob_source(upstream.url + digest, None)  # noqa: E731
    first, started = fills.start_or_join(digest, opener)
    second, started_again = fills.start_or_join(digest, opener)
    assert started and not started_again and first is second
    assert fills.in_flight() == 1
    first.state = State.FAILED  # as if it had failed: the next caller starts afresh
    third, started_third = fills.start_or_join(digest, opener)
    assert started_third and third is not first
    # A fill from a registry nobody chose is its own: never joined by, nor joining, the others.
    named, started_named = fills.start_or_join(digest, opener, source="http://named:80")
    assert started_named and named is not third
    assert fills.get(digest) is third and fills.get(digest, "http://named:80") is named
    upstream.gate.set()
    for fill in (first, third, named):  # none outlives the test's store
        wait_until(fill, lambda fill=fill: fill.finished)


def test_a_fill_started_after_the_blob_was_committed_does_not_fetch(store):
    body = os.urandom(100_000)
    digest = put(store, body)
    calls = []
    finished = threading.Event()
    fill = Fill(digest, store, lambda *range_: calls.append(1), on_finished=lambda f: finished.set())
    fill.start()
    assert finished.wait(WAIT)
    assert calls == [] and fill.already_stored and fill.state is State.VERIFIED and fill.size == len(body)


def test_a_fill_from_a_registry_nobody_chose_never_takes_the_stores_copy(store):
    """Its clients follow it (URLs signed for that registry): they must get
    that registry's bytes, not a blob the store got from elsewhere."""
    digest = put(store, os.urandom(100_000))
    calls = []
    finished = threading.Event()

    def opener(*range_):
        calls.append(1)
        raise requests.ConnectionError("the named host is down")

    fill = Fill(digest, store, opener, on_finished=lambda f: finished.set(), source="http://named:80")
    fill.start()
    assert finished.wait(WAIT)
    assert calls == [1] and not fill.already_stored and fill.state is State.FAILED and fill._read_fd is None


def test_disk_full_mid_fill_still_serves_followers_and_stores_nothing(store, upstream, monkeypatch):
    """ENOSPC after 1 MB, and the blobs stored are too few to make room for
    the rest: none is evicted for nothing, and the fill spills to memory."""
    import errno

    from addon import fill as fill_module

    others = [put(store, os.urandom(200_000)) for _ in range(3)]

    real_pwrite = os.pwrite

    def pwrite_until_full(fd, data, offset):
        if offset + len(data) > 1_000_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(fill_module.os, "pwrite", pwrite_until_full)
    monkeypatch.setattr(store, "disk_space_left", lambda: 1_000_000 - (fill.written if fill_box else 0))
    monkeypatch.setattr(fill_module, "WINDOW_LIMIT", 2 << 20)  # much smaller than the blob
    body = os.urandom(9_000_000)
    fill_box = []
    upstream.gate.clear()
    fill, finished = run_fill(store, upstream, body)
    fill_box.append(fill)
    upstream.gate.set()
    wait_streaming(fill)
    assert follow(fill) == body  # every byte, through a window smaller than the blob
    assert finished.wait(WAIT)
    assert fill.state is State.VERIFIED and fill.spill_at is not None and fill.spill_at <= 1_000_000
    assert store.open(fill.digest) is None
    assert list(store.fills_dir.iterdir()) == []
    assert store.evictions == 0 and all(store.size_of(d) == 200_000 for d in others)


def test_disk_full_mid_fill_evicts_the_least_recently_used_blobs_when_that_makes_room(store, upstream, monkeypatch):
    oldest, older, newest = (put(store, os.urandom(1_500_000)) for _ in range(3))
    # The disk is full until blobs are evicted.
    monkeypatch.setattr(store, "disk_space_left", lambda: 0 if store.evictions == 0 else 1 << 40)
    body = os.urandom(3_000_000)
    fill, finished = run_fill(store, upstream, body)
    wait_streaming(fill)
    assert follow(fill) == body
    assert finished.wait(WAIT)
    assert fill.state is State.VERIFIED and fill.spill_at is None
    assert read_stored(store, fill.digest) == body
    assert store.size_of(oldest) is None and store.size_of(older) is None  # 3 MB needed: two go
    assert store.size_of(newest) == 1_500_000


@pytest.mark.parametrize("mode", ["good", "chunked"], ids=["content-length", "chunked"])
def test_a_blob_larger_than_the_store_is_streamed_not_stored_and_late_clients_told(tmp_path, upstream, mode):
    """With a Content-Length the fill knows at once; without one (chunked)
    it spills once the body outgrows the store, instead of committing it
    and evicting everything else."""
    small = DiskBlobStore(tmp_path / "small", size_limit=1 << 20)
    try:
        others = [put(small, os.urandom(200_000)) for _ in range(3)]
        upstream.mode = mode
        body = os.urandom(3_000_000)
        upstream.body = body
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        fills = Fills(small, max_stored_size=small.size_limit)
        client = UpstreamClient()
        fill, _ = fills.start_or_join(digest, client.blob_source(upstream.url + digest, None))
        wait_streaming(fill)
        assert follow(fill) == body
        wait_until(fill, lambda: fill.finished)
        assert small.open(digest) is None
        assert all(small.size_of(d) == 200_000 for d in others) and small.evictions == 0
        assert list(small.fills_dir.iterdir()) == []
        # A client arriving after it is told why, to retry, not "unknown blob".
        assert "the store may hold" in fills.recent_failure(digest)
    finally:
        small.close()


@pytest.mark.parametrize("mode", ["good", "corrupt", "truncate"])
def test_on_verified_runs_before_any_follower_has_the_last_byte_and_only_if_verified(store, upstream, mode):
    """The access gate records its proof there: a client that has the whole
    blob must find it recorded, and bytes that failed verification prove nothing."""
    upstream.mode = mode
    body = os.urandom(300_000)
    seen_at_callback = []
    fill_box = []

    def on_verified():
        fill = fill_box[0]
        seen_at_callback.append((fill.state, fill.readable_until(0, 0) < len(body)))

    upstream.gate.clear()
    fill, finished = run_fill(store, upstream, body, on_verified=on_verified)
    fill_box.append(fill)
    upstream.gate.set()
    assert finished.wait(WAIT)
    if mode == "good":
        assert seen_at_callback == [(State.STREAMING, True)]  # last byte still held back
    else:
        assert seen_at_callback == [] and fill.state is State.FAILED


def test_a_part_file_that_cannot_be_opened_for_reading_is_not_left_behind(store, upstream, monkeypatch):
    """Out of file descriptors right after the part file was made: the fill
    fails cleanly and neither the file nor its descriptor is leaked."""
    import errno
    real_open = os.open

    def no_read_fds(path, flags, *args, **kwargs):
        if str(path).endswith(".part") and flags == os.O_RDONLY:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, flags, *args, **kwargs)

    def open_in_fills():
        fills = str(store.fills_dir)
        links = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        return [link for link in links if link.startswith(fills)]

    monkeypatch.setattr(os, "open", no_read_fds)
    fill, finished = run_fill(store, upstream, os.urandom(100_000))
    assert finished.wait(WAIT)
    monkeypatch.undo()
    assert fill.state is State.FAILED and "Too many open files" in fill.error
    assert list(store.fills_dir.iterdir()) == []
    assert open_in_fills() == []


def test_a_follower_waits_as_long_as_bytes_keep_arriving(store, upstream):
    """The follow timeout bounds silence, not the whole wait: a Range ahead of
    the writer, or one whose last byte is held until the blob verifies, waits
    through a download that takes longer than the timeout (here 3 s of a paced
    upstream against a 2 s timeout; on a real line, 90 s against hours)."""
    upstream.mode = "slow"
    body = os.urandom(1_200_000)
    fill, finished = run_fill(store, upstream, body)
    wait_streaming(fill)
    pos = len(body) - 10
    cursor = fill.follow(pos)
    try:
        while pos < len(body):  # the last byte comes once verified
            pos = cursor.readable_until(pos, 2.0, len(body))
    finally:
        cursor.close()
    assert finished.wait(WAIT) and fill.state is State.VERIFIED


def test_a_fill_whose_thread_cannot_start_fails_and_does_not_block_the_digest(store, upstream, monkeypatch):
    """Out of threads (a pids limit): the request fails now, and the next one
    starts a new fill instead of joining one that will never run."""
    body = os.urandom(100_000)
    upstream.body = body
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    fills = Fills(store)
    client = UpstreamClient()

    def no_threads(self):
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(Fill, "start", no_threads)
        fill, started = fills.start_or_join(digest, client.blob_source(upstream.url + digest, None))
    assert started and fill.state is State.FAILED and fill.finished and fills.in_flight() == 0
    fill, started = fills.start_or_join(digest, client.blob_source(upstream.url + digest, None))
    assert started
    wait_streaming(fill)
    assert follow(fill) == body


class _ShortResponse:
    """A 200 whose body ends, without any transport error, before its
    Content-Length: what a lenient HTTP stack would hand over."""

    status_code = 200

    def __init__(self, body: bytes, claimed: int):
        self.headers = {"Content-Length": str(claimed)}
        self._chunks = [body]
        self.raw = self

    def read1(self, n, decode_content=False):
        return self._chunks.pop(0) if self._chunks else b""

    def close(self):
        pass


def test_a_body_shorter_than_its_content_length_is_never_stored(store):
    """Even when its bytes hash to the digest: the upstream said there was
    more. Each resume ends as short, and once they run out the fill fails."""
    body = os.urandom(50_000)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    finished = threading.Event()
    fill = Fill(digest, store, lambda *range_: _ShortResponse(body, 100_000), on_finished=lambda f: finished.set())
    fill.start()
    assert finished.wait(WAIT)
    assert fill.state is State.FAILED and "cut short" in fill.error
    assert fill.failure is FailureReason.CONNECTION and fill.resumes == fill_module.RESUMES
    assert store.open(digest) is None


def test_a_follower_dropped_while_it_waits_is_told_at_once(tmp_path, upstream, monkeypatch):
    """A Range of a blob that cannot be stored waits for its held last byte;
    when the writer drops it for falling behind, it must hear so then, not
    wait out the whole download first."""
    import addon.fill as fill_module
    monkeypatch.setattr(fill_module, "WINDOW_LIMIT", 256 << 10)
    monkeypatch.setattr(fill_module, "SLOW_FOLLOWER_TIMEOUT", 0.2)
    small = DiskBlobStore(tmp_path / "small", size_limit=1 << 20)
    try:
        body = os.urandom(3_000_000)
        upstream.body = body
        upstream.gate.clear()  # the second half waits: the fill is not over before the drop
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        fills = Fills(small, max_stored_size=small.size_limit)
        client = UpstreamClient()
        fill, _ = fills.start_or_join(digest, client.blob_source(upstream.url + digest, None))
        wait_streaming(fill)
        cursor = fill.follow(0)
        assert cursor.readable_until(0, WAIT, 10) == 9  # bytes 0-8; byte 9 is held until verified
        outcome = []

        def wait_for_the_last_byte():
            try:
                outcome.append(cursor.readable_until(9, WAIT, 10))
            except FillFailed as exc:
                outcome.append(str(exc))

        waiter = threading.Thread(target=wait_for_the_last_byte)
        waiter.start()
        waiter.join(WAIT)
        assert outcome == ["client fell too far behind a fill that could not be stored"]
        assert not fill.finished  # told while the download was still going on
        upstream.gate.set()
        cursor.close()
        wait_until(fill, lambda: fill.finished)
    finally:
        upstream.gate.set()
        small.close()


class _RecordsOverASocket:
    """A response body as read1 sees it over TLS: at most one 16 KB record a
    call. `waiting` says whether the socket (a real one, for poll) holds more."""

    RECORD = 16 << 10

    def __init__(self, body: bytes, waiting: bool, on_read=lambda: None):
        self.body, self.calls, self.on_read = body, 0, on_read
        self.sock, self.peer = socket.socketpair()
        if waiting:
            self.peer.sendall(b"x")

    def fileno(self) -> int:
        return self.sock.fileno()

    def read1(self, limit: int, decode_content: bool = True) -> bytes:
        self.calls += 1
        self.on_read()
        piece, self.body = self.body[:min(limit, self.RECORD)], self.body[min(limit, self.RECORD):]
        return piece

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


def test_a_fast_link_is_read_in_large_pieces_not_one_tls_record_at_a_time():
    raw = _RecordsOverASocket(os.urandom(3 << 20), waiting=True)
    try:
        arrived = ArrivedBytes(raw)
        assert len(arrived.read(1 << 20)) == 1 << 20 and raw.calls == 64
    finally:
        raw.close()


def test_a_slow_link_gets_what_has_arrived_without_waiting_for_more():
    raw = _RecordsOverASocket(os.urandom(1 << 20), waiting=False)
    try:
        assert len(ArrivedBytes(raw).read(1 << 20)) == _RecordsOverASocket.RECORD and raw.calls == 1
    finally:
        raw.close()


def test_a_slow_link_gathers_a_piece_for_a_bounded_time(monkeypatch):
    """poll also says "readable" for the start of a TLS record whose rest is
    still on its way, and read1 then waits for it: on a slow link each read1
    takes a while. Gathering stops after GATHER_FOR, not at 1 MiB."""
    clock = [0.0]
    monkeypatch.setattr("addon.fill.time.monotonic", lambda: clock[0])

    def a_record_takes_4_ms():
        clock[0] += 0.004

    raw = _RecordsOverASocket(os.urandom(1 << 20), waiting=True, on_read=a_record_takes_4_ms)
    try:
        piece = ArrivedBytes(raw).read(1 << 20)
        assert raw.calls == 1 + 3 and len(piece) == 4 * _RecordsOverASocket.RECORD  # 4 ms, 8 ms, 12 ms > 10 ms
    finally:
        raw.close()


# -- chunked fills, fallbacks, resumes ----------------------------------------------


def stored_bytes(store, digest):
    blob = store.open(digest)
    assert blob is not None, "not stored"
    with blob.file:
        return blob.file.read()


def test_a_large_blob_is_fetched_as_ranges_over_several_connections(store, upstream):
    body = os.urandom(9_000_000)  # first 1 MiB, then 8 chunks of 1 MiB (the last one shorter)
    fill, finished = run_fill(store, upstream, body, policy=CHUNKED)
    wait_streaming(fill)
    assert fill.size == len(body)
    assert follow(fill) == body
    assert finished.wait(WAIT) and fill.state is State.VERIFIED
    assert stored_bytes(store, fill.digest) == body
    mib = 1 << 20
    assert sorted(upstream.ranges_asked()) == sorted(
        [f"bytes=0-{mib - 1}"] + [f"bytes={s}-{min(s + mib, len(body)) - 1}" for s in range(mib, len(body), mib)])
    assert fill.connections == 4 and len(upstream.connections) >= 2
    assert fill.fetched == len(body) and fill.resumes == 0  # one copy


def test_a_small_blob_is_one_request_and_one_connection_means_no_range(store, upstream):
    body = os.urandom(500_000)
    fill, finished = run_fill(store, upstream, body, policy=CHUNKED)
    assert finished.wait(WAIT) and fill.state is State.VERIFIED
    assert upstream.ranges_asked() == [f"bytes=0-{(1 << 20) - 1}"] and fill.fetched == len(body)
    upstream.requests.clear()
    body = os.urandom(3_000_000)
    fill, finished = run_fill(store, upstream, body, policy=ONE_CONNECTION)
    assert finished.wait(WAIT) and fill.state is State.VERIFIED
    assert len(upstream.requests) == 1 and upstream.ranges_asked() == []


def test_followers_never_read_past_a_chunk_still_missing(store, upstream, monkeypatch):
    """Chunk 2 of 6 hangs half-way while the others complete: `written` stops
    where the hole starts, and a follower gets exactly the bytes before it."""
    body = os.urandom(6 << 20)
    hole = (2 << 20) + 1000
    upstream.holds = [hole]
    upstream.gate.clear()
    on_disk = [0]
    wrote = threading.Condition()
    real_pwrite = os.pwrite

    def counted_pwrite(fd, data, offset):
        n = real_pwrite(fd, data, offset)
        with wrote:
            on_disk[0] += n
            wrote.notify_all()
        return n

    monkeypatch.setattr(fill_module.os, "pwrite", counted_pwrite)
    fill, finished = run_fill(store, upstream, body, policy=CHUNKED)
    with wrote:  # every byte but the rest of the held chunk is in the part file...
        assert wrote.wait_for(lambda: on_disk[0] == len(body) - ((3 << 20) - hole), WAIT)
    wait_until(fill, lambda: fill.written == hole)
    assert fill.readable_until(0, WAIT) == hole  # ...yet nothing past the hole is readable
    cursor = fill.follow()
    try:
        assert os.pread(cursor.fd, hole, 0) == body[:hole]
    finally:
        cursor.close()
    assert not finished.is_set()
    upstream.gate.set()
    assert follow(fill) == body
    assert finished.wait(WAIT) and stored_bytes(store, fill.digest) == body


@pytest.mark.parametrize("refusal", ["ignored", "odd"])
def test_an_upstream_that_stops_serving_ranges_gets_one_connection_for_the_rest(store, upstream, refusal):
    """The first Range is answered, the chunks' are not (a 200, or a range not
    asked for): the fill goes on over one connection from where it is (from
    the whole body, what it has skipped, if the upstream ignores ranges)."""
    body = os.urandom(5_000_000)
    if refusal == "ignored":
        upstream.ranges_served = 1
    else:
        upstream.odd_ranges_after = 1
    fill, finished = run_fill(store, upstream, body, policy=CHUNKED)
    wait_streaming(fill)
    assert follow(fill) == body
    assert finished.wait(WAIT) and fill.state is State.VERIFIED and fill.connections == 1
    assert stored_bytes(store, fill.digest) == body


def test_an_upstream_that_never_serves_ranges_gets_one_connection(store, upstream):
    upstream.ranges = False
    body = os.urandom(5_000_000)
    fill, finished = run_fill(store, upstream, body, policy=CHUNKED)
    assert finished.wait(WAIT) and fill.state is State.VERIFIED
    assert len(upstream.requests) == 1 and fill.fetched == len(body) and fill.connections == 1
    assert stored_bytes(store, fill.digest) == body


@pytest.mark.parametrize("policy", [ONE_CONNECTION, CHUNKED], ids=["one-connection", "chunked"])
@pytest.mark.parametrize("where", ["start", "middle", "last-byte"])
def test_a_cut_transfer_resumes_where_it_broke_and_fetches_one_copy(store, upstream, policy, where):
    body = os.urandom(5_000_000)
    cut = {"start": 0, "middle": 2_500_000, "last-byte": len(body) - 1}[where]
    upstream.cuts = [cut]
    fill, finished = run_fill(store, upstream, body, policy=policy)
    wait_streaming(fill)
    assert follow(fill) == body  # the follower saw nothing of it
    assert finished.wait(WAIT) and fill.state is State.VERIFIED
    assert stored_bytes(store, fill.digest) == body
    assert fill.resumes == 1 and fill.fetched == len(body)
    resumed = [r for r in upstream.ranges_asked() if r.startswith(f"bytes={cut}-")]
    assert resumed, upstream.ranges_asked()


def test_a_stalled_transfer_resumes_after_the_read_timeout(store, upstream, monkeypatch):
    monkeypatch.setattr("addon.upstream.READ_TIMEOUT", 0.5)
    body = os.urandom(3_000_000)
    upstream.stalls = [1_000_000]  # the first response goes silent there, for good
    fill, finished = run_fill(store, upstream, body, policy=ONE_CONNECTION)
    assert finished.wait(WAIT) and fill.state is State.VERIFIED, fill.error
    assert fill.resumes == 1 and stored_bytes(store, fill.digest) == body and fill.fetched == len(body)


@pytest.mark.parametrize("status", [503, 429])
def test_a_chunk_answered_with_a_transient_error_is_asked_again(store, upstream, status):
    body = os.urandom(4_000_000)
    upstream.statuses = [status, status]
    fill, finished = run_fill(store, upstream, body, policy=CHUNKED)
    assert finished.wait(WAIT) and fill.state is State.VERIFIED, fill.error
    assert fill.resumes == 2 and stored_bytes(store, fill.digest) == body


def test_a_range_refused_mid_fill_fails_it_at_once(store, upstream):
    body = os.urandom(4_000_000)
    upstream.statuses = [404] * 10
    fill, finished = run_fill(store, upstream, body, policy=CHUNKED)
    assert finished.wait(WAIT) and fill.state is State.FAILED
    assert fill.failure is FailureReason.ANSWERED and fill.failure_status == 404 and fill.resumes == 0
    assert failure_labels(fill.failure, fill.failure_status) == ("upstream 404", None)
    assert store.open(fill.digest) is None and list(store.fills_dir.iterdir()) == []


def test_resumes_run_out_against_an_upstream_that_keeps_failing(store, upstream):
    body = os.urandom(4_000_000)
    upstream.statuses = [503] * 100
    fill, finished = run_fill(store, upstream, body, policy=CHUNKED)
    assert finished.wait(WAIT) and fill.state is State.FAILED
    assert fill.failure is FailureReason.UNAVAILABLE and fill.failure_status == 503
    assert failure_labels(fill.failure, fill.failure_status) == ("upstream 503", "503")


def test_a_corrupt_chunk_fails_the_fill_and_is_never_stored(store, upstream):
    upstream.mode = "corrupt"  # the blob's middle byte flipped, in whichever chunk holds it
    body = os.urandom(6_000_000)
    fill, finished = run_fill(store, upstream, body, policy=CHUNKED)
    wait_streaming(fill)
    with pytest.raises(FillFailed):
        follow(fill)
    assert finished.wait(WAIT) and fill.state is State.FAILED
    assert fill.failure is FailureReason.VERIFICATION and fill.error.startswith("digest mismatch")
    assert failure_labels(fill.failure, fill.failure_status) == ("verification", None)
    assert store.open(fill.digest) is None and list(store.fills_dir.iterdir()) == []


def test_many_range_followers_of_a_chunked_fill_get_their_bytes(store, upstream):
    """As containerd 2.1 reads a blob in chunks: several `bytes=N-` readers at
    once, most far ahead of the fill, each stopping after its part."""
    body = os.urandom(8 << 20)
    upstream.gate.clear()  # the second half waits: readers start while the fill runs
    fill, finished = run_fill(store, upstream, body, policy=CHUNKED)
    wait_streaming(fill)
    part = 1 << 20
    results, errors = {}, []

    def read_part(start):
        cursor = fill.follow(start)
        try:
            pos, out = start, bytearray()
            while pos < start + part:
                limit = min(cursor.readable_until(pos, WAIT, len(body)), start + part)
                out += os.pread(cursor.fd, limit - pos, pos)
                pos = limit
                cursor.advance(pos)
            results[start] = bytes(out)
        except Exception as exc:  # noqa: BLE001 - the test judges
            errors.append(exc)
        finally:
            cursor.close()

    readers = [threading.Thread(target=read_part, args=(s,)) for s in range(0, len(body), part)]
    for t in readers:
        t.start()
    upstream.gate.set()
    for t in readers:
        t.join(WAIT)
    assert not errors and all(results[s] == body[s:s + part] for s in range(0, len(body), part))
    assert finished.wait(WAIT) and fill.fetched == len(body)


def test_disk_full_mid_chunked_fill_goes_on_from_memory_over_one_connection(store, upstream, monkeypatch):
    monkeypatch.setattr(store, "disk_space_left", lambda: 0 if fill_box and fill_box[0].written >= 2 << 20 else 1 << 40)
    monkeypatch.setattr(store, "make_room", lambda needed, certain=True: 0)
    body = os.urandom(6 << 20)
    fill_box = []
    upstream.gate.clear()
    fill, finished = run_fill(store, upstream, body, policy=CHUNKED)
    fill_box.append(fill)
    upstream.gate.set()
    wait_streaming(fill)
    assert follow(fill) == body
    assert finished.wait(WAIT) and fill.state is State.VERIFIED and fill.spill_at is not None
    assert store.open(fill.digest) is None and list(store.fills_dir.iterdir()) == []


@pytest.mark.parametrize("policy", [ONE_CONNECTION, CHUNKED], ids=["one-connection", "chunked"])
@pytest.mark.parametrize("error", [errno.EIO, errno.EACCES])
def test_a_failing_disk_is_a_local_failure_not_the_upstreams(store, upstream, monkeypatch, policy, error):
    real_pwrite = os.pwrite

    def failing_pwrite(fd, data, offset):
        if offset >= 1 << 20:
            raise OSError(error, os.strerror(error))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(fill_module.os, "pwrite", failing_pwrite)
    fill, finished = run_fill(store, upstream, os.urandom(3 << 20), policy=policy)
    assert finished.wait(WAIT) and fill.state is State.FAILED
    assert fill.failure is FailureReason.LOCAL and fill.resumes == 0
    assert failure_labels(fill.failure, fill.failure_status) == ("local", None)
    assert list(store.fills_dir.iterdir()) == []


def test_a_part_file_that_cannot_be_made_is_a_local_failure(store, upstream, monkeypatch):
    def no_part(digest):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(store, "new_part", no_part)
    fill, finished = run_fill(store, upstream, os.urandom(100_000))
    assert finished.wait(WAIT) and fill.failure is FailureReason.LOCAL


def test_a_fill_is_a_plain_object_with_a_short_repr(store):
    one = Fill("sha256:" + "a" * 64, store, lambda *range_: None)
    other = Fill("sha256:" + "a" * 64, store, lambda *range_: None)
    assert one != other and one == one and len({one, other}) == 2
    assert repr(one) == "<Fill sha256:aaaaaaaaaaaa connecting 0/?>"
