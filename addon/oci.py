"""The registry protocol, said once: challenges, tokens, media types, digests, errors.

The addon and `scripts/prefetch.py` both speak it, so it imports nothing of
ours, nothing of mitmproxy's and no third-party module at all (prefetch runs
on machines without mitmproxy; cachectl and the tests load it cheaply). It
makes no I/O policy decisions either: the functions that talk to a token
server take the caller's `requests.Session`, timeout and credentials, and the
caller decides where a password may go and which proxy or CA applies.

- Challenges (RFC 7235 section 4.1): one `WWW-Authenticate` value, or several
  header lines, may hold several challenges (`Basic realm="x", Bearer
  realm="y",service="z"`). Parsed whole, with case-insensitive scheme and
  parameter names and quoted-string unescaping; anything malformed yields no
  challenge rather than an exception or a half-read one.
- Tokens (the distribution token spec and its OAuth2 variant): the GET with
  `service` and repeated `scope` (Basic credentials optional), and the form
  POST containerd sends (`grant_type=password` or `refresh_token`).
- Manifests: the media types, and the digest check a kept manifest must pass.
- Errors: the JSON body the distribution spec defines for error answers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

if TYPE_CHECKING:
    import requests

# -- media types ---------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)  # multi-platform: they point at manifests
IMAGE_MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)  # they point at a config and layers
# Sent with the mirror's own HEADs: a registry answers 404 for a manifest whose
# type the request does not accept (distribution cannot convert OCI manifests).
ALL_MANIFEST_TYPES = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST, "*/*"])
MAX_MANIFEST = 4 << 20  # OCI: registries should accept manifests up to 4 MiB


def media_type_of(headers: Mapping[str, str]) -> str:
    """The Content-Type of an answer without its parameters ('' if none)."""
    return (headers.get("Content-Type") or "").split(";")[0].strip()


# -- manifests -------------------------------------------------------------------------

@dataclass
class Manifest:
    """A manifest whose body was checked against its digest."""

    digest: str
    media_type: str
    body: bytes


class ManifestMismatch(ValueError):
    """A manifest body that is not what its digest (asked for, or announced) says."""


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_manifest(body: bytes, headers: Mapping[str, str], reference: str) -> Manifest:
    """The manifest in a 200 answer to a GET of `reference` (a tag or a
    digest), or ManifestMismatch saying why it cannot be trusted: too large,
    or its sha256 differs from the digest asked for or from the answer's
    Docker-Content-Digest. (Signed schema1 manifests are hashed without their
    signatures by registries, so they never pass; callers that accept them
    must check them their own way.)"""
    if len(body) > MAX_MANIFEST:
        raise ManifestMismatch(f"manifest {reference} is larger than {MAX_MANIFEST} bytes")
    digest = sha256_digest(body)
    if ":" in reference and reference != digest:
        raise ManifestMismatch(f"manifest {reference}: the body's digest is {digest}")
    claimed = headers.get("Docker-Content-Digest")
    if claimed and claimed != digest:
        raise ManifestMismatch(f"manifest {reference}: Docker-Content-Digest {claimed} but the body is {digest}")
    return Manifest(digest, media_type_of(headers), body)


def verified_manifest(body: bytes, headers: Mapping[str, str], reference: str) -> Manifest | None:
    """check_manifest(), with None instead of the exception."""
    try:
        return check_manifest(body, headers, reference)
    except ManifestMismatch:
        return None


# -- errors ------------------------------------------------------------------------------

def error_body(code: str, message: str, detail: str = "") -> bytes:
    """The JSON body of an error answer, as the distribution spec defines it:
    {"errors": [{"code": "BLOB_UNKNOWN", "message": "...", "detail": "..."}]}
    (detail only when there is one)."""
    error = {"code": code, "message": message}
    if detail:
        error["detail"] = detail
    return json.dumps({"errors": [error]}).encode()


# -- challenges (RFC 7235) ------------------------------------------------------------

MAX_CHALLENGE_HEADER = 16 << 10  # longer WWW-Authenticate values are not parsed at all
_TCHARS = r"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN_RE = re.compile(f"[{_TCHARS}]+")
_TOKEN68_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_PARAM_NAME_RE = re.compile(f"([{_TCHARS}]+)[ \t]*=[ \t]*")
# qdtext and quoted-pair; obs-text (\x80-\xff) is what latin-1-decoded bytes give.
_QUOTED_RE = re.compile(r'"((?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*)"')
_UNESCAPE_RE = re.compile(r"\\(.)", re.DOTALL)
_SPACE_RE = re.compile(r"[ \t]+")
_OWS_RE = re.compile(r"[ \t]*")
_SEPARATORS_RE = re.compile(r"[ \t,]*")  # OWS and the empty list elements RFC 9110 tolerates


@dataclass(frozen=True)
class Challenge:
    """One challenge of a WWW-Authenticate header."""

    scheme: str  # lower-case: "bearer", "basic"
    params: Mapping[str, str] = field(default_factory=dict)  # names lower-case, values unescaped
    token68: str | None = None  # the other form: `Basic dXNlcg==`, `Negotiate abc...`

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")


class _Malformed(Exception):
    pass


def parse_challenges(values: str | Iterable[str] | None) -> list[Challenge]:
    """Every well-formed challenge in one WWW-Authenticate value, or in several
    header lines (a list: they are one comma-separated list, RFC 9110 5.3).

    Hostile or broken input never raises: parsing stops at the first thing the
    grammar does not allow, the challenge it was in is dropped, and the ones
    completed before it are kept. A challenge that names a parameter twice is
    dropped (which of two realms would be the registry's?). Values longer than
    MAX_CHALLENGE_HEADER give no challenge at all.
    """
    if values is None:
        return []
    text = values if isinstance(values, str) else ", ".join(v for v in values if isinstance(v, str))
    if len(text) > MAX_CHALLENGE_HEADER:
        return []
    challenges: list[Challenge] = []
    scheme: str | None = None
    params: dict[str, str] = {}
    token68: str | None = None
    duplicate = False

    def close() -> None:
        if scheme is not None and not duplicate:
            challenges.append(Challenge(scheme, params, token68))

    pos, end = 0, len(text)
    try:
        while True:
            pos = _SEPARATORS_RE.match(text, pos).end()
            if pos >= end:
                break
            param = _PARAM_NAME_RE.match(text, pos) if scheme is not None else None
            if param is not None:  # name = value, for the challenge being read
                if token68 is not None:
                    raise _Malformed  # a challenge has a token68 or parameters, not both
                name = param.group(1).lower()
                value, pos = _param_value(text, param.end())
                duplicate = duplicate or name in params
                params[name] = value
                pos = _OWS_RE.match(text, pos).end()
                if pos < end and text[pos] != ",":
                    raise _Malformed
                continue
            auth_scheme = _TOKEN_RE.match(text, pos)
            if auth_scheme is None:
                raise _Malformed
            close()
            scheme, params, token68, duplicate = auth_scheme.group().lower(), {}, None, False
            pos = auth_scheme.end()
            space = _SPACE_RE.match(text, pos)
            if space is None:
                if pos < end and text[pos] != ",":
                    raise _Malformed
                continue
            pos = space.end()
            candidate = _TOKEN68_RE.match(text, pos)
            if candidate is not None:
                after = _OWS_RE.match(text, candidate.end()).end()
                if after >= end or text[after] == ",":
                    token68, pos = candidate.group(), after
    except _Malformed:
        return challenges
    close()
    return challenges


def _param_value(text: str, pos: int) -> tuple[str, int]:
    """(value, position after it) of a token or quoted-string at pos."""
    if pos < len(text) and text[pos] == '"':
        quoted = _QUOTED_RE.match(text, pos)
        if quoted is None:
            raise _Malformed  # unterminated, or a control character inside
        return _UNESCAPE_RE.sub(r"\1", quoted.group(1)), quoted.end()
    token = _TOKEN_RE.match(text, pos)
    if token is None:
        raise _Malformed  # `realm=` with nothing usable after it
    return token.group(), token.end()


def bearer_challenge(values: str | Iterable[str] | None) -> Challenge | None:
    """The first Bearer challenge that names a realm, or None."""
    for challenge in parse_challenges(values):
        if challenge.scheme == "bearer" and challenge.realm:
            return challenge
    return None


# -- credentials -------------------------------------------------------------------------

def basic_authorization(username: str, password: str, charset: str = "utf-8") -> str:
    """`Basic <base64 of user:password>` (RFC 7617).

    RFC 7617 leaves the charset unspecified unless the server announces
    charset="UTF-8" (the only value it allows); registries' auth servers
    (distribution, Docker Hub, containerd and docker as clients) all use
    UTF-8, so that is the default. Pass charset="latin-1" for a server that
    wants ISO-8859-1. A user-id containing ':' cannot be sent (the RFC calls
    it invalid), nor can control characters: ValueError.
    """
    if ":" in username:
        raise ValueError("a user name containing ':' cannot be sent with Basic authentication")
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in username + password):
        raise ValueError("control characters cannot be sent with Basic authentication")
    raw = f"{username}:{password}".encode(charset)
    return "Basic " + base64.b64encode(raw).decode("ascii")


# -- tokens -------------------------------------------------------------------------------

DEFAULT_TOKEN_TTL = 60  # the token spec: an answer without expires_in is good for 60 s
MAX_TOKEN_ANSWER = 1 << 20  # a token server's answer larger than this is refused
OAUTH2_GRANTS = ("password", "refresh_token")
MAX_TOKEN_FIELDS = 256  # a client's token request with more query or form fields is refused


@dataclass(frozen=True)
class TokenRequest:
    """What a client asks a token realm for.

    The GET form (`grant_type` None): `?service=S&scope=A&scope=B`, with
    Basic credentials if any (sent by the caller as a header, see
    basic_authorization), `offline_token=true&client_id=C` to ask for a
    refresh token. The OAuth2 form POST that containerd sends instead when it
    has a refresh token or is told to: `grant_type=password` with
    `username`/`password`, or `grant_type=refresh_token` with
    `refresh_token`; `service`, `client_id`, the scopes space-separated in
    one `scope`, and `access_type=offline` to ask for a refresh token.
    """

    service: str | None = None
    scopes: tuple[str, ...] = ()
    grant_type: str | None = None  # None: the GET form; else one of OAUTH2_GRANTS
    client_id: str | None = None
    offline: bool = False  # ask for a refresh token too
    username: str | None = None  # OAuth2 password grant
    password: str | None = field(default=None, repr=False)  # never in a log line
    refresh_token: str | None = field(default=None, repr=False)  # OAuth2 refresh_token grant

    @classmethod
    def for_challenge(cls, challenge: Challenge, scopes: Iterable[str] | None = None, **fields) -> "TokenRequest":
        """The request a Bearer challenge asks for: its service, and its
        space-separated scope unless `scopes` says otherwise."""
        if scopes is None:
            scopes = (challenge.params.get("scope") or "").split()
        return cls(service=challenge.params.get("service") or None, scopes=tuple(scopes), **fields)

    def query(self) -> list[tuple[str, str]]:
        """The GET form's query parameters (scopes repeated, in order)."""
        fields = [("service", self.service)] if self.service else []
        fields += [("scope", scope) for scope in self.scopes]
        if self.offline:
            fields.append(("offline_token", "true"))
        if self.client_id:
            fields.append(("client_id", self.client_id))
        return fields

    def form(self) -> list[tuple[str, str]]:
        """The OAuth2 POST form's fields. ValueError if this is no OAuth2 request."""
        if self.grant_type not in OAUTH2_GRANTS:
            raise ValueError(f"not an OAuth2 grant: {self.grant_type!r} (want one of {', '.join(OAUTH2_GRANTS)})")
        fields = [("grant_type", self.grant_type)]
        if self.service:
            fields.append(("service", self.service))
        if self.client_id:
            fields.append(("client_id", self.client_id))
        if self.scopes:
            fields.append(("scope", " ".join(self.scopes)))
        if self.grant_type == "password":
            fields += [("username", self.username or ""), ("password", self.password or "")]
        else:
            fields.append(("refresh_token", self.refresh_token or ""))
        if self.offline:
            fields.append(("access_type", "offline"))
        return fields

    @classmethod
    def from_query(cls, query: str) -> "TokenRequest":
        """A client's GET request, from its query string (credentials, if
        any, are in its Authorization header, not here). ValueError past
        MAX_TOKEN_FIELDS fields."""
        fields = parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_TOKEN_FIELDS)
        first = dict(reversed(fields))  # the first of each name wins
        return cls(
            service=first.get("service") or None,
            scopes=tuple(scope for name, value in fields if name == "scope" for scope in value.split()),
            client_id=first.get("client_id") or None,
            offline=first.get("offline_token", "").lower() == "true",
        )

    @classmethod
    def from_form(cls, body: bytes | str) -> "TokenRequest":
        """A client's OAuth2 POST, from its form body. ValueError if its
        grant_type is missing or not one this module knows, or past
        MAX_TOKEN_FIELDS fields."""
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        fields = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_TOKEN_FIELDS)
        first = dict(reversed(fields))
        grant = first.get("grant_type")
        if grant not in OAUTH2_GRANTS:
            raise ValueError(f"unsupported grant_type {grant!r}")
        return cls(
            service=first.get("service") or None,
            scopes=tuple(scope for name, value in fields if name == "scope" for scope in value.split()),
            grant_type=grant,
            client_id=first.get("client_id") or None,
            offline=first.get("access_type") == "offline",
            username=first.get("username") if grant == "password" else None,
            password=first.get("password") if grant == "password" else None,
            refresh_token=first.get("refresh_token") if grant == "refresh_token" else None,
        )

    def encoded_form(self) -> bytes:
        return urlencode(self.form()).encode()


