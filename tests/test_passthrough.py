"""Unit tests for addon/passthrough.py: which pass-through bodies are streamed,
and the framing HTTP/2 uploads of unknown size get. End to end (curl over
HTTP/2 through a running mirror to HTTP/1.1 and HTTP/2 registries):
test_e2e_modes.py."""

from types import SimpleNamespace

from mitmproxy import connection
from mitmproxy.test import tflow, tutils

from addon.passthrough import STREAM_BODIES_OVER, BodyStreaming


def _flow(method=b"PATCH", version=b"HTTP/2.0", headers=(), content=b""):
    flow = tflow.tflow(req=tutils.treq(method=method, http_version=version, scheme=b"https",
                                       headers=headers, content=content))
    flow.request.headers.pop("content-length", None)
    flow.client_conn.timestamp_end = None  # connected
    for name, value in headers:
        flow.request.headers[name.decode()] = value.decode()
    return flow


def _met_server(streaming: BodyStreaming, flow, alpn: bytes | None, offered=(b"h2", b"http/1.1")) -> None:
    server = connection.Server(address=(flow.request.host, flow.request.port))
    server.alpn, server.alpn_offers = alpn, offered
    streaming.tls_established_server(SimpleNamespace(context=SimpleNamespace(client=flow.client_conn), conn=server))


def test_http1_bodies_stream_when_large_or_chunked():
    streaming = BodyStreaming()
    for headers, streamed in [
        (((b"Content-Length", str(STREAM_BODIES_OVER + 1).encode()),), True),
        (((b"Content-Length", b"100"),), False),
        (((b"Transfer-Encoding", b"chunked"),), True),
    ]:
        flow = _flow(version=b"HTTP/1.1", headers=headers)
        streaming.requestheaders(flow)
        assert bool(flow.request.stream) is streamed, headers


def test_an_http2_upload_of_unknown_size_waits_for_its_server_to_be_known():
    streaming = BodyStreaming()
    flow = _flow()
    streaming.requestheaders(flow)
    assert not flow.request.stream and "Transfer-Encoding" not in flow.request.headers
    flow.request.raw_content = b"x" * 1000  # buffered whole; then framed with its length
    streaming.request(flow)
    assert flow.request.headers["Content-Length"] == "1000"


def test_a_buffered_http2_request_without_a_body_gets_no_length():
    flow = _flow(method=b"POST")
    BodyStreaming.request(flow)
    assert "Content-Length" not in flow.request.headers


def test_an_http2_upload_to_a_known_server_streams_framed_for_its_protocol():
    streaming = BodyStreaming()
    to_http1, to_http2 = _flow(), _flow()
    _met_server(streaming, to_http1, b"http/1.1")
    streaming.requestheaders(to_http1)
    assert to_http1.request.stream and to_http1.request.headers["Transfer-Encoding"] == "chunked"
    other_client = BodyStreaming()
    _met_server(other_client, to_http2, b"h2")
    other_client.requestheaders(to_http2)
    assert to_http2.request.stream and "Transfer-Encoding" not in to_http2.request.headers


def test_what_a_client_met_is_forgotten_when_it_disconnects():
    streaming = BodyStreaming()
    flow = _flow()
    _met_server(streaming, flow, b"h2")
    streaming.client_disconnected(flow.client_conn)
    assert streaming._alpn == {}  # per client; what the server speaks is still known process-wide


def test_an_http2_download_request_is_left_alone():
    streaming = BodyStreaming()
    flow = _flow(method=b"GET")
    _met_server(streaming, flow, b"http/1.1")
    streaming.requestheaders(flow)
    assert not flow.request.stream and "Transfer-Encoding" not in flow.request.headers


def test_chunked_framing_drops_empty_pieces_that_would_end_the_body():
    """mitmproxy passes an empty HTTP/2 DATA frame on as an empty piece, and
    an empty chunk ends a chunked body."""
    streaming = BodyStreaming()
    flow = _flow()
    _met_server(streaming, flow, b"http/1.1")
    streaming.requestheaders(flow)
    assert flow.request.stream(b"") == [] and flow.request.stream(b"abc") == [b"abc"]


def test_an_http2_upload_to_a_plain_http_server_streams_chunked():
    """mitmproxy speaks only HTTP/1.1 to a plain-HTTP server."""
    flow = _flow()
    flow.request.scheme = "http"
    BodyStreaming().requestheaders(flow)
    assert flow.request.stream and flow.request.headers["Transfer-Encoding"] == "chunked"


def test_an_http2_upload_to_a_server_of_another_protocol_is_buffered():
    streaming = BodyStreaming()
    flow = _flow()
    _met_server(streaming, flow, b"h3")
    streaming.requestheaders(flow)
    assert not flow.request.stream and "Transfer-Encoding" not in flow.request.headers


def test_a_server_met_after_its_client_left_is_not_remembered():
    streaming = BodyStreaming()
    flow = _flow()
    flow.client_conn.timestamp_end = 1.0
    _met_server(streaming, flow, b"h2")
    assert streaming._alpn == {}


def test_a_server_another_connection_met_with_http2_on_offer_counts_for_all():
    """A script's `curl -X POST` and `curl -T -` are two connections."""
    streaming = BodyStreaming()
    first, second = _flow(), _flow()
    second.client_conn = connection.Client(peername=("127.0.0.1", 2), sockname=("127.0.0.1", 1))
    _met_server(streaming, first, b"http/1.1", offered=(b"h2", b"http/1.1"))
    streaming.requestheaders(second)
    assert second.request.stream and second.request.headers["Transfer-Encoding"] == "chunked"


def test_what_a_server_said_to_an_http1_client_says_nothing_about_http2():
    """Offered only HTTP/1.1, an HTTP/2 server answers HTTP/1.1."""
    streaming = BodyStreaming()
    first, second = _flow(), _flow()
    second.client_conn = connection.Client(peername=("127.0.0.1", 2), sockname=("127.0.0.1", 1))
    _met_server(streaming, first, b"http/1.1", offered=(b"http/1.1",))
    streaming.requestheaders(second)
    assert not second.request.stream and "Transfer-Encoding" not in second.request.headers
