"""Where a fill's bytes come from: the shared object store, the digest's owner
node, or the upstream, in that order.

A `TieredSource` is the opener a fill calls (`source(start, end)`, as
upstream.BlobSource). Each tier may not have the blob (the fill goes on to
the next) or be down (likewise, and it is not asked again by this fill); the
tier that answers keeps answering that fill's later ranges and resumes until
it fails, and then the next tier carries on from the byte the fill has
reached (the hash state kept). The upstream, when it is a tier, is last and
answers whatever it answers (a refusal is relayed to the client).

- Object store (shared_blobs.ObjectTier): blobs another node verified. Read
  in ranges over several connections like an upstream, hashed again here.
- Owner (peers.PeerTier): the node that fetches this digest upstream for the
  whole cluster; it answers from its store or the fill it runs, and starts
  one if none runs. One stream, read behind its writer.
- Upstream: upstream.BlobSource with the client's credentials.

Only bytes the upstream answered with prove anything about access
(`upstream_answered`): a fill fed by another tier never vouches for its
client, which passes the access gate as for a stored blob (blobs.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from .fill import FailureReason, Fill
from .upstream import BlobSource

log = logging.getLogger(__name__)

UPSTREAM = "upstream"


class TierUnavailable(Exception):
    """This tier cannot serve the blob now (down, slow, refusing us): try the next."""


class Tier(Protocol):
    name: str  # "object-store", "peer", "upstream": the metrics' label

    def open(self, start: int, end: int | None):
        """A response-like object for bytes [start, end) (status_code, headers,
        raw with read1/fileno, close), or None if this tier has no such blob.
        Raises TierUnavailable."""


class UpstreamTier:
    name = UPSTREAM

    def __init__(self, source: BlobSource):
        self.source = source

    def open(self, start: int, end: int | None):
        return self.source(start, end)


class TieredSource:
    """The opener of one fill (thread-safe: a large blob's chunks call it at once)."""

    def __init__(self, digest: str, tiers: list[Tier]):
        self.digest = digest
        self.tiers = tiers
        self._current = 0  # the tier answering now; only ever moves on
        self._lock = threading.Lock()
        self.answered_by: str | None = None  # the tier of the first answer
        self.upstream_answered = False  # the upstream served (some of) these bytes: a proof of access
        self.tier_bytes: dict[str, int] = {}  # bytes received from tiers other than the upstream
        self.etags: dict[str, str] = {}  # object store: the ETag of the object read

    @property
    def current(self) -> str | None:
        """The tier answering now (or to be asked next); None: none is left."""
        with self._lock:
            return self.tiers[self._current].name if self._current < len(self.tiers) else None

    def __call__(self, start: int = 0, end: int | None = None):
        while True:
            with self._lock:
                index = self._current
            if index >= len(self.tiers):
                raise ConnectionError(f"no tier can serve {self.digest}")
            tier = self.tiers[index]
            try:
                response = tier.open(start, end)
            except TierUnavailable as exc:
                log.info("fill: %s: %s unavailable (%s); trying the next tier", self.digest, tier.name, exc)
                response = None
            if response is None:
                with self._lock:
                    if self._current == index:
                        self._current = index + 1
                continue
            with self._lock:
                if self.answered_by is None:
                    self.answered_by = tier.name
                if tier.name == UPSTREAM:
                    if response.status_code in (200, 206):
                        self.upstream_answered = True
                else:
                    etag = getattr(response, "etag", None)
                    if etag:
                        self.etags[tier.name] = etag
            if tier.name != UPSTREAM:
                response.raw = _Counted(response.raw, self._counter(tier.name))
            return response

    def _counter(self, name: str) -> Callable[[int], None]:
        def count(n: int) -> None:
            with self._lock:
                self.tier_bytes[name] = self.tier_bytes.get(name, 0) + n
        return count


class _Counted:
    """A response body's raw stream that counts what is read from it."""

    def __init__(self, raw, count: Callable[[int], None]):
        self._raw = raw
        self._count = count

    def read1(self, limit: int = -1, decode_content: bool | None = None) -> bytes:
        data = self._raw.read1(limit, decode_content=decode_content)
        self._count(len(data))
        return data

    def read(self, limit: int | None = None, decode_content: bool | None = None) -> bytes:
        data = self._raw.read(limit, decode_content=decode_content)
        self._count(len(data))
        return data

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        self._raw.close()


class Tiers:
    """The tiers this node has besides the upstream (built by services.py),
    and the sources its fills are made with."""

    def __init__(self, shared=None, peers=None):
        self.shared = shared  # shared_blobs.SharedBlobs, or None
        self.peers = peers  # peers.Peers, or None

    def for_client(self, digest: str, upstream: BlobSource, registry: str, repo: str,
                   authorization: str | None) -> TieredSource:
        """A client's miss: the object store, the owner node, the upstream."""
        tiers: list[Tier] = []
        if self.shared is not None:
            tiers.append(self.shared.tier(digest))
        if self.peers is not None:
            tiers.append(self.peers.tier(digest, registry, repo, authorization))
        tiers.append(UpstreamTier(upstream))
        return TieredSource(digest, tiers)

    def for_peer(self, digest: str, upstream: BlobSource) -> TieredSource:
        """Another node's request: the object store, the upstream; never a
        third node (no request goes round in a circle)."""
        tiers: list[Tier] = [self.shared.tier(digest)] if self.shared is not None else []
        return TieredSource(digest, [*tiers, UpstreamTier(upstream)])

    def for_url(self, digest: str, node: str) -> TieredSource:
        """A blob URL another node signed, brought here: the object store, that
        node and the owners; never the upstream (the client's credentials
        stayed with the node that decided)."""
        tiers: list[Tier] = [self.shared.tier(digest)] if self.shared is not None else []
        if self.peers is not None:
            tiers.append(self.peers.tier_for_url(digest, node))
        return TieredSource(digest, tiers)

    def stored(self, digest: str, source: TieredSource) -> None:
        """A fill committed digest (its thread): what the upstream gave us goes to the object store."""
        if self.shared is not None and source.upstream_answered:
            self.shared.uploader.queue(digest)

    def finished(self, fill: Fill) -> None:
        """A fill ended (its thread). Bytes from the object store that failed
        verification: that object is rotten."""
        source = fill.opener
        if self.shared is None or not isinstance(source, TieredSource) or \
                fill.failure is not FailureReason.VERIFICATION:
            return
        etag = source.etags.get(self.shared.tier(fill.digest).name)
        if etag and source.tier_bytes.get(self.shared.tier(fill.digest).name):
            self.shared.discard_bad(fill.digest, etag)
