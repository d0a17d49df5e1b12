"""A Docker-Hub-style Bearer token server that CNCF distribution 2.8 trusts.

The mirror must do the real token dance against the upstream (and must not
leak private content), so the harness issues real RS256 JWTs that distribution
verifies against the certificate written by :meth:`TokenServer.write_cert`.

Endpoints (both at ``/token``):

* ``GET /token?service=S&scope=repository:NAME:pull[,push]`` (scope may repeat,
  or hold several space-separated scopes), optional Basic auth; with
  ``offline_token=true`` and credentials the answer also has a refresh_token.
* ``POST /token`` OAuth2 form as containerd sends it: ``grant_type=password``
  (username, password) or ``grant_type=refresh_token`` (refresh_token), plus
  service, scope (space-separated) and ``access_type=offline`` to ask for a
  refresh token.

Policy: anonymous clients get ``pull`` on every repository that is not private;
a known user gets pull, push and delete on every repository except private ones
that do not list them. Asking for what you may not have is not an error: like
Docker Hub, the token simply lacks that access and the registry refuses later.
Wrong credentials are a 401.

What distribution 2.8.2 insists on (checked against the Debian binary): the
header's ``kid`` must be the libtrust key id of a key in rootcertbundle (no
kid: 401), ``iss`` must equal its configured issuer, and ``aud`` must be a
plain string equal to the service (a JSON list is refused). It allows 60 s of
leeway on ``exp``/``nbf``: a token stays usable for a minute after it expires,
which matters to tests of token expiry.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from ._http import LoopbackHTTPServer, QuietHandler
from .certs import SigningKey, make_signing_key

AUTHENTICATED_ACTIONS = ("pull", "push", "delete", "*")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_jwt(token: str) -> tuple[dict, dict]:
    """(header, claims) of a JWT, without verifying it (for tests and debugging)."""
    header, claims, _sig = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(claims))


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """``repository:library/alpine:pull,push`` -> ("repository", "library/alpine", ["pull", "push"]).

    The name may itself contain ':' (a registry host with a port), so the
    actions are split off from the right. The resource type may carry a class
    in parentheses (``repository(plugin)``), which is dropped.
    """
    if scope.count(":") < 2:
        return None
    rtype, rest = scope.split(":", 1)
    name, actions = rest.rsplit(":", 1)
    rtype = rtype.split("(", 1)[0]
    return rtype, name, [a for a in actions.split(",") if a]


@dataclass
class TokenRequest:
    """One request to the token endpoint, for tests to inspect."""

    method: str
    grant: str  # "anonymous", "basic", "password", "refresh_token"
    username: str | None
    scopes: list[str]
    status: int
    access: list[dict] = field(default_factory=list)


class _TokenHandler(QuietHandler):
    server: "_TokenHTTPServer"

    def do_GET(self):
        self.server.owner._handle(self, "GET")

    def do_POST(self):
        self.server.owner._handle(self, "POST")


class _TokenHTTPServer(LoopbackHTTPServer):
    owner: "TokenServer"


class TokenServer:
    """Issues RS256 JWTs for one registry ``service`` as ``issuer``.

    ``users`` maps names to passwords; ``private_repos`` maps a repository name
    to the set of users allowed to pull it (anonymous clients never are).
    """

    def __init__(
        self,
        *,
        service: str = "registry.harness.test",
        issuer: str = "harness-token-issuer",
        users: dict[str, str] | None = None,
        private_repos: dict[str, set[str]] | None = None,
        token_ttl: int = 300,
        signing_key: SigningKey | None = None,
        ssl_context=None,
    ):
        self.service = service
        self.issuer = issuer
        self.users = dict(users or {})
        self.private_repos = {k: set(v) for k, v in (private_repos or {}).items()}
        self.token_ttl = token_ttl
        self.signing_key = signing_key or make_signing_key()
        self._server = _TokenHTTPServer(_TokenHandler, ssl_context=ssl_context, name="token")
        self._server.owner = self
        self._lock = threading.Lock()
        self._refresh_tokens: dict[str, str] = {}  # refresh token -> username
        self.tokens_issued = 0
        self.requests: list[TokenRequest] = []
        self.request_delay = 0.0  # seconds before each answer: a far-away auth server (set by Upstream)

    # -- lifecycle / addresses ---------------------------------------------
    def start(self) -> "TokenServer":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def set_down(self, down: bool, how: str = "refuse") -> None:
        self._server.set_down(down, how)

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def realm(self) -> str:
        return self._server.url + "/token"

    @property
    def errors(self) -> list[str]:
        return self._server.errors

    def write_cert(self, path: str) -> str:
        """Write the signing certificate (distribution's ``rootcertbundle``)."""
        with open(path, "wb") as f:
            f.write(self.signing_key.cert_pem)
        return path

    def reset_counters(self) -> None:
        with self._lock:
            self.tokens_issued = 0
            self.requests.clear()

    # -- policy ------------------------------------------------------------
    def allowed_actions(self, username: str | None, rtype: str, name: str) -> set[str]:
        if rtype == "repository":
            if name in self.private_repos:
                return set(AUTHENTICATED_ACTIONS) if username in self.private_repos[name] else set()
            return set(AUTHENTICATED_ACTIONS) if username else {"pull"}
        if rtype == "registry" and name == "catalog" and username:
            return {"*"}
        return set()

    def grant(self, username: str | None, scopes: list[str]) -> list[dict]:
        access = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            rtype, name, wanted = parsed
            allowed = self.allowed_actions(username, rtype, name)
            actions = [a for a in wanted if a in allowed]
            # Like Docker Hub, an entry is present even when nothing was granted.
            access.append({"type": rtype, "name": name, "actions": actions})
        return access

    # -- tokens ------------------------------------------------------------
    def make_token(self, username: str | None, access: list[dict], ttl: int | None = None) -> str:
        now = int(time.time())
        ttl = self.token_ttl if ttl is None else ttl
        header = {"typ": "JWT", "alg": "RS256", "kid": self.signing_key.kid}
        claims = {
            "iss": self.issuer,
            "sub": username or "",
            # A plain string: distribution 2.8 compares `aud` as a string.
            "aud": self.service,
            "exp": now + ttl,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = (
            b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        signature = self.signing_key.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(signature)

    # -- HTTP ----------------------------------------------------------------
    def _handle(self, h: _TokenHandler, method: str) -> None:
        if self.request_delay:
            time.sleep(self.request_delay)  # in this server thread
        url = urlsplit(h.path)
        if url.path != "/token":
            h.drain_request_body()
            h.send_body(404, b'{"details":"not found"}')
            return
        query = parse_qs(url.query)
        if method == "POST":
            body = h.drain_request_body().decode("utf-8", "replace")
            form = parse_qs(body)
        else:
            form = {}

        def param(name: str) -> str | None:
            values = form.get(name) or query.get(name)
            return values[0] if values else None

        scopes = [s for value in (form.get("scope") or query.get("scope") or []) for s in value.split()]
        want_refresh = param("access_type") == "offline" or param("offline_token") == "true"

        username: str | None = None
        grant = "anonymous"
        if method == "POST":
            grant = param("grant_type") or ""
            if grant == "password":
                username, password = param("username"), param("password")
                if username not in self.users or self.users[username] != password:
                    return self._deny(h, method, grant, username, scopes, 401, "invalid username or password")
            elif grant == "refresh_token":
                with self._lock:
                    username = self._refresh_tokens.get(param("refresh_token") or "")
                if username is None:
                    return self._deny(h, method, grant, None, scopes, 401, "invalid refresh token")
            else:
                return self._deny(h, method, grant, None, scopes, 400, "unsupported grant_type")
        else:
            auth = h.headers.get("Authorization", "")
            if auth:
                grant = "basic"
                scheme, _, value = auth.partition(" ")
                try:
                    username, _, password = base64.b64decode(value).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    username, password = None, None
                if scheme.lower() != "basic" or username not in self.users or self.users[username] != password:
                    return self._deny(h, method, grant, username, scopes, 401, "incorrect username or password")

        access = self.grant(username, scopes)
        token = self.make_token(username, access)
        now = time.time()
        reply = {
            "token": token,
            "access_token": token,
            "expires_in": self.token_ttl,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        }
        if want_refresh and username:
            refresh = secrets.token_urlsafe(24)
            with self._lock:
                self._refresh_tokens[refresh] = username
            reply["refresh_token"] = refresh
        if method == "POST" and scopes:
            reply["scope"] = " ".join(scopes)
        with self._lock:
            self.tokens_issued += 1
            self.requests.append(TokenRequest(method, grant, username, scopes, 200, access))
        h.send_body(200, json.dumps(reply).encode())

    def _deny(self, h, method, grant, username, scopes, status: int, detail: str) -> None:
        with self._lock:
            self.requests.append(TokenRequest(method, grant, username, scopes, status))
        body = json.dumps({"details": detail}).encode()
        headers = {"WWW-Authenticate": 'Basic realm="harness"'} if status == 401 else None
        h.send_body(status, body, headers=headers)
