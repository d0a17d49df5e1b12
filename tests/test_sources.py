"""sources.TieredSource: the tiers a fill's bytes come from, in order (unit
tests with stand-in tiers; tests/test_e2e_shared_tier.py and
tests/test_e2e_cluster.py run the real ones)."""

from __future__ import annotations

import io

import pytest
from requests.structures import CaseInsensitiveDict

from addon.sources import TieredSource, TierUnavailable

BLOB = bytes(range(256)) * 40


class Raw(io.BytesIO):
    def read1(self, limit=-1, decode_content=None):
        return super().read1(limit)

    def read(self, limit=None, decode_content=None):
        return super().read(limit)


class Answer:
    redirected = False

    def __init__(self, status, data=b""):
        self.status_code, self.raw = status, Raw(data)
        self.headers = CaseInsensitiveDict({"Content-Length": str(len(data))})

    def close(self):
        pass


class StandIn:
    def __init__(self, name, answers):
        self.name, self.answers, self.asked = name, list(answers), []

    def open(self, start, end):
        self.asked.append((start, end))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_tiers_are_asked_in_order_and_one_that_answers_keeps_answering():
    store = StandIn("object-store", [None])
    peer = StandIn("peer", [TierUnavailable("down")])
    upstream = StandIn("upstream", [Answer(206, BLOB[:100]), Answer(206, BLOB[100:])])
    source = TieredSource("sha256:x", [store, peer, upstream])
    assert source(0, 100).raw.read() == BLOB[:100]
    assert source(100, None).raw.read() == BLOB[100:]
    assert (store.asked, peer.asked, upstream.asked) == ([(0, 100)], [(0, 100)], [(0, 100), (100, None)])
    assert source.answered_by == "upstream" and source.upstream_answered
    assert source.tier_bytes == {}


def test_bytes_from_other_tiers_are_counted_and_prove_nothing():
    store = StandIn("object-store", [Answer(206, BLOB[:1000]), ConnectionError("reset"),
                                     TierUnavailable("down")])
    upstream = StandIn("upstream", [Answer(206, BLOB[1000:])])
    source = TieredSource("sha256:x", [store, upstream])
    first = source(0, 1000)
    while first.raw.read1(300):
        pass
    assert source.tier_bytes == {"object-store": 1000} and not source.upstream_answered
    with pytest.raises(ConnectionError):  # a broken call is the fill's to resume (with backoff)
        source(1000, None)
    assert source(1000, None).raw.read() == BLOB[1000:]  # the store is down by then: the upstream
    assert store.asked == [(0, 1000), (1000, None), (1000, None)]
    assert source.answered_by == "object-store" and source.upstream_answered


def test_an_upstream_refusal_is_an_answer_but_no_proof():
    source = TieredSource("sha256:x", [StandIn("upstream", [Answer(401)])])
    assert source(0, None).status_code == 401
    assert not source.upstream_answered


def test_no_tier_left_is_a_connection_error():
    source = TieredSource("sha256:x", [StandIn("object-store", [None]), StandIn("peer", [TierUnavailable("x")])])
    with pytest.raises(ConnectionError):
        source(0, None)
