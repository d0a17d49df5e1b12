"""A real upstream registry for end-to-end tests: distribution behind a front door.

Layout (all on 127.0.0.1, ports picked at runtime)::

    client/mirror --> front door (Upstream.url) --> docker-registry (distribution 2.8)
                          |  307 (redirect_blobs)
                          +--> CDN (Upstream.cdn_url): blob files straight from storage
    token server (Upstream.token_realm): RS256 JWTs distribution trusts

The registry is the real thing so that protocol details (Accept negotiation,
digests, error bodies, token scopes) are right by construction. The front door
and the CDN are ours so that tests can count what the mirror fetched and break
the upstream in controlled ways. The front door rewrites nothing but hop-by-hop
headers: every other header line, repeated ``Accept`` lines included, reaches
distribution as the client sent it, and responses come back the same way.
Bodies are streamed in 1 MiB pieces in both directions, never buffered whole.

Faults (:meth:`Upstream.set_fault`) apply to blob GETs for one digest where the
body is served: at the front door in relay mode, at the CDN in redirect mode
(``where="frontdoor"``/``"cdn"`` pins them; a front-door fault in redirect mode
replaces the redirect). Kinds: ``"corrupt"`` (same length, the middle byte
flipped), ``"truncate"`` (full Content-Length, half the body, then the
connection closes), ``"close"`` (connection closed without a response), or an
HTTP error status such as 429/500/503 with an OCI error body (429 also gets
``Retry-After``), or ``"stall"`` (half the body, then nothing until
:meth:`Upstream.release_stalls`; :meth:`Upstream.wait_stalled` tells a test the
transfer is parked mid-body), or ``"ignore-range"`` (a request with a Range
header gets a 200 and the whole blob, as from a server without range support).

With ``at=N`` (a byte offset in the blob) a fault applies only to a GET whose
range covers byte N (a whole-blob GET covers every byte): other requests pass
untouched and do not use up ``times``. ``"cut"`` needs it: the response sends
the bytes before N, then the connection closes. With it, ``"corrupt"`` flips
byte N and ``"stall"`` parks the transfer at N, instead of the middle of the
response.

Speed (for the benchmark): ``link_rate`` paces all blob bytes of the front
door and the CDN through one shared line; ``conn_rate`` caps each connection
on top of that, as a long lossy path or a CDN's per-connection shaping does to
one TCP stream; ``request_delay`` holds every request that long before it is
answered (a round trip to a distant server), at the token server too.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import http.client
import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from ._http import LoopbackHTTPServer, QuietHandler
from .certs import make_tls_files
from .lifecycle import Service
from .registryproc import RegistryWorkdir, registry_config, start_registry, stop_process
from .tokenserver import TokenServer, decode_jwt

CHUNK = 1 << 20
BLOB_RE = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$")
MANIFEST_RE = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
CDN_RE = re.compile(r"^/registry-v2/docker/registry/v2/blobs/sha256/(?P<xx>[0-9a-f]{2})/(?P<hex>[0-9a-f]{64})/data$")
# Hop-by-hop headers (RFC 9110 7.6.1) plus Expect, which the front door answers itself.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
     "te", "trailer", "trailers", "transfer-encoding", "upgrade", "expect"}
)
FAULT_KINDS = ("corrupt", "truncate", "close", "stall", "cut", "ignore-range")
STALL_LIMIT = 120.0  # a stalled transfer resumes on its own after this (bounded wait)
ERROR_CODES = {400: "UNSUPPORTED", 401: "UNAUTHORIZED", 403: "DENIED", 404: "BLOB_UNKNOWN",
               429: "TOOMANYREQUESTS", 500: "UNKNOWN", 502: "UNAVAILABLE", 503: "UNAVAILABLE",
               504: "UNAVAILABLE"}

DEFAULT_USERS = {"alice": "alice-secret", "bob": "bob-secret"}
DEFAULT_PRIVATE_REPOS = {"acme/private": {"alice"}}
ALICE = ("alice", DEFAULT_USERS["alice"])  # with the defaults: may pull acme/private, may push anywhere
BOB = ("bob", DEFAULT_USERS["bob"])  # with the defaults: may push, may not pull acme/private


@dataclass
class RequestRecord:
    """One request seen by the front door or the CDN."""

    server: str  # "frontdoor" or "cdn"
    method: str
    path: str
    status: int = 0  # 0: no response was sent (fault "close", client went away)
    bytes: int = 0  # response body bytes actually sent
    authorization: bool = False  # the request carried an Authorization header
    token_subject: str | None = None  # the user a Bearer token of the token server was issued to ("": anonymous)
    range: str | None = None
    fault: str | None = None


@dataclass
class Fault:
    kind: str | int
    remaining: int | None = None  # None: until cleared
    where: str = "auto"  # "auto", "frontdoor" or "cdn"
    at: int | None = None  # only requests whose range covers this blob offset


def _covers(range_header: str | None, offset: int) -> bool:
    """Does a request with this Range header ask for the byte at `offset`?
    (No header, or one we do not parse: the whole blob, so yes.)"""
    m = re.fullmatch(r"\s*bytes=(\d+)-(\d*)\s*", range_header or "")
    if not m:
        return True
    return int(m[1]) <= offset and (m[2] == "" or offset <= int(m[2]))


class Counters:
    """Thread-safe traffic counters. Read dict fields through :meth:`snapshot`.

    ``blob_bytes`` is every blob content byte (200/206 bodies, not error
    bodies) sent to clients by the front door and the CDN together: what "the
    upstream served". Requests are recorded when they arrive and bytes are
    counted as they are handed to the socket, so whatever a client has
    received is already counted when it looks. Every blob GET at the front door counts in ``blob_gets``
    (401s and redirects included); ``cdn_gets`` counts CDN GETs that passed the
    signature check. ``requests`` has every request with its status.
    """

    def __init__(self):
        self._lock = threading.Condition()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.blob_gets = 0
            self.blob_heads = 0
            self.cdn_gets = 0
            self.cdn_heads = 0
            self.blob_bytes = 0
            self.request_body_bytes = 0  # pushed bytes relayed to distribution so far
            self.manifest_gets = 0
            self.manifest_heads = 0
            self.blob_gets_by_digest: collections.Counter = collections.Counter()
            self.cdn_gets_by_digest: collections.Counter = collections.Counter()
            self.blob_bytes_by_digest: collections.Counter = collections.Counter()
            self.manifest_gets_by_ref: collections.Counter = collections.Counter()  # "name:ref"
            self.manifest_heads_by_ref: collections.Counter = collections.Counter()
            self.requests: list[RequestRecord] = []

    def _bump(self, field_name: str, by_key_field: str | None = None, key: str | None = None) -> None:
        with self._lock:
            setattr(self, field_name, getattr(self, field_name) + 1)
            if by_key_field:
                getattr(self, by_key_field)[key] += 1

    def add_blob_bytes(self, digest: str, n: int) -> None:
        with self._lock:
            self.blob_bytes += n
            self.blob_bytes_by_digest[digest] += n

    def add_request_body_bytes(self, n: int) -> None:
        with self._lock:
            self.request_body_bytes += n
            self._lock.notify_all()

    def wait_request_body_bytes(self, count: int, timeout: float) -> bool:
        """Block until `count` pushed bytes have reached distribution (bounded)."""
        with self._lock:
            return self._lock.wait_for(lambda: self.request_body_bytes >= count, timeout)

    def add_record(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    def blob_bytes_for(self, digest: str) -> int:
        with self._lock:
            return self.blob_bytes_by_digest[digest]

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "blob_gets": self.blob_gets,
                "blob_heads": self.blob_heads,
                "cdn_gets": self.cdn_gets,
                "cdn_heads": self.cdn_heads,
                "blob_bytes": self.blob_bytes,
                "manifest_gets": self.manifest_gets,
                "manifest_heads": self.manifest_heads,
                "blob_gets_by_digest": dict(self.blob_gets_by_digest),
                "cdn_gets_by_digest": dict(self.cdn_gets_by_digest),
                "blob_bytes_by_digest": dict(self.blob_bytes_by_digest),
                "manifest_gets_by_ref": dict(self.manifest_gets_by_ref),
                "manifest_heads_by_ref": dict(self.manifest_heads_by_ref),
                "requests": list(self.requests),
            }


class _Abort(Exception):
    """Stop handling this request and drop the client connection."""


def _error_body(status: int, message: str) -> bytes:
    code = ERROR_CODES.get(status, "UNKNOWN")
    return json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()


def _token_subject(authorization: str) -> str | None:
    """The `sub` of a Bearer JWT (the user it was issued to), else None."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    try:
        return decode_jwt(token)[1].get("sub")
    except (ValueError, IndexError, KeyError, TypeError):
        return None


