"""What one node learned, every node knows: small records in the object store.

Under `<prefix>records/` (objectstore.py):

    seen/<registry>/<repo>/<digest>      the upstream served (or confirmed) digest under repo; {}
    public/<registry>/<repo>             {"public": bool, "checked_at": unix time}
    grant/<key>/<registry>/<repo>        {"until": unix time}: the upstream accepted a credential for repo
    manifest/<digest>                    {"media_type": ..., "body": base64}
    tag/<registry>/<repo>/<tag>          {"digest": ...}: the tag's last digest a node saw

(<registry> is scheme/host:port.) Proofs and manifests never change for
their name: created once (put-if-absent), and a node writes each at most
once. Public states and tags are last-writer-wins, as each node's own are.

A node consults these where it would otherwise ask the upstream or give up:
a proof or public state it lacks before it asks the upstream about a stored
blob; a manifest it lacks before fetching it; and, while the upstream
cannot be asked, tags, manifests and grants for stale answers. A manifest
read here is checked against its digest like one from the upstream.

Privacy is the same as on one node. A grant is written only after the
upstream accepted that very credential for that repository, and is found
only by a client presenting that same credential: its key is an HMAC of the
Authorization header with the cluster secret (no secret: no grants shared),
so the bucket holds nothing that tells a credential. It is written under
the secret's first line and looked up under every line (rotation). The gate
takes a grant in only while it still counts, and a public state with the
time it was checked, to age as its own (access.py learn_shared). Only
registries the operator chose have records here: in regular mode a client
names any host, and the bucket is not theirs to fill.
Whoever may write the bucket can of course forge records: give the mirror
nodes alone write access.

Writes go out in the background (WRITERS threads; while the store is down
they wait, up to MAX_PENDING, and go out once it answers). Reads are
blocking: call them from the object store's worker pool. Every failure of
the store reads as "not known", so a node falls back to its own knowledge.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
from urllib.parse import urlsplit

from .objectstore import ObjectStore, StoreUnavailable
from .store_queue import StoreQueue

log = logging.getLogger(__name__)

WRITERS = 2
MAX_PENDING = 50_000
MAX_KNOWN = 200_000  # names written or read by this process, not written again
MAX_TAGS = 100_000  # tags' last digests remembered here (the latest written or read), not written again


def registry_part(registry: str) -> str:
    """"https://registry-1.docker.io:443" -> "https/registry-1.docker.io:443" (IPv6: no brackets)."""
    parts = urlsplit(registry)
    return f"{parts.scheme}/{(parts.hostname or '').lower()}:{parts.port}"


class SharedRecords:
    def __init__(self, objects: ObjectStore, secret=None):
        self.objects = objects
        self.secret = secret  # cluster_secret.ClusterSecret: grants are shared only with one
        self._known: set[str] = set()  # immutable records this process wrote or read
        self._tags: dict[str, str] = {}  # tag record -> digest, as last written or read here, oldest use first
        self._known_registries: set[str] = set()
        self._lock = threading.Lock()
        self._queue = StoreQueue(objects.available, self._send, threads=WRITERS, name="s3-records",
                                 limit=MAX_PENDING, latest_wins=True)

    # -- names -----------------------------------------------------------------
    @staticmethod
    def _seen(registry: str, repo: str, digest: str) -> str:
        return f"seen/{registry_part(registry)}/{repo}/{digest}"

    @staticmethod
    def _public(registry: str, repo: str) -> str:
        return f"public/{registry_part(registry)}/{repo}"

    def _grants(self, authorization: str | None, registry: str, repo: str) -> list[str]:
        """The names of a grant under each line of the cluster secret, the
        one to write first (none without a secret)."""
        if self.secret is None:
            return []
        return [f"grant/{key[:40]}/{registry_part(registry)}/{repo}"
                for key in self.secret.signatures(b"grant\n" + (authorization or "").encode())]

    @staticmethod
    def _manifest(digest: str) -> str:
        return f"manifest/{digest}"

    @staticmethod
    def _tag(registry: str, repo: str, tag: str) -> str:
        return f"tag/{registry_part(registry)}/{repo}/{tag}"

    # -- what this node learned -------------------------------------------------
    def note_seen(self, registry: str, repo: str, digest: str) -> None:
        self._write("create", self._seen(registry, repo, digest), {})

    def note_public(self, registry: str, repo: str, public: bool, checked_at: float) -> None:
        self._write("put", self._public(registry, repo), {"public": public, "checked_at": checked_at})

    def note_grant(self, authorization: str | None, registry: str, repo: str, until: float) -> None:
        names = self._grants(authorization, registry, repo)
        if names:
            self._write("put", names[0], {"until": until})

    def note_manifest(self, digest: str, media_type: str, body: bytes) -> None:
        self._write("create", self._manifest(digest),
                    {"media_type": media_type, "body": base64.b64encode(body).decode()})

    def note_tag(self, registry: str, repo: str, tag: str, digest: str) -> None:
        name = self._tag(registry, repo, tag)
        with self._lock:
            if self._tags.get(name) == digest:
                return
            self._remember_tag(name, digest)
        self._write("put", name, {"digest": digest})

    # -- what other nodes learned (blocking) --------------------------------------
    def seen(self, registry: str, repo: str, digest: str) -> bool:
        name = self._seen(registry, repo, digest)
        with self._lock:
            if name in self._known:
                return True
        found = self._read(name) is not None
        if found:
            self._remember(name)
        return found

    def public(self, registry: str, repo: str) -> tuple[bool, float] | None:
        record = self._read(self._public(registry, repo))
        try:
            return (bool(record["public"]), float(record["checked_at"])) if record else None
        except (KeyError, TypeError, ValueError):
            return None

    def grant(self, authorization: str | None, registry: str, repo: str) -> float | None:
        """Until when a node trusted this credential for repo (None: no node
        did), under any line of the cluster secret: while it rotates, nodes
        write under different lines."""
        found = []
        for name in self._grants(authorization, registry, repo):
            record = self._read(name)
            try:
                found.append(float(record["until"]))
            except (KeyError, TypeError, ValueError):  # (None: not there)
                pass
        return max(found, default=None)

    def manifest(self, digest: str) -> tuple[str, bytes] | None:
        """(media type, body) of a manifest a node kept, checked against digest."""
        name = self._manifest(digest)
        record = self._read(name)
        try:
            media_type, body = record["media_type"], base64.b64decode(record["body"])
        except (KeyError, TypeError, ValueError):
            return None
        if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            log.error("object store: the manifest record of %s does not match its digest; ignoring it", digest)
            return None
        self._remember(name)
        return media_type, body

    def tag(self, registry: str, repo: str, tag: str) -> str | None:
        name = self._tag(registry, repo, tag)
        record = self._read(name)
        digest = record.get("digest") if isinstance(record, dict) else None
        if not isinstance(digest, str):
            return None
        with self._lock:
            self._remember_tag(name, digest)
        return digest

    def knows_registry_here(self, registry: str) -> bool:
        """knows_registry() as far as this process found out (no store call)."""
        return registry in self._known_registries

    def knows_registry(self, registry: str) -> bool:
        """Has any node seen this registry serve anything? (for a stale /v2/ ping)"""
        if registry in self._known_registries:
            return True
        try:
            found = next(iter(self.objects.list_records(f"seen/{registry_part(registry)}/")), None) is not None
        except (StoreUnavailable, ValueError):
            return False
        if found:
            self._known_registries.add(registry)
        return found

    # -- plumbing -----------------------------------------------------------------
    def _read(self, name: str):
        try:
            record = self.objects.get_record(name)
            return None if record is None else record.json()
        except StoreUnavailable:
            return None
        except ValueError:  # a name the store cannot hold (odd characters), or a record that is not JSON
            return None

    def _remember(self, name: str) -> None:
        with self._lock:
            if len(self._known) >= MAX_KNOWN:
                self._known.clear()
            self._known.add(name)

    def _remember_tag(self, name: str, digest: str) -> None:
        """(self._lock held) The MAX_TAGS tags written or read latest are kept:
        every tag a client names would otherwise stay for the process's life."""
        self._tags.pop(name, None)
        self._tags[name] = digest
        while len(self._tags) > MAX_TAGS:
            del self._tags[next(iter(self._tags))]

    def _write(self, mode: str, name: str, value) -> None:
        with self._lock:
            if mode == "create" and name in self._known:
                return
        self._queue.put(name, (mode, value))

    def pending(self) -> int:
        return self._queue.pending()

    def close(self) -> None:
        self._queue.close()

    def _send(self, name: str, item) -> bool:
        """One record out; True: the store was down, try again later."""
        mode, value = item
        try:
            if mode == "create":
                self.objects.create_record(name, value)
            else:
                self.objects.put_record(name, value)
        except StoreUnavailable:
            return True
        except ValueError as exc:
            log.info("object store: not sharing %s: %s", name[:200], exc)
            return False
        if mode == "create":
            self._remember(name)
        log.debug("object store: shared %s", name[:200])
        return False
