"""What the shared tier relies on from the object store, pinned against the real
SeaweedFS (tests/harness/seaweedfs.py), under concurrency where it matters.

A SeaweedFS upgrade that breaks any of these fails here first. The findings
(SeaweedFS 4.48) are summarised in addon/objectstore.py's docstring. Requests
are made with boto3, the client the mirror uses.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import botocore.exceptions
import pytest

RACERS = 16


@pytest.fixture
def s3(seaweedfs):
    return seaweedfs.client(endpoint=seaweedfs.direct_endpoint, max_pool_connections=RACERS * 2)


def _status(call) -> int:
    try:
        return call()["ResponseMetadata"]["HTTPStatusCode"]
    except botocore.exceptions.ClientError as exc:
        return exc.response["ResponseMetadata"]["HTTPStatusCode"]


def _race(n: int, attempt) -> list[int]:
    """Run attempt(i) in n threads released at once; their statuses."""
    start = threading.Barrier(n, timeout=30)

    def one(i):
        start.wait()
        return attempt(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def _body(s3, bucket, key) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_put_if_none_match_has_exactly_one_winner(seaweedfs, s3, s3_prefix):
    """Records and leases are created with If-None-Match: *. Of 16 racing
    creators exactly one wins; the others get 412; the object is the winner's."""
    for round_ in range(10):
        key = f"{s3_prefix}race-{round_}"
        bodies = [f"{round_}:{i}:".encode() * 500 for i in range(RACERS)]
        statuses = _race(RACERS, lambda i: _status(lambda: s3.put_object(
            Bucket=seaweedfs.bucket, Key=key, Body=bodies[i], IfNoneMatch="*")))
        winners = [i for i, status in enumerate(statuses) if status == 200]
        assert len(winners) == 1, (round_, statuses)
        assert sorted(set(statuses)) == [200, 412], statuses
        assert _body(s3, seaweedfs.bucket, key) == bodies[winners[0]]


def test_put_if_match_is_compare_and_swap(seaweedfs, s3, s3_prefix):
    """Records are updated with If-Match on the ETag read: of 16 writers that
    read the same version, exactly one replaces it, the others get 412."""
    key = f"{s3_prefix}cas"
    etag = s3.put_object(Bucket=seaweedfs.bucket, Key=key, Body=b"v0")["ETag"]
    assert s3.head_object(Bucket=seaweedfs.bucket, Key=key)["ETag"] == etag  # the PUT's ETag is the one to match
    for round_ in range(6):
        bodies = [f"v{round_}-{i}".encode() for i in range(RACERS)]
        results = _race(RACERS, lambda i: _put_if_match(s3, seaweedfs.bucket, key, bodies[i], etag))
        winners = [(i, new_etag) for i, (status, new_etag) in enumerate(results) if status == 200]
        assert len(winners) == 1, (round_, results)
        assert sorted({status for status, _ in results}) == [200, 412]
        winner, etag = winners[0]
        assert _body(s3, seaweedfs.bucket, key) == bodies[winner]
    # If-Match on a key that does not exist: 412 here (AWS answers 404); both mean "lost".
    assert _status(lambda: s3.put_object(Bucket=seaweedfs.bucket, Key=f"{s3_prefix}none", Body=b"x",
                                         IfMatch=etag)) in (404, 412)


def _put_if_match(s3, bucket, key, body, etag) -> tuple[int, str | None]:
    try:
        return 200, s3.put_object(Bucket=bucket, Key=key, Body=body, IfMatch=etag)["ETag"]
    except botocore.exceptions.ClientError as exc:
        return exc.response["ResponseMetadata"]["HTTPStatusCode"], None


