"""Several mirror nodes, one upstream fetch per blob: each digest's owner fetches it.

Every node ranks the members (cluster.py: rendezvous hashing over the blob
servers) and agrees, without talking, on one owner per digest. On a local
miss that the object store cannot serve (sources.py), a node that does not
own the digest fills from the owner instead of the upstream: a GET of
`/cluster/blobs/<digest>` at the owner's blob server, signed with the
cluster secret and carrying the client's Authorization, so that the owner
can start the upstream fetch if none runs. The owner answers from its
store, or follows the fill it runs (the last byte once verified, as for its
own clients), or starts one: from the object store, else the upstream, with
those credentials, and never from another node (no request goes round in a
circle). The asking node's clients follow its own fill at its own blob
server, as they would an upstream one, and it makes its own clients' access
decisions as on one node; the owner trusts a signed request.

Why an owner and not a lease in the object store: no extra round trip on
every cold miss, nothing to wait out when a holder dies, and the object
store's conditional writes need not be exclusive (SeaweedFS 4.48's
multipart completion is not). Rendezvous hashing moves only the digests of
a node that joins or leaves.

A node that answers wrongly for an owner (it follows another node itself:
the members disagree for a moment, say while DNS catches up) says so (409),
and is skipped for that fill. One that cannot be reached, refuses our
signature or is draining (503) is marked down for cluster.DOWN_FOR seconds,
and its digests go to the next in rank: a fill whose owner died mid-blob
goes on from the byte it reached, from the next owner. When that is this
node, from the upstream with a Range (nothing is fetched twice); when it is
another, that node fetches the blob from its start (it must verify all of
it), one more copy upstream at most.

Blob URLs signed with the cluster secret name the node that made them
(`node=`): a load balancer may send the client to another node's blob
server, which honours the signature and, having no copy, fills from the
object store or that node.

The owner's answer to what it cannot serve is relayed, marked
(X-Registry-Cache-Relayed): the upstream's refusal (401, 403, 404) or
failure reaches the asking node's client as it would on one node, and is
not taken for the owner's own trouble (no other node is asked, so an
upstream that refuses is not asked once per node).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote

import requests
import requests.adapters

from .cluster import Member, Membership, find_me
from .cluster_secret import ClusterSecret
from .fill import Fill, Fills, State
from .sources import TieredSource, Tiers, TierUnavailable
from .upstream import READ_TIMEOUT, UpstreamClient

log = logging.getLogger(__name__)

CLUSTER_PATH = "/cluster/blobs/"
NODE_HEADER = "X-Registry-Cache-Node"
SIGNATURE_HEADER = "X-Registry-Cache-Signature"
RELAYED_HEADER = "X-Registry-Cache-Relayed"  # "upstream", "redirect" (the upstream's CDN answered), "pending"
PENDING = "pending"  # the owner's upstream has not answered yet: ask again
TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")  # unix seconds (int() of thousands of digits raises)
MAX_SKEW = 60.0  # seconds a signed request stays valid (clocks of the nodes may differ this much)
PEER_CONNECT_TIMEOUT = 3.0
START_TIMEOUT = 120.0  # as blobs.START_TIMEOUT: bound on a client's wait for the upstream's answer
# The owner holds another node's request this long at most while its upstream
# has not answered, then says "not yet" (503, relayed "pending") and is asked
# again, until START_TIMEOUT: well inside the asking node's READ_TIMEOUT, which
# would otherwise take a slow upstream for a dead owner and fetch it twice.
PEER_WAIT = READ_TIMEOUT / 2
CONFLICT_RETRIES = 2  # a node that follows another is asked again this often mid-fill before it is skipped
TIER = "peer"


def _message(method: str, target: str, timestamp: str, authorization: str | None) -> bytes:
    credential = hashlib.sha256((authorization or "").encode()).hexdigest()
    return f"cluster\n{method}\n{target}\n{timestamp}\n{credential}".encode()


def sign_request(secret: ClusterSecret, node: str, method: str, target: str,
                 authorization: str | None, now: float | None = None) -> dict[str, str]:
    """Headers that make a request to another node's blob server one of ours."""
    timestamp = str(int(time.time() if now is None else now))
    return {NODE_HEADER: node,
            SIGNATURE_HEADER: f"{timestamp}:{secret.sign(_message(method, target, timestamp, authorization))}"}


def verify_request(secret: ClusterSecret, method: str, target: str, headers, now: float | None = None) -> bool:
    timestamp, _, signature = (headers.get(SIGNATURE_HEADER) or "").partition(":")
    if not TIMESTAMP_RE.fullmatch(timestamp) or abs((time.time() if now is None else now) - int(timestamp)) > MAX_SKEW:
        return False
    return secret.verify(_message(method, target, timestamp, headers.get("Authorization")), signature)


