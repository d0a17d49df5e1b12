"""A host that accepts connections and never answers: a hung registry, or a
network path that went silent. Connections are held until stop()."""

from __future__ import annotations

import socket
import threading


class Tarpit:
    """`cond`: share one with other tarpits to wait for their total (wait_accepted_total)."""

    def __init__(self, cond: threading.Condition | None = None) -> None:
        self._server = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._held: list[socket.socket] = []
        self._cond = cond or threading.Condition()  # re-entrant (an RLock)
        self._thread = threading.Thread(target=self._accept, name="tarpit", daemon=True)

    def __enter__(self) -> "Tarpit":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:  # stopped
                return
            with self._cond:
                self._held.append(conn)
                self._cond.notify_all()

    @property
    def accepted(self) -> int:
        with self._cond:
            return len(self._held)

    def wait_accepted(self, count: int, timeout: float) -> int:
        """Wait (bounded) until count connections were accepted; returns how many were."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._held) >= count, timeout)
            return len(self._held)

    def stop(self) -> None:
        """Stop listening and close every held connection (the waiting requests fail)."""
        try:
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close alone does not)
        except OSError:
            pass
        self._server.close()
        if self._thread.is_alive():
            self._thread.join(5)
        with self._cond:
            for conn in self._held:
                conn.close()


def wait_accepted_total(tarpits: list[Tarpit], count: int, timeout: float) -> int:
    """Wait (bounded) until tarpits sharing one condition accepted count
    connections in all; returns how many they did."""
    cond = tarpits[0]._cond
    with cond:
        cond.wait_for(lambda: sum(t.accepted for t in tarpits) >= count, timeout)
        return sum(t.accepted for t in tarpits)
