"""One registry request as the mirror sees it: what it asked, what the mirror
decided, how that shows (mitmweb marks, the log line, the metrics).

Services (blobs.py, manifest_relay.py) get a `RegistryRequest`, read once
from the flow, and return an `Outcome`; only the hooks (mirror.py) touch the
flow itself, through `apply`.

Per-flow state is one `FlowState`, kept here beside the flow rather than in
`flow.metadata`: mitmproxy writes metadata into saved flow files (`mitmdump
-w`, mitmweb's save), and its serializer takes only plain values. What users
see stays in metadata as plain text: the outcome under `registry_cache` (the
filter `~meta "registry_cache: hit"` lists hits), the URL a client asked for
when the blob server answered it, and the blob's size.
"""

from __future__ import annotations

import enum
import json
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mitmproxy import http
from mitmproxy.proxy.mode_specs import ReverseMode

from .drain import HEALTH_PATH
from .metrics import METRICS_PATH, STATS_PATH, Metrics
from .routes import Route
from .tokens import TOKEN_PATH
from .workers import UNLISTED

from .fill import failure_labels

if TYPE_CHECKING:
    from .fill import Fill

log = logging.getLogger("registry_cache")

METADATA_KEY = "registry_cache"
HIT_FILTER = '~meta "registry_cache: hit"'  # mitmweb/mitmdump filter listing hits (README)
HOP_BY_HOP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length",
}


class Mark(enum.StrEnum):
    """A registry request's outcome, as mitmweb, the log and the metrics name it."""

    HIT = "hit"
    MISS = "miss"
    FILL_FAILED = "fill-failed"
    ERROR = "error"
    PASS = "pass"
    DENIED = "denied"
    STALE = "stale"


MARKS = {  # what mitmweb shows per outcome
    Mark.HIT: ":green_circle:",
    Mark.MISS: ":large_blue_circle:",
    Mark.FILL_FAILED: ":red_circle:",
    Mark.ERROR: ":red_circle:",
    Mark.PASS: ":white_circle:",
    Mark.DENIED: ":no_entry:",
    Mark.STALE: ":yellow_circle:",
}


@dataclass(frozen=True)
class RegistryRequest:
    """What a service needs to know about one client request."""

    method: str
    url: str  # where it goes upstream (containerd's ns resolved and removed)
    path: str  # of that URL, with its query: what log lines show
    route: Route
    registry: str  # scheme://host:port of that registry: the access gate's key
    trusted: bool  # the operator chose this registry (reverse upstream or `registries`)
    authorization: str | None
    headers: dict[str, bytes]  # end-to-end headers as the client sent them
    accept: tuple[str, ...]  # every Accept line
    tls_client: bool  # the client talks TLS to the mirror (regular mode)
    local_host: str  # the mirror's address the client connected to
    client_gone: Callable[[], bool] = field(compare=False, default=lambda: False)

    @property
    def slot_key(self) -> str:
        """Whose threads a call to this request's registry runs in (workers.py)."""
        return self.registry if self.trusted else UNLISTED

    def wanted(self) -> bool:
        """Does the client still wait for an answer?"""
        return not self.client_gone()

    @property
    def unchosen_source(self) -> str:
        """The registry of a request nobody chose, which gets fills and blob
        URLs of its own; "" for the upstream and the registries list."""
        return "" if self.trusted else self.registry


@dataclass
class Outcome:
    """What a service decided for a request. Exactly one way of answering:
    `response` (the mirror answers), `rewrite_to` (mitmproxy fetches this URL
    instead, streamed: the blob server for a TLS client), or neither (the
    request passes through to its registry; `stream` its answer)."""

    mark: Mark
    response: http.Response | None = None
    rewrite_to: str | None = None
    stream: bool = False
    digest: str = ""
    size: int | None = None
    detail: str = ""
    fill: "Fill | None" = None  # a miss answered before its fill ends: watch it


@dataclass
class FlowState:
    started: float = field(default_factory=time.monotonic)
    route: Route | None = None  # None: refused before it was parsed
    registry_host: str = ""  # named in the log line (not for the reverse-mode upstream)
    outcome: Outcome | None = None
    passes_through: bool = False  # its body goes to the registry (uploads, tags, catalog...)
    stream_response: bool = False
    logged: bool = False  # log_request ran (once per flow)


_states: "weakref.WeakKeyDictionary[http.HTTPFlow, FlowState]" = weakref.WeakKeyDictionary()


_in_progress = 0  # registry flows begun and not yet logged (event loop only)


def begin(flow: http.HTTPFlow) -> FlowState:
    global _in_progress
    state = _states[flow] = FlowState()
    _in_progress += 1
    return state


def in_progress() -> int:
    """Registry requests begun and not yet answered (or failed): what a drain waits for."""
    return _in_progress


def state_of(flow: http.HTTPFlow) -> FlowState | None:
    """The mirror's state of a registry flow; None for everything else."""
    return _states.get(flow)


def passes_through(flow: http.HTTPFlow) -> bool:
    """Will this request (and its body) go on to where it was sent, rather
    than be answered by the mirror? True for all traffic that is not the
    registry's or the mirror's own metrics paths."""
    state = state_of(flow)
    if state is None:
        return own_path(flow.request) is None
    return state.passes_through


def registry_of(request: http.Request) -> str:
    """The registry a request goes to, as scheme://host:port (see registries.origin_of)."""
    host = request.host.lower()
    return f"{request.scheme}://{f'[{host}]' if ':' in host else host}:{request.port}"


def host_port(request: http.Request) -> str:
    """host, or host:port when the port is not the scheme's own: how
    containerd's ns and image names spell a registry."""
    host = request.host.lower()
    host = f"[{host}]" if ":" in host else host
    return host if request.port == (443 if request.scheme == "https" else 80) else f"{host}:{request.port}"