class Peers:
    """This node's view of the others, and its requests to them."""

    def __init__(self, membership: Membership, secret: ClusterSecret, blob_port: int, address: Member | None):
        self.membership = membership
        self.secret = secret
        self.blob_port = blob_port
        self._address = address
        self._me_for: tuple[tuple[Member, ...], Member | None] = ((), None)
        self.session = requests.Session()
        self.session.trust_env = False  # nodes talk to each other directly, never through a proxy
        adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=64, max_retries=0)
        self.session.mount("http://", adapter)

    @property
    def me(self) -> Member | None:
        """This node among the members: cluster_address, else the one member at
        a local address on our blob port (looked for again when they change)."""
        if self._address is not None:
            return self._address
        members = self.membership.members
        known_for, me = self._me_for
        if known_for != members:
            me = find_me(members, self.blob_port)
            self._me_for = (members, me)
            self.membership.me = me
            if me is None:
                log.warning("cluster: this node is not among the members (%s); set cluster_address",
                            ", ".join(m.id for m in members))
        return me

    def ranked(self, digest: str, first: Member | None = None) -> list[Member]:
        owners = self.membership.owners(digest)
        if first is not None and first in owners:
            owners.remove(first)
            owners.insert(0, first)
        return owners

    def mark_down(self, member: Member, why: str) -> None:
        log.warning("cluster: %s %s; its blobs go to the next node for a while", member.id, why)
        self.membership.mark_down(member)

    def get(self, member: Member, digest: str, query: str, authorization: str | None,
            start: int) -> requests.Response:
        """GET a blob from member's blob server (from byte start), signed."""
        target = f"{CLUSTER_PATH}{digest}{'?' + query if query else ''}"
        me = self.me
        headers = sign_request(self.secret, me.id if me else "", "GET", target, authorization)
        headers["Accept-Encoding"] = "identity"
        if authorization:
            headers["Authorization"] = authorization
        if start:
            headers["Range"] = f"bytes={start}-"
        return self.session.get(member.url() + target, headers=headers, stream=True, allow_redirects=False,
                                timeout=(PEER_CONNECT_TIMEOUT, READ_TIMEOUT))

    def tier(self, digest: str, registry: str, repo: str, authorization: str | None) -> "PeerTier":
        """A client's miss: the owner (or, when this node is next in rank, the upstream)."""
        query = f"registry={quote(registry, safe='')}&repo={quote(repo, safe='/')}"
        return PeerTier(self, digest, query, authorization)

    def tier_for_url(self, digest: str, node: str) -> "PeerTier":
        """A blob URL another node signed: that node first, then the owners; never the upstream."""
        try:
            first = Member(*_split_id(node)) if node else None
        except ValueError:
            first = None
        return PeerTier(self, digest, "", None, first=first, stop_at_me=False)

    def close(self) -> None:
        self.membership.stop()
        self.session.close()


def _split_id(node: str) -> tuple[str, int]:
    host, _, port = node.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(node)
    return host.strip("[]"), int(port)


class PeerTier:
    """The owner node as a tier of a fill (see sources.py)."""

    name = TIER

    def __init__(self, peers: Peers, digest: str, query: str, authorization: str | None,
                 first: Member | None = None, stop_at_me: bool = True):
        self.peers = peers
        self.digest = digest
        self.query = query
        self.authorization = authorization
        self.first = first
        self.stop_at_me = stop_at_me  # this node next in rank: on to the upstream tier
        self._skip: set[Member] = set()  # members that said they are not the ones to ask (409)
        self._conflicts: dict[Member, int] = {}  # 409s from each, mid-fill
        self.asking: Member | None = None  # the node this fill's bytes come from (or are asked of)

    def open(self, start: int, end: int | None) -> requests.Response | None:
        # One stream from `start` to the end (whatever `end` asks): the owner may
        # be filling, and withholds the last byte of what is asked until it is
        # verified, so several ranges would each wait for the whole blob.
        me = self.peers.me
        for member in self.peers.ranked(self.digest, self.first):
            if member == me:
                if self.stop_at_me:
                    self.asking = None
                    raise TierUnavailable("this node is next in rank: it fetches the blob itself")
                continue
            if member in self._skip:
                continue
            self.asking = member
            try:
                response = self._ask(member, start)
            except requests.RequestException as exc:
                self.peers.mark_down(member, f"could not be reached ({type(exc).__name__})")
                continue
            relayed = response.headers.get(RELAYED_HEADER)
            if response.status_code in (200, 206) or relayed:
                response.redirected = relayed == "redirect"
                self.peers.membership.mark_up(member)
                log.info("cluster: %s from %s%s", self.digest, member.id, f" from byte {start}" if start else "")
                return response
            status = response.status_code
            response.close()
            if status == 409 and start and self._conflicts.get(member, 0) < CONFLICT_RETRIES:
                # Mid-fill, after an owner died: this node may be moving on to the
                # upstream itself right now. Ask it again (after the fill's backoff)
                # rather than fetch the rest upstream a second time.
                self._conflicts[member] = self._conflicts.get(member, 0) + 1
                raise ConnectionError(f"{member.id} follows another node for now")
            if status in (404, 409):  # it has no copy (a blob URL's), or follows another node itself
                log.info("cluster: %s: %s answered %d; asking the next node", self.digest, member.id, status)
                self._skip.add(member)
                continue
            self.peers.mark_down(member, f"answered {status}")
        self.asking = None
        raise TierUnavailable("no other node can serve it")

    def _ask(self, member: Member, start: int) -> requests.Response:
        """member's answer; its "not yet" (its upstream is slow to answer) is
        asked again until START_TIMEOUT, and then relayed as the upstream's 503."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            response = self.peers.get(member, self.digest, self.query, self.authorization, start)
            if response.headers.get(RELAYED_HEADER) != PENDING or time.monotonic() >= deadline:
                return response
            response.close()
            log.info("cluster: %s: %s is still waiting for the upstream; asking again", self.digest, member.id)


@dataclass
class PeerRefusal:
    """What the blob server answers a node's request it cannot serve."""

    status: int
    message: str
    relayed: str = ""  # RELAYED_HEADER: the upstream's own answer, passed on
    headers: tuple = ()
    body: bytes = b""