def test_delete_if_match_spares_a_replaced_object(seaweedfs, s3, s3_prefix):
    """A reader that finds a bad object deletes it only if it is still the one it read."""
    key = f"{s3_prefix}bad"
    old = s3.put_object(Bucket=seaweedfs.bucket, Key=key, Body=b"bad")["ETag"]
    s3.put_object(Bucket=seaweedfs.bucket, Key=key, Body=b"good")
    assert _status(lambda: s3.delete_object(Bucket=seaweedfs.bucket, Key=key, IfMatch=old)) == 412
    assert _body(s3, seaweedfs.bucket, key) == b"good"
    current = s3.head_object(Bucket=seaweedfs.bucket, Key=key)["ETag"]
    assert _status(lambda: s3.delete_object(Bucket=seaweedfs.bucket, Key=key, IfMatch=current)) == 204
    assert _status(lambda: s3.head_object(Bucket=seaweedfs.bucket, Key=key)) == 404
    # Gone, it can be created again with If-None-Match: * (a lease freed by delete).
    assert _status(lambda: s3.put_object(Bucket=seaweedfs.bucket, Key=key, Body=b"again", IfNoneMatch="*")) == 200


def test_racing_multipart_completions_leave_one_whole_upload(seaweedfs, s3, s3_prefix):
    """Large blobs are uploaded in parts. What matters: whoever completes, the
    object is exactly one uploader's whole body, never a mix, and every
    completion answers 200 or 412. (If-None-Match: * on completion is NOT
    exclusive in SeaweedFS 4.48: up to 6 of 8 racing completions got 200;
    nothing relies on it.)"""
    part = 5 << 20  # S3's smallest part but the last
    for round_ in range(3):
        key = f"{s3_prefix}mpu-{round_}"

        def upload(i):
            upload_id = s3.create_multipart_upload(Bucket=seaweedfs.bucket, Key=key)["UploadId"]
            parts = [{"PartNumber": n, "ETag": s3.upload_part(
                Bucket=seaweedfs.bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=body)["ETag"]}
                for n, body in ((1, bytes([i]) * part), (2, f"tail {i}".encode()))]
            return upload_id, parts

        with ThreadPoolExecutor(8) as pool:
            uploads = list(pool.map(upload, range(8)))
        statuses = _race(8, lambda i: _status(lambda: s3.complete_multipart_upload(
            Bucket=seaweedfs.bucket, Key=key, UploadId=uploads[i][0], IfNoneMatch="*",
            MultipartUpload={"Parts": uploads[i][1]})))
        assert 200 in statuses and set(statuses) <= {200, 412}, statuses
        body = _body(s3, seaweedfs.bucket, key)
        assert body in {bytes([i]) * part + f"tail {i}".encode() for i in range(8)}


def test_object_appears_only_whole(seaweedfs, s3, s3_prefix):
    """While a PUT's body is half sent, readers see no object (or the old one,
    whole); a PUT cut off midway leaves nothing behind."""
    key = f"{s3_prefix}slow"
    size, half = 16 << 20, 8 << 20

    def half_sent_put(key: str, body: bytes) -> http.client.HTTPConnection:
        url = urlsplit(s3.generate_presigned_url("put_object", Params={"Bucket": seaweedfs.bucket, "Key": key}))
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        conn.putrequest("PUT", f"{url.path}?{url.query}")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        conn.send(body[:half])
        return conn

    old, new = os.urandom(size), os.urandom(size)
    conn = half_sent_put(key, old)
    assert _status(lambda: s3.head_object(Bucket=seaweedfs.bucket, Key=key)) == 404
    assert _status(lambda: s3.get_object(Bucket=seaweedfs.bucket, Key=key)) == 404
    conn.send(old[half:])
    assert conn.getresponse().status == 200
    conn.close()
    assert _body(s3, seaweedfs.bucket, key) == old

    conn = half_sent_put(key, new)
    assert _body(s3, seaweedfs.bucket, key) == old  # the old object, whole, until the new one is complete
    conn.send(new[half:])
    assert conn.getresponse().status == 200
    conn.close()
    assert _body(s3, seaweedfs.bucket, key) == new

    cut = f"{s3_prefix}cut"
    conn = half_sent_put(cut, old)
    conn.sock.shutdown(socket.SHUT_RDWR)  # the uploader dies mid-body
    conn.close()
    # The server may still be finishing the request: the cut body must never
    # become an object. Ask a few times, as a reader racing the server would.
    for _ in range(20):
        assert _status(lambda: s3.head_object(Bucket=seaweedfs.bucket, Key=cut)) == 404


