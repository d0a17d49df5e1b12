"""Unit tests for the small helpers of addon/mirror.py (the request flow
itself is tested end to end, in the test_e2e_* modules)."""

import gzip
import resource

from mitmproxy.test import tutils
from requests.structures import CaseInsensitiveDict

from addon.flows import end_to_end_headers as _end_to_end_headers
from addon.responses import relayed as _relayed
from addon.settings import raise_open_files_limit
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
