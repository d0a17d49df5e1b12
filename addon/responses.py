"""Answers the mirror gives itself, as mitmproxy responses."""

from __future__ import annotations

import time

from mitmproxy import http
from mitmproxy.net.http import status_codes

from .oci import error_body

RELAY_DROPS = ("connection", "keep-alive", "transfer-encoding")
_REASONS = {code: reason.encode() for code, reason in status_codes.RESPONSES.items()}


def oci_error(status: int, code: str, message: str, detail: str = "") -> http.Response:
    """An error as the OCI distribution spec words it: {"errors": [...]}."""
    return http.Response.make(status, error_body(code, message, detail), {"Content-Type": "application/json"})


def relayed(answer, method: str) -> http.Response:
    """mitmproxy response carrying an upstream answer unchanged (the body as
    sent: Response.make would encode it again by its Content-Encoding). Its
    headers are made once per answer and method (answer.made)."""
    fields = answer.made.get(method)
    if fields is None:
        fields = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()
                  if k.lower() not in RELAY_DROPS and k.lower() != "content-length"]
        length = answer.headers.get("Content-Length") if method == "HEAD" else None
        fields.append((b"Content-Length", (length or str(len(answer.body))).encode("latin-1")))
        fields = answer.made[method] = tuple(fields)
    return ready(answer.status, fields, answer.body)


def ready(status: int, fields: tuple[tuple[bytes, bytes], ...], body: bytes) -> http.Response:
    """A response from header fields made beforehand (Content-Length among
    them) and a body sent as it is: what Response.make gives, without its
    work per header and on the body (the warm answers of a rollout).

    It is the object `http.Response(b"HTTP/1.1", status, reason, fields,
    body, None, now, now)` makes, without the type check of each of its
    fields that mitmproxy's constructor runs (MessageData.__post_init__:
    Response() took 28 us here, this 1 us; the fields, a tuple of bytes
    pairs, are shared as Headers share them until one is changed).
    test_mirror.py compares the two, and runs that check on what this makes."""
    now = time.time()
    headers = object.__new__(http.Headers)  # the constructors, less their checks
    headers.fields = fields
    data = object.__new__(http.ResponseData)
    data.__dict__.update(http_version=b"HTTP/1.1", headers=headers, content=body, trailers=None,
                         timestamp_start=now, timestamp_end=now, status_code=status,
                         reason=_REASONS.get(status, b""))
    response = object.__new__(http.Response)
    response.data = data
    return response


def blob_headers(digest: str) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "Docker-Content-Digest": digest,
        "Etag": f'"{digest}"',
        "Accept-Ranges": "bytes",
    }


def blob_head(digest: str, size: int) -> http.Response:
    """A HEAD answered from the store."""
    response = http.Response.make(200, b"", blob_headers(digest))
    response.headers["Content-Length"] = str(size)
    response.headers["X-Registry-Cache"] = "hit"  # e.g. for scripts/prefetch.py
    return response
