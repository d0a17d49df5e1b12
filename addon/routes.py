"""Parse and validate registry (OCI distribution v2) request paths.

Only the blob GET/HEAD route is served by the mirror; everything else under
/v2/ is passed to the upstream. Parsing is strict (the grammar of the OCI
distribution spec) because a digest or name taken from a path ends up in store
keys and upstream URLs: anything that does not match is refused, never
"cleaned up".
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

# OCI distribution spec: path components separated by "/", each
# [a-z0-9]+ with ".", "_", "__" or "-+" between alphanumeric runs.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# Any well-formed digest (algorithm:encoded), supported or not.
DIGEST_RE = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
SHA256_RE = re.compile(r"sha256:[a-f0-9]{64}")

MAX_NAME_LENGTH = 255  # distribution's limit for a repository name
MAX_PATH_LENGTH = 2048  # longer request targets are refused outright

# /v2/<name>/<kind>/<reference>; <name> may itself contain "blobs" or
# "manifests" as a component, so the kind is taken from the END of the path.
_OBJECT_RE = re.compile(r"/v2/(?P<name>.+)/(?P<kind>blobs|manifests)/(?P<ref>[^/]+)")
_UPLOADS_RE = re.compile(r"/v2/.+/blobs/uploads(?:/.*)?")


class Kind(enum.Enum):
    PING = "ping"
    BLOB = "blob"
    MANIFEST = "manifest"
    OTHER = "other"  # tags/list, _catalog, uploads, referrers...: pass-through


class RouteError(ValueError):
    """A /v2/ request that violates the protocol grammar.

    `code` is the OCI error code the client gets with a 400.
    """

    def __init__(self, code: str, message: str, detail: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


@dataclass(frozen=True)
class Route:
    kind: Kind
    name: str = ""  # repository, e.g. "library/alpine"
    reference: str = ""  # tag or digest (manifests), digest (blobs)
    query: tuple[tuple[str, str], ...] = ()

    @property
    def namespace(self) -> str | None:
        """containerd's ?ns=<registry host> (the registry the client meant)."""
        for key, value in self.query:
            if key == "ns":
                return value
        return None


def is_registry_path(path: str) -> bool:
    """True for the v2 API root and everything under it."""
    bare = path.split("?", 1)[0]
    return bare == "/v2" or bare.startswith("/v2/")


def parse(path: str) -> Route:
    """Classify a request target (path plus optional query) under /v2/.

    Raises RouteError for a blob or manifest route whose name or reference is
    malformed, and for targets that are too long. Percent-encoded characters
    never match the grammar, so "%2f" or "%2e%2e" tricks are refused here.
    """
    if len(path) > MAX_PATH_LENGTH:
        raise RouteError("NAME_INVALID", "request path too long", f"{len(path)} bytes")
    bare, _, raw_query = path.partition("?")
    query = tuple(parse_qsl(raw_query, keep_blank_values=True)) if raw_query else ()
    if any(segment.lower().replace("%2e", ".") in (".", "..") for segment in bare.split("/")):
        # No registry path has them; passed on, the registry would resolve
        # them into some other path than the one the mirror looked at.
        raise RouteError("NAME_INVALID", "dot segments in path", bare[:300])
    if bare in ("/v2", "/v2/"):
        return Route(Kind.PING, query=query)
    if _UPLOADS_RE.fullmatch(bare):
        return Route(Kind.OTHER, query=query)
    match = _OBJECT_RE.fullmatch(bare)
    if not match:
        return Route(Kind.OTHER, query=query)
    name, kind, ref = match.group("name", "kind", "ref")
    validate_name(name)
    if kind == "blobs":
        validate_blob_digest(ref)
        return Route(Kind.BLOB, name, ref, query)
    if not (TAG_RE.fullmatch(ref) or DIGEST_RE.fullmatch(ref)):
        raise RouteError("MANIFEST_INVALID", "invalid manifest reference", ref[:200])
    if ":" in ref:
        validate_blob_digest(ref)  # same digest rules as blobs
    return Route(Kind.MANIFEST, name, ref, query)


def validate_name(name: str) -> None:
    if len(name) > MAX_NAME_LENGTH or not NAME_RE.fullmatch(name):
        raise RouteError("NAME_INVALID", "invalid repository name", name[:300])


def validate_blob_digest(digest: str) -> None:
    """Only sha256 is cached (and used by Docker Hub); other algorithms are refused."""
    if SHA256_RE.fullmatch(digest):
        return
    if DIGEST_RE.fullmatch(digest) and not digest.startswith("sha256:"):
        raise RouteError("DIGEST_INVALID", "unsupported digest algorithm", digest[:200])
    raise RouteError("DIGEST_INVALID", "invalid digest", digest[:200])