@dataclass(frozen=True)
class Token:
    """A token server's answer."""

    token: str
    expires_in: float = DEFAULT_TOKEN_TTL  # seconds from when it was issued
    refresh_token: str | None = None
    issued_at: str | None = None  # RFC 3339, as the server wrote it

    @property
    def authorization(self) -> str:
        return "Bearer " + self.token


class TokenError(Exception):
    """No token: the server refused (status set) or answered without one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def parse_token_answer(body: bytes) -> Token:
    """The token in a token server's 200 answer: `token`, or OAuth2's
    `access_token` (the spec makes them equivalent; `token` wins if both
    differ, as docker does), `expires_in` (absent, not a number or under one
    second: the spec's 60 s), `refresh_token`, `issued_at`. TokenError if
    there is no usable token."""
    if len(body) > MAX_TOKEN_ANSWER:
        raise TokenError(f"token answer larger than {MAX_TOKEN_ANSWER} bytes")
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise TokenError("token answer is not JSON") from None
    if not isinstance(answer, dict):
        raise TokenError("token answer is not a JSON object")
    token = answer.get("token") or answer.get("access_token")
    if not isinstance(token, str) or not token or any(c in token for c in "\r\n\0"):
        raise TokenError("token answer without a token")
    ttl = answer.get("expires_in")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 1 <= ttl < 1e9:
        ttl = DEFAULT_TOKEN_TTL
    refresh = answer.get("refresh_token")
    issued = answer.get("issued_at")
    return Token(token, float(ttl), refresh if isinstance(refresh, str) and refresh else None,
                 issued if isinstance(issued, str) else None)


def request_token(session: "requests.Session", realm: str, request: TokenRequest, *,
                  authorization: str | None = None, **kwargs) -> "requests.Response":
    """Send `request` to `realm` (a GET, or the OAuth2 POST) and return the
    answer unread (stream=True: read it with read_token_answer). Nothing is
    decided here: `authorization` (e.g. basic_authorization(...)) is sent
    as given, and `kwargs` (timeout, proxies, headers, verify) go to requests.

    The GET follows redirects (requests drops the Authorization header when
    one changes host); the POST does not, since a 307 would carry its form,
    password included, wherever it pointed."""
    headers = dict(kwargs.pop("headers", None) or {})
    if authorization:
        headers["Authorization"] = authorization
    if request.grant_type is None:
        return session.get(realm, params=request.query(), headers=headers, stream=True, **kwargs)
    headers["Content-Type"] = "application/x-www-form-urlencoded; charset=utf-8"
    kwargs.setdefault("allow_redirects", False)
    return session.post(realm, data=request.encoded_form(), headers=headers, stream=True, **kwargs)


def read_token_answer(response: "requests.Response") -> Token:
    """The Token in a token server's answer (read at most MAX_TOKEN_ANSWER
    bytes, then closed); TokenError with the status if it is not a 200 with
    a token in it."""
    with response:
        if response.status_code != 200:
            raise TokenError(f"token server answered {response.status_code}", response.status_code)
        body = response.raw.read(MAX_TOKEN_ANSWER + 1, decode_content=True)
    try:
        return parse_token_answer(body)
    except TokenError as exc:
        raise TokenError(str(exc), response.status_code) from None


def fetch_token(session: "requests.Session", realm: str, request: TokenRequest, *,
                authorization: str | None = None, **kwargs) -> Token:
    """request_token() and read_token_answer() in one: a Token, or TokenError.
    (requests' own exceptions for unreachable servers pass through.)"""
    return read_token_answer(request_token(session, realm, request, authorization=authorization, **kwargs))
