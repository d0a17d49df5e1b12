"""The blob path: GET and HEAD of a blob, answered from the store or a fill.

- Stored: the access gate decides (access.py). Allowed: a HEAD is answered
  here, a GET is sent to the blob server (a 307 for plain-HTTP clients, the
  request rewritten to it for TLS clients). Refused: the upstream's answer,
  or the request passes through to a registry that must first prove it
  holds the blob (REFETCH: a GET fetches it from there again, verified).
- Not stored: a HEAD passes through (it never costs a blob download); a GET
  starts or joins the one fill of that digest (fill.py) and follows it at
  the blob server, which streams the part file as it grows.

Returns an `Outcome` (flows.py); never touches the flow.
"""

from __future__ import annotations

import asyncio
import enum
import logging

from mitmproxy import http

from .access import Decision, others_may_know
from .blobserver import BlobServer
from .fill import Fill, State
from .flows import Mark, Outcome, RegistryRequest
from .responses import blob_head, oci_error
from .settings import Settings
from .storage import Storage
from .store import BlobModified, StoredBlob
from .sources import Tiers, TieredSource
from .upstream import BlobSource, UpstreamClient
from .workers import Workers

log = logging.getLogger(__name__)

START_TIMEOUT = 120.0  # bound on waiting for an upstream to answer a blob GET
REFUSAL_CODES = {  # OCI error for an access refusal, by the upstream's status
    401: ("UNAUTHORIZED", "authentication required"),
    403: ("DENIED", "requested access to the resource is denied"),
    404: ("BLOB_UNKNOWN", "blob unknown to registry"),
    503: ("UNAVAILABLE", "upstream unavailable and access could not be checked"),
}
RELAYED_REFUSAL_HEADERS = ("www-authenticate", "retry-after", "docker-distribution-api-version")


class Verdict(enum.Enum):
    """What the access gate lets a request do with a stored blob."""

    READ = "read"
    REFETCH = "refetch"  # fetch it again from the client's registry, verified: its proof
    REFUSED = "refused"  # answered (denied, or passed through to the registry)


