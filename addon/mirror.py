"""The mitmproxy hooks of the mirror: they decide where a request goes and hand it on.

A request meets, in order (README, "How it works"):
- `requestheaders`: not /v2/: untouched. Malformed, oversized or an `?ns=`
  not served: refused at once, before any body is read. Uploads, tags,
  catalog and the rest of /v2/: passed through (passthrough.py streams them).
- `request`: the mirror's own paths (metrics, health: drain.py, the token relay: tokens.py) are
  answered; a request aimed at the mirror itself is refused (own_addresses.py);
  a blob GET/HEAD goes to the blob path (blobs.py), a ping or manifest
  GET/HEAD to the manifest relay (manifest_relay.py). Each returns an
  Outcome, which flows.apply carries out on the flow.
- `request`, `responseheaders`: in reverse mode, a registry's token challenge
  is passed on naming the mirror's token relay as its realm.
- `response` / `error`: one log line and the metrics (flows.py).

SIGTERM drains the node before it stops (drain.py).

Hooks never block the event loop: disk work and registry calls run in the
worker pools (workers.py); fills and the blob server run in their own threads.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

from mitmproxy import ctx, exceptions, hooks, http

from . import flows, hook_dispatch, routes, settings
from .drain import HEALTH_PATH, Drain
from .fill import Fill, State
from .flows import Mark, Outcome
from .metrics import Metrics
from .own_addresses import OwnAddresses
from .registries import base_url_for, origin_of
from .responses import oci_error
from .routes import Kind, RouteError
from .services import Services
from .settings import Settings
from .tokens import TOKEN_PATH
from .workers import ClientGone, Workers

log = logging.getLogger("registry_cache")

MAX_HEADER_BYTES = 32 * 1024  # registry clients send a few hundred bytes
ANSWERED_HERE = (Kind.BLOB, Kind.MANIFEST, Kind.PING)  # for GET and HEAD


class RegistryCache:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.workers = Workers()
        self.own = OwnAddresses(self._listening)
        self.services = Services(self.metrics, self.workers, self.own, self._fill_finished,
                                 lambda storage: self._background(storage.retire()))
        self._running = False
        self._tasks: set[asyncio.Task] = set()
        self.drain = Drain(self._in_progress, self.services.health)
        self.drain.on_drain = self.services.draining.set

    # -- lifecycle ---------------------------------------------------------------

    def load(self, loader) -> None:
        hook_dispatch.install()
        settings.declare(loader)
        for problem in settings.check_set_values(ctx.options):
            log.error("registry-cache: %s", problem)

    def configure(self, updated: set[str]) -> None:
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            # With the default eager strategy mitmproxy connects upstream before
            # any hook runs, so even blobs we hold would fail while it is down.
            # Set here, not in `running`: the proxy accepts clients before that
            # hook runs, and a node started while the upstream was down failed
            # its first requests.
            ctx.options.update(connection_strategy="lazy")
            log.info("registry-cache: connection_strategy set to lazy (serve stored blobs while the upstream is down)")
        try:
            new = Settings.read(ctx.options)
            if new != self.services.settings:
                self.services.apply(new)
        except (ValueError, OSError, sqlite3.Error) as exc:
            if self._running:  # a change in mitmweb: refused, the options roll back
                raise exceptions.OptionsError(f"registry-cache: {exc}") from None
            log.error("registry-cache: %s", exc)  # at start: mitmdump exits, with no traceback

    def running(self) -> None:
        self._running = True
        self.own.forget()  # the proxy listens now
        self.drain.install(ctx.master.shutdown, lambda: self.services.settings.drain_timeout)
        settings.raise_open_files_limit()
        logging.getLogger("asyncio").addFilter(_not_a_cancelled_connection)
        if ctx.options.stream_large_bodies:
            # mitmproxy turns streaming on mid-body for a request the mirror
            # has already answered (refused), and its HTTP layer then fails.
            log.warning("registry-cache: stream_large_bodies is set; leave it unset: the mirror streams the "
                        "large bodies it passes through itself, and refusing a large request breaks with it")

    def done(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.services.close()
        self.workers.shutdown()

    # -- requests ------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Refuse or route a registry request before its body (a pushed
        layer) goes anywhere."""
        request = flow.request
        if not routes.is_registry_path(request.path):
            return
        state = flows.begin(flow)
        size = sum(len(name) + len(value) for name, value in request.headers.fields)
        if size > MAX_HEADER_BYTES:
            return self._refuse(flow, oci_error(431, "UNSUPPORTED", "request headers too large", f"{size} bytes"),
                                f"{size} bytes of headers")
        if not request.headers.get("Authorization", "").isascii():
            return self._refuse(flow, oci_error(400, "UNAUTHORIZED", "malformed Authorization header"),
                                "Authorization header is not ASCII")
        try:
            state.route = route = routes.parse(request.path)
        except RouteError as exc:
            return self._refuse(flow, oci_error(400, exc.code, exc.message, exc.detail), exc.message)
        if not flows.is_reverse(flow):
            state.registry_host = flows.host_port(request)  # for the log line
        if route.namespace is not None and not self._route_to_namespace(flow, state, route.namespace):
            return
        state.passes_through = not (request.method in ("GET", "HEAD") and route.kind in ANSWERED_HERE)

    async def request(self, flow: http.HTTPFlow) -> None:
        if path := flows.own_path(flow.request):
            if path == HEALTH_PATH:
                flow.response = self.drain.health_response()
            elif path.startswith(TOKEN_PATH):
                flow.response = await self._token(flow, path.removeprefix(TOKEN_PATH))
            else:
                flow.response = await self.workers.local(self._metrics_response, path)
            return
        state = flows.state_of(flow)
        if state is None or state.route is None or flow.response is not None:
            return
        request = flow.request
        if self.own.on_own_port(request.port) and await self.workers.local(self.own.is_own, request.host, request.port):
            return self._refuse(flow, oci_error(
                508, "UNSUPPORTED", "this request names the mirror itself",
                "name the registry (e.g. https://registry-1.docker.io), or use the mirror's reverse-mode port"),
                f"{request.host}:{request.port} is the mirror itself")
        route = state.route
        if state.passes_through:
            flows.mark(flow, Mark.PASS, detail=route.kind.value)
            return
        req = flows.registry_request(flow, route, self._trusted(flow))
        service = self.services.blobs if route.kind is Kind.BLOB else self.services.manifests
        try:
            outcome = await service.handle(req)
        except ClientGone:
            log.info("registry-cache: %s %s: the client left before the registry could be asked",
                     request.method, request.path[:200])
            outcome = Outcome(Mark.ERROR, response=oci_error(503, "UNAVAILABLE", "client left"),
                              digest=route.reference, detail="client left")
        except Exception:
            if route.kind is not Kind.BLOB:
                raise
            # A broken store must not break pulls.
            log.exception("registry-cache: error serving %s; passing it to the upstream", route.reference)
            outcome = Outcome(Mark.ERROR, stream=True, digest=route.reference, detail="store error, passed through")
        flows.apply(flow, state, outcome)
        if outcome.fill is not None:
            self._background(self._watch_fill(flow, outcome.fill))
        if flow.response is not None:
            self._pass_on_challenge(flow, req.trusted)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        state = flows.state_of(flow)
        if state is not None and (state.outcome is None or state.outcome.response is None):  # passed through
            self._pass_on_challenge(flow, self._trusted(flow))

    def response(self, flow: http.HTTPFlow) -> None:
        flows.log_request(flow, self.metrics)

    def error(self, flow: http.HTTPFlow) -> None:
        flows.log_request(flow, self.metrics)

    # -- tokens ----------------------------------------------------------------------

    def _pass_on_challenge(self, flow: http.HTTPFlow, trusted: bool) -> None:
        """Learn a chosen registry's token realm; in reverse mode, name the mirror's (tokens.py)."""
        if trusted:
            base = self.services.settings.mirror_url or flows.client_base_url(flow)
            realm = base + TOKEN_PATH + flows.host_port(flow.request) if flows.is_reverse(flow) else None
            self.services.token_endpoint.pass_on_challenge(flow.response, flows.registry_of(flow.request), realm)

    async def _token(self, flow: http.HTTPFlow, name: str) -> http.Response:
        request, started = flow.request, time.monotonic()
        response = await self.services.token_endpoint.answer(
            name, request.method, request.path.partition("?")[2], flows.end_to_end_headers(request),
            request.raw_content or b"", wanted=lambda: flow.client_conn.timestamp_end is None)
        outcome = Mark.PASS if response.status_code < 500 else Mark.ERROR
        self.metrics.count("requests_total", 1, "token", str(outcome))
        # The query and body (scopes, user names, passwords) are not logged.
        log.info("registry-cache: %s token %s %s %d %.0f ms", request.method, name[:100], outcome,
                 response.status_code, (time.monotonic() - started) * 1000)
        return response

    # -- helpers ---------------------------------------------------------------------

    def _refuse(self, flow: http.HTTPFlow, response: http.Response, why: str, outcome: Mark = Mark.ERROR) -> None:
        """Answer a bad request with an OCI error (mitmproxy reads the request's
        body before it sends the answer: README, Limits)."""
        log.warning("registry-cache: refused %s %s: %s", flow.request.method, flow.request.path[:200], why)
        flows.apply(flow, flows.state_of(flow), Outcome(outcome, response=response, detail=why))

    def _route_to_namespace(self, flow: http.HTTPFlow, state: flows.FlowState, ns: str) -> bool:
        """Send a request to the registry containerd named with ?ns=, if served."""
        request = flow.request
        del request.query["ns"]  # meant for the mirror, not the registry
        target = base_url_for(ns, self.services.settings.registries)
        if target is None and ns.strip().lower() == flows.host_port(request):
            return True  # the registry it goes to anyway: a reverse-mode mirror of that registry
        if target is None:
            self._refuse(flow, oci_error(403, "DENIED", "registry not mirrored here", ns[:200]),
                         f"registry {ns[:200]!r} is not in the registries option", outcome=Mark.DENIED)
            return False
        if origin_of(target) != flows.registry_of(request):
            flow.metadata[flows.METADATA_KEY + ".original_url"] = request.url
            state.registry_host = ns.strip().lower()
            request.url = target + request.path
        return True

    def _trusted(self, flow: http.HTTPFlow) -> bool:
        """Did the operator choose the registry this flow goes to? In reverse
        mode: the upstream, or an ns= from the registries list. In regular
        mode the client names the host: only the registries list counts."""
        return flows.is_reverse(flow) or flows.registry_of(flow.request) in self.services.settings.listed_origins

    def _in_progress(self) -> dict[str, int]:
        return {"requests": flows.in_progress(), **self.services.in_progress()}

    def _metrics_response(self, path: str) -> http.Response:
        return flows.metrics_response(path, self.metrics, self.services.gauges())

    def _fill_finished(self, fill: Fill) -> None:
        """Called by each fill as it ends (in its thread)."""
        flows.count_fill(self.metrics, fill)

    async def _watch_fill(self, flow: http.HTTPFlow, fill: Fill) -> None:
        """A miss is answered before its fill ends; show a late failure too."""
        await fill.wait_finished()
        if fill.state is State.FAILED:
            flows.mark(flow, Mark.FILL_FAILED, fill.digest, fill.size, detail=fill.error)
            ctx.master.addons.trigger(hooks.UpdateHook([flow]))
            log.info("registry-cache: marked flow %s fill-failed: %s", flow.id, fill.digest)

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _listening(self) -> list[tuple[str, int]]:
        """Where the mirror listens: its proxy ports and its blob server."""
        proxy = ctx.master.addons.get("proxyserver") if getattr(ctx, "master", None) else None
        addresses = [(host, port) for host, port, *_ in proxy.listen_addrs()] if proxy else []
        if self.services.blob_server is not None:
            addresses.append((self.services.blob_server.host, self.services.blob_server.port))
        return addresses


def _not_a_cancelled_connection(record: logging.LogRecord) -> bool:
    """Drop asyncio's report of a client connection cancelled at shutdown.

    Python 3.12.1's asyncio (fixed in 3.13) reports each client connection
    still open when mitmdump stops as an "Exception in callback" with a
    CancelledError traceback: SIGTERM printed dozens of them."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (isinstance(exc, asyncio.CancelledError) and "StreamReaderProtocol.connection_made" in record.getMessage())
