"""A small threaded loopback HTTP server base shared by the harness servers.

Why not plain ThreadingHTTPServer: tests need to (a) stop a server and be sure
its keep-alive connections die with it, (b) make a server "go away" without
giving its port up (re-binding a port later can race with the kernel handing
it out as an ephemeral port), and (c) optionally speak TLS, with the handshake
done in the connection's own thread rather than in the accept loop.
"""

from __future__ import annotations

import socket
import ssl
import struct
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Errors a client that hangs up mid-response causes; they are normal in tests
# that inject faults or abort transfers, so they are not recorded as errors.
_EXPECTED_ERRORS = (
    ConnectionError,
    TimeoutError,
    ssl.SSLError,
    ssl.SSLEOFError,
)


def reset_socket(sock: socket.socket) -> None:
    """Close ``sock`` with an RST (SO_LINGER 0): the peer sees the connection reset."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class LoopbackHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer on 127.0.0.1:<random port> that tracks its connections.

    `host`: another address to listen on, for a test that made one for its
    own network namespace (a veth pair); never a shared interface's."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, handler_class, *, ssl_context: ssl.SSLContext | None = None, name: str = "http",
                 host: str = "127.0.0.1"):
        super().__init__((host, 0), handler_class)
        self.name = name
        self.ssl_context = ssl_context
        self.down = False
        self.errors: list[str] = []
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._listening = True
        self._down_how = "refuse"
        self._held: list[socket.socket] = []

    # -- addresses ---------------------------------------------------------
    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def host_port(self) -> str:
        return f"{self.server_address[0]}:{self.port}"

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host_port}"

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "LoopbackHTTPServer":
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, name=f"{self.name}-accept", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close the port and cut every open connection."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self.shutdown()  # returns once serve_forever has left its loop (<= poll_interval)
        self.server_close()
        self.abort_connections()
        self._release_held()
        if thread is not None:
            thread.join(timeout)

    def set_down(self, down: bool, how: str = "refuse") -> None:
        """While down, live connections are cut and new ones fail.

        how="refuse": the port stops listening (clients see "connection
        refused"), and listens again, on the same port, when back up.
        how="reset": the port keeps listening but resets every accepted
        connection (a dying load balancer does this). Note: mitmproxy 12.3.1
        sometimes never answers a request that meets such a reset right after
        its keep-alive upstream connection was closed, so tests that need a
        prompt error use "refuse".
        how="hang": the port keeps listening, and accepted connections are
        held, never answered, until the server is back up (a hung front end).
        """
        if how not in ("refuse", "reset", "hang"):
            raise ValueError(f"unknown way to go down: {how!r}")
        with self._lock:
            was_down, self.down = self.down, down
            if down:
                self._down_how = how
        if down and not was_down:
            if how == "refuse":
                self._stop_listening()
            self.abort_connections()
        elif not down and was_down:
            self._release_held()
            if self._listening is False:
                self._listen_again()

    @property
    def held(self) -> int:
        """Connections accepted and left unanswered while down with how="hang"."""
        with self._lock:
            return len(self._held)

    def _release_held(self) -> None:
        with self._lock:
            held, self._held = self._held, []
        for conn in held:
            reset_socket(conn)

    def _stop_listening(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self.shutdown()
            thread.join(5)
        self.socket.close()
        self._listening = False

    def _listen_again(self) -> None:
        """Bind the same port again (SO_REUSEADDR) and resume serving."""
        self.socket = socket.socket(self.address_family, self.socket_type)
        self.server_bind()  # binds self.server_address, i.e. the same port
        self.server_activate()
        self._listening = True
        self.start()

    def abort_connections(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                # socket.socket.shutdown, not SSLSocket.shutdown: cut the TCP
                # connection under the TLS layer without touching its state
                # from this thread.
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
            except OSError:
                pass

    # -- connection handling ----------------------------------------------
    def process_request(self, request, client_address):
        with self._lock:
            if self.down and self._down_how == "hang":
                self._held.append(request)
                return
            if self.down:
                reset_socket(request)
                return
            self._conns.add(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        conn = request
        try:
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                with self._lock:
                    self._conns.discard(request)
                    conn = self.ssl_context.wrap_socket(
                        request, server_side=True, do_handshake_on_connect=False
                    )
                    self._conns.add(conn)
                conn.settimeout(10)
                conn.do_handshake()
                conn.settimeout(None)
            self.finish_request(conn, client_address)
        except Exception:
            self.handle_error(conn, client_address)
        finally:
            with self._lock:
                self._conns.discard(conn)
            self.shutdown_request(conn)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, _EXPECTED_ERRORS) or (isinstance(exc, OSError) and self.down):
            return
        text = "".join(traceback.format_exception(exc))
        with self._lock:
            if len(self.errors) < 100:
                self.errors.append(text)


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler that does not log every request to stderr."""

    protocol_version = "HTTP/1.1"
    server: LoopbackHTTPServer

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass

    def send_body(self, status: int, body: bytes, content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def drain_request_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""
