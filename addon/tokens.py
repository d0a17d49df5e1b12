"""Tokens through the mirror, for machines that can reach only the mirror.

A registry's 401 names its token server: `WWW-Authenticate: Bearer
realm="https://auth.docker.io/token",service="registry.docker.io"`. An office
machine that reaches only the mirror (an intranet, a region where Docker Hub
is blocked) cannot get a token there, so it could pull nothing, not even what
the store holds. So in reverse mode every challenge the mirror passes on names
a realm on the mirror itself, at the address the client used:

    http://<mirror address>/_registry_cache/token/<registry>

and the mirror forwards what the client sends there (its query with service
and scopes, its Basic credentials, or containerd's OAuth2 form POST) to the
realm that registry named, and relays the answer unchanged. (Regular mode
needs none of this: its clients reach the auth server through the proxy.)

The mirror must not become an open relay or a way into internal addresses,
so where a token request goes is never taken from the client's request:
`<registry>` must name a registry the operator chose (the reverse-mode
upstream, or one on `registries`), and the realm is the one that registry's
own challenge named, seen by the mirror in an answer it received itself (or
asked of that registry's /v2/ when unknown). A client that changes the query,
adds `realm=` or `url=`, or names another registry in the path reaches the
same auth servers or none. Credentials pass through and are never logged or
kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

import requests

from .oci import Challenge, TokenError, parse_challenges, parse_token_answer
from .responses import oci_error, relayed
from .upstream import Answer, AnswerTooLarge, UpstreamClient
from .workers import ClientGone

log = logging.getLogger(__name__)

TOKEN_PATH = "/_registry_cache/token/"
FORWARDED_HEADERS = ("authorization", "content-type", "accept", "user-agent")
MAX_FORM = 64 * 1024  # an OAuth2 form is a few hundred bytes
ANONYMOUS_REUSE = 60.0  # seconds at most an anonymous token answer is given again (and half its lifetime)


class NoRealm(Exception):
    """The registry names no token server: nothing to forward to."""


class TokenRelay:
    def __init__(self, upstream: UpstreamClient):
        self.upstream = upstream
        self._challenges: dict[str, Challenge] = {}  # registry origin -> the Bearer challenge it sent
        # (registry, query) -> (until, answer): anonymous tokens, the same for
        # every client that asks for the same scopes (none of them sends credentials)
        self._anonymous: dict[tuple[str, str], tuple[float, Answer]] = {}
        self._lock = threading.Lock()

    def learn(self, registry: str, challenges: Iterable[str]) -> None:
        """Remember a Bearer challenge the registry itself sent (its realm)."""
        for challenge in parse_challenges(list(challenges)):
            realm = challenge.realm if challenge.scheme == "bearer" else None
            parts = urlsplit(realm or "")
            if realm and parts.scheme in ("http", "https") and parts.hostname and not parts.path.startswith(TOKEN_PATH):
                with self._lock:
                    self._challenges[registry] = challenge
                return

    def challenge_of(self, registry: str) -> Challenge:
        """The Bearer challenge a registry sent; asked of its /v2/ when not
        yet seen (blocking). Raises NoRealm, or requests' errors."""
        with self._lock:
            challenge = self._challenges.get(registry)
        if challenge is None:
            answer = self.upstream.fetch("GET", f"{registry}/v2/", {})
            self.learn(registry, [answer.headers.get("WWW-Authenticate", "")])  # several: joined by ", "
            with self._lock:
                challenge = self._challenges.get(registry)
        if challenge is None:
            raise NoRealm(f"{registry} asks for no token")
        return challenge

    def realm_of(self, registry: str) -> str:
        return self.challenge_of(registry).realm

    def given_lately(self, registry: str, method: str, query: str, headers: dict[str, bytes]) -> Answer | None:
        """An anonymous GET (no credentials) whose scopes were asked for
        moments ago: that answer again, from memory (every new client of a
        rollout asks for the same anonymous token; no thread hop)."""
        if not _anonymous(method, headers):
            return None
        with self._lock:
            until, answer = self._anonymous.get((registry, query), (0.0, None))
        return answer if answer is not None and time.monotonic() < until else None

    def forward(self, registry: str, method: str, query: str, headers: dict[str, bytes], body: bytes) -> Answer:
        """The client's token request, sent to the realm the registry named
        (blocking); an anonymous answer is kept for given_lately()."""
        now = time.monotonic()
        realm = self.realm_of(registry)
        url = realm + ("&" if "?" in realm else "?") + query if query else realm
        kept = {name: value for name, value in headers.items() if name.lower() in FORWARDED_HEADERS}
        answer = self.upstream.fetch(method, url, kept, body=body or None)
        if _anonymous(method, headers) and answer.status == 200:
            try:
                lifetime = parse_token_answer(answer.body).expires_in
            except TokenError:
                return answer
            with self._lock:
                if len(self._anonymous) > 10_000:
                    self._anonymous.clear()
                self._anonymous[(registry, query)] = (now + min(ANONYMOUS_REUSE, lifetime / 2), answer)
        return answer


