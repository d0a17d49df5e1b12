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
    # Garbage in the header is a refusal, never an exception in the handler (hmac.compare_digest
    # raises TypeError on non-ASCII text).
    for garbage in ("1000:" + "é" * 64, "1000:" + "\u0661" * 64, "1000:", "1000:" + "A" * 64, "\u0661\u0660\u0660\u0660:" + "0" * 64,
                    "9" * 5000 + ":" + "0" * 64):  # (int() raises past 4300 digits)
        assert not verify_request(secret, "GET", TARGET, {**headers, SIGNATURE_HEADER: garbage}, now=1000)
        assert not secret.verify(b"message", garbage.partition(":")[2])
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


def test_a_node_that_joins_the_members_after_it_started_names_itself_in_the_urls_it_signs(tmp_path):
    """A pod joins its headless service's DNS answer only once it is ready,
    after its options were applied: the URLs it signs must still name it
    once it is a member, or another node that has no copy answers a blob
    URL of it with 404 BLOB_UNKNOWN (fatal to clients) instead of filling."""
    import requests

    from addon.blobserver import BlobServer
    from addon.fill import Fills
    from addon.peers import PeerEndpoint
    from addon.sources import Tiers
    from addon.store import DiskBlobStore
    from addon.upstream import UpstreamClient
    from tests.test_store import put

    secret = ClusterSecret(secret_file(tmp_path, "s" * 32))
    nodes = []
    for name in "ab":
        store = DiskBlobStore(str(tmp_path / name), 1 << 30)
        fills = Fills(store)
        nodes.append((store, fills, BlobServer(store, fills, "127.0.0.1", 0)))
        nodes[-1][2].start()
    members = [Member("127.0.0.1", server.port) for _, _, server in nodes]
    membership = Membership(members)
    membership._members = ()  # what a DNS refresh leaves while neither pod is ready: nobody
    try:
        for store, fills, server in nodes:  # the options applied: neither node among the members
            peers = Peers(membership, secret, server.port, None)  # no cluster_address: found among the members
            endpoint = PeerEndpoint(secret, fills, Tiers(None, peers), UpstreamClient(), lambda *a: None,
                                    frozenset({"https://registry-1.docker.io:443"}))
            server.serve_cluster(secret, endpoint, lambda peers=peers: peers.me.id if peers.me else "")
        (a_store, _, a), (_, _, b) = nodes
        digest = put(a_store, os.urandom(100_000))
        assert a.node == "" and "&node=" not in a.signed_path(digest)
        membership._members = tuple(sorted(members))  # both ready: the next refresh finds both
        path = a.signed_path(digest)
        assert a.node == members[0].id and f"&node={members[0].id}" in path.replace("%3A", ":")
        answer = requests.get(f"http://127.0.0.1:{b.port}{path}", timeout=30)
        assert answer.status_code == 200 and len(answer.content) == 100_000  # filled from A
    finally:
        for _, _, server in nodes:
            server.stop()


def test_an_owner_whose_upstream_is_slow_to_answer_says_not_yet_and_is_asked_again(tmp_path, monkeypatch):
    """The asking node reads the owner's answer with the upstream's read
    timeout; an owner that held the request until its own upstream answered
    (up to START_TIMEOUT, longer) was taken for dead on a slow upstream, and
    the blob fetched a second time. The owner says "not yet" in time and is
    asked again; the upstream is asked once."""
    import hashlib
    import http.server
    import threading

    from addon import peers as peers_module
    from addon.blobserver import BlobServer
    from addon.fill import Fills
    from addon.peers import PeerEndpoint, PeerTier
    from addon.sources import Tiers
    from addon.store import DiskBlobStore
    from addon.upstream import UpstreamClient

    monkeypatch.setattr(peers_module, "READ_TIMEOUT", 2.0)  # the asking node's patience per read
    monkeypatch.setattr(peers_module, "PEER_WAIT", 0.2, raising=False)
    data = os.urandom(50_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    release, upstream_gets = threading.Event(), []

    class SlowUpstream(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            upstream_gets.append(self.path)
            release.wait(30)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowUpstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    registry = f"http://127.0.0.1:{upstream.server_address[1]}"
    secret = ClusterSecret(secret_file(tmp_path, "s" * 32))
    store = DiskBlobStore(str(tmp_path / "owner"), 1 << 30)
    fills = Fills(store)
    owner = BlobServer(store, fills, "127.0.0.1", 0)
    owner.start()
    membership = Membership([Member("127.0.0.1", owner.port)])
    asked = []
    try:
        owner_peers = Peers(membership, secret, owner.port, Member("127.0.0.1", owner.port))
        endpoint = PeerEndpoint(secret, fills, Tiers(None, owner_peers), UpstreamClient(), lambda *a: None,
                                frozenset({registry}))
        real_fill_for = endpoint.fill_for

        def fill_for(*args):
            asked.append(args)
            if len(asked) == 3:  # asked again twice: now let the upstream answer
                release.set()
            return real_fill_for(*args)

        endpoint.fill_for = fill_for
        owner.serve_cluster(secret, endpoint, lambda: f"127.0.0.1:{owner.port}")
        asking = Peers(membership, secret, 1, Member("127.0.0.2", 1))  # another node, not among the members
        tier = PeerTier(asking, digest, f"registry={registry}&repo=library/x", None)
        with tier.open(0, None) as answer:
            assert answer.status_code == 200 and answer.raw.read() == data
        assert len(asked) >= 3 and len(upstream_gets) == 1
        assert Member("127.0.0.1", owner.port) not in membership._down
    finally:
        release.set()
        owner.stop()
        upstream.shutdown()
        upstream.server_close()
