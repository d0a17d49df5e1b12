"""Unit tests for the mirror's own HTTP client: relayed answers are whole or an error."""

import socket
import threading

import pytest
import requests

from addon.upstream import UpstreamClient


@pytest.fixture
def cut_short():
    """A server that promises 100 bytes, sends 10 and closes the connection."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            if stop.is_set():
                conn.close()
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n" + b"{" * 10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    socket.create_connection(server.getsockname(), timeout=5).close()  # wakes accept()
    thread.join(5)
    server.close()
    assert not thread.is_alive()


def test_a_manifest_cut_short_is_an_error_not_a_short_200(cut_short):
    with pytest.raises(requests.ConnectionError, match="cut short"):
        UpstreamClient().fetch("GET", f"{cut_short}/v2/x/manifests/latest", {})


def test_a_head_has_no_body_to_check(cut_short):
    answer = UpstreamClient().fetch("HEAD", f"{cut_short}/v2/x/manifests/latest", {})
    assert answer.status == 200 and answer.body == b""


def test_a_registry_that_timed_out_is_asked_again_by_one_request_after_the_quiet_time(monkeypatch):
    from addon import upstream as module

    now = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    client = UpstreamClient()

    def times_out(timeout):
        assert timeout == (module.CONNECT_TIMEOUT, module.ANSWER_TIMEOUT)
        raise requests.ReadTimeout("no answer")

    try:
        with pytest.raises(requests.Timeout):
            client._answered("https://hung.example/v2/", times_out)
        assert client.hung("https://hung.example:443") and not client.hung("https://other.example:443")
        now[0] += module.QUIET_FOR
        assert not client.hung("https://hung.example:443")  # this caller asks again
        assert client.hung("https://hung.example:443")  # the others do not meanwhile
        client._answered("https://hung.example/v2/", lambda timeout: "an answer")
        assert client.hung("https://hung.example:443")  # a ping's answer says nothing of its manifests
        client._answered("https://hung.example/v2/x/manifests/latest", lambda timeout: "an answer")
        assert not client.hung("https://hung.example:443")
    finally:
        client.close()


def test_the_quiet_time_is_at_least_the_timeout(monkeypatch):
    """With upstream_timeout over 30 s, a second caller asked while the first
    still waited for its answer."""
    from addon import upstream as module

    now = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    client = UpstreamClient(answer_timeout=90)

    def times_out(timeout):
        raise requests.ReadTimeout("no answer")

    try:
        with pytest.raises(requests.Timeout):
            client._answered("https://slow.example/v2/x/manifests/latest", times_out)
        now[0] += module.QUIET_FOR + 1
        assert client.hung("https://slow.example:443")  # 31 s: the 90 s timeout is not over
        now[0] += 60
        assert not client.hung("https://slow.example:443")
    finally:
        client.close()


def test_an_ipv6_registry_is_named_with_brackets():
    from mitmproxy.test import tutils

    from addon.flows import host_port, registry_of
    from addon.registries import origin_of
    from addon.settings import host_port_of

    assert origin_of("http://[::1]:5000/v2/") == "http://[::1]:5000"
    assert origin_of("https://[2001:db8::1]/v2/") == "https://[2001:db8::1]:443"
    request = tutils.treq(host=b"::1", port=5000, scheme=b"http")
    assert registry_of(request) == origin_of("http://[::1]:5000") == "http://[::1]:5000"
    assert host_port(request) == host_port_of(registry_of(request)) == "[::1]:5000"  # as realms name it
