"""Unit tests for the small helpers of the hooks (the request flow
itself is tested end to end, in the test_e2e_* modules)."""

import gzip
import resource

from mitmproxy import http
from mitmproxy.test import tutils
from requests.structures import CaseInsensitiveDict

from addon.flows import end_to_end_headers as _end_to_end_headers
from addon.manifest_relay import _from_store
from addon.oci import Manifest
from addon.responses import ready, relayed as _relayed
from addon.settings import raise_open_files_limit
from addon.tokens import TokenEndpoint, TokenRelay
from addon.upstream import Answer


def test_a_relayed_answer_keeps_its_body_bytes_whatever_its_content_encoding():
    body = gzip.compress(b'{"errors":[]}')
    answer = Answer(500, CaseInsensitiveDict({"Content-Encoding": "gzip", "Content-Length": str(len(body))}), body)
    response = _relayed(answer, "GET")
    assert response.raw_content == body  # not gzipped a second time
    assert response.headers["Content-Length"] == str(len(body))


def test_a_relayed_answer_keeps_a_content_encoding_mitmproxy_does_not_know():
    answer = Answer(200, CaseInsensitiveDict({"Content-Encoding": "x-custom", "Content-Length": "3"}), b"abc")
    response = _relayed(answer, "GET")
    assert response.headers["Content-Encoding"] == "x-custom" and response.raw_content == b"abc"


def test_a_relayed_head_keeps_the_upstreams_content_length():
    answer = Answer(200, CaseInsensitiveDict({"Content-Length": "1234"}), b"")
    assert _relayed(answer, "HEAD").headers["Content-Length"] == "1234"


def test_an_answer_given_again_is_a_new_response_each_time():
    """A ping's or token's answer is relayed to every client of a rollout,
    its headers made once: what the hall or another addon changes in one
    client's response must not reach the next one."""
    answer = Answer(401, CaseInsensitiveDict({"WWW-Authenticate": 'Bearer realm="https://auth.example/token"',
                                              "Content-Length": "2"}), b"{}")
    first = _relayed(answer, "GET")
    first.headers["WWW-Authenticate"] = 'Bearer realm="http://mirror/token"'
    first.headers["X-Added"] = "1"
    second = _relayed(answer, "GET")
    assert second.headers.get_all("WWW-Authenticate") == ['Bearer realm="https://auth.example/token"']
    assert "X-Added" not in second.headers and second.raw_content == b"{}"
    assert second.status_code == 401 and second.reason == "Unauthorized" and second.http_version == "HTTP/1.1"


def test_a_kept_manifest_answers_each_client_with_a_response_of_its_own():
    manifest = Manifest("sha256:" + "a" * 64, "application/vnd.oci.image.manifest.v1+json", b'{"schemaVersion":2}')
    first = _from_store(manifest, "latest").response
    first.headers["X-Added"] = "1"
    second, head = _from_store(manifest, "latest").response, _from_store(manifest, "latest", "HEAD").response
    assert "X-Added" not in second.headers and second.content == manifest.body
    assert second.headers["Content-Type"] == manifest.media_type and second.headers["Docker-Content-Digest"] == manifest.digest
    assert head.content == b"" and head.headers["Content-Length"] == str(len(manifest.body))


def test_a_registry_that_changes_its_challenge_has_the_new_one_learnt_and_passed_on():
    """The rewritten challenge is kept while the registry sends the same one;
    a new one (back and forth) is learnt again and rewritten."""
    relay = TokenRelay(upstream=None)
    endpoint = TokenEndpoint(relay, workers=None, settings=None)
    ours = "http://127.0.0.1:5000/_registry_cache/token/registry.example"
    for realm in ("https://a.example/token", "https://b.example/token", "https://a.example/token"):
        response = tutils.tresp(headers=((b"WWW-Authenticate", f'Bearer realm="{realm}",service="s"'.encode()),))
        endpoint.pass_on_challenge(response, "https://registry.example:443", ours)
        assert relay.realm_of("https://registry.example:443") == realm
        assert response.headers.get_all("WWW-Authenticate") == [f'Bearer realm="{ours}",service="s"']


def test_client_headers_go_upstream_as_sent_bytes_merged_and_without_hop_by_hop():
    request = tutils.treq(headers=(
        (b"Accept", b"a/b"), (b"accept", b"c/d"), (b"X-Odd", b"\xff\xfe"),
        (b"Connection", b"keep-alive"), (b"Host", b"example.org"),
    ))
    assert _end_to_end_headers(request) == {"Accept": b"a/b, c/d", "X-Odd": b"\xff\xfe"}


def test_the_open_files_limit_is_raised_towards_the_hard_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raise_open_files_limit()
        raised, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert raised == (65536 if hard == resource.RLIM_INFINITY else min(hard, 65536))
        assert raised > 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_fill_failures_are_counted_by_the_reason_the_fill_set(tmp_path, monkeypatch):
    """A disk that fails (EIO) while a fill writes its part file is a local
    failure, never an upstream error; upstream trouble is counted as both."""
    import errno
    import hashlib
    import os
    import threading

    from addon import fill as fill_module
    from addon.fill import FailureReason, Fill
    from addon.flows import count_fill
    from addon.metrics import Metrics
    from addon.store import DiskBlobStore

    class Body:  # a 200 with a Content-Length, as requests hands it over
        status_code = 200

        def __init__(self, data):
            self.headers = {"Content-Length": str(len(data))}
            self._data = [data]
            self.raw = self

        def read1(self, n, decode_content=False):
            return self._data.pop() if self._data else b""

        def close(self):
            pass

    def eio(fd, data, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fill_module.os, "pwrite", eio)
    metrics = Metrics()
    store = DiskBlobStore(tmp_path / "cache", 1 << 30)
    try:
        data = os.urandom(1000)
        done = threading.Event()

        def counted(fill):
            count_fill(metrics, fill)
            done.set()

        fill = Fill("sha256:" + hashlib.sha256(data).hexdigest(), store, lambda *range_: Body(data),
                    on_finished=counted)
        fill.start()
        assert done.wait(30) and fill.failure is FailureReason.LOCAL
        fill.failure, fill.failure_status = FailureReason.UNAVAILABLE, 503  # as a fill the upstream failed
        count_fill(metrics, fill)
        stats = metrics.stats({"fills_in_flight": 0, "store_bytes": 0, "store_blobs": 0,
                                     "store_limit_bytes": 0})
        assert stats["fill_failures"] == {"local": 1, "upstream 503": 1}
        assert stats["upstream_errors"] == {"503": 1}
    finally:
        store.close()


def test_a_ready_answer_is_what_mitmproxys_constructor_makes_and_passes_its_type_check():
    """responses.ready skips mitmproxy's per-field type check (the cost of a warm answer)."""
    fields = ((b"Content-Type", b"application/json"), (b"Content-Length", b"2"))
    made = ready(404, fields, b"{}")
    checked = http.Response(b"HTTP/1.1", 404, b"Not Found", fields, b"{}", None,
                            made.timestamp_start, made.timestamp_end)
    assert made.get_state() == checked.get_state()
    for ours, theirs in ((made, checked), (made.data, checked.data), (made.headers, checked.headers)):
        assert vars(ours).keys() == vars(theirs).keys()
    made.data.__post_init__()  # mitmproxy's type check, on what was made without it
    made.headers["X-Added"] = "1"
    assert ready(404, fields, b"{}").headers.fields == fields  # a change is the response's own
    assert repr(made) == "Response(404, application/json, 2b)" and made.status_code == 404 and made.reason == "Not Found"
