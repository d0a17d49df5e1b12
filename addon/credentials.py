"""The mirror's own account at a registry, for the pulls of public images.

Docker Hub counts every manifest GET as a pull, per address for anonymous
clients, and a whole office shares the mirror's one address. An operator may
give the mirror an account per registry (option `upstream_credentials`: a
file in Docker's config.json format, read at start). The mirror then makes
the manifest GETs it must send upstream (what Docker Hub counts) for public
repositories with that account's token, so the office's pulls count against
the account's quota instead of the anonymous one.

Only for public repositories: the access gate checks that with an anonymous
token of its own (access.py). A repository the account may read but the
public may not is fetched with the client's own token, as without an
account, so the mirror never serves a private image to a client whose token
the registry would not accept.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path

from . import oci
from .tokens import TokenRelay
from .upstream import UpstreamClient

log = logging.getLogger(__name__)

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")
EXPIRY_MARGIN = 30.0  # seconds before its expiry a token is no longer used


def read_accounts(path: str | os.PathLike, origin_of_name) -> dict[str, tuple[str, str]]:
    """{registry origin: (username, password)} from a config.json-style file:
    {"auths": {"docker.io": {"auth": base64("user:password")}, "ghcr.io":
    {"username": ..., "password": ...}}}. `origin_of_name(name)` maps a
    registry name to the origin of a registry the operator chose (None:
    not one of them; such entries are ignored with a warning). Raises
    ValueError for a file it cannot use."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"upstream_credentials: cannot read {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("credentials: %s can be read by other users (mode %o); chmod 600 it", path, mode & 0o777)
    entries = document.get("auths") if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"upstream_credentials: {path} has no \"auths\" object (Docker's config.json format)")
    accounts = {}
    for name, entry in entries.items():
        key = "docker.io" if name.lower().rstrip("/") in (k.rstrip("/") for k in DOCKER_HUB_KEYS) else name.lower()
        origin = origin_of_name(key)
        user, password = _user_and_password(entry)
        if origin is None or not user:
            log.warning("credentials: ignoring the entry for %s: %s", name,
                        "no username and password" if origin else "not a registry this mirror serves")
            continue
        accounts[origin] = (user, password)
    return accounts


def _user_and_password(entry) -> tuple[str, str]:
    if not isinstance(entry, dict):
        return "", ""
    if entry.get("auth"):
        try:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            return user, password
        except (ValueError, UnicodeError):
            return "", ""
    return str(entry.get("username") or ""), str(entry.get("password") or "")


class MirrorAccounts:
    """Tokens of the mirror's own accounts, one per registry and repository,
    kept until shortly before they expire. Never logged."""

    def __init__(self, accounts: dict[str, tuple[str, str]], upstream: UpstreamClient, tokens: TokenRelay):
        self._accounts = accounts
        self.upstream = upstream
        self.tokens = tokens
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}  # (registry, repo) -> (authorization, until)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<MirrorAccounts for {sorted(self._accounts)}>"

    def has(self, registry: str) -> bool:
        return registry in self._accounts

    def authorization(self, registry: str, repo: str) -> str:
        """`Bearer <token>` for pulling repo with the mirror's account (blocking).
        Raises oci.TokenError, tokens.NoRealm or requests' errors."""
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get((registry, repo))
        if cached and cached[1] > now:
            return cached[0]
        user, password = self._accounts[registry]
        challenge = self.tokens.challenge_of(registry)
        request = oci.TokenRequest.for_challenge(challenge, scopes=[f"repository:{repo}:pull"])
        self.upstream.refuse_own(challenge.realm)
        token = oci.fetch_token(self.upstream.session, challenge.realm, request,
                                authorization=oci.basic_authorization(user, password),
                                timeout=self.upstream.answer_timeout)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[(registry, repo)] = (token.authorization, now + token.expires_in - EXPIRY_MARGIN)
        return token.authorization
