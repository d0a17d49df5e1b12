"""The mirror's own listening addresses: never a destination of its requests.

In regular mode the client names the host, and the mirror makes calls of its
own there (pings, manifests, access checks, fills). A client that names the
proxy itself (`curl http://mirror:3128/v2/`, a health check, a Docker
`registry-mirrors` entry pointed at the proxy port by mistake) made each of
those calls come back in as a new request that made another call: 17
connections to itself within 3 s, and the loop kept 16 threads busy for
minutes. A reverse-mode upstream that is the mirror itself, or a registry
that redirects a blob to it, would do the same.

mitmproxy's own guard (proxyserver.server_connect) compares the literal host
with its listen addresses. This one also resolves names, and treats a
listener on all interfaces as every local address on its port. Lookups are
blocking (DNS): call `is_own` from a worker thread. Only a destination on one
of the mirror's ports is ever resolved here, so calls to registries on their
usual ports cost nothing.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Iterable

RESOLVED_FOR = 60.0  # seconds a name's addresses are remembered
LISTENING_FOR = 5.0  # seconds the listening addresses are reused (asking costs a getsockname per listener)
WILDCARDS = ("", "0.0.0.0", "::")


class OwnAddresses:
    def __init__(self, listening: Callable[[], Iterable[tuple[str, int]]]):
        """`listening()`: the (host, port) pairs the mirror listens on now."""
        self._ask_listening = listening
        self._listening_cache: tuple[float, list[tuple[str, int]]] = (-LISTENING_FOR, [])
        self._lock = threading.Lock()
        self._resolved: dict[str, tuple[float, frozenset[str]]] = {}
        self._local: dict[str, bool] = {}

    def _listening(self) -> list[tuple[str, int]]:
        """The listening addresses; asked again every LISTENING_FOR seconds
        (a proxy mode or the blob port can change at run time)."""
        now = time.monotonic()
        since, addresses = self._listening_cache
        if now - since >= LISTENING_FOR:
            addresses = list(self._ask_listening())
            self._listening_cache = (now, addresses)
        return addresses

    def forget(self) -> None:
        """The listeners changed (a rebuild, the proxy started): ask again."""
        self._listening_cache = (-LISTENING_FOR, [])

    def on_own_port(self, port: int) -> bool:
        """Cheap first check (no lookups): is port one the mirror listens on?"""
        return any(lport == port for _, lport in self._listening())

    def is_own(self, host: str, port: int) -> bool:
        """Does host:port reach the mirror itself? (May resolve host.)"""
        listeners = [lhost for lhost, lport in self._listening() if lport == port]
        if not listeners:
            return False
        addresses = self._addresses(host)
        for lhost in listeners:
            if lhost in WILDCARDS:
                if any(self._is_local(a) for a in addresses):
                    return True
            elif addresses & self._addresses(lhost):
                return True
        return False

    def _addresses(self, host: str) -> frozenset[str]:
        host = host.strip("[]").lower()
        try:
            return frozenset({_normal(str(ipaddress.ip_address(host)))})
        except ValueError:
            pass
        now = time.monotonic()
        with self._lock:
            cached = self._resolved.get(host)
        if cached and now - cached[0] < RESOLVED_FOR:
            return cached[1]
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            addresses = frozenset(_normal(info[4][0]) for info in infos)
        except (OSError, UnicodeError):
            addresses = frozenset()  # the call itself will fail to connect
        with self._lock:
            if len(self._resolved) > 1000:
                self._resolved.clear()
            self._resolved[host] = (now, addresses)
        return addresses

    def _is_local(self, address: str) -> bool:
        """Is address one of this machine's own? (A bind to it succeeds.)"""
        with self._lock:
            known = self._local.get(address)
        if known is not None:
            return known
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((address, 0))
            local = True
        except OSError:
            local = False
        with self._lock:
            if len(self._local) > 1000:
                self._local.clear()
            self._local[address] = local
        return local


def _normal(address: str) -> str:
    """An address as getaddrinfo and the listeners would both spell it."""
    address = address.split("%", 1)[0]
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address
