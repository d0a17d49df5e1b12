"""A canary: listeners of the test's own that record every connection made to them.

For proving that the mirror never connects to a host taken from a client's
request: a test hands the mirror requests that name the canary's addresses
(in a realm URL's query or path, in added parameters, in headers), then
asserts the canary saw nobody. Each listener answers what arrives with a 200
and a token-shaped JSON body and closes, so a mirror that did follow such a
name finishes at once (and the test fails on the record, not on a timeout).

Listeners bind where the mirror could reach them: the host's 127.0.0.1 (the
default), an office's host address, or, with ``office=``, an address inside
the office's namespace (the office's own address: a client naming itself).
"""

from __future__ import annotations

import json
import selectors
import socket
import threading
import time
from dataclasses import dataclass

HEAD_LIMIT = 64 * 1024
READ_TIMEOUT = 2.0
ANSWER = json.dumps({"token": "canary", "access_token": "canary", "expires_in": 300}).encode()


@dataclass
class Visit:
    """One connection to a canary listener."""

    listener: str  # host:port it came to
    peer: str  # host:port it came from
    head: bytes  # what it sent before the blank line (at most HEAD_LIMIT bytes)

    def __str__(self) -> str:
        first = self.head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
        return f"{self.peer} -> {self.listener}: {first!r}"


class Canary:
    """Record every connection to any of its listeners. Context manager."""

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._listeners: list[socket.socket] = []
        self._cond = threading.Condition()
        self.visits: list[Visit] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)

    def listen(self, host: str = "127.0.0.1", office=None) -> str:
        """Add a listener on host (inside ``office``'s namespace if given);
        returns its host:port."""
        def make() -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
            sock.listen(64)
            return sock

        sock = office.in_namespace(make) if office is not None else make()
        sock.setblocking(False)
        self._listeners.append(sock)
        self._selector.register(sock, selectors.EVENT_READ, sock)
        self._wake()
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="canary", daemon=True)
            self._thread.start()
        return self._address(sock)

    @staticmethod
    def _address(sock: socket.socket) -> str:
        host, port = sock.getsockname()[:2]
        return f"{host}:{port}"

    @property
    def addresses(self) -> list[str]:
        return [self._address(s) for s in self._listeners]

    # ------------------------------------------------------------------ serving
    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _serve(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select(timeout=1.0):
                if key.data is None:
                    self._wake_r.recv(4096)
                    continue
                try:
                    conn, peer = key.data.accept()
                except (BlockingIOError, OSError):
                    continue
                threading.Thread(target=self._answer, args=(conn, key.data, peer), daemon=True).start()

    def _answer(self, conn: socket.socket, listener: socket.socket, peer) -> None:
        head = b""
        with conn:
            conn.setblocking(True)
            conn.settimeout(READ_TIMEOUT)
            try:
                while b"\r\n\r\n" not in head and len(head) < HEAD_LIMIT:
                    data = conn.recv(4096)
                    if not data:
                        break
                    head += data
            except OSError:
                pass
            with self._cond:
                self.visits.append(Visit(self._address(listener), f"{peer[0]}:{peer[1]}",
                                         head.split(b"\r\n\r\n", 1)[0]))
                self._cond.notify_all()
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(ANSWER), ANSWER))
            except OSError:
                pass

    # ------------------------------------------------------------------ checks
    def wait_visits(self, count: int = 1, timeout: float = 10.0) -> list[Visit]:
        """Wait (bounded) until ``count`` connections were recorded; returns them all."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.visits) >= count, timeout):
                raise TimeoutError(f"{len(self.visits)} of {count} visits to the canary in {timeout}s")
            return list(self.visits)

    def assert_untouched(self, grace: float = 1.0) -> None:
        """Nobody connected, including within ``grace`` seconds from now (for a
        connection a background task of the mirror might still make)."""
        deadline = time.monotonic() + grace
        with self._cond:
            while not self.visits:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)
            visits = "\n".join(str(v) for v in self.visits)
        raise AssertionError(f"the canary was reached:\n{visits}")

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        for sock in self._listeners:
            self._selector.unregister(sock)
            sock.close()
        self._listeners.clear()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> "Canary":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
