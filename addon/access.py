"""Who may read a stored blob: private images stay private.

A store keyed by digest would hand any blob to anyone who names its digest,
bypassing the upstream's access control. So a stored blob is served for
repository R only when both hold:

1. R was seen to contain it: the upstream served (GET) or confirmed (HEAD) that
   digest under R. This blocks cross-repository probing such as
   GET /v2/library/alpine/blobs/<digest of a private layer>.
2. The client may pull R: R is public (checked once in a while with an
   anonymous token of our own), or the upstream accepted this client's
   credentials for R, remembered per credential and repository until the
   token expires.

When either is unknown, one HEAD of the blob with the client's credentials
settles both; it costs no blob bytes and (on Docker Hub) no rate limit.
Anonymous pulls of a repository known to be public cost nothing extra.

That HEAD is only evidence from a registry the operator chose (the
reverse-mode upstream, the `registries` list). In regular mode a client can
name any host, one it runs itself included, which would answer 200 for any
digest. Such a registry is believed only about blobs it has itself served to
the mirror, verified. For any other stored blob the gate answers "pass
through": the mirror fetches a GET from that registry again, as for a miss
(the verified bytes are its proof), and lets a HEAD go to it as if the mirror
had no copy. A client joining a fill from that registry follows its bytes,
not the store's, once a HEAD with its credentials there says yes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

from .upstream import UpstreamClient

log = logging.getLogger(__name__)

PUBLIC_TTL = 600.0  # how long "R is public/private" is believed
MAX_GRANT_TTL = 3600.0  # cap on trusting a token, whatever its exp says
OPAQUE_GRANT_TTL = 60.0  # for credentials whose lifetime we cannot read
UNREACHABLE = (429, 500, 502, 503, 504)
# Credential x repository grants kept in memory. Expired ones still serve
# offline decisions, so they are not dropped at expiry; past this many, the
# older half goes (every pull brings a new token, so they would pile up).
MAX_GRANTS = 20_000
MAX_RECORDED_REMEMBERED = 100_000  # triples known to be in the index already
PROBE_THREADS = 4  # "is R public?" checks run in the background, this many at a time
CLOCK_SKEW = 60.0  # how far ahead another node's clock may be: a shared record's time further ahead is not believed


@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int = 200  # when refused: the upstream's status for the client
    headers: tuple[tuple[str, str], ...] = ()
    reason: str = ""
    pass_through: bool = False  # not refused: the registry must answer (or serve it to us), not the store


ALLOWED = Decision(True)


def fingerprint(authorization: str | None) -> str:
    return hashlib.sha256(authorization.encode()).hexdigest() if authorization else ""


def credential_expiry(authorization: str | None, now: float) -> float:
    """When to stop trusting a credential the upstream accepted."""
    if authorization and authorization.lower().startswith("bearer "):
        try:
            payload = authorization.split(None, 1)[1].split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            return min(float(claims["exp"]), now + MAX_GRANT_TTL)
        except (IndexError, ValueError, KeyError, TypeError):
            pass
    return now + OPAQUE_GRANT_TTL


def _believable(ahead: float, what: str) -> bool:
    """A time another node wrote, at most CLOCK_SKEW later than this node's clock allows."""
    if ahead <= CLOCK_SKEW:
        return True
    log.info("access: ignoring %s from the object store: %.0fs ahead of this node's clock", what, ahead)
    return False


def others_may_know(decision: "Decision | None") -> bool:
    """Whether what other nodes learned (learn_shared) may settle decision:
    none yet, or a refusal made only from what this node knew while the
    registry is in its quiet time (a grant another node holds would allow it)."""
    return decision is None or not (decision.allowed or decision.pass_through)


