"""Blobs in the shared object store: read as a fill's source, uploaded once verified.

A node's local store (store.py) is its first tier. On a local miss a fill
asks the object store next (sources.py): bytes another node verified, read
in ranges, hashed again here, kept locally. Bytes that turn out not to
match their digest (rot in the store) fail that fill like a corrupt upstream
body, and the object is deleted, if it is still the one read (If-Match), so
the next request goes on to the upstream.

A blob this node fetched from the upstream is uploaded after it is committed
locally (verified), in the background: UPLOADERS at a time, the others
waiting in order (at most MAX_PENDING; past that the oldest are dropped,
logged). A blob the store already holds is not uploaded again (one HEAD).
While the store is down, uploads wait and go up once it answers again:
nothing a client waits for depends on them.

This module imports objectstore, hence boto3: services.py imports it only
when a bucket is configured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from requests.structures import CaseInsensitiveDict

from .metrics import Metrics
from .objectstore import BadDigest, ObjectStore, ObjectStoreConfig, RemoteBlob, StoreUnavailable
from .sources import TierUnavailable
from .store import StoredBlob
from .store_queue import StoreQueue

log = logging.getLogger(__name__)

TIER = "object-store"
UPLOADERS = 2
MAX_PENDING = 10_000


class ObjectResponse:
    """A blob being read from the object store, as the response a fill reads.
    `connections`: how many the fill may read the rest of it over (s3_connections)."""

    redirected = False

    def __init__(self, blob: RemoteBlob, ranged: bool, connections: int = 1):
        self.connections = connections
        self.etag = blob.etag
        self.status_code = 206 if ranged else 200
        self.headers = CaseInsensitiveDict({"Content-Length": str(blob.end - blob.start)})
        if ranged:
            self.headers["Content-Range"] = f"bytes {blob.start}-{blob.end - 1}/{blob.size}"
        self.raw = _Body(blob)
        self.url = "object store"

    def close(self) -> None:
        self.raw.close()


class _Body:
    """RemoteBlob's reads, failing as a broken connection does (the fill resumes)."""

    def __init__(self, blob: RemoteBlob):
        self._blob = blob

    def read1(self, limit: int = 1 << 20, decode_content: bool | None = None) -> bytes:
        try:
            return self._blob.read1(limit)
        except StoreUnavailable as exc:
            raise ConnectionError(f"object store: {exc}") from exc

    def read(self, limit: int | None = None, decode_content: bool | None = None) -> bytes:
        try:
            return self._blob.read(limit or (1 << 20))
        except StoreUnavailable as exc:
            raise ConnectionError(f"object store: {exc}") from exc

    def fileno(self) -> int:
        return self._blob.fileno()

    def close(self) -> None:
        self._blob.close()


class ObjectTier:
    """One blob in the object store, as a tier of a fill (sources.py).

    With one connection (s3_connections=1) the fill's first request, a
    range, is answered with the whole object, which the fill then reads as
    one stream: on a server nearby one stream carries more than a node's disk
    can write, and reading ranges over several connections cost a 2-core
    node 1.6x the CPU (500 MB from SeaweedFS on loopback: 0.94 s with one,
    1.8 s with 8). AWS S3 gives one connection about 90 MB/s: there, ranges
    over several are faster."""

    name = TIER

    def __init__(self, objects: ObjectStore, digest: str, connections: int = 1):
        self.objects = objects
        self.digest = digest
        self.connections = connections

    def open(self, start: int, end: int | None) -> ObjectResponse | None:
        if self.connections == 1 and start == 0:
            end = None  # the whole object, one stream
        try:
            blob = self.objects.open(self.digest, start, end)
        except StoreUnavailable as exc:
            raise TierUnavailable(str(exc)) from exc
        if blob is None:
            return None
        return ObjectResponse(blob, ranged=bool(start or end is not None), connections=self.connections)


class SharedBlobs:
    """The object store's blobs for this node: reading them, uploading ours."""

    def __init__(self, config: ObjectStoreConfig, open_local: Callable[[str], StoredBlob | None],
                 metrics: Metrics | None = None, connections: int = 1):
        self.objects = ObjectStore(config)
        self.uploader = Uploader(self.objects, open_local, metrics)
        self.connections = connections  # s3_connections

    def tier(self, digest: str) -> ObjectTier:
        return ObjectTier(self.objects, digest, self.connections)

    def available(self) -> bool:
        return self.objects.available()

    def discard_bad(self, digest: str, etag: str) -> None:
        """Bytes read from the object store did not match digest: delete that
        object, unless someone put a good one back since."""
        try:
            if self.objects.delete(digest, etag=etag):
                log.error("object store: %s did not match its digest; deleted it", digest)
        except StoreUnavailable as exc:
            log.error("object store: %s did not match its digest, and could not be deleted: %s", digest, exc)

    def close(self) -> None:
        self.uploader.close()
        self.objects.close()


class Uploader:
    """Uploads committed local blobs in the background (see the module docstring)."""

    def __init__(self, objects: ObjectStore, open_local: Callable[[str], StoredBlob | None],
                 metrics: Metrics | None = None):
        self.objects = objects
        self.open_local = open_local
        self.metrics = metrics
        self._queue = StoreQueue(objects.available, lambda digest, _: self._upload(digest), threads=UPLOADERS,
                                 name="s3-uploader", limit=MAX_PENDING, latest_wins=False)

    def queue(self, digest: str) -> None:
        dropped = self._queue.put(digest)
        if dropped is not None:
            log.warning("object store: more than %d blobs wait to be uploaded; %s will not be", MAX_PENDING, dropped)

    def pending(self) -> int:
        return self._queue.pending()

    def close(self) -> None:
        self._queue.close()

    def _upload(self, digest: str) -> bool:
        """One upload; True if it should be tried again later (the store was down)."""
        blob = self.open_local(digest)
        if blob is None:
            log.info("object store: %s is no longer stored here; not uploading it", digest)
            return False
        try:
            with blob.file:
                stored = self.objects.upload(digest, blob.file, blob.size)
        except StoreUnavailable as exc:
            log.info("object store: uploading %s waits: %s", digest, exc)
            return True
        except BadDigest as exc:
            log.error("object store: not uploading %s: %s", digest, exc)
            self._count("refused")
            return False
        except Exception:  # noqa: BLE001 - one blob's failure must not stop the uploads
            log.exception("object store: uploading %s failed", digest)
            self._count("failed")
            return False
        self._count("stored" if stored else "present")
        log.info("object store: %s %s (%d bytes)", "uploaded" if stored else "already holds", digest, blob.size)
        return False

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.count("object_store_uploads_total", 1, result)
