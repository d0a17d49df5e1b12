"""Cluster membership, and which node owns (fetches upstream) each blob.

Members are the mirror nodes' blob servers (host:port), from a static list or
from a DNS name that resolves to all of them (a Kubernetes headless service:
one A/AAAA record per ready pod), re-resolved in the background. A failed or
empty answer keeps the last list: a DNS hiccup must not make every node think
it is alone (and fetch everything upstream itself).

Ownership is rendezvous (highest random weight) hashing: every node scores
each member against the digest and the highest score owns it. All nodes that
see the same members agree without talking to each other, and a node joining
or leaving moves only the digests it gains or held (about 1/N), so the rest
keep their owner and their warm fills. `owners()` gives the whole ranking:
when the owner is known to be down, the next one takes its digests, and only
those.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

REFRESH_EVERY = 10.0  # seconds between DNS lookups
DOWN_FOR = 10.0  # a member that failed us is skipped for this long


@dataclass(frozen=True, order=True)
class Member:
    host: str  # an IP address or a host name
    port: int

    @property
    def id(self) -> str:
        """host:port, IPv6 in brackets: what the hash is taken over, the same on every node."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://{self.id}"


def parse_member(text: str, default_port: int | None = None) -> Member:
    """'10.0.0.1:5000', '[fd00::1]:5000', 'node-a.lan:5000' (or no port, with default_port)."""
    text = text.strip()
    host, port = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad member {text!r}")
        port = rest[1:] or None
        ipaddress.IPv6Address(host)  # ValueError if not
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" in text:
        raise ValueError(f"bad member {text!r}: put an IPv6 address in brackets, [addr]:port")
    if port is None:
        if default_port is None:
            raise ValueError(f"member {text!r} has no port")
        port = default_port
    if not host or not str(port).isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad member {text!r}")
    return Member(host.lower(), int(port))


def parse_members(text: str, default_port: int | None = None) -> list[Member]:
    """A comma- or space-separated list of members."""
    members = [parse_member(part, default_port) for part in text.replace(",", " ").split()]
    if not members:
        raise ValueError("no members given")
    return sorted(set(members))


def _score(member: Member, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{member.id}\n{key}".encode(), digest_size=8).digest(), "big")


def rank(members: Iterable[Member], key: str) -> list[Member]:
    """Members in rendezvous order for key: the owner first."""
    return sorted(members, key=lambda m: (_score(m, key), m.id), reverse=True)


Resolver = Callable[[str], Iterable[str]]


def resolve_all(name: str) -> list[str]:
    """Every A and AAAA address of name (the system resolver: /etc/hosts, DNS)."""
    infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


class Membership:
    """The current members and who owns what. Give either `members` (static)
    or `dns_name` and `port` (every address the name resolves to, on port).
    `me`: this node, as the others know it (see find_me)."""

    def __init__(self, members: Sequence[Member] = (), *, dns_name: str = "", port: int = 0,
                 me: Member | None = None, resolver: Resolver = resolve_all,
                 refresh_every: float = REFRESH_EVERY, down_for: float = DOWN_FOR,
                 clock: Callable[[], float] = time.monotonic):
        if bool(members) == bool(dns_name):
            raise ValueError("give either a static member list or a DNS name")
        self.dns_name, self.port = dns_name, port
        self.me = me
        self._resolver = resolver
        self._refresh_every = refresh_every
        self._down_for = down_for
        self._clock = clock
        self._lock = threading.Lock()
        self._members: tuple[Member, ...] = tuple(sorted(set(members)))
        self._down: dict[Member, float] = {}  # member -> until (clock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if dns_name:
            self.refresh()

    # -- who is in -------------------------------------------------------------
    @property
    def members(self) -> tuple[Member, ...]:
        with self._lock:
            return self._members

    def refresh(self) -> bool:
        """Resolve the DNS name again; True if the members changed. A failed or
        empty answer keeps the members we had."""
        if not self.dns_name:
            return False
        try:
            addresses = list(self._resolver(self.dns_name))
        except OSError as exc:
            log.warning("cluster: resolving %s failed (%s); keeping %d member(s)",
                        self.dns_name, exc, len(self.members))
            return False
        if not addresses:
            log.warning("cluster: %s resolved to nothing; keeping %d member(s)", self.dns_name, len(self.members))
            return False
        new = tuple(sorted({Member(address.lower(), self.port) for address in addresses}))
        with self._lock:
            old, self._members = self._members, new
        if new != old:
            log.info("cluster: members now %s", ", ".join(m.id for m in new))
        return new != old

    def start(self) -> None:
        """Re-resolve the DNS name every refresh_every seconds, in the background."""
        if self.dns_name and self._thread is None:
            self._thread = threading.Thread(target=self._refresh_loop, name="cluster-dns", daemon=True)
            self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self._refresh_every):
            try:
                self.refresh()
            except Exception:  # never let the thread die: the list would freeze
                log.exception("cluster: refreshing members failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    # -- who owns what ----------------------------------------------------------
    def owners(self, digest: str) -> list[Member]:
        """Every member in rendezvous order for digest, those known to be down last."""
        ranked = rank(self.members, digest)
        now = self._clock()
        with self._lock:
            down = {m for m, until in self._down.items() if until > now}
        return [m for m in ranked if m not in down] + [m for m in ranked if m in down]

    def owner(self, digest: str) -> Member:
        return self.owners(digest)[0]

    def is_mine(self, digest: str) -> bool:
        return self.me is not None and self.owner(digest) == self.me

    def mark_down(self, member: Member) -> None:
        """member failed us (refused, timed out): its digests go to the next in
        rank for down_for seconds. Never ourselves."""
        if member == self.me:
            return
        with self._lock:
            self._down[member] = self._clock() + self._down_for

    def down_members(self) -> list[Member]:
        """Members skipped now (marked down less than down_for ago)."""
        now = self._clock()
        with self._lock:
            return sorted(m for m, until in self._down.items() if until > now)

    def mark_up(self, member: Member) -> None:
        with self._lock:
            self._down.pop(member, None)


def find_me(members: Iterable[Member], port: int) -> Member | None:
    """The member that is this machine: on `port`, at an address that can be
    bound here (a local one). None if there is none, or several (two members
    on one machine need `me` given explicitly)."""
    mine = []
    for member in members:
        if member.port != port:
            continue
        try:
            infos = socket.getaddrinfo(member.host, None, type=socket.SOCK_STREAM)
        except OSError:
            continue
        for family, _, _, _, address in infos:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((address[0], 0))
                except OSError:
                    continue
            mine.append(member)
            break
    return mine[0] if len(mine) == 1 else None
