"""Manifests: relayed to the upstream, remembered for when it is down.

The mirror fetches manifest (and /v2/ ping) requests itself rather than
leaving them to mitmproxy's pass-through, because mitmproxy answers a failed
upstream connection with its own 502 and offers no hook to answer instead.
Fetching them here, the mirror sees the failure first:

- The upstream answers (anything but 429 or 5xx): relayed as is. Tags stay
  fresh and the upstream decides who may pull what.
- A 200 manifest is verified against its digest and kept in a small store
  (a manifest's content never changes for its digest), and a tag's digest is
  remembered.
- The upstream is unreachable, 429 or 5xx, and `serve_stale` is on: a
  manifest by digest comes from the store, a tag resolves to the last digest
  seen for it, marked stale in the response headers. Only for repositories
  seen to contain it, and for clients the access gate trusted before.
"""

from __future__ import annotations

import logging
import os
import threading

import diskcache

from . import oci
from .oci import INDEX_TYPES, MAX_MANIFEST  # noqa: F401 - re-exported: the mirror's names for them
from .routes import SHA256_RE

log = logging.getLogger(__name__)

IN_MEMORY_BYTES = 32 << 20  # manifests kept in memory as well, most recently used
STALE_HEADERS = {
    "Warning": '110 registry-cache "Response is Stale"',
    "X-Registry-Cache": "stale",
}
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length",
}


StoredManifest = oci.Manifest  # a manifest checked against its digest: (digest, media_type, body)


