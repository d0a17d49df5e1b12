"""The blob server: sends blob bytes with sendfile, off mitmproxy's thread.

mitmproxy relays about 0.5 GB/s in total on its one Python thread, so blob
bytes do not go through it when they do not have to. The mirror answers a blob
GET with a 307 to this server (plain-HTTP clients) or rewrites the request to
it and lets mitmproxy stream the answer (TLS clients). Either way this server
sends the bytes: from the store for a hit, or from a fill's part file, behind
the writer, for a miss in progress.

URLs are signed (HMAC over digest and expiry, secret per process) and expire,
so nobody reads the store here without first passing through the mirror.
With a cluster secret (cluster_secret.py) they are signed with that, and name
the node that made them: any node's blob server honours them (a load
balancer may send the client to another node than the one it asked), and
fills from that node or the object store when it has no copy (peers.py).
The same server answers other nodes' signed requests, /cluster/blobs/<digest>.

A blob the mirror decided to serve is pinned for a minute: its open file is
kept, so that if the store evicts it before the client arrives (a fill
making room, `cachectl purge`), the client still gets it instead of a
404 BLOB_UNKNOWN, which clients take as fatal.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from collections.abc import Callable
from urllib.parse import parse_qs, quote, urlsplit

from .cluster_secret import SIGNATURE_RE
from .fill import Cursor, FillFailed, Fills
from .metrics import Metrics
from .oci import error_body
from .peers import CLUSTER_PATH, RELAYED_HEADER, PeerRefusal
from .routes import SHA256_RE
from .store import BlobStore, StoredBlob

log = logging.getLogger(__name__)

URL_TTL = 300.0  # seconds a signed URL may be used to START a download
EXPIRES_RE = re.compile(r"[0-9]{1,12}")  # what signed_path writes: a Unix time
SEND_TIMEOUT = 60.0  # a client that accepts nothing for this long is dropped
FOLLOW_TIMEOUT = 90.0  # > the fill's own upstream read timeout
PIN_FOR = 60.0  # seconds a blob the mirror chose to serve stays readable here, evicted or not
MAX_PINS = 1024  # open files held for pins at most (the oldest are let go first)
_RANGE_RE = re.compile(r"bytes=(\d{0,19})-(\d{0,19})")  # longer numbers: ignored, as malformed


class BlobServer:
    def __init__(self, store: BlobStore, fills: Fills, host: str = "127.0.0.1", port: int = 0,
                 metrics: Metrics | None = None, proven: Callable[[str, str], bool] | None = None):
        self.metrics = metrics
        self.serve_from(store, fills, proven)
        self._secret = secrets.token_bytes(32)
        self.cluster_secret = None  # cluster_secret.ClusterSecret: signs URLs instead of _secret
        self._node_of: Callable[[], str] = lambda: ""  # this node's member id, named in the URLs it signs
        self.peers = None  # peers.PeerEndpoint: other nodes' requests, URLs they signed
        self.sending = 0  # requests being answered now (a drain waits for them)
        self._pins: dict[str, tuple[StoredBlob, float]] = {}  # digest -> (open blob, until)
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"server_ctx": self})
        self._httpd = _Server((host, port), handler)
        self.host, self.port = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="blob-server", daemon=True)  # stop() waits up to one interval

    def serve_from(self, store: BlobStore, fills: Fills, proven: Callable[[str, str], bool] | None = None) -> None:
        """The store and fills to serve (another cache_dir: set at run time).
        `proven(registry, digest)`: has that registry served the blob to the
        mirror itself? Asked for URLs made for a registry nobody chose (see access.py)."""
        self.store, self.fills, self.proven = store, fills, proven

    def serve_cluster(self, secret, endpoint, node_of: Callable[[], str] = lambda: "") -> None:
        """Sign URLs with the cluster secret (None: this process's own), and
        answer other nodes with endpoint (peers.PeerEndpoint, or None).
        node_of(): this node's member id as known now ("" while it is not
        among the members yet: a pod joins a headless service's DNS answer
        only once it is ready, after it started)."""
        self.cluster_secret, self.peers, self._node_of = secret, endpoint, node_of

    @property
    def node(self) -> str:
        return self._node_of()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._lock:
            pins, self._pins = self._pins, {}
        for blob, _ in pins.values():
            blob.close()

    def pin(self, digest: str, blob: StoredBlob) -> None:
        """Keep blob (an open, committed file; now owned here) readable for
        PIN_FOR seconds, even if the store evicts it meanwhile."""
        now = time.monotonic()
        with self._lock:
            old = self._pins.pop(digest, None)
            self._pins[digest] = (blob, now + PIN_FOR)
            released = [self._pins.pop(d)[0] for d, (_, until) in list(self._pins.items()) if until <= now]
            while len(self._pins) > MAX_PINS:  # oldest first: a pin again moves to the end
                released.append(self._pins.pop(next(iter(self._pins)))[0])
        for stale in ([old[0]] if old else []) + released:
            stale.close()

    def pinned(self, digest: str) -> StoredBlob | None:
        """A fresh handle on a pinned blob, or None."""
        with self._lock:
            pin = self._pins.get(digest)
            if pin is None or pin[1] <= time.monotonic():
                return None
            return StoredBlob(os.fdopen(os.dup(pin[0].file.fileno()), "rb"), pin[0].size)

    def signed_path(self, digest: str, ttl: float = URL_TTL, registry: str = "") -> str:
        """A URL for this digest. With `registry` (a registry nobody chose), the
        store answers it only once that registry has served the blob itself;
        before that, only a fill from there can. Signed with the cluster
        secret, it names this node (`node`)."""
        expires = int(time.time() + ttl)
        named = f"&registry={quote(registry, safe='')}" if registry else ""
        node = self.node if self.cluster_secret is not None and not registry else ""
        noded = f"&node={quote(node, safe='')}" if node else ""
        return f"/blobs/{digest}?expires={expires}{named}{noded}&sig={self._sign(digest, expires, registry, node)}"

    def _message(self, digest: str, expires: int, registry: str, node: str) -> bytes:
        return f"{digest}\n{expires}\n{registry}{chr(10) + node if node else ''}".encode()

    def _sign(self, digest: str, expires: int, registry: str, node: str = "") -> str:
        message = self._message(digest, expires, registry, node)
        if self.cluster_secret is not None:
            return self.cluster_secret.sign(b"url\n" + message)
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def check_signature(self, digest: str, expires: str, sig: str, registry: str = "", node: str = "") -> bool:
        if not (EXPIRES_RE.fullmatch(expires) and SIGNATURE_RE.fullmatch(sig)) or int(expires) < time.time():
            return False
        message = self._message(digest, int(expires), registry, node)
        if self.cluster_secret is not None:
            return self.cluster_secret.verify(b"url\n" + message, sig)
        return hmac.compare_digest(hmac.new(self._secret, message, hashlib.sha256).hexdigest(), sig)

    def count_sent(self, n: int, source: str) -> None:
        if self.metrics is not None:
            self.metrics.count("blob_bytes_served_total", n, source)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address, handler):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate writes: with Nagle's algorithm a
    # small blob (an image config) on a reused connection waited for the
    # client's delayed ACK, 43 ms each time (measured here).
    disable_nagle_algorithm = True
    timeout = SEND_TIMEOUT  # also closes idle keep-alive connections
    server_ctx: BlobServer

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        log.debug("blob server: " + format, *args)

    def do_HEAD(self):
        self._counted(head=True)

    def do_GET(self):
        self._counted(head=False)

    def _counted(self, head: bool) -> None:
        ctx = self.server_ctx
        with ctx._lock:
            ctx.sending += 1
        try:
            self._serve(head)
        finally:
            with ctx._lock:
                ctx.sending -= 1

    def _serve(self, head: bool) -> None:
        url = urlsplit(self.path)
        if url.path.startswith(CLUSTER_PATH):
            return self._serve_node(url, head)
        digest = url.path.removeprefix("/blobs/")
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if not (url.path.startswith("/blobs/") and SHA256_RE.fullmatch(digest)):
            return self._error(404, "BLOB_UNKNOWN", "no such blob")
        registry, node = query.get("registry", ""), query.get("node", "")
        if not self.server_ctx.check_signature(digest, query.get("expires", ""), query.get("sig", ""), registry,
                                               node):
            return self._error(403, "DENIED", "missing, invalid or expired signature")
        source = self._open_source(digest, registry)
        peers = self.server_ctx.peers
        if source is None and not registry and peers is not None and node != self.server_ctx.node:
            # Another node decided this client may have it: from there, or the object store.
            fill = peers.fill_for_url(digest, node)
            source = self._open_source(digest, registry) if fill is not None else None
        if source is None:
            failure = self.server_ctx.fills.recent_failure(digest, registry)
            if failure is not None:  # the fill this URL was for failed before the client came
                return self._error(502, "UNAVAILABLE", f"fetching the blob upstream failed: {failure}")
            return self._error(404, "BLOB_UNKNOWN", "blob not in the store")
        try:
            self._send(digest, source, head)
        finally:
            source.close()

    def _serve_node(self, url, head: bool) -> None:
        """Another node's request (peers.py): from the store, the fill running
        here, or a fill started for it."""
        peers = self.server_ctx.peers
        if peers is None or not peers.verify(self.command, self.path, self.headers):
            return self._error(403, "DENIED", "not a signed request of a mirror node")
        digest = url.path.removeprefix(CLUSTER_PATH)
        if not SHA256_RE.fullmatch(digest):
            return self._error(404, "BLOB_UNKNOWN", "no such blob")
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        source = self._open_stored(digest)
        for _attempt in range(2):
            if source is not None:
                break
            found = peers.fill_for(digest, query.get("registry", ""), query.get("repo", ""),
                                   self.headers.get("Authorization"))
            if isinstance(found, PeerRefusal):
                return self._refuse(found, head)
            cursor = found.follow()
            # None: the fill ended meanwhile, and its blob is in the store (or went).
            source = _FillSource(cursor) if cursor is not None else self._open_stored(digest)
        if source is None:
            return self._error(404, "BLOB_UNKNOWN", "blob not in the store")
        try:
            self._send(digest, source, head)
        finally:
            source.close()

    def _refuse(self, refusal: PeerRefusal, head: bool) -> None:
        if not refusal.relayed:
            return self._error(refusal.status, "UNAVAILABLE" if refusal.status >= 500 else "DENIED", refusal.message)
        body = refusal.body if refusal.headers else error_body("UNAVAILABLE", refusal.message)
        self.send_response(refusal.status)
        for name, value in refusal.headers:
            name, value = name.decode("latin-1"), value.decode("latin-1")
            if name.lower() not in ("content-length", "connection", "transfer-encoding", RELAYED_HEADER.lower()):
                self.send_header(name, value)
        if not refusal.headers:
            self.send_header("Content-Type", "application/json")
        self.send_header(RELAYED_HEADER, refusal.relayed)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _open_stored(self, digest: str) -> "_StoredSource | None":
        blob = self.server_ctx.store.open(digest) or self.server_ctx.pinned(digest)
        return _StoredSource(blob) if blob is not None else None

    def _open_source(self, digest: str, registry: str) -> "_StoredSource | _FillSource | None":
        """A fill in progress (followed behind its writer), else the store."""
        fill = self.server_ctx.fills.get(digest, registry)
        cursor = fill.follow() if fill else None
        if cursor is not None:
            return _FillSource(cursor)
        proven = self.server_ctx.proven
        if registry and not (proven is not None and proven(registry, digest)):
            return None  # its fill failed (or is over unverified): our copy is not its to read
        blob = self.server_ctx.store.open(digest) or self.server_ctx.pinned(digest)
        return _StoredSource(blob) if blob is not None else None

    def _send(self, digest: str, source, head: bool) -> None:
        size = source.size
        start, end = 0, size
        status = 200
        if size is not None and "Range" in self.headers:
            parsed = _parse_range(self.headers["Range"], size)
            if parsed == "unsatisfiable":
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if parsed is not None:
                start, end = parsed
                status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Docker-Content-Digest", digest)
        self.send_header("Etag", f'"{digest}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Registry-Cache", source.cache_state())
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        if end is not None:
            self.send_header("Content-Length", str(end - start))
        else:  # a fill whose upstream gave no length: chunked, ended only once verified
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        if head:
            return
        try:
            self._send_body(source, start, end)
        except FillFailed as exc:
            # Headers are out: the only honest signal left is an incomplete body.
            log.warning("blob server: aborting %s to %s: %s", digest, self.client_address[0], exc)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as exc:
            log.debug("blob server: client %s went away: %s", self.client_address[0], exc)
            self.close_connection = True

    def _send_body(self, source, start: int, end: int | None) -> None:
        chunked = end is None
        pos = start
        source.seek(start)
        while end is None or pos < end:
            limit = source.readable_until(pos, FOLLOW_TIMEOUT, end)
            if end is not None:
                limit = min(limit, end)
            elif limit == pos:  # verified and fully sent
                break
            if chunked:
                self.wfile.write(b"%x\r\n" % (limit - pos))
                self.wfile.flush()
            # Counted before sending, so the figures are complete by the time
            # the client has its last byte.
            self.server_ctx.count_sent(limit - pos, source.name)
            source.send(self.connection, pos, limit)
            if chunked:
                self.wfile.write(b"\r\n")
            pos = limit
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def _error(self, status: int, code: str, message: str) -> None:
        body = error_body(code, message)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _StoredSource:
    """A committed blob: all of it is readable at once."""

    name = "store"

    def __init__(self, blob: StoredBlob):
        self.blob = blob
        self.size = blob.size

    def cache_state(self) -> str:
        return "hit"

    def seek(self, pos: int) -> None:
        pass

    def readable_until(self, pos: int, timeout: float, end: int | None) -> int:
        return self.size

    def send(self, sock: socket.socket, pos: int, limit: int) -> None:
        _sendfile(sock, self.blob.file.fileno(), pos, limit - pos)

    def close(self) -> None:
        self.blob.close()


class _FillSource:
    """A fill in progress, read behind its writer (from memory past a spill)."""

    name = "fill"

    def __init__(self, cursor: Cursor):
        self.cursor = cursor
        self.size = cursor.fill.size

    def cache_state(self) -> str:
        """X-Registry-Cache: "miss, not stored" once the fill has spilled (a
        blob larger than the store's limit spills before its first byte, so
        its clients know at once): a client warming the store
        (scripts/prefetch.py) need not wait for a commit that will not come."""
        fill = self.cursor.fill
        if fill.already_stored:
            return "hit"
        return "miss, not stored" if fill.spill_at is not None else "miss"

    def seek(self, pos: int) -> None:
        self.cursor.advance(pos)

    def readable_until(self, pos: int, timeout: float, end: int | None) -> int:
        return self.cursor.readable_until(pos, timeout, end)

    def send(self, sock: socket.socket, pos: int, limit: int) -> None:
        on_disk = self.cursor.on_disk_until()
        if on_disk is None or pos < on_disk:
            end = limit if on_disk is None else min(limit, on_disk)
            _sendfile(sock, self.cursor.fd, pos, end - pos)
            pos = end
        while pos < limit:
            data = self.cursor.read_memory(pos, limit - pos)
            sock.sendall(data)
            pos += len(data)
        self.cursor.advance(limit)

    def close(self) -> None:
        self.cursor.close()


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """(start, end-exclusive) for a single byte range; None to ignore it."""
    match = _RANGE_RE.fullmatch(header.strip())
    if not match or match.group(1) == match.group(2) == "":
        return None  # multi-range or malformed: RFC 9110 lets us send it all
    first, last = match.groups()
    if first == "":  # suffix: the last N bytes
        count = int(last)
        if count == 0:
            return "unsatisfiable"
        return max(0, size - count), size
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or end <= start:
        return "unsatisfiable"
    return start, end


def _sendfile(sock: socket.socket, fd: int, offset: int, count: int) -> None:
    """os.sendfile with explicit offsets (never moves the file position)."""
    out = sock.fileno()
    poller = select.poll()
    poller.register(out, select.POLLOUT)
    while count > 0:
        try:
            sent = os.sendfile(out, fd, offset, count)
        except BlockingIOError:
            if not poller.poll(SEND_TIMEOUT * 1000):
                raise TimeoutError("client accepted nothing")
            continue
        if sent == 0:
            raise FillFailed("file shorter than expected")
        offset += sent
        count -= sent
