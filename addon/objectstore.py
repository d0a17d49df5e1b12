"""The shared tier: verified blobs and small records in an S3-compatible object store.

Several mirror nodes share one bucket (AWS S3, MinIO, Ceph RGW, SeaweedFS).
Blobs are keyed by digest (`<prefix>blobs/sha256/<hex>`) and uploaded only
from a committed, verified local file; small records (access proofs,
manifests, tags, grants) live under `<prefix>records/`.

Why no reader ever sees a partial or wrong blob, and racing uploaders are
harmless:

- An S3 object appears only when its PUT (or multipart completion) is
  complete; until then readers get 404, or the old object whole. A PUT cut
  off midway leaves nothing.
- Each upload carries the blob's sha256 as `x-amz-checksum-sha256` (its digest,
  so it costs nothing for a single PUT; each part's for a multipart upload),
  and the server refuses bytes that do not match (400 BadDigest).
- The key is the digest, so two uploaders of one blob upload the same bytes:
  whichever completes last, the object is whole and right. A single PUT is
  created with If-None-Match: * (the loser gets 412 and knows it lost).
- Readers still hash what they stream (as a fill from the upstream does): a
  blob that rotted in the store is caught, and removed with If-Match on the
  ETag read, which spares a good copy someone put back since.

Records are created with If-None-Match: * (put-if-absent) and replaced with
If-Match on the ETag read (compare-and-swap); both are single PUTs.

Measured against SeaweedFS 4.48 (tests/test_objectstore_semantics.py pins it
on every run, 16 threads racing, 10 rounds of creates and 6 of swaps):

| what | SeaweedFS 4.48 |
|---|---|
| PUT If-None-Match: *, 16 racing | exactly one 200, the rest 412 PreconditionFailed; the object is the winner's; losers answered in 10-30 ms (a few 1 s on new connections) |
| PUT If-Match: <etag>, 16 racing | exactly one 200, the rest 412; If-Match on a missing key: 412 (AWS: 404) |
| DELETE If-Match: <old etag> | 412, object kept; the current ETag deletes (204) |
| CompleteMultipartUpload If-None-Match: *, 8 racing (5 MiB parts) | NOT exclusive: up to 6 of 8 got 200 in one round; the object is always one uploader's whole body |
| reader during a half-sent PUT | 404 (new key) or the old object whole; a cut PUT leaves no object |
| x-amz-checksum-sha256 wrong (PUT, UploadPart) | 400 BadDigest, nothing stored |
| Range bytes=a-b, a-, past the end | 206 with Content-Range; 206; 416 InvalidRange |
| ListObjectsV2 Prefix + MaxKeys | pages with NextContinuationToken, in key order |
| unsigned or wrongly signed request | 403 |

So nothing here relies on conditional multipart completion being exclusive.

A store that is down or slow never holds clients up for long: every call has
a timeout (`timeout`), and after a failure the store counts as down for
`down_for` seconds, during which calls fail at once with `StoreUnavailable`
(one call tries again after that, as `UpstreamClient.hung()` does for
registries). Callers fall back to the local tier and the upstream.

Client library: boto3. It reads credentials the standard AWS way (environment,
shared config and credentials files, SSO, web identity for Kubernetes IRSA,
container and instance metadata) and supports the conditional writes and
checksums above; scripts/bench_s3client.py measured it against minio-py and
plain requests (README). Importing this module imports boto3 (about 0.3 s and
30 MB): import it only when a bucket is configured.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import BinaryIO
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import boto3
import botocore.exceptions
import urllib3.exceptions
from botocore.config import Config

log = logging.getLogger(__name__)

SHA256_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
RECORD_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@=+-]*(/[A-Za-z0-9][A-Za-z0-9._:@=+-]*)*")
MAX_RECORD = 8 << 20  # an image index or manifest is at most a few MB
PART_SIZE = 16 << 20  # multipart: part size, and the largest blob sent in one PUT
UPLOAD_THREADS = 4  # parts in flight per upload (each held in memory)
# What a store that is down, slow or refusing us raises inside botocore/urllib3.
_TRANSPORT_ERRORS = (botocore.exceptions.BotoCoreError, urllib3.exceptions.HTTPError, OSError)


class StoreUnavailable(Exception):
    """The object store is down, slow, or refusing us: fall back to the local
    tier and the upstream, and try it again later."""


class BadDigest(ValueError):
    """The store refused an upload whose bytes do not match their sha256: the
    local file changed after it was verified. The store itself is fine."""


@dataclass(frozen=True)
class ObjectStoreConfig:
    bucket: str
    endpoint: str = ""  # empty: AWS S3 in `region`; else e.g. http://minio.lan:9000
    prefix: str = "registry-cache/"  # keys start with this (several mirrors can share a bucket)
    region: str = ""  # empty: from the standard chain (AWS_REGION, shared config), else us-east-1
    profile: str = ""  # a profile of the shared config files; empty: the default chain
    timeout: float = 5.0  # seconds to connect, and of silence while reading, per call
    upload_timeout: float = 120.0  # the same for uploads, which run in the background
    down_for: float = 30.0  # after a failure, calls fail at once for this long
    addressing_style: str = ""  # "path" or "virtual"; empty: path with an endpoint, else virtual


@dataclass(frozen=True)
class Record:
    data: bytes
    etag: str  # for replace_record / delete_record

    def json(self):
        return json.loads(self.data)


class RemoteBlob:
    """A blob being read from the store. `size` is the whole blob's; the body
    holds bytes [start, end). Hash what you read: the store can rot too.
    `raw` is the urllib3 response (read1, fileno) for fill.ArrivedBytes."""

    def __init__(self, store: "ObjectStore", response: dict, start: int, end: int, size: int):
        self._store = store
        self._body = response["Body"]
        self.raw = self._body._raw_stream
        self.etag: str = response["ETag"]
        self.start, self.end, self.size = start, end, size

    def read(self, limit: int = 1 << 20) -> bytes:
        try:
            return self._body.read(limit)
        except _TRANSPORT_ERRORS as exc:
            raise self._store._failed(f"reading a blob: {exc}") from exc

    def read1(self, limit: int = 1 << 20) -> bytes:
        """What has arrived, up to limit (one socket read at most): for a
        reader that passes bytes on as they come (a fill's followers)."""
        try:
            return self.raw.read1(limit, decode_content=False)
        except _TRANSPORT_ERRORS as exc:
            raise self._store._failed(f"reading a blob: {exc}") from exc

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> "RemoteBlob":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ObjectStore:
    def __init__(self, config: ObjectStoreConfig, session: boto3.Session | None = None,
                 clock=time.monotonic):
        self.config = config
        self._clock = clock
        session = session or boto3.Session(profile_name=config.profile or None)
        self._s3 = self._client(session, config.timeout)
        # Uploads run in the background, and a server may take seconds to
        # answer a large part: a longer timeout of their own.
        self._s3_upload = self._client(session, max(config.timeout, config.upload_timeout))
        self.bucket = config.bucket
        self._down_until = 0.0  # monotonic; 0: up
        self._down_reason = ""
        self._lock = threading.Lock()

    def _client(self, session: boto3.Session, timeout: float):
        config = self.config
        style = config.addressing_style or ("path" if config.endpoint else "virtual")
        return session.client(
            "s3",
            endpoint_url=config.endpoint or None,
            region_name=config.region or session.region_name or "us-east-1",
            config=Config(
                connect_timeout=config.timeout,
                read_timeout=timeout,
                retries={"max_attempts": 1, "mode": "standard"},  # a retry doubles what a dead store costs
                s3={"addressing_style": style},
                max_pool_connections=64,
                # We send sha256 checksums ourselves and verify every blob we read.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    # -- availability ----------------------------------------------------------
    def available(self) -> bool:
        """Not known to be down (without asking it)."""
        with self._lock:
            return self._down_until == 0.0 or self._clock() >= self._down_until

    def _gate(self) -> None:
        """Fail at once while the store is known to be down. Once down_for is
        over, one caller gets through (and asks it); the others keep failing
        until that call succeeds or fails too."""
        now = self._clock()
        with self._lock:
            if self._down_until == 0.0:
                return
            if now < self._down_until:
                raise StoreUnavailable(f"object store down ({self._down_reason}); "
                                       f"trying again in {self._down_until - now:.0f} s")
            self._down_until = now + self.config.down_for  # this caller's turn to ask

    def _failed(self, reason: str) -> StoreUnavailable:
        with self._lock:
            if self._down_until == 0.0:
                log.warning("object store: %s; using the local tier and the upstream for %.0f s",
                            reason, self.config.down_for)
            self._down_until = self._clock() + self.config.down_for
            self._down_reason = reason
        return StoreUnavailable(reason)

    def _succeeded(self) -> None:
        with self._lock:
            if self._down_until:
                log.info("object store: answering again")
            self._down_until = 0.0

    def _call(self, operation: str, quiet: tuple[int, ...] = (), upload: bool = False, **params):
        """One S3 call. Statuses in `quiet` (404, 412: answers, not failures)
        are returned as the status; anything else that is not a success
        marks the store down and raises StoreUnavailable."""
        self._gate()
        client = self._s3_upload if upload else self._s3
        try:
            result = getattr(client, operation)(Bucket=self.bucket, **params)
        except botocore.exceptions.ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status in quiet:
                self._succeeded()
                return status
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "BadDigest":
                self._succeeded()
                raise BadDigest(f"{operation} {params.get('Key')}: the bytes do not match their sha256") from exc
            raise self._failed(f"{operation}: {status} {code}".rstrip()) from exc
        except _TRANSPORT_ERRORS as exc:
            raise self._failed(f"{operation}: {exc}") from exc
        self._succeeded()
        return result

    def check(self) -> None:
        """Raise StoreUnavailable unless the bucket answers (for a health endpoint)."""
        self._call("head_bucket")

    # -- blobs -----------------------------------------------------------------
    def blob_key(self, digest: str) -> str:
        match = SHA256_DIGEST_RE.fullmatch(digest)
        if match is None:
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return f"{self.config.prefix}blobs/sha256/{match.group(1)}"

    def size_of(self, digest: str) -> int | None:
        """The stored blob's size, or None if the store has none."""
        result = self._call("head_object", quiet=(404,), Key=self.blob_key(digest))
        return None if result == 404 else result["ContentLength"]

    def open(self, digest: str, start: int = 0, end: int | None = None) -> RemoteBlob | None:
        """Stream bytes [start, end) of the blob (end: None for all), or None if
        the store has no such blob (or the range starts past its end)."""
        params = {"Key": self.blob_key(digest)}
        if start or end is not None:
            params["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        result = self._call("get_object", quiet=(404, 416), **params)
        if result in (404, 416):
            return None
        if "ContentRange" in result:  # "bytes 10-19/1024"
            size = int(result["ContentRange"].rsplit("/", 1)[1])
        else:
            size, start = result["ContentLength"], 0
        return RemoteBlob(self, result, start, start + result["ContentLength"], size)

    def upload(self, digest: str, path: str | os.PathLike | BinaryIO, size: int | None = None) -> bool:
        """Upload a VERIFIED local file (a path, or a file open for reading)
        as the blob for digest. False if the store already had it (or another
        uploader won the race); True if this call stored it. Raises
        StoreUnavailable (nothing partial is left)."""
        key = self.blob_key(digest)
        if size is None:
            size = os.fstat(path.fileno()).st_size if hasattr(path, "read") else os.path.getsize(path)
        stored = self.size_of(digest)
        if stored == size:
            return False
        # None: create it, and lose quietly to a racing uploader. A stored
        # object of another size is wrong (ours verified): replace it.
        condition = {"IfNoneMatch": "*"} if stored is None else {}
        if stored is not None:
            log.error("object store: %s holds %d bytes, not %d; replacing it", key, stored, size)
        if size <= PART_SIZE:
            checksum = base64.b64encode(bytes.fromhex(digest.split(":", 1)[1])).decode()
            with _reading(path) as f:
                result = self._call("put_object", quiet=(412,), upload=True, Key=key, Body=f, ContentLength=size,
                                    ChecksumSHA256=checksum, **condition)
            return result != 412
        return self._upload_parts(key, path, size, condition)

    def _upload_parts(self, key: str, path: str | os.PathLike, size: int, condition: dict) -> bool:
        """Multipart: parts read in order (the whole file is hashed on the way:
        a part's own checksum only covers its transfer), UPLOAD_THREADS in
        flight, completed only if the whole file still matches its digest."""
        upload_id = self._call("create_multipart_upload", upload=True, Key=key,
                               ChecksumAlgorithm="SHA256")["UploadId"]
        whole = hashlib.sha256()

        def send(number: int, data: bytes) -> dict:
            checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
            result = self._call("upload_part", upload=True, Key=key, UploadId=upload_id, PartNumber=number,
                                Body=data, ChecksumSHA256=checksum)
            return {"PartNumber": number, "ETag": result["ETag"], "ChecksumSHA256": checksum}

        try:
            with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="s3-upload") as pool, \
                    _reading(path) as f:
                pending, parts = [], []
                for number in range(1, -(-size // PART_SIZE) + 1):
                    if len(pending) >= UPLOAD_THREADS:  # bounds the parts held in memory
                        parts.append(pending.pop(0).result())
                    data = f.read(PART_SIZE)
                    whole.update(data)
                    pending.append(pool.submit(send, number, data))
                parts.extend(future.result() for future in pending)
            if "sha256:" + whole.hexdigest() != "sha256:" + key.rsplit("/", 1)[1]:
                raise BadDigest(f"{path} no longer matches {key.rsplit('/', 1)[1]}")
            # If-None-Match: * is not exclusive for completions on every server
            # (SeaweedFS 4.48), but a second completion stores the same bytes.
            result = self._call("complete_multipart_upload", quiet=(412,), upload=True, Key=key,
                                UploadId=upload_id, MultipartUpload={"Parts": parts}, **condition)
        except BaseException:
            self._abort(key, upload_id)
            raise
        if result == 412:
            self._abort(key, upload_id)
            return False
        return True

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self._s3_upload.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (botocore.exceptions.ClientError, *_TRANSPORT_ERRORS):
            pass  # a lifecycle rule for incomplete multipart uploads cleans up (README)

    def delete(self, digest: str, etag: str | None = None) -> bool:
        """Remove a blob; with etag, only if it is still the object read (a
        reader that found it corrupt spares a good copy put back since)."""
        params = {"Key": self.blob_key(digest)}
        if etag is not None:
            params["IfMatch"] = etag
        return self._call("delete_object", quiet=(404, 412), **params) not in (404, 412)

    # -- records -----------------------------------------------------------------
    def record_key(self, name: str) -> str:
        if not RECORD_NAME_RE.fullmatch(name) or len(name) > 900:
            raise ValueError(f"bad record name: {name!r}")
        return f"{self.config.prefix}records/{name}"

    def get_record(self, name: str) -> Record | None:
        result = self._call("get_object", quiet=(404,), Key=self.record_key(name))
        if result == 404:
            return None
        if result["ContentLength"] > MAX_RECORD:
            result["Body"].close()
            raise self._failed(f"record {name} is {result['ContentLength']} bytes, more than we keep")
        try:
            data = result["Body"].read()
        except _TRANSPORT_ERRORS as exc:
            raise self._failed(f"reading record {name}: {exc}") from exc
        return Record(data, result["ETag"])

    def create_record(self, name: str, value) -> Record | None:
        """Put-if-absent: the new record, or None if one exists already."""
        return self._put_record(name, value, IfNoneMatch="*")

    def replace_record(self, name: str, value, etag: str) -> Record | None:
        """Compare-and-swap: the new record, or None if it changed (or went) since it was read."""
        return self._put_record(name, value, IfMatch=etag)

    def put_record(self, name: str, value) -> Record:
        """Write unconditionally (last writer wins)."""
        return self._put_record(name, value)

    def _put_record(self, name: str, value, **condition) -> Record | None:
        data = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True).encode()
        if len(data) > MAX_RECORD:
            raise ValueError(f"record {name} is {len(data)} bytes, more than {MAX_RECORD}")
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        result = self._call("put_object", quiet=(404, 412), Key=self.record_key(name), Body=data,
                            ChecksumSHA256=checksum, **condition)
        return None if result in (404, 412) else Record(data, result["ETag"])

    def delete_record(self, name: str, etag: str | None = None) -> bool:
        params = {"Key": self.record_key(name)}
        if etag is not None:
            params["IfMatch"] = etag
        return self._call("delete_object", quiet=(404, 412), **params) not in (404, 412)

    def list_records(self, prefix: str = "") -> Iterator[str]:
        """Names of the records whose names start with prefix, in order."""
        base = f"{self.config.prefix}records/"
        token = None
        while True:
            params = {"Prefix": base + prefix}
            if token:
                params["ContinuationToken"] = token
            page = self._call("list_objects_v2", **params)
            for item in page.get("Contents", []):
                yield item["Key"][len(base):]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def close(self) -> None:
        self._s3.close()
        self._s3_upload.close()


@contextlib.contextmanager
def _reading(path: str | os.PathLike | BinaryIO) -> Iterator[BinaryIO]:
    """The file at path, opened; or an open file, from its start and left open."""
    if hasattr(path, "read"):
        path.seek(0)
        yield path
    else:
        with open(path, "rb") as f:
            yield f