class ManifestStore:
    """Manifests by digest, and the last digest seen for each tag."""

    def __init__(self, directory: str | os.PathLike, size_limit: int = 256 << 20):
        # Least recently STORED: with LRU every read is a write (a transaction
        # per pull, measured as most of the disk pool's time under load), and
        # manifests are small enough that the limit is rarely reached.
        self._cache = diskcache.Cache(str(directory), size_limit=size_limit,
                                      eviction_policy="least-recently-stored", timeout=60)
        # The manifests of a rollout, kept in memory too: answered without disk or thread hop.
        self._recent: dict[str, StoredManifest] = {}
        self._recent_bytes = 0
        self._recent_lock = threading.Lock()
        self.shared = None  # shared_records.SharedRecords: kept manifests and tags go there too

    def put(self, manifest: StoredManifest, share: bool = True) -> None:
        """Keep a manifest. `share`: write it to the shared records too, only
        for a registry the operator chose (whatever a client names would
        otherwise go to the bucket)."""
        self._cache.set(f"manifest:{manifest.digest}", (manifest.media_type, manifest.body))
        self._keep_in_memory(manifest)
        if share and self.shared is not None:
            self.shared.note_manifest(manifest.digest, manifest.media_type, manifest.body)

    def get(self, digest: str) -> StoredManifest | None:
        if manifest := self.in_memory(digest):
            return manifest
        found = self._cache.get(f"manifest:{digest}")
        if not found:
            return None
        manifest = StoredManifest(digest, *found)
        self._keep_in_memory(manifest)
        return manifest

    def in_memory(self, digest: str) -> StoredManifest | None:
        """A manifest read or kept lately, from memory (safe on the event loop)."""
        with self._recent_lock:
            manifest = self._recent.pop(digest, None)
            if manifest is not None:
                self._recent[digest] = manifest  # most recently used last
            return manifest

    def _keep_in_memory(self, manifest: StoredManifest) -> None:
        with self._recent_lock:
            old = self._recent.pop(manifest.digest, None)
            self._recent_bytes += len(manifest.body) - (len(old.body) if old else 0)
            self._recent[manifest.digest] = manifest
            while self._recent_bytes > IN_MEMORY_BYTES and self._recent:
                self._recent_bytes -= len(self._recent.pop(next(iter(self._recent))).body)

    def remember_tag(self, registry: str, repo: str, tag: str, digest: str, share: bool = True) -> None:
        """`share`: as for put()."""
        key = f"tag:{registry}/{repo}:{tag}"
        if self._cache.get(key) != digest:  # a read; every pull asks about the tag, few move it
            self._cache.set(key, digest)
            if share and self.shared is not None:
                self.shared.note_tag(registry, repo, tag, digest)

    def digest_of_tag(self, registry: str, repo: str, tag: str) -> str | None:
        return self._cache.get(f"tag:{registry}/{repo}:{tag}")

    def remember(self, registry: str, repo: str, reference: str, body: bytes, headers,
                 accepted: list[str], share: bool = True) -> str | None:
        """Keep a verified 200 manifest (GET), or a tag's fresh digest (HEAD).
        Returns the digest, or None if nothing was kept. `accepted`: the
        Accept values of the client's request; `share`: as for put().

        A tag points only at a kept manifest. containerd resolves a tag by
        HEAD and then GETs the manifest by digest (or not at all, if it has
        it): a HEAD naming a manifest not kept yet is held as pending, and
        the tag moves once that manifest is kept. Until then the tag's
        older manifest still answers while the upstream is down."""
        if body:
            manifest = verified_manifest(body, headers, reference)
            if manifest is None:
                return None
            self.put(manifest, share)
            digest = manifest.digest
            self._promote_pending(registry, repo, digest, share)
        else:
            digest = headers.get("Docker-Content-Digest", "")
            if not SHA256_RE.fullmatch(digest):
                return None
        media_type = oci.media_type_of(headers)
        if ":" not in reference and is_what_the_tag_names(accepted, media_type):
            if body or self.get(digest) is not None:
                self.remember_tag(registry, repo, reference, digest, share)
            else:
                self._set_pending(registry, repo, reference, digest)
        return digest

    def _set_pending(self, registry: str, repo: str, tag: str, digest: str) -> None:
        key = f"pending:{registry}/{repo}"
        with self._cache.transact():
            pending = self._cache.get(key) or {}
            pending[tag] = digest
            self._cache.set(key, pending)

    def _promote_pending(self, registry: str, repo: str, digest: str, share: bool) -> None:
        key = f"pending:{registry}/{repo}"
        if digest not in (self._cache.get(key) or {}).values():
            return  # the usual case: read only, no write lock for every manifest kept
        with self._cache.transact():
            pending = self._cache.get(key)
            if not pending or digest not in pending.values():
                return
            for tag in [t for t, d in pending.items() if d == digest]:
                self.remember_tag(registry, repo, tag, digest, share)
                del pending[tag]
            self._cache.set(key, pending)

    def lookup(self, registry: str, repo: str, reference: str) -> StoredManifest | None:
        """The kept manifest for a digest, or for a tag's last known digest."""
        digest = reference if ":" in reference else self.digest_of_tag(registry, repo, reference)
        return self.get(digest) if digest else None

    def close(self) -> None:
        self._cache.close()


def verified_manifest(body: bytes, headers, reference: str) -> StoredManifest | None:
    """The manifest in a 200 answer, if its digest checks out (else None, logged)."""
    try:
        return oci.check_manifest(body, headers, reference)
    except oci.ManifestMismatch as exc:
        log.warning("manifests: not keeping the upstream's manifest: %s", exc)
        return None


def is_what_the_tag_names(accepted: list[str], media_type: str) -> bool:
    """Is this answer to a request by tag what the tag itself points at? A
    client that does not take index types gets one platform's manifest (or a
    converted one) in place of a multi-arch index: remembering that for the
    tag would later hand arm64 nodes an amd64 manifest."""
    return media_type in INDEX_TYPES or (bool(accepted) and any(accepts(accepted, t) for t in INDEX_TYPES))


def accepts(accept_header_values: list[str], media_type: str) -> bool:
    """Would a client that sent these Accept values take this media type?"""
    if not accept_header_values:
        return True
    offered = {part.split(";")[0].strip() for value in accept_header_values for part in value.split(",")}
    return media_type in offered or "*/*" in offered
