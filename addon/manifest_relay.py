"""Pings and manifests: relayed by the mirror itself, kept, answered stale.

The mirror fetches these requests itself rather than leaving them to
mitmproxy's pass-through, because mitmproxy answers a failed upstream
connection with its own 502 and offers no hook to answer instead (see
manifests.py for what is kept and when it answers). So:

- The registry answers (anything but 429 or 5xx): relayed unchanged; a 200
  manifest is verified, kept, and vouches for its repository.
- It cannot be reached, answers 429 or 5xx, or let a request time out
  moments ago (upstream.hung) and `serve_stale` is on: the store answers,
  marked stale, if it can; else the registry's answer, or a 502.

Returns an `Outcome` (flows.py); never touches the flow.
"""

from __future__ import annotations

import logging

import requests
from mitmproxy import http

from . import manifests
from .access import UNREACHABLE
from .flows import Mark, Outcome, RegistryRequest
from .metrics import Metrics
from .responses import oci_error, relayed
from .routes import Kind
from .settings import Settings
from .storage import Storage
from .upstream import MAX_RELAYED_BODY, QUIET_FOR, AnswerTooLarge, UpstreamClient
from .workers import Workers

log = logging.getLogger(__name__)


class ManifestRelay:
    def __init__(self, storage: Storage, upstream: UpstreamClient, workers: Workers, metrics: Metrics,
                 settings: Settings):
        self.storage = storage
        self.upstream = upstream
        self.workers = workers
        self.metrics = metrics
        self.settings = settings

    async def handle(self, req: RegistryRequest) -> Outcome:
        kind = req.route.kind.value
        if self.settings.serve_stale and self.upstream.hung(req.registry):
            # It let a request wait the whole timeout moments ago: what the
            # store can answer is not asked of it meanwhile.
            stale = await self.workers.local(self._stale_answer, req)
            if stale is not None:
                return self._stale(req, stale, f"{req.registry} timed out less than {QUIET_FOR:.0f}s ago")
        try:
            answer = await self.workers.upstream(req.slot_key, self.upstream.fetch, req.method, req.url,
                                                 req.headers, wanted=req.wanted)
            why = f"upstream answered {answer.status}"
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
            answer, why = None, f"upstream unreachable: {exc}"
        if answer is None or answer.status in UNREACHABLE:
            self.metrics.count("upstream_errors_total", 1, str(answer.status) if answer else "connection")
        if answer is not None and answer.status not in UNREACHABLE:
            if answer.status == 200 and req.route.kind is Kind.MANIFEST:
                await self.workers.local(self._remember, req, answer)
            return Outcome(Mark.PASS, response=relayed(answer, req.method), detail=kind)
        stale = await self.workers.local(self._stale_answer, req) if self.settings.serve_stale else None
        if stale is not None:
            return self._stale(req, stale, why)
        if answer is not None:
            return Outcome(Mark.ERROR, response=relayed(answer, req.method), digest=req.route.reference, detail=why)
        log.warning("registry-cache: %s for %s %s", why, req.method, req.path[:200])
        return Outcome(Mark.ERROR, response=oci_error(502, "UNAVAILABLE", "upstream unreachable", why),
                       digest=req.route.reference, detail=why)

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
                                                 answer.headers, list(req.accept))
        if digest is not None:  # the upstream served this manifest under this repository to this client
            self.storage.access.vouch(req.registry, route.name, digest, req.authorization, kind="manifests",
                                      trusted=req.trusted)

    def _stale_answer(self, req: RegistryRequest) -> http.Response | None:
        """What the store can say while the upstream cannot (blocking)."""
        route = req.route
        if route.kind is Kind.PING:
            if not self.storage.access.index.knows(req.registry):  # maybe no registry at all: its /v2/ is its own
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