def _parse_range(value: str | None, size: int) -> tuple[int, int] | None | str:
    """A single ``bytes=`` range -> (start, end inclusive); None = whole; "bad" = 416."""
    if not value:
        return None
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", value)
    if not m or (m[1] == "" and m[2] == ""):
        return None  # unsupported forms (multi-range): serve the whole blob, as allowed
    if m[1] == "":
        length = int(m[2])
        if length == 0:
            return "bad"
        return max(0, size - length), size - 1
    start = int(m[1])
    end = int(m[2]) if m[2] else size - 1
    if start >= size or end < start:
        return "bad"
    return start, min(end, size - 1)


class _Handler(QuietHandler):
    """Dispatches every method to the owning Upstream (front door or CDN)."""

    server: "_OwnedServer"
    _upstream_conn: http.client.HTTPConnection | None = None

    def _dispatch(self):
        self.server.dispatch(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def finish(self):
        try:
            super().finish()
        finally:
            if self._upstream_conn is not None:
                self._upstream_conn.close()
                self._upstream_conn = None


class _OwnedServer(LoopbackHTTPServer):
    def __init__(self, dispatch, **kw):
        super().__init__(_Handler, **kw)
        self.dispatch = dispatch


class Link:
    """A shared line of `rate` bytes/s: callers wait their turn to send.

    Emulates the slow or metered link between a site and Docker Hub, for the
    benchmark; the pacing sleeps in server threads, never in a test.
    """

    def __init__(self, rate: float):
        self.rate = rate
        self._lock = threading.Lock()
        self._free_at = time.monotonic()

    def pace(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + nbytes / self.rate
        delay = start - now
        if delay > 0:
            time.sleep(delay)


class Upstream(Service):
    """distribution + token server + counting/faulting front door + redirect CDN.

    Use as a context manager or call :meth:`start`/:meth:`stop`. ``users`` and
    ``private_repos`` configure the token server (see tokenserver.py).
    """

    def __init__(
        self,
        *,
        users: dict[str, str] | None = None,
        private_repos: dict[str, set[str]] | None = None,
        redirect_blobs: bool = False,
        https: bool = False,
        service: str = "registry.harness.test",
        issuer: str = "harness-token-issuer",
        token_ttl: int = 300,
        cdn_url_ttl: int = 600,
        retry_after: int = 1,
        registry_binary: str = "docker-registry",
        workdir: str | None = None,
        keep_workdir: bool = False,
        start_timeout: float = 15.0,
        link_rate: float | None = None,
        conn_rate: float | None = None,
        request_delay: float = 0.0,
    ):
        self.users = dict(DEFAULT_USERS if users is None else users)
        self.private_repos = dict(DEFAULT_PRIVATE_REPOS if private_repos is None else private_repos)
        self.redirect_blobs = redirect_blobs
        self.https = https
        self.service = service
        self.issuer = issuer
        self.token_ttl = token_ttl
        self.cdn_url_ttl = cdn_url_ttl
        # A signed CDN URL answers this many GETs, then 403 "URL expired", as
        # one past its expiry time does (None: only the time counts). A
        # deterministic stand-in for a URL that expires during a long fill.
        self.cdn_url_uses: int | None = None
        self._cdn_url_used: collections.Counter[str] = collections.Counter()
        self.retry_after = retry_after
        self.registry_binary = registry_binary
        self.start_timeout = start_timeout
        self._workdir_arg = workdir
        self._keep_workdir = keep_workdir

        self.counters = Counters()
        self._faults: dict[str, Fault] = {}
        self._faults_lock = threading.Lock()
        self._stall_cond = threading.Condition()
        self._stall_generation = 0
        self._stalled_now = 0
        self._stalled_by_digest: collections.Counter[str] = collections.Counter()
        self._cdn_secret = secrets.token_bytes(32)
        # Blob bytes (front door and CDN together) are paced through one shared
        # link of this many bytes/s: the slow line the mirror exists for.
        self.link = Link(link_rate) if link_rate else None
        # ...and each connection at most this many bytes/s (None: no cap).
        self.conn_rate = conn_rate
        self.request_delay = request_delay  # seconds before each request is answered
        # A status (e.g. 429 or 503) the front door answers every /v2/ request
        # with: Docker Hub rate-limiting us, or failing. None: behave.
        self.answer_everything_with: int | None = None

        self.workdir: str | None = None
        self.rootdir: str | None = None
        self.ca_cert_path: str | None = None
        self.tokens: TokenServer | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._frontdoor: _OwnedServer | None = None
        self._cdn: _OwnedServer | None = None
        self._proc: subprocess.Popen | None = None
        self._files: RegistryWorkdir | None = None
        self._registry_port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def _start(self) -> None:
        self._files = RegistryWorkdir(self._workdir_arg, self._keep_workdir, "upstream-")
        self.workdir, self.rootdir = self._files.path, self._files.rootdir

        if self.https:
            tls = make_tls_files(os.path.join(self.workdir, "tls"))
            self.ca_cert_path = tls.ca_cert_path
            self._ssl_context = tls.server_context()

        self.tokens = TokenServer(
            service=self.service,
            issuer=self.issuer,
            users=self.users,
            private_repos=self.private_repos,
            token_ttl=self.token_ttl,
            ssl_context=self._ssl_context,
        ).start()
        self.tokens.request_delay = self.request_delay  # its auth server is as far away as it is
        cert_path = self.tokens.write_cert(os.path.join(self.workdir, "token-signer.pem"))

        self._start_registry(cert_path)
        self._cdn = _OwnedServer(self._serve_cdn, ssl_context=self._ssl_context, name="cdn").start()
        self._frontdoor = _OwnedServer(self._serve_frontdoor, ssl_context=self._ssl_context, name="frontdoor").start()

    def _registry_config(self, port: int, cert_path: str) -> str:
        q = json.dumps  # a JSON string is a valid YAML double-quoted scalar
        return registry_config(port, self.rootdir, "warn") + f"""\
  # Relative Location headers: uploads keep going through whichever front
  # door (http or https) the client used, with no header rewriting.
  relativeurls: true
auth:
  token:
    realm: {q(self.tokens.realm)}
    service: {q(self.service)}
    issuer: {q(self.issuer)}
    rootcertbundle: {q(cert_path)}
"""

    def _start_registry(self, cert_path: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        self._proc, self._registry_port = start_registry(
            self.registry_binary, self._files.config_path,
            lambda port: self._registry_config(port, cert_path), log_file=self._files.log_file,
            log_text=self.logs, env=env, cwd=self.workdir,
            ready_status=401,  # token auth is on
            timeout=self.start_timeout,
        )

    def _stop_registry(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc)

    def stop(self) -> None:
        for server in (self._frontdoor, self._cdn):
            if server is not None:
                server.stop()
        self._frontdoor = self._cdn = None
        self._stop_registry()
        if self.tokens is not None:
            self.tokens.stop()
        files, self._files = self._files, None
        if files is not None:
            files.close()

    # ------------------------------------------------------------------ addresses
    @property
    def url(self) -> str:
        """THE upstream: the front door's base URL (http://127.0.0.1:PORT)."""
        return self._frontdoor.url

    @property
    def host_port(self) -> str:
        return self._frontdoor.host_port

    @property
    def cdn_url(self) -> str:
        return self._cdn.url

    @property
    def registry_url(self) -> str:
        """distribution itself, bypassing the front door (debugging only)."""
        return f"http://127.0.0.1:{self._registry_port}"

    @property
    def token_realm(self) -> str:
        return self.tokens.realm

    @property
    def tokens_issued(self) -> int:
        return self.tokens.tokens_issued

    def logs(self) -> str:
        """distribution's log, then any unexpected exceptions in our servers."""
        text = self._files.log_text() if self._files is not None else ""
        for err in self.errors():
            text += "\n[harness server error]\n" + err
        return text

    def errors(self) -> list[str]:
        """Unexpected exceptions raised in the front door, CDN or token server."""
        out = []
        for server in (self._frontdoor, self._cdn):
            if server is not None:
                out.extend(server.errors)
        if self.tokens is not None:
            out.extend(self.tokens.errors)
        return out

    def blob_path(self, digest: str) -> str:
        """Where distribution stores a blob (the CDN serves this file)."""
        hexdigest = digest.split(":", 1)[1]
        return os.path.join(self.rootdir, "docker", "registry", "v2", "blobs", "sha256",
                            hexdigest[:2], hexdigest, "data")

    # ------------------------------------------------------------------ control
    def reset_counters(self) -> None:
        """Zero the traffic counters and the token server's counters."""
        self.counters.reset()
        if self.tokens is not None:
            self.tokens.reset_counters()

    def set_fault(self, digest: str, kind: str | int, *, times: int | None = None, where: str = "auto",
                  at: int | None = None) -> None:
        """Break blob GETs of ``digest``; ``times`` limits how often (None: until
        cleared); ``at`` limits it to GETs of ranges covering that byte."""
        if not (kind in FAULT_KINDS or (isinstance(kind, int) and 400 <= kind <= 599)):
            raise ValueError(f"unknown fault kind {kind!r}")
        if where not in ("auto", "frontdoor", "cdn"):
            raise ValueError(f"unknown fault location {where!r}")
        if kind == "cut" and at is None:
            raise ValueError("fault 'cut' needs at=: the blob offset to cut the connection at")
        with self._faults_lock:
            self._faults[digest] = Fault(kind, times, where, at)

    def clear_faults(self) -> None:
        self.answer_everything_with = None
        self.cdn_url_uses = None
        with self._faults_lock:
            self._faults.clear()
        self.release_stalls()

    def _stall(self, digest: str | None) -> None:
        """Park a transfer of `digest` mid-body until release_stalls() (or STALL_LIMIT)."""
        with self._stall_cond:
            generation = self._stall_generation
            self._stalled_now += 1
            self._stalled_by_digest[digest] += 1
            self._stall_cond.notify_all()
            try:
                self._stall_cond.wait_for(lambda: self._stall_generation != generation, STALL_LIMIT)
            finally:
                self._stalled_now -= 1
                self._stalled_by_digest[digest] -= 1
                if self._stalled_by_digest[digest] <= 0:
                    del self._stalled_by_digest[digest]
                self._stall_cond.notify_all()

    def wait_stalled(self, count: int = 1, timeout: float = 30.0, digest: str | None = None) -> None:
        """Wait until `count` transfers are parked by a "stall" fault; with
        `digest`, transfers of that blob only (a stall of another test's blob,
        released but not yet resumed, does not count then)."""
        def stalled() -> int:
            return self._stalled_now if digest is None else self._stalled_by_digest[digest]

        with self._stall_cond:
            if not self._stall_cond.wait_for(lambda: stalled() >= count, timeout):
                which = "" if digest is None else f" of {digest}"
                raise TimeoutError(f"{stalled()} of {count} transfers{which} stalled after {timeout}s")

    def release_stalls(self) -> None:
        with self._stall_cond:
            self._stall_generation += 1
            self._stall_cond.notify_all()

    @property
    def held(self) -> int:
        """Connections to the front door left unanswered while down with how="hang"."""
        return self._frontdoor.held

    def set_down(self, down: bool, *, include_auth: bool = True, how: str = "refuse") -> None:
        """Make the upstream go away (or come back) on the same ports.

        While down, live connections to the front door and the CDN (and the
        token server unless ``include_auth=False``), keep-alive or
        mid-transfer, are cut, and new ones are refused (``how="refuse"``),
        accepted and reset at once (``how="reset"``), or accepted and never
        answered (``how="hang"``).
        """
        self._frontdoor.set_down(down, how)
        self._cdn.set_down(down, how)
        if include_auth or not down:
            self.tokens.set_down(down, how)

    def _take_fault(self, digest: str, at: str, range_header: str | None = None) -> Fault | None:
        with self._faults_lock:
            fault = self._faults.get(digest)
            if fault is None:
                return None
            where = fault.where
            if where == "auto":
                where = "cdn" if self.redirect_blobs else "frontdoor"
            if where != at:
                return None
            if fault.at is not None and not _covers(range_header, fault.at):
                return None
            if fault.kind == "ignore-range" and not range_header:
                return None
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    del self._faults[digest]
            return fault

    def cdn_url_for(self, digest: str, ttl: int | None = None) -> str:
        """A signed, expiring CDN URL for ``digest`` (Docker Hub style)."""
        hexdigest = digest.split(":", 1)[1]
        expires = int(time.time()) + (self.cdn_url_ttl if ttl is None else ttl)
        nonce = secrets.token_hex(4)  # each redirect a URL of its own (cdn_url_uses counts per URL)
        sig = self._cdn_signature(digest, expires, nonce)
        return (f"{self._cdn.url}/registry-v2/docker/registry/v2/blobs/sha256/{hexdigest[:2]}/"
                f"{hexdigest}/data?expires={expires}&n={nonce}&verify={sig}")

    def _cdn_signature(self, digest: str, expires: int, nonce: str = "") -> str:
        return hmac.new(self._cdn_secret, f"{digest}\n{expires}\n{nonce}".encode(), hashlib.sha256).hexdigest()

    # ------------------------------------------------------------------ shared bits
    def _pace(self, h: _Handler, nbytes: int) -> None:
        """Hold blob bytes back to the connection's cap, then to the shared line's."""
        if self.conn_rate:
            link = getattr(h, "_conn_link", None)
            if link is None:
                link = h._conn_link = Link(self.conn_rate)
            link.pace(nbytes)
        if self.link:
            self.link.pace(nbytes)

    @property
    def _paced(self) -> bool:
        return bool(self.link or self.conn_rate)

    def _send_fault_status(self, h: _Handler, status: int, rec: RequestRecord) -> None:
        headers = {"Docker-Distribution-Api-Version": "registry/2.0"}
        if status == 429:
            headers["Retry-After"] = str(self.retry_after)
        if status == 401:
            headers["WWW-Authenticate"] = (
                f'Bearer realm="{self.token_realm}",service="{self.service}"'
            )
        rec.status = status
        h.send_body(status, _error_body(status, f"injected fault {status}"), headers=headers)

    # ------------------------------------------------------------------ front door
    def _serve_frontdoor(self, h: _Handler) -> None:
        target = h.path
        if target.startswith(("http://", "https://")):  # absolute-form: keep path+query
            parts = urlsplit(target)
            target = parts.path + ("?" + parts.query if parts.query else "")
        route = urlsplit(target).path
        rec = RequestRecord("frontdoor", h.command, target,
                            authorization="Authorization" in h.headers, range=h.headers.get("Range"),
                            token_subject=_token_subject(h.headers.get("Authorization", "")))
        c = self.counters
        c.add_record(rec)
        if self.request_delay:
            time.sleep(self.request_delay)  # a far-away server (in this server thread)
        try:
            if self.answer_everything_with and route.startswith("/v2"):
                rec.fault = str(self.answer_everything_with)
                h.drain_request_body()
                return self._send_fault_status(h, self.answer_everything_with, rec)
            blob = BLOB_RE.match(route)
            manifest = MANIFEST_RE.match(route)
            if blob and h.command == "GET":
                digest = blob["digest"]
                c._bump("blob_gets", "blob_gets_by_digest", digest)
                fault = self._take_fault(digest, "frontdoor", h.headers.get("Range"))
                if fault is not None and fault.kind != "ignore-range":
                    rec.fault = str(fault.kind)
                    if isinstance(fault.kind, int):
                        h.drain_request_body()
                        return self._send_fault_status(h, fault.kind, rec)
                    if fault.kind == "close":
                        h.close_connection = True
                        return
                elif fault is None and self.redirect_blobs and self._redirect_blob(h, target, digest, rec):
                    return
                if fault is not None and fault.kind == "ignore-range":
                    rec.fault = fault.kind
                return self._relay(h, target, rec, digest=digest, fault=fault)
            if blob and h.command == "HEAD":
                c._bump("blob_heads")
            elif manifest and h.command in ("GET", "HEAD"):
                key = f"{manifest['name']}:{manifest['ref']}"
                if h.command == "GET":
                    c._bump("manifest_gets", "manifest_gets_by_ref", key)
                else:
                    c._bump("manifest_heads", "manifest_heads_by_ref", key)
            self._relay(h, target, rec)
        except _Abort:
            h.close_connection = True

    def _connection(self, h: _Handler) -> tuple[http.client.HTTPConnection, bool]:
        """The handler's keep-alive connection to distribution (and whether it is reused)."""
        if h._upstream_conn is not None:
            return h._upstream_conn, True
        conn = http.client.HTTPConnection("127.0.0.1", self._registry_port, timeout=120)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        h._upstream_conn = conn
        return conn, False

    def _drop_connection(self, h: _Handler) -> None:
        if h._upstream_conn is not None:
            h._upstream_conn.close()
            h._upstream_conn = None

    def _send_request_head(self, conn, h: _Handler, method: str, target: str, *,
                           skip: frozenset = frozenset(), chunked: bool = False) -> None:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in h.headers.items():  # every line, in order, repeats kept
            lname = name.lower()
            if lname in HOP_BY_HOP or lname in skip:
                continue
            conn.putheader(name, value)
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()

    def _upstream_response(self, h: _Handler, method: str, target: str, *,
                           skip: frozenset = frozenset()) -> http.client.HTTPResponse:
        """Send the client's request (head and body) to distribution; return its response.

        A request without a body is retried once on a fresh connection if a
        reused keep-alive connection turns out to be dead.
        """
        chunked = "chunked" in h.headers.get("Transfer-Encoding", "").lower()
        length = int(h.headers.get("Content-Length") or 0)
        has_body = (chunked or length > 0) and method == h.command
        for attempt in (0, 1):
            conn, reused = self._connection(h)
            try:
                self._send_request_head(conn, h, method, target, skip=skip, chunked=chunked and has_body)
                if has_body:
                    self._relay_request_body(h, conn, chunked, length)
                return conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop_connection(h)
                if attempt or not reused or has_body:
                    raise

    def _relay_request_body(self, h: _Handler, conn, chunked: bool, length: int) -> None:
        sock = conn.sock
        if chunked:
            while True:
                line = h.rfile.readline(65537)
                if not line:
                    raise _Abort()
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while h.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers are dropped
                    sock.sendall(b"0\r\n\r\n")
                    return
                sock.sendall(b"%x\r\n" % size)
                self._copy_exact(h.rfile, sock, size, self.counters)
                h.rfile.readline(3)  # CRLF after the chunk data
                sock.sendall(b"\r\n")
        else:
            self._copy_exact(h.rfile, sock, length, self.counters)

    @staticmethod
    def _copy_exact(src, sock, count: int, counters: Counters) -> None:
        buf = bytearray(min(CHUNK, count) or 1)
        view = memoryview(buf)
        while count > 0:
            n = src.readinto(view[: min(len(buf), count)])
            if not n:
                raise _Abort()  # client hung up mid-body
            sock.sendall(view[:n])
            counters.add_request_body_bytes(n)
            count -= n

    def _relay(self, h: _Handler, target: str, rec: RequestRecord, *,
               digest: str | None = None, fault: Fault | None = None) -> None:
        skip = frozenset({"range"}) if fault is not None and fault.kind == "ignore-range" else frozenset()
        try:
            resp = self._upstream_response(h, h.command, target, skip=skip)
        except _Abort:
            self._drop_connection(h)
            raise
        except (OSError, http.client.HTTPException) as exc:
            self._drop_connection(h)
            rec.status = 502
            h.send_body(502, _error_body(502, f"front door: registry unreachable: {exc}"))
            return
        try:
            self._relay_response(h, resp, rec, digest, fault)
        except BaseException:
            self._drop_connection(h)  # body not drained: the connection is unusable
            raise
        if resp.will_close or not resp.isclosed():
            self._drop_connection(h)

    def _relay_response(self, h: _Handler, resp, rec: RequestRecord,
                        digest: str | None, fault: Fault | None) -> None:
        rec.status = resp.status
        has_body = h.command != "HEAD" and resp.status not in (204, 304) and resp.status >= 200
        length = resp.length  # None: chunked or delimited by close
        h.send_response_only(resp.status, resp.reason)
        for name, value in resp.msg.items():
            if name.lower() not in HOP_BY_HOP:
                h.send_header(name, value)
        chunked_out = has_body and length is None
        if chunked_out:
            h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        if not has_body:
            resp.close()
            return

        stall_digest = digest  # the fault's blob, whatever the status
        if resp.status not in (200, 206):
            digest = None  # an error body is not blob content: do not count it
        kind = fault.kind if fault else None
        # Where in this body a fault strikes: its middle, or the blob offset `at`.
        if fault is not None and fault.at is not None:
            first = re.match(r"bytes (\d+)-", resp.getheader("Content-Range") or "")
            strike = fault.at - (int(first[1]) if resp.status == 206 and first else 0)
        else:
            strike = length // 2 if length else None
        stop_at = strike if kind in ("truncate", "cut") else None
        flip_at = strike if kind == "corrupt" else None
        stall_at = strike if kind == "stall" else None
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        sent = 0
        try:
            while True:
                if stall_at is not None and sent >= stall_at:
                    h.wfile.flush()
                    self._stall(stall_digest)
                    stall_at = None
                want = CHUNK if stop_at is None else min(CHUNK, stop_at - sent)
                if stall_at is not None:
                    want = min(want, stall_at - sent)
                if want <= 0:
                    break
                n = resp.readinto(view[:want])
                if not n:
                    break
                if flip_at is not None and sent <= flip_at < sent + n:
                    buf[flip_at - sent] ^= 0xFF
                sent += n
                rec.bytes = sent
                if digest is not None:
                    self.counters.add_blob_bytes(digest, n)
                    self._pace(h, n)
                if chunked_out:
                    h.wfile.write(b"%x\r\n" % n)
                    h.wfile.write(view[:n])
                    h.wfile.write(b"\r\n")
                else:
                    h.wfile.write(view[:n])
        except (OSError, http.client.HTTPException):
            raise _Abort()  # either side went away mid-body
        if chunked_out:
            h.wfile.write(b"0\r\n\r\n")
        if stop_at is not None or (length is not None and sent != length):
            raise _Abort()  # the client must see the connection end here
        resp.close()

    def _redirect_blob(self, h: _Handler, target: str, digest: str, rec: RequestRecord) -> bool:
        """Answer 307 to the CDN if distribution would serve the blob (checked with a HEAD)."""
        try:
            head = self._upstream_response(h, "HEAD", target, skip=frozenset({"range"}))
            head.read()
            if head.will_close:
                self._drop_connection(h)
        except (OSError, http.client.HTTPException):
            self._drop_connection(h)
            return False
        if head.status != 200:
            return False  # relay distribution's own error response for the GET
        rec.status = 307
        h.send_response(307, "Temporary Redirect")
        h.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        h.send_header("Location", self.cdn_url_for(digest))
        h.send_header("Content-Type", "text/html; charset=utf-8")
        h.send_header("Content-Length", "0")
        h.end_headers()
        return True

    # ------------------------------------------------------------------ CDN
    def _serve_cdn(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        rec = RequestRecord("cdn", h.command, h.path,
                            authorization="Authorization" in h.headers, range=h.headers.get("Range"))
        self.counters.add_record(rec)
        if self.request_delay:
            time.sleep(self.request_delay)
        try:
            h.drain_request_body()
            self._cdn_request(h, url, rec)
        except (_Abort, OSError):
            h.close_connection = True

    def _cdn_error(self, h: _Handler, rec: RequestRecord, status: int, message: str) -> None:
        body = f"<?xml version=\"1.0\"?><Error><Code>{status}</Code><Message>{message}</Message></Error>"
        rec.status = status
        h.send_body(status, body.encode(), content_type="application/xml")

    def _cdn_request(self, h: _Handler, url, rec: RequestRecord) -> None:
        if "Authorization" in h.headers:
            # Like Docker Hub's CDN: a signed URL plus an Authorization header is refused.
            return self._cdn_error(h, rec, 400, "Only one auth mechanism allowed")
        m = CDN_RE.match(url.path)
        if not m or m["hex"][:2] != m["xx"]:
            return self._cdn_error(h, rec, 404, "NoSuchKey")
        if h.command not in ("GET", "HEAD"):
            return self._cdn_error(h, rec, 405, "MethodNotAllowed")
        digest = "sha256:" + m["hex"]
        query = parse_qs(url.query)
        try:
            expires = int(query["expires"][0])
            signature = query["verify"][0]
            nonce = query.get("n", [""])[0]
        except (KeyError, ValueError, IndexError):
            return self._cdn_error(h, rec, 403, "missing signature")
        if not hmac.compare_digest(signature, self._cdn_signature(digest, expires, nonce)):
            return self._cdn_error(h, rec, 403, "bad signature")
        if time.time() > expires:
            return self._cdn_error(h, rec, 403, "URL expired")
        if self.cdn_url_uses is not None and h.command == "GET":
            with self._faults_lock:
                self._cdn_url_used[signature] += 1
                used = self._cdn_url_used[signature]
            if used > self.cdn_url_uses:
                return self._cdn_error(h, rec, 403, "URL expired")
        path = self.blob_path(digest)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return self._cdn_error(h, rec, 404, "NoSuchKey")
        with f:
            size = os.fstat(f.fileno()).st_size
            if h.command == "HEAD":
                self.counters._bump("cdn_heads")
                fault = None
            else:
                self.counters._bump("cdn_gets", "cdn_gets_by_digest", digest)
                fault = self._take_fault(digest, "cdn", h.headers.get("Range"))
            if fault is not None:
                rec.fault = str(fault.kind)
                if isinstance(fault.kind, int):
                    return self._send_fault_status(h, fault.kind, rec)
                if fault.kind == "close":
                    raise _Abort()
            rng = _parse_range(h.headers.get("Range"), size)
            if fault is not None and fault.kind == "ignore-range":
                rng = None
            if rng == "bad":
                rec.status = 416
                h.send_body(416, b"", headers={"Content-Range": f"bytes */{size}"})
                return
            start, end = rng if rng else (0, size - 1)
            count = end - start + 1 if size else 0
            status = 206 if rng else 200
            rec.status = status
            h.send_response(status)
            h.send_header("Content-Type", "application/octet-stream")
            h.send_header("Content-Length", str(count))
            h.send_header("Accept-Ranges", "bytes")
            h.send_header("ETag", f'"{digest}"')
            h.send_header("Cache-Control", "public, max-age=14400")
            if rng:
                h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            h.end_headers()
            if h.command == "HEAD" or count == 0:
                return
            kind = fault.kind if fault else None
            # Where a fault strikes: the middle of this body, or the blob offset `at`.
            strike = start + count // 2 if fault is None or fault.at is None else fault.at
            if kind in ("truncate", "cut"):
                self._sendfile(h, f, start, strike - start, digest, rec)
                raise _Abort()
            if kind == "stall":
                self._sendfile(h, f, start, strike - start, digest, rec)
                self._stall(digest)
                self._sendfile(h, f, strike, end + 1 - strike, digest, rec)
                return
            if kind == "corrupt":
                mid = strike
                self._sendfile(h, f, start, mid - start, digest, rec)
                byte = os.pread(f.fileno(), 1, mid)
                rec.bytes += 1
                self.counters.add_blob_bytes(digest, 1)
                h.wfile.write(bytes([byte[0] ^ 0xFF]))
                self._sendfile(h, f, mid + 1, end - mid, digest, rec)
                return
            self._sendfile(h, f, start, count, digest, rec)

    def _sendfile(self, h: _Handler, f, offset: int, count: int, digest: str, rec: RequestRecord) -> None:
        """Send part of a file with sendfile(2) (plain) or a read/write loop (TLS).

        Bytes are counted before they are handed to the socket (and a short
        sendfile corrected right after), so the counters are complete by the
        time the client has read the last byte.
        """
        sock = h.connection
        if isinstance(sock, ssl.SSLSocket):
            while count > 0:
                data = os.pread(f.fileno(), min(CHUNK, count), offset)
                if not data:
                    raise _Abort()
                rec.bytes += len(data)
                self.counters.add_blob_bytes(digest, len(data))
                self._pace(h, len(data))
                sock.sendall(data)
                offset += len(data)
                count -= len(data)
            return
        out_fd, in_fd = sock.fileno(), f.fileno()
        while count > 0:
            want = min(count, CHUNK if self._paced else 8 * CHUNK)
            self._pace(h, want)
            rec.bytes += want
            self.counters.add_blob_bytes(digest, want)
            n = 0
            try:
                n = os.sendfile(out_fd, in_fd, offset, want)
            finally:
                if n < want:  # correct the advance count for what was not sent
                    rec.bytes -= want - n
                    self.counters.add_blob_bytes(digest, n - want)
            if n == 0:
                raise _Abort()  # file shorter than expected
            offset += n
            count -= n
