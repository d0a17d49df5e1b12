"""The mitmproxy addon: routes registry traffic between the upstream and the store.

Request paths (see README "How it works"):
- not /v2/: untouched.
- /v2/ ping and manifest GET/HEAD: fetched from the upstream by the mirror
  itself and relayed; 200 manifests are kept, and answer (marked stale) while
  the upstream is down (manifests.py).
- tags, catalog, uploads, everything else under /v2/: mitmproxy passes them on.
- blob HEAD: answered here if stored (and allowed), else passed to the upstream.
- blob GET, stored: the access gate decides (access.py), then the blob server
  sends it (307 for plain-HTTP clients, a rewritten, streamed request for TLS
  clients).
- blob GET, not stored: one fill per digest fetches it from the upstream
  (fill.py); the client is sent to the blob server, which streams the part
  file as it grows.

Hooks never block the event loop: store calls run in a private thread pool,
fills and the blob server run in their own threads.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import re
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import requests
from mitmproxy import connection, ctx, exceptions, hooks, http, tls
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from . import manifests, routes
from .access import UNREACHABLE, AccessGate, SeenIndex
from .blobserver import BlobServer
from .fill import FetchPolicy, Fills, State, failure_labels
from .manifests import ManifestStore
from .metrics import METRICS_PATH, STATS_PATH, Metrics
from .passthrough import BodyStreaming
from .registries import DEFAULT_REGISTRIES, base_url_for, origin_of, parse_registries
from .routes import Kind, Route, RouteError
from .store import DiskBlobStore
from .upstream import ANSWER_TIMEOUT, QUIET_FOR, UpstreamClient
from .workers import UNLISTED, ClientGone, Workers

log = logging.getLogger("registry_cache")

START_TIMEOUT = 120.0  # bound on waiting for an upstream to answer a blob GET
MAX_HEADER_BYTES = 32 * 1024  # registry clients send a few hundred bytes
OPEN_FILES_WANTED = 65536  # sockets, blob files and fill cursors: 1024 runs out under load
METADATA_KEY = "registry_cache"
HIT_FILTER = '~meta "registry_cache: hit"'  # mitmweb/mitmdump filter listing hits (README)
MARKS = {  # what mitmweb shows per outcome
    "hit": ":green_circle:",
    "miss": ":large_blue_circle:",
    "fill-failed": ":red_circle:",
    "error": ":red_circle:",
    "pass": ":white_circle:",
    "denied": ":no_entry:",
    "stale": ":yellow_circle:",
}
REFUSAL_CODES = {  # OCI error for an access refusal, by the upstream's status
    401: ("UNAUTHORIZED", "authentication required"),
    403: ("DENIED", "requested access to the resource is denied"),
    404: ("BLOB_UNKNOWN", "blob unknown to registry"),
    503: ("UNAVAILABLE", "upstream unavailable and access could not be checked"),
}


def _check_set_values() -> None:
    """Stop mitmdump over a --set value of ours it cannot parse (serve_stale=yes).

    mitmproxy parses a script's --set values only once the script has
    registered its options, and a failure there ends the script's loading
    task without a word: mitmdump would run on as a plain proxy, caching
    nothing. Parsed here first, a bad value is logged as an error, on which
    mitmdump exits at start. (Uses mitmproxy 12's option internals.)"""
    options = ctx.options
    for name, value in list(options.deferred.items()):
        raw = getattr(value, "val", None)
        if raw is None or name not in options._options:  # not (yet) an option: someone else's
            continue
        try:
            options._parse_setval(options._options[name], raw)
        except exceptions.OptionsError as exc:
            log.error("registry-cache: --set %s=%s: %s", name, " ".join(raw), exc)


def raise_open_files_limit() -> None:
    """Lift the soft limit on open files towards the hard one. Each blob a
    client downloads holds its socket and a file; the usual soft limit of
    1024 ends in "too many open files" at a few hundred concurrent pulls."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        log.info("registry-cache: open files limit raised from %d to %d", soft, wanted)


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "registry-cache")


SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def format_size(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as parse_size reads them)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str) -> int:
    """'20g', '512M', '1.5T', '1000000' -> bytes (binary units)."""
    match = SIZE_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 500m, 20g, 1t)")
    number, unit = match.groups()
    size = int(float(number) * 1024 ** " kmgt".index(unit.lower() or " "))
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size


def _fetch_policy() -> FetchPolicy:
    """The fill_* options, checked (a bad value stops mitmdump at start)."""
    try:
        threshold = parse_size(ctx.options.fill_chunk_threshold)
        chunk = parse_size(ctx.options.fill_chunk_size)
    except ValueError as exc:
        raise exceptions.OptionsError(f"registry-cache: {exc}") from None
    connections = ctx.options.fill_connections
    if not 1 <= connections <= 64:
        raise exceptions.OptionsError(f"registry-cache: fill_connections must be 1 to 64, not {connections}")
    if min(threshold, chunk) < 1 << 20:
        raise exceptions.OptionsError("registry-cache: fill_chunk_threshold and fill_chunk_size must be 1m or more")
    return FetchPolicy(first_request=threshold, chunk_size=chunk, connections=connections)


class Verdict(enum.Enum):
    """What the access gate lets a request do with a stored blob."""

    READ = "read"
    REFETCH = "refetch"  # fetch it again from the client's registry, verified: its proof
    REFUSED = "refused"  # answered (denied, or passed through to the registry)


def oci_error(status: int, code: str, message: str, detail: str = "") -> http.Response:
    error = {"code": code, "message": message}
    if detail:
        error["detail"] = detail
    return http.Response.make(
        status, json.dumps({"errors": [error]}).encode(), {"Content-Type": "application/json"}
    )


class RegistryCache:
    def __init__(self) -> None:
        self.store: DiskBlobStore | None = None
        self.fills: Fills | None = None
        self.blob_server: BlobServer | None = None
        self.upstream: UpstreamClient | None = None
        self.access: AccessGate | None = None
        self.manifests: ManifestStore | None = None
        self.metrics = Metrics()
        self.streaming = BodyStreaming()
        self.registries: dict[str, str] = {}
        self._listed_origins: set[str] = set()
        self._size_limit = 0
        self._fetch_policy = FetchPolicy()
        self.workers = Workers()
        self._tasks: set[asyncio.Task] = set()

    # -- mitmproxy lifecycle --------------------------------------------------

    def load(self, loader) -> None:
        loader.add_option(
            "cache_dir", str, "",
            f"Directory of the blob store (default: {default_cache_dir()}).",
        )
        loader.add_option(
            "cache_size", str, "20g",
            "Size limit of the blob store (e.g. 500m, 20g, 1t); least recently used blobs are evicted.",
        )
        loader.add_option(
            "registries", Sequence[str], list(DEFAULT_REGISTRIES),
            "Registries a request may name with containerd's ?ns= (name, or name=URL; comma-separated "
            "or repeated). Any other ns is refused. docker.io means https://registry-1.docker.io.",
        )
        loader.add_option(
            "serve_stale", bool, True,
            "While the upstream is unreachable, rate-limited (429) or failing (5xx), answer manifests "
            "from the store (a tag: its last known digest, marked stale) and /v2/ pings locally.",
        )
        loader.add_option(
            "upstream_timeout", int, ANSWER_TIMEOUT,
            "Seconds a registry may take to answer a manifest, ping or access check. Past that the "
            f"store answers (serve_stale), and for {QUIET_FOR:.0f}s what it can answer is not asked of "
            "that registry (one request asks again).",
        )
        loader.add_option(
            "fill_chunk_threshold", str, "8m",
            "Blobs up to this size are fetched from the upstream in one request; the first request for a "
            "larger one asks for this much (a Range), and tells its size.",
        )
        loader.add_option(
            "fill_chunk_size", str, "8m",
            "Size of the ranges the rest of a larger blob is fetched in, over fill_connections connections.",
        )
        loader.add_option(
            "fill_connections", int, 8,
            "Upstream connections one fill uses at once (1: one connection, as a direct pull does).",
        )
        loader.add_option(
            "blob_redirect", bool, True,
            "Send plain-HTTP clients a 307 to the blob port for blob bytes (fastest). "
            "When off, and always for TLS clients, mitmproxy streams the bytes itself.",
        )
        loader.add_option(
            "blob_host", str, "",
            "Address the blob server listens on (default: the proxy's own listen address).",
        )
        loader.add_option(
            "blob_port", str, "0",
            "Port of the blob server (0: any free port; set one if a firewall sits in between).",
        )
        loader.add_option(
            "blob_url", str, "",
            "Base URL clients use to reach the blob server, e.g. http://mirror.lan:5001 "
            "(default: the address the client connected to, with blob_port).",
        )
        _check_set_values()

    def configure(self, updated: set[str]) -> None:
        if "upstream_timeout" in updated:
            if ctx.options.upstream_timeout <= 0:
                raise exceptions.OptionsError("registry-cache: upstream_timeout must be a number of seconds > 0")
            if self.upstream is not None:
                self.upstream.answer_timeout = ctx.options.upstream_timeout
        if updated & {"fill_chunk_threshold", "fill_chunk_size", "fill_connections"} or self.fills is None:
            self._fetch_policy = _fetch_policy()
            if self.fills is not None:
                self.fills.policy = self._fetch_policy
        if "registries" in updated:
            try:
                self.registries = parse_registries(ctx.options.registries)
                self._listed_origins = {origin_of(url) for url in self.registries.values()}
            except ValueError as exc:
                raise exceptions.OptionsError(f"registry-cache: registries: {exc}") from None
        watched = {"cache_dir", "cache_size", "blob_host", "blob_port", "mode", "listen_host"}
        if self.store is not None and not (updated & watched):
            return
        try:
            size_limit = parse_size(ctx.options.cache_size)
            port = int(ctx.options.blob_port)
            if not 0 <= port <= 65535:
                raise ValueError(f"blob_port out of range: {port}")
        except ValueError as exc:
            raise exceptions.OptionsError(f"registry-cache: {exc}") from None
        self._shutdown()
        cache_dir = Path(ctx.options.cache_dir or default_cache_dir()).expanduser()
        self._size_limit = size_limit
        self.store = DiskBlobStore(cache_dir, size_limit)
        self.fills = Fills(self.store, max_stored_size=size_limit, on_finished=self._count_fill,
                           policy=self._fetch_policy)
        self.upstream = UpstreamClient(verify=self._upstream_verify(), answer_timeout=ctx.options.upstream_timeout)
        self.access = AccessGate(SeenIndex(cache_dir / "access.sqlite3"), self.upstream)
        self.manifests = ManifestStore(cache_dir / "manifests")
        host = ctx.options.blob_host or self._proxy_listen_host()
        try:
            self.blob_server = BlobServer(self.store, self.fills, host, port, metrics=self.metrics,
                                          proven=self.access.index.served_by)
        except OSError as exc:
            raise exceptions.OptionsError(f"registry-cache: blob server cannot listen on {host}:{port}: {exc}")
        self.blob_server.start()
        used, count = self.store.usage()
        log.info(
            "registry-cache: store %s (%d blobs, %s of %s); blob server on %s:%d",
            cache_dir, count, format_size(used), format_size(size_limit), self.blob_server.host, self.blob_server.port,
        )

    def running(self) -> None:
        # With the default eager strategy mitmproxy connects upstream before
        # any hook runs, so even blobs we hold would fail while it is down.
        if ctx.options.connection_strategy != "lazy":
            ctx.options.update(connection_strategy="lazy")
            log.info("registry-cache: connection_strategy set to lazy (serve stored blobs while the upstream is down)")
        raise_open_files_limit()
        if ctx.options.stream_large_bodies:
            # mitmproxy turns streaming on mid-body for a request the mirror
            # has already answered (refused), and its HTTP layer then fails.
            log.warning("registry-cache: stream_large_bodies is set; leave it unset: the mirror streams the "
                        "large bodies it passes through itself, and refusing a large request breaks with it")

    def done(self) -> None:
        self._shutdown()
        self.workers.shutdown()

    def _shutdown(self) -> None:
        if self.blob_server is not None:
            self.blob_server.stop()
            self.blob_server = None
        if self.upstream is not None:
            self.upstream.close()
        if self.access is not None:
            self.access.close()
            self.access = None
        if self.manifests is not None:
            self.manifests.close()
            self.manifests = None
        if self.store is not None:
            self.store.close()
            self.store = None

    @staticmethod
    def _upstream_verify() -> bool | str:
        if ctx.options.ssl_insecure:
            return False
        return ctx.options.ssl_verify_upstream_trusted_ca or ctx.options.ssl_verify_upstream_trusted_confdir or True

    @staticmethod
    def _proxy_listen_host() -> str:
        """The one address all proxy modes listen on, else all interfaces."""
        hosts = {ProxyMode.parse(spec).listen_host(ctx.options.listen_host) for spec in ctx.options.mode}
        return hosts.pop() if len(hosts) == 1 else ""

    # -- request routing -------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Refuse or route a registry request before its body (a pushed
        layer) goes anywhere, and stream large bodies passed through."""
        request = flow.request
        if not routes.is_registry_path(request.path):
            if _metrics_path(request) is None:  # the mirror answers those itself
                self.streaming.request_headers(flow)
            return
        flow.metadata[METADATA_KEY + ".started"] = time.monotonic()
        size = sum(len(name) + len(value) for name, value in request.headers.fields)
        if size > MAX_HEADER_BYTES:
            self._refuse(flow, oci_error(431, "UNSUPPORTED", "request headers too large", f"{size} bytes"),
                         f"{size} bytes of headers")
            return
        if not request.headers.get("Authorization", "").isascii():
            self._refuse(flow, oci_error(400, "UNAUTHORIZED", "malformed Authorization header"),
                         "Authorization header is not ASCII")
            return
        try:
            route = routes.parse(request.path)
        except RouteError as exc:
            self._refuse(flow, oci_error(400, exc.code, exc.message, exc.detail), exc.message)
            return
        flow.metadata[METADATA_KEY + ".route"] = route
        if not isinstance(flow.client_conn.proxy_mode, ReverseMode):
            flow.metadata[METADATA_KEY + ".registry_host"] = _host_port(request)  # for the log line
        if route.namespace is not None and not self._route_to_namespace(flow, route.namespace):
            return
        if not (request.method in ("GET", "HEAD") and route.kind in (Kind.BLOB, Kind.MANIFEST, Kind.PING)):
            self.streaming.request_headers(flow)  # passed through: uploads, tags, catalog, deletes

    def _refuse(self, flow: http.HTTPFlow, response: http.Response, why: str, outcome: str = "error") -> None:
        """Answer a bad request with an OCI error (mitmproxy reads the request's
        body before it sends the answer: README, Limits)."""
        log.warning("registry-cache: refused %s %s: %s", flow.request.method, flow.request.path[:200], why)
        self._mark(flow, outcome, detail=why)
        flow.response = response
        flow.request.stream = False

    async def request(self, flow: http.HTTPFlow) -> None:
        self.streaming.request_complete(flow.request)
        if path := _metrics_path(flow.request):
            flow.response = await self.workers.local(self._metrics_response, path)
            return
        route = flow.metadata.get(METADATA_KEY + ".route")
        if flow.response is not None or route is None:
            return
        try:
            await self._answer_route(flow, route)
        except ClientGone:
            log.info("registry-cache: %s %s: the client left before the registry could be asked",
                     flow.request.method, flow.request.path[:200])
            flow.response = oci_error(503, "UNAVAILABLE", "client left")
            self._mark(flow, "error", route.reference, detail="client left")

    async def _answer_route(self, flow: http.HTTPFlow, route: Route) -> None:
        if route.kind is Kind.BLOB and flow.request.method in ("GET", "HEAD"):
            try:
                await self._blob(flow, route)
            except ClientGone:
                raise
            except Exception:  # noqa: BLE001 - a broken store must not break pulls
                log.exception("registry-cache: error serving %s; passing it to the upstream", route.reference)
                if flow.response is None:
                    self._mark(flow, "error", route.reference, detail="store error, passed through")
                    flow.metadata[METADATA_KEY + ".stream"] = True
        elif route.kind in (Kind.MANIFEST, Kind.PING) and flow.request.method in ("GET", "HEAD"):
            await self._relay_remembering(flow, route)
        else:
            self._mark(flow, "pass", detail=route.kind.value)

    def _route_to_namespace(self, flow: http.HTTPFlow, ns: str) -> bool:
        """Send a request to the registry containerd named with ?ns=, if served."""
        del flow.request.query["ns"]  # meant for the mirror, not the registry
        target = base_url_for(ns, self.registries)
        if target is None and _names_destination(ns, flow.request):
            return True  # the registry it goes to anyway: a reverse-mode mirror of that registry
        if target is None:
            self._refuse(flow, oci_error(403, "DENIED", "registry not mirrored here", ns[:200]),
                         f"registry {ns[:200]!r} is not in the registries option", outcome="denied")
            return False
        request = flow.request
        if origin_of(target) != _registry_of(flow):
            flow.metadata[METADATA_KEY + ".original_url"] = request.url
            flow.metadata[METADATA_KEY + ".registry_host"] = ns.strip().lower()
            request.url = target + request.path
        return True

    # -- metrics, request log --------------------------------------------------

    def _gauges(self) -> dict[str, float]:
        used, count = self.store.usage()
        return {
            "fills_in_flight": self.fills.in_flight(),
            "store_bytes": used,
            "store_blobs": count,
            "store_limit_bytes": self._size_limit,
            "evictions_total": self.store.evictions,
        }

    def _metrics_response(self, path: str) -> http.Response:
        gauges = self._gauges()
        if path == METRICS_PATH:
            return http.Response.make(200, self.metrics.prometheus(gauges).encode(),
                                      {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
        return http.Response.make(200, json.dumps(self.metrics.stats(gauges), indent=1).encode(),
                                  {"Content-Type": "application/json"})

    def _count_fill(self, fill) -> None:
        """Called by each fill as it ends (in its thread)."""
        if not fill.already_stored:
            self.metrics.count("upstream_blob_bytes_total", fill.fetched)
        if fill.failure is not None:  # a refusal is the upstream's answer, not a failure
            failed, upstream_error = failure_labels(fill.failure, fill.failure_status)
            self.metrics.count("fill_failures_total", 1, failed)
            if upstream_error is not None:
                self.metrics.count("upstream_errors_total", 1, upstream_error)

    def response(self, flow: http.HTTPFlow) -> None:
        self._log_request(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._log_request(flow)

    def _log_request(self, flow: http.HTTPFlow) -> None:
        """One line per registry request: method, repository (with its
        registry's host unless it is the reverse-mode upstream), kind,
        reference, outcome, HTTP status, bytes, milliseconds; and its count
        in the metrics."""
        started = flow.metadata.get(METADATA_KEY + ".started")
        if started is None:
            return
        route = flow.metadata.get(METADATA_KEY + ".route")
        outcome = flow.metadata.get(METADATA_KEY, "pass")
        if flow.error is not None and outcome in ("pass", "hit", "miss"):
            outcome = "error"
        size = flow.metadata.get(METADATA_KEY + ".size")
        if size is None and flow.response is not None:
            size = len(flow.response.raw_content or b"")
        kind = route.kind.value if route else "invalid"
        self.metrics.count("requests_total", 1, kind, outcome)
        name = route.name if route and route.name else "-"
        if registry_host := flow.metadata.get(METADATA_KEY + ".registry_host"):
            name = f"{registry_host}/{name}"
        status = flow.response.status_code if flow.response is not None else "-"
        log.info("registry-cache: %s %s %s %s %s %s %d bytes %.0f ms",
                 flow.request.method, name, kind, route.reference if route and route.reference else "-",
                 outcome, status, size or 0, (time.monotonic() - started) * 1000)

    # -- manifests and pings: relayed, with a stale answer when the upstream is down

    async def _relay_remembering(self, flow: http.HTTPFlow, route: Route) -> None:
        request = flow.request
        registry = _registry_of(flow)
        authorization = request.headers.get("Authorization")
        if ctx.options.serve_stale and self.upstream.hung(registry):
            # It let a request wait the whole timeout moments ago: what the
            # store can answer is not asked of it meanwhile.
            stale = await self.workers.local(self._stale_answer, registry, route, authorization, request)
            if stale is not None:
                self._answer_stale(flow, route, stale, f"{registry} timed out less than {QUIET_FOR:.0f}s ago")
                return
        try:
            answer = await self._ask_registry(flow, self.upstream.fetch, request.method, request.url,
                                              _end_to_end_headers(request))
            why = f"upstream answered {answer.status}"
        except (requests.exceptions.InvalidHeader, UnicodeError) as exc:
            log.warning("registry-cache: refused %s %s: %s", request.method, request.path[:200], exc)
            flow.response = oci_error(400, "UNSUPPORTED", "malformed request header", str(exc)[:200])
            self._mark(flow, "error", route.reference, detail="malformed header")
            return
        except requests.RequestException as exc:
            answer, why = None, f"upstream unreachable: {exc}"
        if answer is None or answer.status in UNREACHABLE:
            self.metrics.count("upstream_errors_total", 1, str(answer.status) if answer else "connection")
        if answer is not None and answer.status not in UNREACHABLE:
            flow.response = _relayed(answer, request.method)
            self._mark(flow, "pass", detail=route.kind.value)
            if answer.status == 200 and route.kind is Kind.MANIFEST:
                await self.workers.local(self._remember_manifest, registry, route, authorization, answer,
                                         request.headers.get_all("Accept"), self._trusted(flow))
            return
        stale = None
        if ctx.options.serve_stale:
            stale = await self.workers.local(self._stale_answer, registry, route, authorization, request)
        if stale is not None:
            self._answer_stale(flow, route, stale, why)
        elif answer is not None:
            flow.response = _relayed(answer, request.method)
            self._mark(flow, "error", route.reference, detail=why)
        else:
            log.warning("registry-cache: %s for %s %s", why, request.method, request.path)
            flow.response = oci_error(502, "UNAVAILABLE", "upstream unreachable", why)
            self._mark(flow, "error", route.reference, detail=why)

    def _answer_stale(self, flow: http.HTTPFlow, route: Route, stale: http.Response, why: str) -> None:
        log.warning("registry-cache: %s; answering %s %s from the store (stale)",
                    why, flow.request.method, flow.request.path)
        flow.response = stale
        self._mark(flow, "stale", route.reference, detail=why)

    def _remember_manifest(self, registry: str, route: Route, authorization: str | None, answer,
                           accepted: list[str], trusted: bool) -> None:
        if not trusted and not answer.body:
            # A HEAD's Docker-Content-Digest is a claim; a registry nobody
            # chose could name any manifest we hold (a private one) with it.
            return
        digest = self.manifests.remember(registry, route.name, route.reference, answer.body, answer.headers,
                                         accepted)
        if digest is not None:  # the upstream served this manifest under this repository to this client
            self.access.vouch(registry, route.name, digest, authorization, kind="manifests", trusted=trusted)

    def _stale_answer(self, registry: str, route: Route, authorization: str | None,
                      request: http.Request) -> http.Response | None:
        """What the store can say while the upstream cannot (blocking)."""
        if route.kind is Kind.PING:
            if not self.access.index.knows(registry):  # maybe no registry at all: its /v2/ is its own
                return None
            return http.Response.make(200, b"{}", {"Content-Type": "application/json", **manifests.STALE_HEADERS})
        manifest = self.manifests.lookup(registry, route.name, route.reference)
        if manifest is None or not manifests.accepts(request.headers.get_all("Accept"), manifest.media_type):
            return None
        if not self.access.allowed_offline(registry, route.name, manifest.digest, authorization):
            return None
        response = http.Response.make(200, manifest.body, {
            "Content-Type": manifest.media_type,
            "Docker-Content-Digest": manifest.digest,
            **manifests.STALE_HEADERS,
        })
        if request.method == "HEAD":
            response.content = b""
            response.headers["Content-Length"] = str(len(manifest.body))
        return response

    def tls_established_server(self, data: tls.TlsData) -> None:
        self.streaming.server_tls_established(data.context.client, data.conn)

    def client_disconnected(self, client: connection.Client) -> None:
        self.streaming.client_disconnected(client)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(METADATA_KEY + ".stream") or self._to_blob_server(flow.request):
            flow.response.stream = True
        elif flow.request.method != "HEAD":
            self.streaming.response_headers(flow.response)

    async def _ask_registry(self, flow: http.HTTPFlow, fn, *args):
        """fn(*args), a call to this flow's registry, in one of its slots (one
        of the slots all registries nobody chose share); see workers.py."""
        key = _registry_of(flow) if self._trusted(flow) else UNLISTED
        return await self.workers.upstream(key, fn, *args, wanted=lambda: flow.client_conn.timestamp_end is None)

    @staticmethod
    def _to_blob_server(request: http.Request) -> bool:
        """A proxy client following a redirect to the blob server (at whatever
        address blob_url gave): a fill in progress must reach it as it
        arrives, however small the blob. (Streaming anything else that looks
        like it costs nothing.)"""
        return request.path.startswith("/blobs/") and "&sig=" in request.path

    async def _blob(self, flow: http.HTTPFlow, route: Route) -> None:
        digest = route.reference
        registry = _registry_of(flow)
        authorization = flow.request.headers.get("Authorization")
        size = await self.workers.local(self.store.size_of, digest)
        refetch = False
        if size is not None:
            verdict = await self._may_read(flow, registry, route.name, digest, authorization,
                                           may_refetch=flow.request.method == "GET")
            if verdict is Verdict.REFUSED:
                return
            if verdict is Verdict.READ:
                self._mark(flow, "hit", digest, size)
                if flow.request.method == "HEAD":
                    flow.response = self._blob_head_response(digest, size)
                else:
                    self._send_to_blob_server(flow, digest)
                return
            # REFETCH: a registry nobody chose must show it holds these bytes
            # by serving them (verified) before our copy is its clients' too.
            refetch = True
        elif flow.request.method == "HEAD":
            self._mark(flow, "pass", digest)  # a HEAD never costs a blob download
            return
        fill, started = await self._start_or_join_fill(flow, digest, registry, route.name, refetch)
        if fill.state is State.CONNECTING:  # START_TIMEOUT: it goes on, and will be stored
            log.warning("registry-cache: the upstream has not answered for %s in %.0fs", digest, START_TIMEOUT)
            flow.response = oci_error(503, "UNAVAILABLE", "upstream slow to answer, retry later",
                                      f"no answer in {START_TIMEOUT:.0f}s")
            flow.response.headers["Retry-After"] = "10"
            self._mark(flow, "error", digest, detail="upstream did not answer in time")
            return
        if fill.state is State.FAILED:
            self._mark(flow, "denied" if fill.refused else "fill-failed", digest, detail=fill.error)
            if fill.answer is not None:
                answer = fill.answer
                flow.response = http.Response.make(answer.status, answer.body, answer.headers)
            else:
                flow.response = oci_error(502, "UNAVAILABLE", "upstream fetch failed", fill.error)
            return
        # A fill this request started vouches for it once its bytes verify
        # (on_verified); joining someone else's needs the same proof as a hit,
        # or, from a registry nobody chose, that registry's consent.
        if (not started or fill.already_stored) and await self._may_read(
                flow, registry, route.name, digest, authorization,
                its_own_fill=not fill.already_stored) is not Verdict.READ:
            return
        self._mark(flow, "hit" if fill.already_stored else "miss", digest, fill.size)
        self._send_to_blob_server(flow, digest)
        self._background(self._report_fill_outcome(flow, fill))

    def _trusted(self, flow: http.HTTPFlow) -> bool:
        """Did the operator choose the registry this flow goes to? In reverse
        mode: the upstream, or an ns= from the registries list. In regular
        mode the client names the host: only the registries list counts."""
        return isinstance(flow.client_conn.proxy_mode, ReverseMode) or \
            _registry_of(flow) in self._listed_origins

    def _unchosen_source(self, flow: http.HTTPFlow) -> str:
        """The registry of a flow nobody chose, which gets fills and blob URLs
        of its own; "" for the upstream and the registries list."""
        return "" if self._trusted(flow) else _registry_of(flow)

    async def _may_read(self, flow: http.HTTPFlow, registry: str, repo: str, digest: str,
                        authorization: str | None, may_refetch: bool = False,
                        its_own_fill: bool = False) -> "Verdict":
        """Apply the access gate; on refusal, answer the client as the upstream
        did (or pass it through to a registry that must first prove it holds
        the blob, unless the caller may refetch it from there instead).
        `its_own_fill`: the client is to follow a fill in progress from this
        flow's registry, not read the store."""
        trusted = self._trusted(flow)
        decision = await self.workers.local(self.access.check_locally, registry, repo, digest, authorization,
                                            trusted, its_own_fill)
        if decision is None:  # one HEAD there settles it
            decision = await self._ask_registry(flow, self.access.ask_registry, registry, repo, digest,
                                                authorization, trusted)
        if decision.allowed:
            return Verdict.READ
        if decision.pass_through:
            if may_refetch:
                log.info("registry-cache: fetching %s from %s although stored: %s", digest, registry, decision.reason)
                return Verdict.REFETCH
            log.info("registry-cache: passing %s %s through, not serving it from the store: %s",
                     flow.request.method, digest, decision.reason)
            self._mark(flow, "pass", digest, detail=decision.reason)
            flow.metadata[METADATA_KEY + ".stream"] = True
            return Verdict.REFUSED
        self._mark(flow, "denied", digest, detail=decision.reason)
        code, message = REFUSAL_CODES.get(decision.status, ("DENIED", "access denied"))
        response = oci_error(decision.status, code, message, decision.reason)
        for name, value in decision.headers:
            if name.lower() in ("www-authenticate", "retry-after", "docker-distribution-api-version"):
                response.headers[name] = value
        if flow.request.method == "HEAD":
            response.content = b""
        flow.response = response
        return Verdict.REFUSED

    def _background(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report_fill_outcome(self, flow: http.HTTPFlow, fill) -> None:
        """A miss is answered before its fill ends; show a late failure too."""
        await fill.wait_finished()
        if fill.state is State.FAILED:
            self._mark(flow, "fill-failed", fill.digest, fill.size, detail=fill.error)
            ctx.master.addons.trigger(hooks.UpdateHook([flow]))
            log.info("registry-cache: marked flow %s fill-failed: %s", flow.id, fill.digest)

    async def _start_or_join_fill(self, flow: http.HTTPFlow, digest: str, registry: str, repo: str,
                                  refetch: bool = False):
        url = flow.request.url.split("?", 1)[0]
        authorization = flow.request.headers.get("Authorization")
        trusted = self._trusted(flow)

        opener = self.upstream.blob_source(url, authorization)

        def vouch():
            # The upstream served these verified bytes under this repository
            # to this client: the proof the access gate asks for.
            self.access.vouch(registry, repo, digest, authorization, trusted=trusted)

        for _attempt in range(2):
            fill, started = self.fills.start_or_join(digest, opener, vouch, refetch=refetch,
                                                     source=self._unchosen_source(flow))
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

    def _blob_head_response(self, digest: str, size: int) -> http.Response:
        response = http.Response.make(200, b"", self._blob_headers(digest))
        response.headers["Content-Length"] = str(size)
        response.headers["X-Registry-Cache"] = "hit"  # e.g. for scripts/prefetch.py
        return response

    @staticmethod
    def _blob_headers(digest: str) -> dict[str, str]:
        return {
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": digest,
            "Etag": f'"{digest}"',
            "Accept-Ranges": "bytes",
        }

    def _send_to_blob_server(self, flow: http.HTTPFlow, digest: str) -> None:
        path = self.blob_server.signed_path(digest, registry=self._unchosen_source(flow))
        if ctx.options.blob_redirect and not flow.client_conn.tls_established:
            location = self._blob_base_url(flow) + path
            flow.response = http.Response.make(
                307, b"", {"Location": location, "Docker-Content-Digest": digest, "Cache-Control": "no-store"}
            )
            return
        # TLS client (or redirects off): mitmproxy streams the blob server's answer.
        flow.metadata[METADATA_KEY + ".original_url"] = flow.request.url
        flow.comment += f" (for {flow.request.url}, sent by the blob server)"
        flow.metadata[METADATA_KEY + ".stream"] = True
        flow.request.headers.pop("Authorization", None)
        flow.request.scheme = "http"
        flow.request.host = _loopback_for(self.blob_server.host)
        flow.request.port = self.blob_server.port
        flow.request.path = path

    def _blob_base_url(self, flow: http.HTTPFlow) -> str:
        if ctx.options.blob_url:
            return ctx.options.blob_url.rstrip("/")
        host = flow.client_conn.sockname[0]
        if host.startswith("::ffff:"):
            host = host[7:]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.blob_server.port}"

    @staticmethod
    def _mark(flow: http.HTTPFlow, outcome: str, digest: str = "", size: int | None = None, detail: str = "") -> None:
        """Show the outcome in mitmweb (mark + comment) and in flow metadata."""
        flow.marked = MARKS[outcome]
        parts = [f"registry-cache: {outcome}"]
        if digest:
            parts.append(digest)
        if size is not None:
            parts.append(f"{size} bytes")
        if detail:
            parts.append(f"({detail})")
        flow.comment = " ".join(parts)
        flow.metadata[METADATA_KEY] = outcome
        if size is not None:
            flow.metadata[METADATA_KEY + ".size"] = size


def _relayed(answer, method: str) -> http.Response:
    """mitmproxy response carrying an upstream answer unchanged (the body as
    sent: Response.make would encode it again by its Content-Encoding)."""
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()
               if k.lower() not in ("connection", "keep-alive", "transfer-encoding")]
    response = http.Response.make(answer.status)
    response.headers = http.Headers(headers)  # after make(), which would re-encode by them
    response.raw_content = answer.body
    if method == "HEAD" and "Content-Length" in answer.headers:
        response.headers["Content-Length"] = answer.headers["Content-Length"]
    else:
        response.headers["Content-Length"] = str(len(answer.body))
    return response


def _metrics_path(request: http.Request) -> str | None:
    """METRICS_PATH or STATS_PATH if the request asks for one, whatever host
    it names: those paths are the mirror's own."""
    path = request.path.split("?", 1)[0]
    return path if path in (METRICS_PATH, STATS_PATH) else None


def _host_port(request: http.Request) -> str:
    """host, or host:port when the port is not the scheme's own: how
    containerd's ns and image names spell a registry."""
    host = request.host.lower()
    return host if request.port == (443 if request.scheme == "https" else 80) else f"{host}:{request.port}"


def _names_destination(ns: str, request: http.Request) -> bool:
    """Does containerd's ns name the registry this request already goes to?"""
    return ns.strip().lower() == _host_port(request)


def _end_to_end_headers(request: http.Request) -> dict[str, bytes]:
    """The client's headers for the upstream, values as the bytes it sent
    (requests would fail to encode a value that is not Latin-1)."""
    headers: dict[str, bytes] = {}
    names: dict[str, str] = {}
    for raw_name, value in request.headers.fields:
        name = raw_name.decode("latin-1")
        key = name.lower()
        if key in manifests.HOP_BY_HOP:
            continue
        if key in names:
            headers[names[key]] += b", " + value
        else:
            names[key] = name
            headers[name] = value
    return headers


def _registry_of(flow: http.HTTPFlow) -> str:
    """The upstream registry a flow is for, as a base URL (the access gate's key)."""
    request = flow.request
    return f"{request.scheme}://{request.host.lower()}:{request.port}"


def _loopback_for(host: str) -> str:
    """Where mitmproxy itself reaches the blob server."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host
