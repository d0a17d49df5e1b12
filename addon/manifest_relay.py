"""Pings and manifests: relayed by the mirror itself, kept, answered from the store.

The mirror fetches these requests itself rather than leaving them to
mitmproxy's pass-through, because mitmproxy answers a failed upstream
connection with its own 502 and offers no hook to answer instead (see
manifests.py for what is kept and when it answers).

Docker Hub counts every manifest GET as a pull against a limit per address
(an office's whole mirror is one address), and a HEAD as nothing. So a GET
of a manifest from a registry the operator chose costs a GET upstream only
when the store lacks the manifest:
- by digest: answered from the store, after the access gate's check (the
  one for blobs; when it must ask, it asks with a HEAD);
- by tag: a HEAD with the client's headers names the digest the tag points
  at now (tags stay fresh), and the store answers it if it holds it.
Otherwise:
- The registry answers (anything but 429 or 5xx): relayed unchanged; a 200
  manifest is verified, kept, and vouches for its repository.
- It cannot be reached, answers 429 or 5xx, or let a request time out
  moments ago (upstream.hung) and `serve_stale` is on: the store answers,
  marked stale, if it can; else the registry's answer, or a 502.
Every answer's ratelimit headers are kept for the metrics.

Returns an `Outcome` (flows.py); never touches the flow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import requests
from mitmproxy import http

from . import manifests, oci
from .access import UNREACHABLE, others_may_know
from .credentials import MirrorAccounts
from .flows import Mark, Outcome, RegistryRequest
from .metrics import Metrics
from .responses import oci_error, ready, relayed
from .routes import Kind
from .settings import Settings
from .storage import Storage
from .tokens import NoRealm
from .upstream import MAX_RELAYED_BODY, QUIET_FOR, AnswerTooLarge, UpstreamClient
from .workers import Workers

log = logging.getLogger(__name__)

PING_REUSE = 5.0  # seconds a registry's answer to an anonymous /v2/ ping is reused (every new client pings)
QUOTA_WARNING_SHARE = 0.10  # warn when less than this share of a registry's pulls is left
QUOTA_WARNING_EVERY = 300.0  # seconds between two such warnings for one registry
REFUSED_MANIFEST_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "MANIFEST_UNKNOWN"}


@dataclass
class Unreachable:
    """The registry could not answer (no connection, 429, 5xx): why."""

    why: str
    answer: object = None  # its 429/5xx answer, if it gave one


class ManifestRelay:
    def __init__(self, storage: Storage, upstream: UpstreamClient, workers: Workers, metrics: Metrics,
                 settings: Settings, accounts: MirrorAccounts | None = None, shared=None):
        self.storage = storage
        self.accounts = accounts
        self.shared = shared  # shared_records.SharedRecords: manifests and tags other nodes kept
        self.upstream = upstream
        self.workers = workers
        self.metrics = metrics
        self.settings = settings
        self._quota_warned: dict[str, float] = {}
        self._pings: dict[tuple[str, str], tuple[float, object]] = {}  # (registry, method) -> (when, answer)
        # (registry, repo, tag) -> (when, digest): when the registry last named the tag's kept digest
        self._checked: dict[tuple[str, str, str], tuple[float, str]] = {}
        self._in_flight: dict[tuple, asyncio.Future] = {}  # tag HEADs that clients of a public repository share

    async def handle(self, req: RegistryRequest) -> Outcome:
        if self.settings.serve_stale and self.upstream.hung(req.registry):
            # It let a request wait the whole timeout moments ago: what the
            # store can answer is not asked of it meanwhile.
            stale = await self._stale_answer_shared(req)
            if stale is not None:
                return self._stale(req, stale, f"{req.registry} timed out less than {QUIET_FOR:.0f}s ago")
        if req.route.kind is Kind.PING and not req.authorization and req.trusted:
            asked_at, answer = self._pings.get((req.registry, req.method), (0.0, None))
            if answer is not None and time.monotonic() - asked_at < PING_REUSE:
                return Outcome(Mark.PASS, response=relayed(answer, req.method), detail="ping")
        found = None
        if req.route.kind is Kind.MANIFEST and req.trusted:
            if digest := self._checked_lately(req):
                found = await self._kept(req, digest)
            elif req.method == "GET":
                found = await (self._kept(req, req.route.reference) if ":" in req.route.reference
                               else self._by_tag(req))
        if isinstance(found, Outcome):
            return found
        if isinstance(found, Unreachable):
            return await self._unreachable(req, found)
        return await self._relay(req)

    def _checked_lately(self, req: RegistryRequest) -> str | None:
        """With tag_check_interval set: the digest the registry named for this
        tag less than that many seconds ago (None: ask it again)."""
        interval, route = self.settings.tag_check_interval, req.route
        if not interval or ":" in route.reference:
            return None
        checked_at, digest = self._checked.get((req.registry, route.name, route.reference), (0.0, ""))
        return digest if digest and time.monotonic() - checked_at < interval else None

    def _note_checked(self, req: RegistryRequest, digest: str) -> None:
        """The registry named digest for this tag just now (and it is kept)."""
        if len(self._checked) > 100_000:
            self._checked.clear()
        self._checked[(req.registry, req.route.name, req.route.reference)] = (time.monotonic(), digest)

    async def _kept(self, req: RegistryRequest, digest: str) -> Outcome | Unreachable | None:
        """A kept manifest, for a client the gate lets read it; None: not kept.
        A rollout's warm answers come from memory alone, without a thread hop."""
        manifest = self.storage.manifests.in_memory(digest)
        if manifest is not None and manifests.accepts(list(req.accept), manifest.media_type) and \
                self.storage.access.allowed_from_memory(req.registry, req.route.name, digest, req.authorization):
            return _from_store(manifest, req.route.reference, req.method)
        manifest = await self.workers.local(self.storage.manifests.get, digest)
        if manifest is None and self.shared is not None:
            manifest = await self.workers.object_store(self._from_shared, digest)
        if manifest is None or not manifests.accepts(list(req.accept), manifest.media_type):
            return None
        access, repo = self.storage.access, req.route.name
        decision = await self.workers.local(access.check_locally, req.registry, repo, manifest.digest,
                                            req.authorization)
        if others_may_know(decision) and access.shared is not None:
            decision = await self.workers.object_store(access.learn_shared, req.registry, repo, manifest.digest,
                                                       req.authorization)
        if decision is None:
            decision = await self.workers.upstream(req.slot_key, access.ask_registry, req.registry, repo,
                                                   manifest.digest, req.authorization, True, "manifests",
                                                   wanted=req.wanted)
        if decision.allowed:
            return _from_store(manifest, req.route.reference, req.method)
        if decision.status in UNREACHABLE:
            return Unreachable(decision.reason)
        return _refused(decision.status, decision.headers, decision.reason, req.route.reference)

    async def _by_tag(self, req: RegistryRequest) -> Outcome | Unreachable | None:
        """What the tag names now, asked with a HEAD (free); from the store if
        kept there. None: not kept (or an odd answer): a GET must fetch it."""
        try:
            answer, confirmed = await self._shared_head(req, lambda: self.workers.upstream(
                req.slot_key, self.upstream.fetch, "HEAD", req.url, req.headers, wanted=req.wanted))
        except (requests.exceptions.InvalidHeader, UnicodeError, AnswerTooLarge):
            return None  # the GET says what is wrong
        except requests.RequestException as exc:
            return Unreachable(f"upstream unreachable: {exc}")
        self._note_rate_limit(req.registry, answer.headers)
        if answer.status in UNREACHABLE:
            return Unreachable(f"upstream answered {answer.status}", answer)
        if answer.status in REFUSED_MANIFEST_CODES:
            return _refused(answer.status, tuple(answer.headers.items()), f"upstream answered {answer.status}",
                            req.route.reference)
        digest = answer.headers.get("Docker-Content-Digest", "")
        if answer.status != 200 or not digest:
            return None
        manifest = await self.workers.local(self._kept_for_tag, req, digest, confirmed)
        if manifest is None and self.shared is not None and \
                await self.workers.object_store(self._from_shared, digest) is not None:
            manifest = await self.workers.local(self._kept_for_tag, req, digest, confirmed)
        return _from_store(manifest, req.route.reference, req.method) if manifest is not None else None

    async def _shared_head(self, req: RegistryRequest, ask):
        """(answer, asked with this client's credentials) of a HEAD of a tag.
        Clients of a repository known to be public that ask for the same tag
        while a HEAD for it is on its way (a rollout: every node at once) take
        its 200 rather than each sending their own: the answer is the same
        for all of them, and on a distant registry each costs a round trip."""
        key = (req.registry, req.route.name, req.route.reference, req.method, req.accept)
        if not (req.trusted and self.storage.access.known_public(req.registry, req.route.name)):
            return await ask(), True
        running = self._in_flight.get(key)
        if running is not None:
            try:
                answer = await asyncio.shield(running)
                if answer.status == 200:
                    return answer, False
            except Exception:  # noqa: BLE001 - its client's trouble (gone, say): ask for ourselves
                pass
            return await ask(), True
        future = self._in_flight[key] = asyncio.get_running_loop().create_future()
        try:
            answer = await ask()
            future.set_result(answer)
            return answer, True
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody joined
            raise
        finally:
            del self._in_flight[key]

    def _kept_for_tag(self, req: RegistryRequest, digest: str, confirmed: bool = True):
        """The kept manifest the registry's HEAD named for the tag, if the
        client takes its type; the tag moves to it, and the client is granted
        it if the HEAD was made with its own credentials (`confirmed`)
        (blocking)."""
        manifest = self.storage.manifests.get(digest)
        if manifest is None or not manifests.accepts(list(req.accept), manifest.media_type):
            return None
        route = req.route
        self.storage.manifests.remember(req.registry, route.name, route.reference, manifest.body,
                                        {"Content-Type": manifest.media_type, "Docker-Content-Digest": digest},
                                        list(req.accept))
        if confirmed:
            self.storage.access.vouch(req.registry, route.name, digest, req.authorization, kind="manifests")
        if self.storage.manifests.digest_of_tag(req.registry, route.name, route.reference) == digest:
            self._note_checked(req, digest)
        return manifest

    async def _relay(self, req: RegistryRequest) -> Outcome:
        """Ask the registry, relay its answer; stale answers when it cannot."""
        kind = req.route.kind.value
        try:
            headers = await self._pull_headers(req)
            fetch = lambda: self.workers.upstream(req.slot_key, self._fetch_and_keep, req, headers,  # noqa: E731
                                                  wanted=req.wanted)
            shareable = req.method == "HEAD" and req.route.kind is Kind.MANIFEST and ":" not in req.route.reference
            answer = (await self._shared_head(req, fetch))[0] if shareable else await fetch()
        except (requests.exceptions.InvalidHeader, UnicodeError) as exc:
            log.warning("registry-cache: refused %s %s: %s", req.method, req.path[:200], exc)
            return Outcome(Mark.ERROR, response=oci_error(400, "UNSUPPORTED", "malformed request header",
                                                          str(exc)[:200]),
                           digest=req.route.reference, detail="malformed header")
        except AnswerTooLarge as exc:
            log.warning("registry-cache: %s %s: %s", req.method, req.path[:200], exc)
            self.metrics.count("upstream_errors_total", 1, "too-large")
            return Outcome(Mark.ERROR, response=oci_error(
                502, "UNSUPPORTED", "upstream answer too large to relay",
                f"more than {MAX_RELAYED_BODY >> 20} MiB"), digest=req.route.reference,
                detail="upstream answer too large")
        except requests.RequestException as exc:
            return await self._unreachable(req, Unreachable(f"upstream unreachable: {exc}"))
        if req.route.kind is Kind.MANIFEST:
            self._note_rate_limit(req.registry, answer.headers)
        if answer.status in UNREACHABLE:
            return await self._unreachable(req, Unreachable(f"upstream answered {answer.status}", answer))
        if req.route.kind is Kind.PING and not req.authorization and req.trusted:
            # Every new client pings first: the same challenge for all of them.
            self._pings[(req.registry, req.method)] = (time.monotonic(), answer)
        return Outcome(Mark.PASS, response=relayed(answer, req.method), detail=kind)

    def _fetch_and_keep(self, req: RegistryRequest, headers: dict[str, bytes]):
        """The registry's answer; a 200 manifest kept (in the same thread: one hop, not two)."""
        answer = self.upstream.fetch(req.method, req.url, headers)
        if answer.status == 200 and req.route.kind is Kind.MANIFEST:
            self._remember(req, answer)
        return answer

    async def _pull_headers(self, req: RegistryRequest) -> dict[str, bytes]:
        """The headers for a request upstream: the client's, but a manifest GET
        (a pull, to Docker Hub) of a public repository is made with the
        mirror's own account where it has one (credentials.py)."""
        if not (self.accounts and req.trusted and req.method == "GET" and req.route.kind is Kind.MANIFEST
                and self.accounts.has(req.registry)):
            return req.headers
        route, access = req.route, self.storage.access
        try:
            if not await self.workers.upstream(req.slot_key, access.public_now, req.registry, route.name,
                                               f"manifests/{route.reference}", wanted=req.wanted):
                return req.headers
            authorization = await self.workers.upstream(req.slot_key, self.accounts.authorization, req.registry,
                                                        route.name, wanted=req.wanted)
        except (requests.RequestException, oci.TokenError, NoRealm) as exc:
            log.warning("registry-cache: no token of the mirror's own account for %s: %s", route.name, exc)
            return req.headers
        headers = {k: v for k, v in req.headers.items() if k.lower() != "authorization"}
        headers["Authorization"] = authorization.encode()
        return headers

    def forget_ping(self, registry: str) -> None:
        """The registry (or its token server) failed: its next ping is asked
        again, so that while it is down clients get the stale answer, which
        needs no token, rather than a challenge no token server can meet."""
        for method in ("GET", "HEAD"):
            self._pings.pop((registry, method), None)

    async def _unreachable(self, req: RegistryRequest, failure: Unreachable) -> Outcome:
        """The store's answer (stale), else the registry's own error, else a 502."""
        self.forget_ping(req.registry)
        answer = failure.answer
        self.metrics.count("upstream_errors_total", 1, str(answer.status) if answer else "connection")
        stale = await self._stale_answer_shared(req) if self.settings.serve_stale else None
        if stale is not None:
            return self._stale(req, stale, failure.why)
        if answer is not None:
            return Outcome(Mark.ERROR, response=relayed(answer, req.method), digest=req.route.reference,
                           detail=failure.why)
        log.warning("registry-cache: %s for %s %s", failure.why, req.method, req.path[:200])
        return Outcome(Mark.ERROR, response=oci_error(502, "UNAVAILABLE", "upstream unreachable", failure.why),
                       digest=req.route.reference, detail=failure.why)

    def _note_rate_limit(self, registry: str, headers) -> None:
        """Keep the registry's ratelimit-limit/-remaining ("100;w=21600") for
        the metrics, and warn when little is left. The limits change from
        year to year: only the registry's own headers say what they are."""
        limit, remaining = _leading_int(headers.get("ratelimit-limit")), _leading_int(headers.get("ratelimit-remaining"))
        if limit is None or remaining is None:
            return
        self.metrics.set("upstream_ratelimit_limit", limit, registry)
        self.metrics.set("upstream_ratelimit_remaining", remaining, registry)
        now = time.monotonic()
        if remaining < QUOTA_WARNING_SHARE * limit and now - self._quota_warned.get(registry, -1e9) > QUOTA_WARNING_EVERY:
            self._quota_warned[registry] = now
            log.warning("registry-cache: %s allows %d more pulls of %d in its window (ratelimit-remaining)",
                        registry, remaining, limit)

    @staticmethod
    def _stale(req: RegistryRequest, response: http.Response, why: str) -> Outcome:
        log.warning("registry-cache: %s; answering %s %s from the store (stale)", why, req.method, req.path[:200])
        return Outcome(Mark.STALE, response=response, digest=req.route.reference, detail=why)

    def _remember(self, req: RegistryRequest, answer) -> None:
        """Keep a verified 200 manifest; it vouches for its repository (blocking)."""
        if not req.trusted and not answer.body:
            # A HEAD's Docker-Content-Digest is a claim; a registry nobody
            # chose could name any manifest we hold (a private one) with it.
            return
        route = req.route
        digest = self.storage.manifests.remember(req.registry, route.name, route.reference, answer.body,
                                                 answer.headers, list(req.accept), share=req.trusted)
        if digest is not None:  # the upstream served this manifest under this repository to this client
            self.storage.access.vouch(req.registry, route.name, digest, req.authorization, kind="manifests",
                                      trusted=req.trusted)
            if req.trusted and self.storage.manifests.digest_of_tag(req.registry, route.name, route.reference) == digest:
                self._note_checked(req, digest)

    async def _stale_answer_shared(self, req: RegistryRequest) -> http.Response | None:
        """_stale_answer(); if this node cannot give one, after taking in what
        other nodes kept (tags, manifests, access) from the shared records."""
        stale = await self.workers.local(self._stale_answer, req)
        if stale is None and self.shared is not None and req.trusted:
            await self.workers.object_store(self._learn_for_stale, req)
            stale = await self.workers.local(self._stale_answer, req)
        return stale

    def _from_shared(self, digest: str) -> manifests.StoredManifest | None:
        """The manifest of digest, from the shared records if this node lacks
        it, kept here (blocking: the object store)."""
        manifest = self.storage.manifests.get(digest)
        if manifest is None:
            found = self.shared.manifest(digest)
            if found is not None:
                manifest = manifests.StoredManifest(digest, *found)
                self.storage.manifests.put(manifest)
        return manifest

    def _learn_for_stale(self, req: RegistryRequest) -> None:
        """What a stale answer needs that other nodes may know: that the
        registry exists, the tag's last digest and its manifest, and whether
        this client may read it (blocking: the object store)."""
        route, store, shared = req.route, self.storage.manifests, self.shared
        if route.kind is Kind.PING:
            shared.knows_registry(req.registry)
            return
        digest = route.reference if ":" in route.reference else \
            store.digest_of_tag(req.registry, route.name, route.reference)
        tagged = digest is None
        if tagged:
            digest = shared.tag(req.registry, route.name, route.reference)
        if digest is None or self._from_shared(digest) is None:
            return
        if tagged:
            store.remember_tag(req.registry, route.name, route.reference, digest)
        self.storage.access.learn_shared(req.registry, route.name, digest, req.authorization)

    def _stale_answer(self, req: RegistryRequest) -> http.Response | None:
        """What the store can say while the upstream cannot (blocking)."""
        route = req.route
        if route.kind is Kind.PING:
            # Maybe no registry at all: its /v2/ is its own.
            if not (self.storage.access.index.knows(req.registry)
                    or (self.shared is not None and self.shared.knows_registry_here(req.registry))):
                return None
            return http.Response.make(200, b"{}", {"Content-Type": "application/json", **manifests.STALE_HEADERS})
        manifest = self.storage.manifests.lookup(req.registry, route.name, route.reference)
        if manifest is None or not manifests.accepts(list(req.accept), manifest.media_type):
            return None
        if not self.storage.access.allowed_offline(req.registry, route.name, manifest.digest, req.authorization):
            return None
        response = http.Response.make(200, manifest.body, {
            "Content-Type": manifest.media_type,
            "Docker-Content-Digest": manifest.digest,
            **manifests.STALE_HEADERS,
        })
        if req.method == "HEAD":
            response.content = b""
            response.headers["Content-Length"] = str(len(manifest.body))
        return response