class SeenIndex:
    """Persistent (registry, repository, digest) triples the upstream vouched for."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._recorded: set[tuple[str, str, str]] = set()  # known to be in the index (written or read here)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS seen (registry TEXT, repo TEXT, digest TEXT, seen_at REAL,"
                " PRIMARY KEY (registry, repo, digest)) WITHOUT ROWID"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS seen_by_digest ON seen (digest, registry)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS public (registry TEXT, repo TEXT, public INTEGER, checked_at REAL,"
                " PRIMARY KEY (registry, repo)) WITHOUT ROWID"
            )

    def known_here(self, registry: str, repo: str, digest: str) -> bool:
        """contains(), answered from memory: True only for a triple this
        process recorded or found (no disk access: safe on the event loop)."""
        return (registry, repo, digest) in self._recorded

    def contains(self, registry: str, repo: str, digest: str) -> bool:
        if (registry, repo, digest) in self._recorded:
            return True
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM seen WHERE registry=? AND repo=? AND digest=?", (registry, repo, digest)
            ).fetchone()
            if row is not None and len(self._recorded) < MAX_RECORDED_REMEMBERED:
                self._recorded.add((registry, repo, digest))
        return row is not None

    def served_by(self, registry: str, digest: str) -> bool:
        """Did this registry serve (or confirm) digest under any repository?"""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM seen WHERE digest=? AND registry=? LIMIT 1", (digest, registry)
            ).fetchone()
        return row is not None

    def knows(self, registry: str) -> bool:
        """Has this registry served (or confirmed) anything at all?"""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM seen WHERE registry=? LIMIT 1", (registry,)).fetchone()
        return row is not None

    def record(self, registry: str, repo: str, digest: str) -> None:
        """Once per triple and process: every pull vouches again, and a write
        per pull was most of the disk pool's time under load."""
        with self._lock:
            if (registry, repo, digest) in self._recorded:
                return
            self._db.execute(
                "INSERT OR REPLACE INTO seen VALUES (?, ?, ?, ?)", (registry, repo, digest, time.time())
            )
            if len(self._recorded) >= MAX_RECORDED_REMEMBERED:
                self._recorded.clear()
            self._recorded.add((registry, repo, digest))

    def public_states(self) -> dict[tuple[str, str], tuple[bool, float]]:
        with self._lock:
            rows = self._db.execute("SELECT registry, repo, public, checked_at FROM public").fetchall()
        return {(registry, repo): (bool(public), checked) for registry, repo, public, checked in rows}

    def record_public(self, registry: str, repo: str, public: bool, checked_at: float) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO public VALUES (?, ?, ?, ?)", (registry, repo, public, checked_at))

    def repos_of(self, digest: str) -> list[tuple[str, str]]:
        with self._lock:
            return self._db.execute("SELECT registry, repo FROM seen WHERE digest=?", (digest,)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()


class AccessGate:
    """Decides, per request, whether a stored blob may be served (see module docstring)."""

    def __init__(self, index: SeenIndex, upstream: UpstreamClient):
        self.index = index
        self.upstream = upstream
        self._grants: dict[tuple[str, str, str], float] = {}  # (cred, registry, repo) -> until
        self._public: dict[tuple[str, str], tuple[bool, float]] = {}  # -> (public, checked)
        self._probing: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._probes = ThreadPoolExecutor(PROBE_THREADS, thread_name_prefix="registry-cache-probe")
        self.shared = None  # shared_records.SharedRecords: what other nodes learned (s3_bucket)
        # Known-public repositories survive a restart, so they are still
        # served from the store if the upstream is down when we come back.
        self._public.update(self.index.public_states())

    def __repr__(self) -> str:
        return f"<AccessGate {len(self._grants)} grants, {len(self._public)} repositories checked>"

    def check(self, registry: str, repo: str, digest: str, authorization: str | None,
              trusted: bool = True, its_own_fill: bool = False) -> Decision:
        """May this client read this stored blob as part of repo? (blocking)

        `trusted`: the operator chose this registry (see the module docstring).
        `its_own_fill`: the client is to follow a fill from this very registry
        (its bytes, not the store's), which matters for one nobody chose."""
        decision = self.check_locally(registry, repo, digest, authorization, trusted, its_own_fill)
        if decision is None:
            decision = self.ask_registry(registry, repo, digest, authorization, trusted)
        return decision

    def allowed_from_memory(self, registry: str, repo: str, digest: str, authorization: str | None) -> bool:
        """check_locally()'s yes for a chosen registry, from what is in memory
        only (no disk, no lock held long): the warm path of a rollout, run on
        the event loop without a thread hop. False means: ask check_locally."""
        now = time.time()
        return self.index.known_here(registry, repo, digest) and \
            (self._is_public(registry, repo, now) or self._granted(fingerprint(authorization), registry, repo, now))

    def check_locally(self, registry: str, repo: str, digest: str, authorization: str | None,
                      trusted: bool = True, its_own_fill: bool = False) -> Decision | None:
        """check() as far as it needs no registry (disk only); None: ask_registry()."""
        if not trusted and not self.index.served_by(registry, digest):
            if its_own_fill:
                return None  # _may_follow
            return Decision(False, pass_through=True,
                            reason=f"{registry} has not served this blob to the mirror itself")
        now = time.time()
        if self.index.contains(registry, repo, digest) and \
                (self._is_public(registry, repo, now) or self._granted(fingerprint(authorization), registry, repo, now)):
            return ALLOWED
        if trusted and self.upstream.in_quiet_time(registry):
            # It let a request time out moments ago: decide now from what it
            # said before, rather than wait for one of its threads (all of
            # them may be waiting on it) only to make the same decision.
            return self._offline_decision(registry, repo, digest, authorization, f"{registry} timed out recently")
        return None

    def ask_registry(self, registry: str, repo: str, digest: str, authorization: str | None,
                     trusted: bool = True, kind: str = "blobs") -> Decision:
        """The rest of check(): one HEAD of the blob (or manifest: `kind`) with
        the client's credentials. A HEAD is free (Docker Hub counts GETs of
        manifests as pulls, not HEADs)."""
        if not trusted and not self.index.served_by(registry, digest):
            return self._may_follow(registry, repo, digest, authorization)
        if self.upstream.hung(registry):
            return self._offline_decision(registry, repo, digest, authorization, f"{registry} timed out recently")
        url = f"{registry}/v2/{repo}/{kind}/{digest}"
        try:
            status, headers = self.upstream.head(url, authorization)
        except requests.RequestException as exc:
            return self._offline_decision(registry, repo, digest, authorization, f"upstream unreachable: {exc}")
        if status in UNREACHABLE:
            return self._offline_decision(registry, repo, digest, authorization, f"upstream answered {status}")
        if status != 200:
            log.info("access: upstream refused %s in %s (%d); not serving it from the store", digest, repo, status)
            return Decision(False, status, tuple(headers.items()), f"upstream answered {status}")
        self.vouch(registry, repo, digest, authorization, kind=kind, trusted=trusted)
        return ALLOWED

    def _may_follow(self, registry: str, repo: str, digest: str, authorization: str | None) -> Decision:
        """A registry nobody chose, whose bytes the mirror is fetching for
        another client, decides whether this client may have them too: a
        HEAD with this client's credentials. Its yes is not recorded, since it
        proves nothing about the store's copy; the bytes themselves will."""
        try:
            status, headers = self.upstream.head(f"{registry}/v2/{repo}/blobs/{digest}", authorization)
        except requests.RequestException as exc:
            return Decision(False, pass_through=True, reason=f"could not ask {registry}: {exc}")
        if status == 200:
            return ALLOWED
        if status in UNREACHABLE:
            return Decision(False, pass_through=True, reason=f"{registry} answered {status}")
        log.info("access: %s refused %s in %s (%d)", registry, digest, repo, status)
        return Decision(False, status, tuple(headers.items()), f"{registry} answered {status}")

    def vouch(self, registry: str, repo: str, digest: str, authorization: str | None,
              kind: str = "blobs", trusted: bool = True) -> None:
        """The upstream served or confirmed digest (a blob or a manifest) under
        repo to this client. A registry the operator chose is then asked
        (once in a while, in the background) whether repo is public; one
        nobody chose is not: its clients' own HEADs decide, and a host that
        holds every HEAD open must not tie up the mirror's threads."""
        now = time.time()
        self.index.record(registry, repo, digest)
        key, until = (fingerprint(authorization), registry, repo), credential_expiry(authorization, now)
        with self._lock:
            before = self._keep_grant(key, until)
            probe = trusted and (registry, repo) not in self._probing \
                and self._public_state(registry, repo, now) is None
            if probe:
                self._probing.add((registry, repo))
        if trusted and self.shared is not None:
            self.shared.note_seen(registry, repo, digest)
            if before <= now:  # a credential new to this node (or one it had stopped trusting)
                self.shared.note_grant(authorization, registry, repo, until)
        if probe:
            try:
                self._probes.submit(self._probe_public, registry, repo, f"{kind}/{digest}")
            except RuntimeError:  # shut down
                with self._lock:
                    self._probing.discard((registry, repo))

    def probing(self, registry: str, repo: str) -> bool:
        """Is the check of whether repo is public that record() started still running?"""
        with self._lock:
            return (registry, repo) in self._probing

    def known_public(self, registry: str, repo: str) -> bool:
        """Was repo found public lately? (memory only: safe on the event loop)"""
        return self._is_public(registry, repo, time.time())

    def learn_shared(self, registry: str, repo: str, digest: str, authorization: str | None) -> Decision | None:
        """check_locally() for a chosen registry, after taking in what other
        nodes learned (shared_records.py): that the upstream served digest
        under repo, whether repo is public, and whether the upstream accepted
        this very credential for it. Blocking (the object store): run it in
        its pool. None: ask the registry.

        A shared grant is taken in only while it would still count on the
        node that wrote it: not expired, and no longer than this node would
        trust that credential. A shared public state is taken in with the
        time it was checked, and ages here as this node's own does: fresh for
        PUBLIC_TTL, then asked again, and while the upstream cannot be asked
        it counts as "was public" (allowed_offline), so stale answers work on
        every node as on the one that checked. A time further ahead than
        CLOCK_SKEW (a clock ahead, a forged record) is not believed; a nearer
        one counts as now."""
        shared = self.shared
        if shared is not None:
            if not self.index.contains(registry, repo, digest) and shared.seen(registry, repo, digest):
                self.index.record(registry, repo, digest)
            now = time.time()
            with self._lock:
                state = self._public.get((registry, repo))
            if state is None or now - state[1] > PUBLIC_TTL:
                found = shared.public(registry, repo)
                if found is not None and _believable(found[1] - now, f"the public state of {repo}"):
                    found = (found[0], min(found[1], now))
                    if state is None or found[1] > state[1]:
                        with self._lock:
                            self._public[(registry, repo)] = found
                        self.index.record_public(registry, repo, *found)
            decision = self.check_locally(registry, repo, digest, authorization)
            if decision is not None and decision.allowed:  # public: no grant needed (one lookup less)
                return decision
            key = (fingerprint(authorization), registry, repo)
            if not self._granted(*key, now):
                until = shared.grant(authorization, registry, repo)
                longest = credential_expiry(authorization, now)  # were it accepted now
                if until is not None and min(until, longest) > now and \
                        _believable(until - longest, f"a grant for {repo}"):
                    with self._lock:
                        self._keep_grant(key, min(until, longest))
        return self.check_locally(registry, repo, digest, authorization)

    def public_now(self, registry: str, repo: str, path: str) -> bool:
        """Is repo public? Asked now (with an anonymous token, as the
        background check does) when not known lately (blocking). `path`:
        something in repo to ask about, e.g. "manifests/latest"."""
        with self._lock:
            state = self._public_state(registry, repo, time.time())
        if state is None:
            self._probe_public(registry, repo, path)
            with self._lock:
                state = self._public_state(registry, repo, time.time())
        return bool(state)

    def close(self) -> None:
        self._probes.shutdown(wait=False, cancel_futures=True)
        self.index.close()

    def _offline_decision(self, registry: str, repo: str, digest: str, authorization: str | None,
                          why: str) -> Decision:
        if self.allowed_offline(registry, repo, digest, authorization):
            log.warning("access: %s; serving %s from what the upstream allowed earlier", why, repo)
            return ALLOWED
        return Decision(False, 503, (), why)

    def allowed_offline(self, registry: str, repo: str, digest: str, authorization: str | None) -> bool:
        """The upstream cannot be asked: trust what it told us before, even if dated."""
        return self.index.contains(registry, repo, digest) and \
            self._allowed_before(fingerprint(authorization), registry, repo)

    def _allowed_before(self, cred: str, registry: str, repo: str) -> bool:
        """Was repo public, or this credential granted, at any time this node
        knows of? Shared records are part of that only as learn_shared() took
        them in: while they still counted."""
        with self._lock:
            public = self._public.get((registry, repo), (False, 0))[0]
            return public or (cred, registry, repo) in self._grants

    def _keep_grant(self, key: tuple[str, str, str], until: float) -> float:
        """Remember a grant (self._lock held); returns the one before (0: none)."""
        before = self._grants.get(key, 0.0)
        self._grants[key] = max(before, until)
        if len(self._grants) > MAX_GRANTS:
            newest = sorted(self._grants.items(), key=lambda item: item[1])[len(self._grants) // 2:]
            self._grants = dict(newest)
        return before

    def _granted(self, cred: str, registry: str, repo: str, now: float) -> bool:
        with self._lock:
            return self._grants.get((cred, registry, repo), 0) > now

    def _public_state(self, registry: str, repo: str, now: float) -> bool | None:
        state = self._public.get((registry, repo))
        if state is None or now - state[1] > PUBLIC_TTL:
            return None
        return state[0]

    def _is_public(self, registry: str, repo: str, now: float) -> bool:
        with self._lock:
            return bool(self._public_state(registry, repo, now))

    def _probe_public(self, registry: str, repo: str, path: str) -> None:
        """Is repo readable with no credentials, or with an anonymous token?"""
        public = False
        try:
            url = f"{registry}/v2/{repo}/{path}"
            status, headers = self.upstream.head(url, None)
            if status == 401:
                token = self.upstream.anonymous_token(headers.get("WWW-Authenticate", ""), repo)
                if token:
                    status, _ = self.upstream.head(url, f"Bearer {token}")
            public = status == 200
            log.info("access: %s/%s is %s", registry, repo, "public" if public else "not public")
        except requests.RequestException as exc:
            log.info("access: could not tell whether %s is public: %s", repo, exc)
            return
        finally:
            with self._lock:
                self._probing.discard((registry, repo))
        checked_at = time.time()
        with self._lock:
            self._public[(registry, repo)] = (public, checked_at)
        self.index.record_public(registry, repo, public, checked_at)
        if self.shared is not None:
            self.shared.note_public(registry, repo, public, checked_at)