def test_ranged_get(seaweedfs, s3, s3_prefix):
    key = f"{s3_prefix}range"
    body = os.urandom(1 << 20)
    s3.put_object(Bucket=seaweedfs.bucket, Key=key, Body=body)
    got = s3.get_object(Bucket=seaweedfs.bucket, Key=key, Range="bytes=10-19")
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
    assert got["ContentRange"] == f"bytes 10-19/{len(body)}"
    assert got["Body"].read() == body[10:20]
    got = s3.get_object(Bucket=seaweedfs.bucket, Key=key, Range=f"bytes={len(body) - 100}-")
    assert got["ContentRange"] == f"bytes {len(body) - 100}-{len(body) - 1}/{len(body)}"
    assert got["Body"].read() == body[-100:]
    assert _status(lambda: s3.get_object(Bucket=seaweedfs.bucket, Key=key, Range=f"bytes={len(body)}-")) == 416


def test_sha256_checksum_is_checked_by_the_server(seaweedfs, s3, s3_prefix):
    """A blob's digest is its sha256: sent as x-amz-checksum-sha256, the server
    refuses bytes that do not match it (400 BadDigest) and stores nothing."""
    body = os.urandom(100_000)
    right = base64.b64encode(hashlib.sha256(body).digest()).decode()
    wrong = base64.b64encode(hashlib.sha256(body + b"!").digest()).decode()
    key = f"{s3_prefix}checked"
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        s3.put_object(Bucket=seaweedfs.bucket, Key=key, Body=body, ChecksumSHA256=wrong)
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert refused.value.response["Error"]["Code"] == "BadDigest"
    assert _status(lambda: s3.head_object(Bucket=seaweedfs.bucket, Key=key)) == 404
    s3.put_object(Bucket=seaweedfs.bucket, Key=key, Body=body, ChecksumSHA256=right)
    assert s3.head_object(Bucket=seaweedfs.bucket, Key=key, ChecksumMode="ENABLED")["ChecksumSHA256"] == right
    # Parts too.
    upload_id = s3.create_multipart_upload(Bucket=seaweedfs.bucket, Key=key + ".mpu",
                                           ChecksumAlgorithm="SHA256")["UploadId"]
    try:
        assert _status(lambda: s3.upload_part(Bucket=seaweedfs.bucket, Key=key + ".mpu", UploadId=upload_id,
                                              PartNumber=1, Body=body, ChecksumSHA256=wrong)) == 400
        assert _status(lambda: s3.upload_part(Bucket=seaweedfs.bucket, Key=key + ".mpu", UploadId=upload_id,
                                              PartNumber=1, Body=body, ChecksumSHA256=right)) == 200
    finally:
        s3.abort_multipart_upload(Bucket=seaweedfs.bucket, Key=key + ".mpu", UploadId=upload_id)


def test_list_with_prefix_in_pages(seaweedfs, s3, s3_prefix):
    for i in range(5):
        s3.put_object(Bucket=seaweedfs.bucket, Key=f"{s3_prefix}a/{i}", Body=b"x")
    s3.put_object(Bucket=seaweedfs.bucket, Key=f"{s3_prefix}ab", Body=b"x")
    first = s3.list_objects_v2(Bucket=seaweedfs.bucket, Prefix=f"{s3_prefix}a/", MaxKeys=2)
    assert [o["Key"] for o in first["Contents"]] == [f"{s3_prefix}a/0", f"{s3_prefix}a/1"]
    assert first["IsTruncated"]
    rest = s3.list_objects_v2(Bucket=seaweedfs.bucket, Prefix=f"{s3_prefix}a/",
                              ContinuationToken=first["NextContinuationToken"])
    assert [o["Key"] for o in rest["Contents"]] == [f"{s3_prefix}a/{i}" for i in (2, 3, 4)]
    assert not rest["IsTruncated"]