def _from_store(manifest, reference: str, method: str = "GET") -> Outcome:
    """A kept manifest as the registry would answer a GET (or HEAD) for it."""
    key = (manifest.digest, manifest.media_type, method)
    fields = _hit_fields.get(key)
    if fields is None:
        if len(_hit_fields) >= 1024:
            _hit_fields.clear()
        fields = _hit_fields[key] = tuple((name.encode(), value.encode()) for name, value in (
            ("Content-Type", manifest.media_type),
            ("Docker-Content-Digest", manifest.digest),
            ("Docker-Distribution-Api-Version", "registry/2.0"),
            ("X-Registry-Cache", "hit"),
            ("Content-Length", str(len(manifest.body)))))
    response = ready(200, fields, b"" if method == "HEAD" else manifest.body)
    return Outcome(Mark.HIT, response=response, digest=reference, size=len(manifest.body))


# The headers of a kept manifest's answer, by (digest, media type, method):
# made once, not for every client of a rollout.
_hit_fields: dict[tuple[str, str, str], tuple[tuple[bytes, bytes], ...]] = {}


def _refused(status: int, headers, reason: str, reference: str) -> Outcome:
    """The registry's refusal (its challenge kept) of a GET answered here."""
    response = oci_error(status, REFUSED_MANIFEST_CODES.get(status, "DENIED"), "manifest refused by the registry",
                         reason)
    for name, value in headers:
        if name.lower() in ("www-authenticate", "docker-distribution-api-version"):
            response.headers.add(name, value)
    return Outcome(Mark.DENIED, response=response, digest=reference, detail=reason)


def _leading_int(value: str | None) -> int | None:
    """100 from "100;w=21600"."""
    number = (value or "").split(";", 1)[0].strip()
    return int(number) if number.isdigit() else None
