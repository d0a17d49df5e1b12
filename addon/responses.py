"""Answers the mirror gives itself, as mitmproxy responses."""

from __future__ import annotations

from mitmproxy import http

from .oci import error_body

RELAY_DROPS = ("connection", "keep-alive", "transfer-encoding")


def oci_error(status: int, code: str, message: str, detail: str = "") -> http.Response:
    """An error as the OCI distribution spec words it: {"errors": [...]}."""
    return http.Response.make(status, error_body(code, message, detail), {"Content-Type": "application/json"})


def relayed(answer, method: str) -> http.Response:
    """mitmproxy response carrying an upstream answer unchanged (the body as
    sent: Response.make would encode it again by its Content-Encoding)."""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()
               if k.lower() not in RELAY_DROPS]
    response = http.Response.make(answer.status)
    response.headers = http.Headers(headers)  # after make(), which would re-encode by them
    response.raw_content = answer.body
    if method == "HEAD" and "Content-Length" in answer.headers:
        response.headers["Content-Length"] = answer.headers["Content-Length"]
    else:
        response.headers["Content-Length"] = str(len(answer.body))
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