class BlobPath:
    def __init__(self, storage: Storage, blob_server: BlobServer, upstream: UpstreamClient,
                 workers: Workers, settings: Settings, tiers: Tiers | None = None):
        self.storage = storage
        self.blob_server = blob_server
        self.upstream = upstream
        self.workers = workers
        self.settings = settings
        self.tiers = tiers  # the object store and the cluster (sources.py), if any

    async def handle(self, req: RegistryRequest) -> Outcome:
        digest = req.route.reference
        blob = await self._open_stored(digest)
        refetch = False
        try:
            if blob is not None:
                verdict, refusal = await self._may_read(req, digest, may_refetch=req.method == "GET")
                if verdict is Verdict.REFUSED:
                    return refusal
                if verdict is Verdict.READ:
                    size = blob.size
                    if req.method == "HEAD":
                        return Outcome(Mark.HIT, response=blob_head(digest, size), digest=digest, size=size)
                    self.blob_server.pin(digest, blob)  # evicted before the client arrives: still served
                    blob = None
                    return self._to_blob_server(req, Outcome(Mark.HIT, digest=digest, size=size))
                # REFETCH: a registry nobody chose must show it holds these bytes
                # by serving them (verified) before our copy is its clients' too.
                refetch = True
            elif req.method == "HEAD":
                return Outcome(Mark.PASS, digest=digest)  # a HEAD never costs a blob download
        finally:
            if blob is not None:
                blob.close()
        return await self._fill(req, digest, refetch)

    async def _open_stored(self, digest: str) -> StoredBlob | None:
        """The stored blob, open. One whose file changed on disk is re-hashed
        in a pool of its own: a multi-GB re-hash must not hold up other hits."""
        try:
            return await self.workers.local(self.storage.store.open, digest, False)
        except BlobModified:
            return await self.workers.rehash(self.storage.store.open, digest)

    async def _fill(self, req: RegistryRequest, digest: str, refetch: bool) -> Outcome:
        fill, started = await self._start_or_join_fill(req, digest, refetch)
        if fill.state is State.CONNECTING:  # START_TIMEOUT: it goes on, and will be stored
            log.warning("registry-cache: the upstream has not answered for %s in %.0fs", digest, START_TIMEOUT)
            response = oci_error(503, "UNAVAILABLE", "upstream slow to answer, retry later",
                                 f"no answer in {START_TIMEOUT:.0f}s")
            response.headers["Retry-After"] = "10"
            return Outcome(Mark.ERROR, response=response, digest=digest, detail="upstream did not answer in time")
        if fill.state is State.FAILED:
            if fill.answer is not None:
                answer = fill.answer
                response = http.Response.make(answer.status, answer.body, answer.headers)
            else:
                response = oci_error(502, "UNAVAILABLE", "upstream fetch failed", fill.error)
            return Outcome(Mark.DENIED if fill.refused else Mark.FILL_FAILED, response=response,
                           digest=digest, detail=fill.error)
        # A fill this request started from the upstream vouches for it once its
        # bytes verify (on_verified); joining someone else's, or one fed by the
        # object store or another node, needs the same proof as a hit, or, from
        # a registry nobody chose, that registry's consent.
        if not started or fill.already_stored or not getattr(fill.opener, "upstream_answered", True):
            verdict, refusal = await self._may_read(req, digest, its_own_fill=not fill.already_stored)
            if verdict is not Verdict.READ:
                return refusal
        mark = Mark.HIT if fill.already_stored else Mark.MISS
        return self._to_blob_server(req, Outcome(mark, digest=digest, size=fill.size, fill=fill))

    async def _may_read(self, req: RegistryRequest, digest: str, may_refetch: bool = False,
                        its_own_fill: bool = False) -> tuple[Verdict, Outcome | None]:
        """Apply the access gate; a refusal comes with its outcome: the
        upstream's answer, or passing the request through to a registry
        that must first prove it holds the blob (unless the caller may
        refetch it from there instead). `its_own_fill`: the client is to
        follow a fill in progress from its own registry, not read the store."""
        access = self.storage.access
        repo = req.route.name
        decision = await self.workers.local(access.check_locally, req.registry, repo, digest, req.authorization,
                                            req.trusted, its_own_fill)
        if others_may_know(decision) and req.trusted and access.shared is not None:  # what other nodes learned
            decision = await self.workers.object_store(access.learn_shared, req.registry, repo, digest,
                                                       req.authorization)
        if decision is None:  # one HEAD there settles it
            decision = await self.workers.upstream(req.slot_key, access.ask_registry, req.registry, repo, digest,
                                                   req.authorization, req.trusted, wanted=req.wanted)
        if decision.allowed:
            return Verdict.READ, None
        if decision.pass_through:
            if may_refetch:
                log.info("registry-cache: fetching %s from %s although stored: %s", digest, req.registry,
                         decision.reason)
                return Verdict.REFETCH, None
            log.info("registry-cache: passing %s %s through, not serving it from the store: %s",
                     req.method, digest, decision.reason)
            return Verdict.REFUSED, Outcome(Mark.PASS, stream=True, digest=digest, detail=decision.reason)
        return Verdict.REFUSED, Outcome(Mark.DENIED, response=_refusal(decision, req.method), digest=digest,
                                        detail=decision.reason)

    async def _start_or_join_fill(self, req: RegistryRequest, digest: str, refetch: bool) -> tuple[Fill, bool]:
        url = req.url.split("?", 1)[0]
        access = self.storage.access

        for _attempt in range(2):
            opener = self._source(req, digest, url)

            def vouch(opener=opener):
                # The upstream served these verified bytes under this repository
                # to this client: the proof the access gate asks for.
                if getattr(opener, "upstream_answered", True):
                    access.vouch(req.registry, req.route.name, digest, req.authorization, trusted=req.trusted)

            stored = (lambda opener=opener: self.tiers.stored(digest, opener)) \
                if isinstance(opener, TieredSource) else None
            fill, started = self.storage.fills.start_or_join(digest, opener, vouch, refetch=refetch,
                                                             source=req.unchosen_source, on_stored=stored)
            log.info("registry-cache: miss %s: %s fill", digest, "started" if started else "joined")
            try:
                await asyncio.wait_for(fill.wait_started(), START_TIMEOUT)
            except TimeoutError:
                break
            # A fill someone else started was refused with THEIR credentials
            # (e.g. 401 before they had a token): try again with ours.
            if started or fill.state is not State.FAILED or fill.answer is None:
                break
        return fill, started

    def _source(self, req: RegistryRequest, digest: str, url: str) -> BlobSource | TieredSource:
        """What a new fill fetches from: the upstream, after the object store and
        the digest's owner node when there are those (for registries the
        operator chose: one nobody chose must serve its blobs itself)."""
        upstream = self.upstream.blob_source(url, req.authorization)
        if self.tiers is None or not req.trusted or req.route.name is None:
            return upstream
        return self.tiers.for_client(digest, upstream, req.registry, req.route.name, req.authorization)

    def _to_blob_server(self, req: RegistryRequest, outcome: Outcome) -> Outcome:
        """Send the client to the blob server for outcome.digest."""
        path = self.blob_server.signed_path(outcome.digest, registry=req.unchosen_source)
        if self.settings.blob_redirect and not req.tls_client:
            outcome.response = http.Response.make(307, b"", {
                "Location": self._base_url(req) + path,
                "Docker-Content-Digest": outcome.digest,
                "Cache-Control": "no-store",
            })
        else:  # TLS client (or redirects off): mitmproxy streams the blob server's answer
            outcome.rewrite_to = f"http://{_url_host(_loopback_for(self.blob_server.host))}:{self.blob_server.port}{path}"
        return outcome

    def _base_url(self, req: RegistryRequest) -> str:
        if self.settings.blob_url:
            return self.settings.blob_url
        return f"http://{_url_host(req.local_host)}:{self.blob_server.port}"


def _refusal(decision: Decision, method: str) -> http.Response:
    """The client's answer to an access refusal, as the upstream worded it."""
    code, message = REFUSAL_CODES.get(decision.status, ("DENIED", "access denied"))
    response = oci_error(decision.status, code, message, decision.reason)
    for name, value in decision.headers:
        if name.lower() in RELAYED_REFUSAL_HEADERS:
            response.headers[name] = value
    if method == "HEAD":
        response.content = b""
    return response


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _loopback_for(host: str) -> str:
    """Where mitmproxy itself reaches the blob server."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host
