"""A tiny registry answering from memory, for in-process tests of the hooks.

The end-to-end tests use the real one (upstream.py: distribution, a token
server, a CDN); starting it costs about a second, and the hook tests want
milliseconds. This one speaks just enough of the distribution API for the
mirror's own calls: /v2/ pings, manifests and blobs by GET and HEAD, with
Bearer challenges. Tokens are plain strings: `Bearer <user>` for a user in
`users`, and no header at all for anonymous.

With `auth` on, /v2/ asks for a token (Bearer realm=<its /token>), and
/token answers {"token": <user>} (Basic credentials) or "anonymous"; token
requests, GET or POST, are recorded in `token_requests`. `ratelimit`
(limit, remaining) adds Docker Hub's ratelimit headers to manifest answers.

Every request is recorded; `down` makes it answer 503; `stall` holds blob
bodies after their first half until `release()`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field

from ._http import LoopbackHTTPServer, QuietHandler

_BLOB = re.compile(r"/v2/(?P<repo>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})")
_MANIFEST = re.compile(r"/v2/(?P<repo>.+)/manifests/(?P<ref>[^/]+)")
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
WAIT = 30


@dataclass
class Repo:
    blobs: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes
    manifests: dict[str, bytes] = field(default_factory=dict)  # tag or digest -> body
    readers: set[str] | None = None  # users who may pull; None: public


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class CannedRegistry:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self.down = False
        self.auth = False
        self.ratelimit: tuple[int, int] | None = None
        self.token_requests: list[dict] = []
        self._stall = threading.Event()
        self._stall.set()
        self._stalled = threading.Semaphore(0)
        self._manifests_go = threading.Event()
        self._manifests_go.set()
        self._manifests_held = threading.Semaphore(0)
        registry = self

        class Handler(QuietHandler):
            def do_GET(self):
                registry._serve(self, head=False)

            def do_HEAD(self):
                registry._serve(self, head=True)

            def do_POST(self):
                registry._serve(self, head=False)

        self.server = LoopbackHTTPServer(Handler, name="canned-registry")

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> "CannedRegistry":
        self.server.start()
        return self

    def stop(self) -> None:
        self._stall.set()
        self._manifests_go.set()
        self.server.stop()

    # -- content -----------------------------------------------------------------

    def add_blob(self, repo: str, data: bytes, readers: set[str] | None = None) -> str:
        entry = self.repos.setdefault(repo, Repo(readers=readers))
        digest = digest_of(data)
        entry.blobs[digest] = data
        return digest

    def add_manifest(self, repo: str, tag: str, body: bytes, readers: set[str] | None = None) -> str:
        entry = self.repos.setdefault(repo, Repo(readers=readers))
        digest = digest_of(body)
        entry.manifests[tag] = entry.manifests[digest] = body
        return digest

    def count(self, method: str, path_part: str) -> int:
        return sum(1 for m, p, _ in list(self.requests) if m == method and path_part in p)

    # -- faults ------------------------------------------------------------------

    def stall(self) -> None:
        """Hold blob bodies after their first half until release()."""
        self._stall.clear()

    def wait_stalled(self) -> bool:
        return self._stalled.acquire(timeout=WAIT)

    def release(self) -> None:
        self._stall.set()

    def hold_manifests(self) -> None:
        """Keep manifest answers (GET and HEAD) waiting until release_manifests()."""
        self._manifests_go.clear()

    def wait_manifest_held(self) -> bool:
        """Wait (bounded) until one more manifest request is being held."""
        return self._manifests_held.acquire(timeout=WAIT)

    def release_manifests(self) -> None:
        self._manifests_go.set()

    # -- serving -----------------------------------------------------------------

    def _serve(self, h, head: bool) -> None:
        path = h.path.split("?", 1)[0]
        authorization = h.headers.get("Authorization")
        self.requests.append((h.command, path, authorization))
        if self.down:
            return self._send(h, 503, b'{"errors":[{"code":"UNAVAILABLE"}]}', head=head)
        if path == "/token":
            return self._token(h)
        if path in ("/v2", "/v2/"):
            if self.auth and not authorization:
                return self._send(h, 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', head=head,
                                  headers=self.challenge())
            return self._send(h, 200, b"{}", head=head)
        match = _BLOB.fullmatch(path) or _MANIFEST.fullmatch(path)
        repo = self.repos.get(match.group("repo")) if match else None
        if repo is None:
            return self._send(h, 404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}', head=head)
        user = authorization.split(" ", 1)[1] if authorization else None
        if repo.readers is not None and user not in repo.readers:
            return self._send(h, 401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', head=head, headers=self.challenge())
        if "digest" in match.groupdict():
            data = repo.blobs.get(match.group("digest"))
            if data is None:
                return self._send(h, 404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}', head=head)
            return self._send(h, 200, data, head=head, headers={"Docker-Content-Digest": digest_of(data)},
                              content_type="application/octet-stream", stall=True)
        if not self._manifests_go.is_set():
            self._manifests_held.release()
            self._manifests_go.wait(WAIT)
        body = repo.manifests.get(match.group("ref"))
        if body is None:
            return self._send(h, 404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}', head=head)
        headers = {"Docker-Content-Digest": digest_of(body)}
        if self.ratelimit:
            headers["ratelimit-limit"] = f"{self.ratelimit[0]};w=21600"
            headers["ratelimit-remaining"] = f"{self.ratelimit[1]};w=21600"
        return self._send(h, 200, body, head=head, headers=headers, content_type=MANIFEST_TYPE)

    def challenge(self) -> dict[str, str]:
        return {"WWW-Authenticate": f'Bearer realm="{self.url}/token",service="canned"'}

    def _token(self, h) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        authorization = h.headers.get("Authorization") or ""
        self.token_requests.append({"method": h.command, "query": h.path.partition("?")[2],
                                    "authorization": authorization, "body": body,
                                    "content_type": h.headers.get("Content-Type")})
        user = "anonymous"
        if authorization.startswith("Basic "):
            user = base64.b64decode(authorization[6:]).decode().split(":", 1)[0]
        self._send(h, 200, json.dumps({"token": user, "expires_in": 300}).encode(), head=False)

    def _send(self, h, status: int, body: bytes, head: bool, headers: dict[str, str] | None = None,
              content_type: str = "application/json", stall: bool = False) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.end_headers()
        if head:
            return
        if stall and not self._stall.is_set():
            h.wfile.write(body[:len(body) // 2])
            h.wfile.flush()
            self._stalled.release()
            self._stall.wait(WAIT)
            h.wfile.write(body[len(body) // 2:])
        else:
            h.wfile.write(body)


def image_manifest(config: bytes, layers: list[bytes]) -> bytes:
    """An OCI image manifest naming these blobs."""
    def descriptor(data: bytes, media_type: str) -> dict:
        return {"mediaType": media_type, "digest": digest_of(data), "size": len(data)}

    return json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": descriptor(config, "application/vnd.oci.image.config.v1+json"),
        "layers": [descriptor(layer, "application/vnd.oci.image.layer.v1.tar+gzip") for layer in layers],
    }).encode()
