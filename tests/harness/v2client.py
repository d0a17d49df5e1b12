"""A registry v2 client (requests) that pulls and verifies everything it gets.

Tests pull THROUGH the mirror with it, so it trusts nothing: manifests are
checked against the digest asked for and against Docker-Content-Digest, blobs
against their digest and size. It does the Bearer token dance the way docker
and containerd do (token from the challenge's realm, Basic credentials if it
has any, tokens cached per scope) and follows blob redirects, relying on
requests to drop the Authorization header when the redirect changes host or
port (a CDN must never see the registry token; Docker Hub's answers 400).

Limitation: requests cannot send one header name on several lines, so the
Accept media types go comma-joined on ONE line (equivalent per RFC 9110).
Tests that need repeated Accept lines, as skopeo sends them, use http.client.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests
import urllib3

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ALL_MANIFEST_TYPES = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST]

CHUNK = 1 << 20
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHALLENGE_PARAM_RE = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(Exception):
    """A registry answered with an error status."""

    def __init__(self, message: str, status: int | None = None, body: bytes = b"",
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.body = body
        self.headers = headers or {}

    @property
    def codes(self) -> list[str]:
        """The OCI error codes in the body (e.g. ["UNAUTHORIZED"])."""
        try:
            return [e.get("code") for e in json.loads(self.body).get("errors", [])]
        except (ValueError, AttributeError):
            return []


class VerificationError(Exception):
    """Content did not match its digest or size."""


class TransferError(Exception):
    """The connection failed in the middle of a body (e.g. a truncated blob)."""


# Everything a failed pull can raise, for tests that expect a pull to fail.
PULL_ERRORS = (RegistryError, VerificationError, TransferError, requests.RequestException)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="...",scope="..."`` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM_RE.findall(rest))


def _repo_of(path: str) -> str | None:
    m = re.match(r"^/v2/(.+)/(manifests|blobs|tags)/", urlsplit(path).path)
    return m.group(1) if m else None


def _raise_for(resp: requests.Response, what: str) -> None:
    if resp.status_code >= 400:
        body = resp.content
        raise RegistryError(f"{what}: HTTP {resp.status_code}: {body[:300]!r}", resp.status_code,
                            body, dict(resp.headers))


@dataclass
class ManifestHead:
    media_type: str
    digest: str | None
    size: int | None


@dataclass
class PullResult:
    """What :meth:`RegistryClient.pull` fetched and verified."""

    repo: str
    ref: str
    digest: str  # what ref resolved to (the index, for a multi-arch image)
    media_type: str
    manifest_digest: str  # the platform's image manifest
    manifest_media_type: str
    config_digest: str
    config: dict
    layers: list[tuple[str, int]]
    bytes_fetched: int
    index: dict | None = None

    @property
    def blobs(self) -> list[str]:
        return [self.config_digest] + [d for d, _ in self.layers]


@dataclass
class _Token:
    value: str
    expires_at: float


@dataclass
class RegistryClient:
    """Registry API client for one base URL (e.g. the mirror, http://127.0.0.1:PORT).

    ``proxies`` is passed to requests (for a mirror used as an HTTP proxy);
    the environment's proxy settings and .netrc are ignored, on purpose.
    """

    base_url: str
    username: str | None = None
    password: str | None = None
    verify: bool | str = True
    proxies: dict | None = None
    timeout: float = 60.0
    query: dict | None = None  # added to every registry request, e.g. {"ns": "ghcr.io"} like containerd
    session: requests.Session = field(default=None, repr=False)

    def __post_init__(self):
        self.base_url = self.base_url.rstrip("/")
        if self.session is None:
            self.session = requests.Session()
            self.session.trust_env = False
        self.session.verify = self.verify
        if self.proxies:
            self.session.proxies.update(self.proxies)
        self._tokens: dict[tuple, _Token] = {}  # (realm, service, scopes) -> token
        self._repo_token: dict[str | None, tuple] = {}  # repo -> key of its last token
        self._lock = threading.Lock()
        self.token_fetches = 0

    # ---------------------------------------------------------------- auth
    @property
    def _basic(self) -> tuple[str, str] | None:
        return (self.username, self.password or "") if self.username else None

    def _cached_token(self, repo: str | None) -> str | None:
        with self._lock:
            key = self._repo_token.get(repo)
            token = self._tokens.get(key) if key else None
        if token and token.expires_at > time.time():
            return token.value
        return None

    def authorization_for(self, repo: str) -> str:
        """The Authorization header value of the token last used for `repo`
        (for a request made with another client, such as curl)."""
        token = self._cached_token(repo)
        assert token, f"no token for {repo} yet"
        return "Bearer " + token

    def fetch_token(self, realm: str, service: str | None, scopes: list[str]) -> tuple[str, int]:
        """GET a token from ``realm`` (with Basic credentials if configured)."""
        params = [("service", service)] if service else []
        params += [("scope", s) for s in scopes]
        resp = self.session.get(realm, params=params, auth=self._basic, timeout=self.timeout)
        _raise_for(resp, f"token from {realm}")
        body = resp.json()
        token = body.get("token") or body.get("access_token")
        if not token:
            raise RegistryError(f"token response without a token: {body}", resp.status_code)
        self.token_fetches += 1
        return token, int(body.get("expires_in") or 60)

    def _answer_challenge(self, resp: requests.Response, repo: str | None) -> str | None:
        """An Authorization header value answering a 401's challenge, or None."""
        scheme, params = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if not self._basic:
                return None
            return requests.auth._basic_auth_str(*self._basic)
        if scheme != "bearer" or "realm" not in params:
            return None
        scopes = params.get("scope", "").split()
        key = (params["realm"], params.get("service"), tuple(scopes))
        value, ttl = self.fetch_token(params["realm"], params.get("service"), scopes)
        with self._lock:
            # A token is reused until shortly before it expires; never past it.
            self._tokens[key] = _Token(value, time.time() + max(0, ttl - 5))
            self._repo_token[repo] = key
        return "Bearer " + value

    # ---------------------------------------------------------------- requests
    def url_for(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return self.base_url + "/" + path.lstrip("/")

    def request(self, method: str, path: str, *, headers: dict | None = None, data=None,
                params=None, stream: bool = False, allow_redirects: bool = True,
                repo: str | None = None) -> requests.Response:
        """One registry request, answering a 401 challenge once.

        A streamed body (file-like ``data``) cannot be re-sent, so callers get
        a token first with a body-less request to the same repository.
        """
        repo = repo if repo is not None else _repo_of(path)
        headers = dict(headers or {})
        if self.query and not path.startswith(("http://", "https://")):
            params = {**self.query, **(params or {})}
        token = self._cached_token(repo)
        if token:
            headers["Authorization"] = "Bearer " + token
        url = self.url_for(path)
        resp = self.session.request(method, url, headers=headers, data=data, params=params,
                                    stream=stream, allow_redirects=allow_redirects, timeout=self.timeout)
        if resp.status_code != 401:
            return resp
        if data is not None and not isinstance(data, (bytes, str)):
            return resp  # cannot replay a stream
        auth = self._answer_challenge(resp, repo)
        if auth is None:
            return resp
        resp.close()
        headers["Authorization"] = auth
        return self.session.request(method, url, headers=headers, data=data, params=params,
                                    stream=stream, allow_redirects=allow_redirects, timeout=self.timeout)

    def ping(self) -> int:
        """GET /v2/ (authenticating if challenged); returns the final status."""
        resp = self.request("GET", "/v2/")
        resp.close()
        return resp.status_code

    def tags(self, repo: str) -> list[str]:
        resp = self.request("GET", f"/v2/{repo}/tags/list")
        _raise_for(resp, f"tags of {repo}")
        return resp.json().get("tags") or []

    # ---------------------------------------------------------------- manifests
    @staticmethod
    def _accept(accept) -> str:
        return ", ".join(accept or ALL_MANIFEST_TYPES)

    def get_manifest(self, repo: str, ref: str, accept: list[str] | None = None) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest, verified.

        The digest is computed from the body; it must equal ``ref`` when ref is
        a digest, and the Docker-Content-Digest header whenever there is one.
        """
        resp = self.request("GET", f"/v2/{repo}/manifests/{ref}", headers={"Accept": self._accept(accept)})
        _raise_for(resp, f"manifest {repo}:{ref}")
        body = resp.content
        digest = sha256_digest(body)
        if DIGEST_RE.match(ref) and digest != ref:
            raise VerificationError(f"manifest {repo}@{ref}: body digest is {digest}")
        header = resp.headers.get("Docker-Content-Digest")
        if header and header != digest:
            raise VerificationError(f"manifest {repo}:{ref}: Docker-Content-Digest {header} != body {digest}")
        length = resp.headers.get("Content-Length")
        if length is not None and int(length) != len(body):
            raise VerificationError(f"manifest {repo}:{ref}: Content-Length {length} != {len(body)}")
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        if not media_type or media_type in ("application/json", "application/octet-stream"):
            media_type = json.loads(body).get("mediaType", media_type)
        return body, media_type, digest

    def head_manifest(self, repo: str, ref: str, accept: list[str] | None = None) -> ManifestHead:
        resp = self.request("HEAD", f"/v2/{repo}/manifests/{ref}", headers={"Accept": self._accept(accept)})
        _raise_for(resp, f"HEAD manifest {repo}:{ref}")
        length = resp.headers.get("Content-Length")
        return ManifestHead(
            media_type=resp.headers.get("Content-Type", "").split(";")[0].strip(),
            digest=resp.headers.get("Docker-Content-Digest"),
            size=int(length) if length is not None else None,
        )

    # ---------------------------------------------------------------- blobs
    def get_blob(self, repo: str, digest: str, dest_path: str | None = None,
                 range_: tuple[int, int | None] | str | None = None,
                 expected_size: int | None = None) -> int:
        """Stream a blob (to ``dest_path`` or nowhere); return the byte count.

        A whole blob is verified against ``digest``, its Content-Length and
        ``expected_size``; anything short or different raises. With ``range_``
        ((start, end-inclusive-or-None) or a raw "bytes=..." value) a 206 is
        required and only the length is checked.
        """
        headers = {}
        if range_ is not None:
            if isinstance(range_, str):
                headers["Range"] = range_
            else:
                start, end = range_
                headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        resp = self.request("GET", f"/v2/{repo}/blobs/{digest}", headers=headers, stream=True)
        with resp:
            _raise_for(resp, f"blob {repo}@{digest}")
            if range_ is not None and resp.status_code != 206:
                raise RegistryError(f"blob {digest}: asked for a range, got {resp.status_code}", resp.status_code)
            length = resp.headers.get("Content-Length")
            hasher = hashlib.sha256()
            count = 0
            out = open(dest_path, "wb") if dest_path else None
            try:
                # raw.read avoids requests' small-chunk iteration; decode_content
                # stays off: a blob is bytes, whatever Content-Encoding claims.
                while True:
                    try:
                        chunk = resp.raw.read(CHUNK, decode_content=False)
                    except (urllib3.exceptions.HTTPError, OSError) as exc:
                        raise TransferError(f"blob {digest}: transfer failed after {count} bytes: {exc!r}") from exc
                    if not chunk:
                        break
                    hasher.update(chunk)
                    count += len(chunk)
                    if out:
                        out.write(chunk)
            finally:
                if out:
                    out.close()
        if length is not None and int(length) != count:
            raise VerificationError(f"blob {digest}: Content-Length {length}, received {count}")
        if range_ is None:
            got = "sha256:" + hasher.hexdigest()
            if got != digest:
                raise VerificationError(f"blob {digest}: received content has digest {got}")
            if expected_size is not None and count != expected_size:
                raise VerificationError(f"blob {digest}: size {count}, expected {expected_size}")
        return count

    def get_blob_bytes(self, repo: str, digest: str) -> bytes:
        """A small blob (e.g. a config) in memory, verified."""
        resp = self.request("GET", f"/v2/{repo}/blobs/{digest}")
        _raise_for(resp, f"blob {repo}@{digest}")
        data = resp.content
        if sha256_digest(data) != digest:
            raise VerificationError(f"blob {digest}: received content has digest {sha256_digest(data)}")
        return data

    # ---------------------------------------------------------------- pull
    @staticmethod
    def select_platform(index: dict, platform: tuple[str, ...]) -> dict:
        """The index entry for (os, arch[, variant])."""
        want_os, want_arch, *rest = platform
        want_variant = rest[0] if rest else None
        for entry in index.get("manifests", []):
            p = entry.get("platform") or {}
            if p.get("os") == want_os and p.get("architecture") == want_arch and (
                want_variant is None or p.get("variant") == want_variant
            ):
                return entry
        raise LookupError(f"no manifest for platform {platform} in index")

    def pull(self, repo: str, ref: str, platform: tuple[str, ...] | None = None,
             dest_dir: str | None = None) -> PullResult:
        """Pull an image like a container runtime and verify every byte.

        An index resolves to ``platform`` (default linux/amd64). Blobs are
        written to ``dest_dir`` (named by hex digest) when given.
        """
        body, media_type, digest = self.get_manifest(repo, ref)
        index = None
        manifest_body, manifest_type, manifest_digest = body, media_type, digest
        if media_type in INDEX_TYPES:
            index = json.loads(body)
            entry = self.select_platform(index, platform or ("linux", "amd64"))
            manifest_body, manifest_type, manifest_digest = self.get_manifest(repo, entry["digest"])
            if manifest_digest != entry["digest"]:
                raise VerificationError(f"{repo}: index entry {entry['digest']} resolved to {manifest_digest}")
        if manifest_type not in MANIFEST_TYPES:
            raise VerificationError(f"{repo}:{ref}: unexpected manifest media type {manifest_type}")
        manifest = json.loads(manifest_body)
        fetched = len(body) + (len(manifest_body) if index is not None else 0)

        config_desc = manifest["config"]
        config_bytes = self.get_blob_bytes(repo, config_desc["digest"])
        if len(config_bytes) != config_desc["size"]:
            raise VerificationError(f"config {config_desc['digest']}: size {len(config_bytes)} != {config_desc['size']}")
        fetched += len(config_bytes)
        if dest_dir:
            os.makedirs(dest_dir, exist_ok=True)
            with open(os.path.join(dest_dir, config_desc["digest"].split(":")[1]), "wb") as f:
                f.write(config_bytes)

        layers = []
        for desc in manifest["layers"]:
            dest = os.path.join(dest_dir, desc["digest"].split(":")[1]) if dest_dir else None
            fetched += self.get_blob(repo, desc["digest"], dest_path=dest, expected_size=desc["size"])
            layers.append((desc["digest"], desc["size"]))
        return PullResult(
            repo=repo, ref=ref, digest=digest, media_type=media_type,
            manifest_digest=manifest_digest, manifest_media_type=manifest_type,
            config_digest=config_desc["digest"], config=json.loads(config_bytes),
            layers=layers, bytes_fetched=fetched, index=index,
        )