def is_reverse(flow: http.HTTPFlow) -> bool:
    return isinstance(flow.client_conn.proxy_mode, ReverseMode)


def client_base_url(flow: http.HTTPFlow) -> str:
    """The mirror as the client reached it: scheme, and the address and port it connected to."""
    host, port = (flow.client_conn.sockname or ("127.0.0.1", 0))[:2]
    host = host.removeprefix("::ffff:")
    scheme = "https" if flow.client_conn.tls_established else "http"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def registry_request(flow: http.HTTPFlow, route: Route, trusted: bool) -> RegistryRequest:
    request = flow.request
    host = flow.client_conn.sockname[0] if flow.client_conn.sockname else "127.0.0.1"
    return RegistryRequest(
        method=request.method,
        url=request.url,
        path=request.path,
        route=route,
        registry=registry_of(request),
        trusted=trusted,
        authorization=request.headers.get("Authorization"),
        headers=end_to_end_headers(request),
        accept=tuple(request.headers.get_all("Accept")),
        tls_client=flow.client_conn.tls_established,
        local_host=host.removeprefix("::ffff:"),
        client_gone=lambda: flow.client_conn.timestamp_end is not None,
    )


def end_to_end_headers(request: http.Request) -> dict[str, bytes]:
    """The client's headers for the upstream, values as the bytes it sent
    (requests would fail to encode a value that is not Latin-1)."""
    headers: dict[str, bytes] = {}
    names: dict[str, str] = {}
    for raw_name, value in request.headers.fields:
        name = raw_name.decode("latin-1")
        key = name.lower()
        if key in HOP_BY_HOP:
            continue
        if key in names:
            headers[names[key]] += b", " + value
        else:
            names[key] = name
            headers[name] = value
    return headers


def apply(flow: http.HTTPFlow, state: FlowState, outcome: Outcome) -> None:
    """Carry out a service's decision on the flow, and show it."""
    state.outcome = outcome
    mark(flow, outcome.mark, outcome.digest, outcome.size, outcome.detail)
    if outcome.response is not None:
        flow.response = outcome.response
        flow.request.stream = False  # a refused request's body is read, not sent on
    elif outcome.rewrite_to is not None:
        flow.metadata[METADATA_KEY + ".original_url"] = flow.request.url
        flow.comment += f" (for {flow.request.url}, sent by the blob server)"
        flow.request.headers.pop("Authorization", None)
        flow.request.url = outcome.rewrite_to
        state.stream_response = True
    elif outcome.stream:
        state.stream_response = True


def mark(flow: http.HTTPFlow, outcome: Mark, digest: str = "", size: int | None = None, detail: str = "") -> None:
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
    flow.metadata[METADATA_KEY] = str(outcome)
    if size is not None:
        flow.metadata[METADATA_KEY + ".size"] = size


def log_request(flow: http.HTTPFlow, metrics: Metrics) -> None:
    """One line per registry request: method, repository (with its
    registry's host unless it is the reverse-mode upstream), kind,
    reference, outcome, HTTP status, bytes, milliseconds; and its count
    in the metrics."""
    global _in_progress
    state = state_of(flow)
    if state is None or state.logged:
        return
    state.logged = True
    _in_progress -= 1
    route = state.route
    outcome = Mark(flow.metadata.get(METADATA_KEY, Mark.PASS))
    if flow.error is not None and outcome in (Mark.PASS, Mark.HIT, Mark.MISS):
        outcome = Mark.ERROR
    size = flow.metadata.get(METADATA_KEY + ".size")
    if size is None and flow.response is not None:
        size = len(flow.response.raw_content or b"")
    kind = route.kind.value if route else "invalid"
    metrics.count("requests_total", 1, kind, str(outcome))
    name = route.name if route and route.name else "-"
    if state.registry_host:
        name = f"{state.registry_host}/{name}"
    status = flow.response.status_code if flow.response is not None else "-"
    log.info("registry-cache: %s %s %s %s %s %s %d bytes %.0f ms",
             flow.request.method, name, kind, route.reference if route and route.reference else "-",
             outcome, status, size or 0, (time.monotonic() - state.started) * 1000)


def own_path(request: http.Request) -> str | None:
    """A path the mirror answers itself, whatever host the request names:
    the metrics, and the token endpoint (tokens.py)."""
    path = request.path.split("?", 1)[0]
    return path if path in (METRICS_PATH, STATS_PATH, HEALTH_PATH) or path.startswith(TOKEN_PATH) else None


def metrics_response(path: str, metrics: Metrics, gauges: dict[str, float]) -> http.Response:
    if path == METRICS_PATH:
        return http.Response.make(200, metrics.prometheus(gauges).encode(),
                                  {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
    return http.Response.make(200, json.dumps(metrics.stats(gauges), indent=1).encode(),
                              {"Content-Type": "application/json"})


def count_fill(metrics: Metrics, fill: "Fill") -> None:
    """A fill's bytes and failure in the metrics (called in the fill's thread as it ends)."""
    if not fill.already_stored:
        from_tiers = dict(getattr(fill.opener, "tier_bytes", {}))  # the object store, other nodes (sources.py)
        metrics.count("upstream_blob_bytes_total", fill.fetched - sum(from_tiers.values()))
        for tier, n in from_tiers.items():
            metrics.count("tier_blob_bytes_total", n, tier)
    if fill.failure is not None:  # a refusal is the upstream's answer, not a failure
        failed, upstream_error = failure_labels(fill.failure, fill.failure_status)
        metrics.count("fill_failures_total", 1, failed)
        if upstream_error is not None:
            metrics.count("upstream_errors_total", 1, upstream_error)
