"""addon/cluster.py: members, rendezvous ownership, DNS refresh."""

from __future__ import annotations

import collections
import hashlib
import socket
import threading

import pytest

from addon.cluster import Member, Membership, find_me, parse_member, parse_members, rank, resolve_all

DIGESTS = ["sha256:" + hashlib.sha256(str(i).encode()).hexdigest() for i in range(30_000)]


def nodes(n: int, port: int = 5000) -> list[Member]:
    return [Member(f"10.0.0.{i + 1}", port) for i in range(n)]


def owners(members) -> dict[str, Member]:
    return {d: rank(members, d)[0] for d in DIGESTS}


def test_parse_members():
    assert parse_members("10.0.0.2:5000, 10.0.0.1:5000 [FD00::1]:5001 node-a.lan:80") == [
        Member("10.0.0.1", 5000), Member("10.0.0.2", 5000), Member("fd00::1", 5001), Member("node-a.lan", 80)]
    assert parse_member("node-b", default_port=5000) == Member("node-b", 5000)
    assert Member("fd00::1", 5001).id == "[fd00::1]:5001"
    assert Member("fd00::1", 5001).url() == "http://[fd00::1]:5001"
    for bad in ("", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:99999", "fd00::1:5000", "[fd00::1", "[nothex]:1", ":5000"):
        with pytest.raises(ValueError):
            parse_members(bad)


def test_owners_spread_evenly_and_agree_whatever_the_order():
    members = nodes(3)
    counts = collections.Counter(owners(members).values())
    for member in members:
        assert abs(counts[member] / len(DIGESTS) - 1 / 3) < 0.02, counts
    shuffled = [members[2], members[0], members[1]]
    assert all(rank(shuffled, d) == rank(members, d) for d in DIGESTS[:2000])


def test_a_joining_node_takes_about_a_quarter_and_only_for_itself():
    before = owners(nodes(3))
    after = owners(nodes(4))
    moved = [d for d in DIGESTS if before[d] != after[d]]
    assert 0.22 < len(moved) / len(DIGESTS) < 0.28
    assert {after[d] for d in moved} == {nodes(4)[3]}  # every moved digest went to the new node


def test_a_leaving_node_moves_only_its_own_digests():
    members = nodes(4)
    before = owners(members)
    gone = members[1]
    after = owners([m for m in members if m != gone])
    moved = {d for d in DIGESTS if before[d] != after[d]}
    assert moved == {d for d in DIGESTS if before[d] == gone}
    # ... and they spread over the others, not onto one of them.
    spread = collections.Counter(after[d] for d in moved)
    assert len(spread) == 3 and min(spread.values()) > len(moved) / 3 * 0.85


def test_a_member_marked_down_hands_its_digests_to_the_next_in_rank():
    now = [0.0]
    membership = Membership(nodes(3), me=nodes(3)[0], down_for=10, clock=lambda: now[0])
    sample = DIGESTS[:3000]
    before = {d: membership.owners(d) for d in sample}
    down = nodes(3)[1]
    membership.mark_down(down)
    for d in sample:
        expected = before[d][1] if before[d][0] == down else before[d][0]
        assert membership.owner(d) == expected
        assert membership.owners(d)[-1] == down
    membership.mark_down(membership.me)  # never ourselves
    assert membership.owner(next(d for d in sample if before[d][0] == membership.me)) == membership.me
    now[0] += 11
    assert all(membership.owner(d) == before[d][0] for d in sample)
    assert membership.is_mine(next(d for d in sample if before[d][0] == membership.me))


class FakeDNS:
    def __init__(self, *answer):
        self.answer: list[str] | Exception = list(answer)
        self.asked = threading.Event()

    def __call__(self, name):
        self.asked.set()
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_dns_members_follow_the_answers_and_survive_a_failed_lookup():
    dns = FakeDNS("10.0.0.2", "10.0.0.1", "fd00::A")
    membership = Membership(dns_name="mirror.ns.svc.cluster.local", port=5001, resolver=dns)
    assert membership.members == (Member("10.0.0.1", 5001), Member("10.0.0.2", 5001), Member("fd00::a", 5001))
    assert membership.refresh() is False  # same answer
    dns.answer = ["10.0.0.1", "10.0.0.3"]
    assert membership.refresh() is True
    assert membership.members == (Member("10.0.0.1", 5001), Member("10.0.0.3", 5001))
    dns.answer = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    assert membership.refresh() is False
    dns.answer = []
    assert membership.refresh() is False
    assert membership.members == (Member("10.0.0.1", 5001), Member("10.0.0.3", 5001))  # kept


def test_dns_is_refreshed_in_the_background():
    dns = FakeDNS("10.0.0.1")
    membership = Membership(dns_name="mirror", port=5001, resolver=dns, refresh_every=0.01)
    dns.answer = ["10.0.0.1", "10.0.0.2"]
    dns.asked.clear()
    membership.start()
    try:
        assert dns.asked.wait(10)
        assert dns.asked.wait(10)
    finally:
        membership.stop()
    assert len(membership.members) == 2


def test_the_system_resolver_on_localhost():
    addresses = resolve_all("localhost")
    assert "127.0.0.1" in addresses
    membership = Membership(dns_name="localhost", port=5001)
    assert Member("127.0.0.1", 5001) in membership.members
    with pytest.raises(ValueError):
        Membership()
    with pytest.raises(ValueError):
        Membership(nodes(2), dns_name="localhost", port=1)


def test_find_me_by_local_address_and_port():
    # 203.0.113.0/24 (TEST-NET-3) is nobody's local address.
    members = [Member("127.0.0.1", 5001), Member("127.0.0.1", 5002), Member("203.0.113.7", 5001)]
    assert find_me(members, 5002) == Member("127.0.0.1", 5002)
    assert find_me(members, 5001) == Member("127.0.0.1", 5001)
    assert find_me([Member("203.0.113.7", 5001)], 5001) is None
    assert find_me([Member("localhost", 5001)], 5001) == Member("localhost", 5001)