class PeerEndpoint:
    """This node's answer to another node's request, and to a blob URL another
    node signed (run by the blob server, in its threads). Any node that holds
    the cluster secret has one, a member of cluster_members or not."""

    def __init__(self, secret: ClusterSecret, fills: Fills, tiers: Tiers, upstream: UpstreamClient, vouch,
                 chosen: frozenset[str], draining: threading.Event | None = None):
        self.secret = secret
        self.fills = fills
        self.tiers = tiers
        self.upstream = upstream
        self.vouch = vouch  # vouch(registry, repo, digest, authorization): the proof an upstream fill gives
        self.chosen = chosen  # registries the operator chose: the only ones fetched for others
        self.draining = draining or threading.Event()  # set: start no fill for other nodes (drain.py)

    def verify(self, method: str, target: str, headers) -> bool:
        return verify_request(self.secret, method, target, headers)

    def fill_for(self, digest: str, registry: str, repo: str, authorization: str | None) -> Fill | PeerRefusal:
        """The fill another node's request for digest follows: the one running
        here, or a new one (the caller looked in the store first)."""
        deadline = time.monotonic() + PEER_WAIT  # one wait in all: the asking node reads with READ_TIMEOUT

        def started(fill: Fill) -> bool:
            return fill.started_within(max(0.0, deadline - time.monotonic()))

        fill = self.fills.get(digest)
        if fill is not None and fill.state is not State.FAILED:
            if self._follows_another_node(fill):
                return PeerRefusal(409, "this node follows another node for this blob")
            if not started(fill):
                return PeerRefusal(503, "the upstream has not answered yet", relayed=PENDING)
            if fill.state is not State.FAILED:
                return fill  # (one that failed meanwhile: another is started below)
        if not registry:
            return PeerRefusal(404, "no copy here")
        if registry not in self.chosen:
            return PeerRefusal(403, f"{registry} is not a registry this node serves")
        if self.draining.is_set():
            return PeerRefusal(503, "draining: ask the next node")
        for _attempt in range(2):
            upstream = self.upstream.blob_source(f"{registry}/v2/{repo}/blobs/{digest}", authorization)
            source = self.tiers.for_peer(digest, upstream)

            def vouch(source=source):
                if source.upstream_answered:
                    self.vouch(registry, repo, digest, authorization)

            fill, is_new = self.fills.start_or_join(digest, source, vouch,
                                                     on_stored=lambda source=source: self.tiers.stored(digest, source))
            log.info("cluster: %s for another node: %s fill", digest, "started" if is_new else "joined")
            if not started(fill):
                return PeerRefusal(503, "the upstream has not answered yet", relayed=PENDING)
            if is_new or fill.state is not State.FAILED or fill.answer is None:
                break  # (a fill someone else started was refused with THEIR credentials: try ours)
        if fill.state is State.FAILED:
            answer = fill.answer
            if answer is not None:
                return PeerRefusal(answer.status, fill.error, "redirect" if answer.from_redirect else "upstream",
                                   tuple(answer.headers), answer.body)
            return PeerRefusal(502, f"fetching the blob upstream failed: {fill.error}", relayed="upstream")
        if self._follows_another_node(fill):  # joined one our own client started meanwhile
            return PeerRefusal(409, "this node follows another node for this blob")
        return fill

    def fill_for_url(self, digest: str, node: str) -> Fill | None:
        """A client brought a blob URL another node signed, and this node has no
        copy: fill from the object store or that node (never the upstream: the
        client's credentials stayed there)."""
        fill = self.fills.get(digest)
        if fill is None or fill.state is State.FAILED:
            fill, _ = self.fills.start_or_join(digest, self.tiers.for_url(digest, node))
            log.info("cluster: %s for a blob URL %s signed", digest, node or "another node")
        if not fill.started_within(START_TIMEOUT) or fill.state is State.FAILED:
            return None
        return fill

    @staticmethod
    def _follows_another_node(fill: Fill) -> bool:
        """A fill fed by another node is not handed on: the members disagree
        about the owner for a moment, and two nodes following each other
        would wait on each other."""
        source = fill.opener
        return isinstance(source, TieredSource) and source.current == TIER and \
            any(isinstance(tier, PeerTier) and tier.asking is not None for tier in source.tiers)
