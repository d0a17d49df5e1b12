"""peers.py and cluster_secret.py in-process: signed requests between nodes,
this node among DNS members, the secret file read again when it changes.
(tests/test_e2e_cluster*.py run the nodes for real.)"""

from __future__ import annotations

import os

import pytest

from addon.cluster import Member, Membership
from addon.cluster_secret import ClusterSecret
from addon.peers import SIGNATURE_HEADER, Peers, sign_request, verify_request

TARGET = "/cluster/blobs/sha256:" + "a" * 64 + "?registry=https%3A%2F%2Fregistry-1.docker.io%3A443&repo=library/alpine"


def secret_file(tmp_path, *lines: str):
    path = tmp_path / "secret"
    path.write_text("".join(line + "\n" for line in lines))
    path.chmod(0o600)
    return path


def test_a_signed_request_is_accepted_within_its_time_and_nothing_else(tmp_path):
    secret = ClusterSecret(str(secret_file(tmp_path, "first-secret-0123456789")))
    headers = sign_request(secret, "10.0.0.1:5001", "GET", TARGET, "Bearer tok", now=1000)
    headers["Authorization"] = "Bearer tok"
    assert verify_request(secret, "GET", TARGET, headers, now=1030)
    assert not verify_request(secret, "GET", TARGET, headers, now=1061)  # too old
    assert not verify_request(secret, "GET", TARGET.replace("alpine", "private"), headers, now=1000)
    assert not verify_request(secret, "HEAD", TARGET, headers, now=1000)
    assert not verify_request(secret, "GET", TARGET, {**headers, "Authorization": "Bearer other"}, now=1000)
    assert not verify_request(secret, "GET", TARGET, {**headers, SIGNATURE_HEADER: "1000:" + "0" * 64}, now=1000)
    (tmp_path / "other").mkdir()
    other = ClusterSecret(str(secret_file(tmp_path / "other", "another-secret-0123456789")))
    assert not verify_request(other, "GET", TARGET, headers, now=1000)


def test_rotation_every_line_is_accepted_and_the_first_signs(tmp_path, monkeypatch):
    path = secret_file(tmp_path, "old-secret-0123456789")
    old = ClusterSecret(str(path))
    signed_old = old.sign(b"message")
    path.write_text("new-secret-0123456789\nold-secret-0123456789\n")
    os.utime(path, ns=(1, 1))  # a new mtime, whatever the clock's resolution
    monkeypatch.setattr("addon.cluster_secret.RELOAD_EVERY", 0.0)
    assert old.verify(b"message", signed_old)  # read again: the old one is still accepted
    assert old.sign(b"message") != signed_old  # ... and the new one signs
    assert ClusterSecret(str(secret_file(tmp_path, "new-secret-0123456789"))).verify(b"message", old.sign(b"message"))
    with pytest.raises(ValueError):
        ClusterSecret(str(secret_file(tmp_path, "short")))


def test_this_node_is_found_again_among_members_from_dns(tmp_path):
    answers = {"now": ["203.0.113.7", "127.0.0.1"]}
    membership = Membership(dns_name="mirror-nodes", port=5001, resolver=lambda name: answers["now"])
    peers = Peers(membership, ClusterSecret(str(secret_file(tmp_path, "a-secret-0123456789"))), 5001, None)
    try:
        assert peers.me == Member("127.0.0.1", 5001) and membership.me == peers.me
        answers["now"] = ["203.0.113.7", "203.0.113.8"]  # not ready yet, say: not in the answer
        membership.refresh()
        assert peers.me is None and not membership.is_mine("sha256:" + "b" * 64)
        owners = peers.ranked("sha256:" + "b" * 64, first=Member("203.0.113.8", 5001))
        assert owners[0] == Member("203.0.113.8", 5001) and len(owners) == 2
    finally:
        peers.close()
