"""Streaming the bodies the mirror passes through.

mitmproxy holds a whole body in memory unless told to stream it: a pushed
layer, or a large download in regular mode, would cost its size. Bodies the
mirror passes through are streamed, flow by flow, when over STREAM_BODIES_OVER
or of unknown size. (mitmproxy's global `stream_large_bodies` is left unset:
with it, refusing a large request breaks mitmproxy's HTTP layer.)

One case needs care: an HTTP/2 upload of unknown size (curl -T -, a streamed
layer of go-containerregistry) has no framing an HTTP/1.1 server understands,
and mitmproxy 12.3.1, passing it on as HTTP/1.1, adds none: the server reads
an empty body and then the layer's bytes as its next request (seen here: a
502). So such an upload is streamed only to a server whose protocol is
known: plain HTTP (mitmproxy speaks HTTP/1.1 to it), or a TLS server this
client's connection has already met, or else any connection of this process
(a script's `curl -X POST` then `curl -T -` are two connections); chunked
framing is added for HTTP/1.1. Otherwise it is buffered, and given a
Content-Length once it is complete.
"""

from __future__ import annotations

from mitmproxy import http, tls

from . import flows

STREAM_BODIES_OVER = 1 << 20
HTTP1_ALPNS = (None, b"", b"http/1.1", b"http/1.0")  # a server that negotiated no protocol speaks HTTP/1.1
MAX_SERVERS_REMEMBERED = 10_000


class BodyStreaming:
    """Which bodies to stream, and what that needs to know: the protocol each
    client connection's servers negotiated (mitmproxy connects lazily, so a
    request's own server connection is not open yet when its headers arrive).

    An addon of its own, after the mirror in `addons`: the mirror has decided
    by then which requests it answers (flows.passes_through)."""

    def __init__(self) -> None:
        self._alpn: dict[str, dict[tuple[str, int], bytes | None]] = {}  # client id -> server -> ALPN
        self._last_alpn: dict[tuple[str, int], bytes | None] = {}  # server -> ALPN of its latest connection offered h2

    # -- hooks ---------------------------------------------------------------

    def tls_established_server(self, data: tls.TlsData) -> None:
        client, server = data.context.client, data.conn
        if server.address is None:
            return
        if b"h2" in (server.alpn_offers or ()):  # what it says to HTTP/2 clients, whose uploads need this
            if len(self._last_alpn) >= MAX_SERVERS_REMEMBERED:
                self._last_alpn.clear()
            self._last_alpn[server.address] = server.alpn
        if client.timestamp_end is None:  # not after client_disconnected
            self._alpn.setdefault(client.id, {})[server.address] = server.alpn

    def client_disconnected(self, client) -> None:
        self._alpn.pop(client.id, None)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Stream a request body passed through that is large or of unknown size."""
        if flow.response is not None or not flows.passes_through(flow):
            return
        request = flow.request
        if _declares_large_body(request):
            request.stream = True
        elif _unframed_upload(request):
            if request.scheme == "http":
                alpn = None
            else:
                server = (request.host, request.port)
                alpn = self._alpn.get(flow.client_conn.id, {}).get(server, self._last_alpn.get(server, b"unknown"))
            if alpn == b"h2":
                request.stream = True  # mitmproxy streams only when a body follows the headers
            elif alpn in HTTP1_ALPNS:
                request.headers["Transfer-Encoding"] = "chunked"
                # mitmproxy turns an empty HTTP/2 DATA frame into an empty
                # chunk, which would end the body there: drop those.
                request.stream = _without_empty_pieces
            # else: not met yet (or HTTP/3): buffered, and request_complete frames it

    @staticmethod
    def request(flow: http.HTTPFlow) -> None:
        """Give a buffered HTTP/2 upload of unknown size its Content-Length."""
        request = flow.request
        if not request.stream and _unframed_upload(request) and request.raw_content:
            request.headers["Content-Length"] = str(len(request.raw_content))

    @staticmethod
    def responseheaders(flow: http.HTTPFlow) -> None:
        """Stream what the mirror said to stream (a blob from the blob server,
        a blob passed through), a proxy client's request to the blob server
        (a fill in progress must reach it as it arrives, however small the
        blob), and any other large answer passed through."""
        state = flows.state_of(flow)
        if (state is not None and state.stream_response) or _to_blob_server(flow.request):
            flow.response.stream = True
        elif flow.request.method != "HEAD" and _declares_large_body(flow.response):
            flow.response.stream = True


def _declares_large_body(message: http.Message) -> bool:
    """A body over STREAM_BODIES_OVER, or one whose size is not declared
    (chunked; for a response also one that runs until the connection closes).
    HTTP/2 request bodies of unknown size are _unframed_upload's."""
    length = message.headers.get("Content-Length", "")
    if length.isdigit():
        return int(length) > STREAM_BODIES_OVER
    if "chunked" in message.headers.get("Transfer-Encoding", "").lower():
        return True
    return isinstance(message, http.Response)


def _to_blob_server(request: http.Request) -> bool:
    """A proxy client following a redirect to the blob server (at whatever
    address blob_url gave). (Streaming anything else that looks like it
    costs nothing.)"""
    return request.path.startswith("/blobs/") and "&sig=" in request.path


def _without_empty_pieces(data: bytes) -> list[bytes]:
    return [data] if data else []


def _unframed_upload(request: http.Request) -> bool:
    """An HTTP/2 or 3 request that may carry a body and does not say its size."""
    return ((request.is_http2 or request.is_http3) and request.method in ("POST", "PUT", "PATCH")
            and "Content-Length" not in request.headers and "Transfer-Encoding" not in request.headers)