def _anonymous(method: str, headers: dict[str, bytes]) -> bool:
    return method == "GET" and not any(name.lower() == "authorization" for name in headers)


def rewritten(values: Iterable[str], realm: str) -> list[str]:
    """WWW-Authenticate values with each Bearer challenge's realm set to ours;
    values that do not parse are passed on as they are."""
    result = []
    for value in values:
        challenges = parse_challenges(value)
        if not any(c.scheme == "bearer" and c.realm for c in challenges):
            result.append(value)
            continue
        result.append(", ".join(_format(c, realm if c.scheme == "bearer" and c.realm else None)
                                for c in challenges))
    return result


def _format(challenge: Challenge, realm: str | None) -> str:
    scheme = challenge.scheme.capitalize()
    if challenge.token68 is not None:
        return f"{scheme} {challenge.token68}"
    params = dict(challenge.params)
    if realm is not None:
        params["realm"] = realm
    return f"{scheme} " + ",".join(f'{name}="{_quoted(value)}"' for name, value in params.items())


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


class TokenEndpoint:
    """The mirror's /_registry_cache/token/<registry> path: a token request
    from a client, forwarded by the relay to that registry's realm."""

    def __init__(self, relay: TokenRelay, workers, settings, on_unreachable=lambda registry: None):
        self.relay, self.workers, self.settings = relay, workers, settings
        self.on_unreachable = on_unreachable  # the registry's token server could not be asked
        # (registry, our realm) -> (its last challenges, as passed on): learnt and rewritten when they change
        self._passed_on: dict[tuple[str, str | None], tuple[tuple[str, ...], list[str]]] = {}

    async def answer(self, name: str, method: str, query: str, headers: dict[str, bytes], body: bytes,
                     wanted):
        """The answer (a mitmproxy response) to a client's token request for
        the registry `name`; wanted(): does the client still wait?"""
        origin = self.settings.origin_named(name)
        if origin is None:
            return oci_error(404, "NAME_UNKNOWN", "no registry of that name is mirrored here", name[:100])
        if method not in ("GET", "POST"):
            return oci_error(405, "UNSUPPORTED", "token requests are GET or POST")
        if len(body) > MAX_FORM:
            return oci_error(413, "UNSUPPORTED", "token request too large")
        if answer := self.relay.given_lately(origin, method, query, headers):
            return relayed(answer, method)
        try:
            answer = await self.workers.upstream(origin, self.relay.forward, origin, method, query, headers, body,
                                                 wanted=wanted)
        except NoRealm as exc:
            return oci_error(404, "UNSUPPORTED", "this registry asks for no token", str(exc))
        except (requests.RequestException, AnswerTooLarge, ClientGone) as exc:
            if not isinstance(exc, ClientGone):
                self.on_unreachable(origin)
            return oci_error(502, "UNAVAILABLE", "token server unreachable", str(exc)[:300])
        if answer.status >= 500 or answer.status == 429:
            self.on_unreachable(origin)
        return relayed(answer, method)

    def pass_on_challenge(self, response, registry: str, realm: str | None) -> None:
        """A registry the operator chose asked for a token: learn its realm,
        and name `realm` (the mirror's own, in reverse mode) instead."""
        challenges = response.headers.get_all("WWW-Authenticate")
        if not challenges:
            return
        seen, passed_on = self._passed_on.get((registry, realm), ((), []))
        if seen != tuple(challenges):  # not what it said last time (a rollout's clients all get the same)
            self.relay.learn(registry, challenges)
            passed_on = rewritten(challenges, realm) if realm is not None else challenges
            if len(self._passed_on) >= 1024:
                self._passed_on.clear()
            self._passed_on[(registry, realm)] = (tuple(challenges), passed_on)
        if realm is not None:
            response.headers.set_all("WWW-Authenticate", passed_on)
