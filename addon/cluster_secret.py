"""The secret the mirror nodes share (cluster_secret_file).

It signs what one node hands another or a client to bring to another: blob
URLs (any node's blob server honours them, nobody else can make them) and
the nodes' requests to each other. It also keys the names under which
grants are shared, so the bucket holds no plain hash of a credential (a
grant is written under the first line and looked up under every line).

The file's first line signs; every line is accepted. Rotation without a
failed request: add the new secret as a second line on every node, then
move it first, then drop the old one. The file is read again when it
changes (looked at every RELOAD_EVERY seconds at most).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time

log = logging.getLogger(__name__)

RELOAD_EVERY = 5.0
MIN_LENGTH = 16  # characters of a secret
SIGNATURE_RE = re.compile(r"[0-9a-f]{64}")  # what sign() makes: an HMAC-SHA256 in lower-case hex


class ClusterSecret:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._mtime = None
        self._checked = 0.0
        self._secrets: tuple[bytes, ...] = ()
        self._load()  # OSError or ValueError: the option cannot be used

    def _load(self) -> None:
        stat = os.stat(self.path)
        with open(self.path, "rb") as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"cluster_secret_file {self.path} holds no secret")
        if any(len(line) < MIN_LENGTH for line in lines):
            raise ValueError(f"cluster_secret_file {self.path}: each secret needs {MIN_LENGTH} characters or more")
        if stat.st_mode & 0o007:  # (a group may be meant: Kubernetes hands secrets to the pod's fsGroup)
            log.warning("registry-cache: every user can read cluster_secret_file %s; chmod o-rwx it", self.path)
        self._secrets, self._mtime = tuple(lines), stat.st_mtime_ns

    def _fresh(self) -> tuple[bytes, ...]:
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= RELOAD_EVERY:
                self._checked = now
                try:
                    if os.stat(self.path).st_mtime_ns != self._mtime:
                        self._load()
                        log.info("registry-cache: read cluster_secret_file %s again", self.path)
                except (OSError, ValueError) as exc:
                    log.error("registry-cache: cluster_secret_file %s: %s; keeping the secrets read before",
                              self.path, exc)
            return self._secrets

    def sign(self, message: bytes) -> str:
        return hmac.new(self._fresh()[0], message, hashlib.sha256).hexdigest()

    def signatures(self, message: bytes) -> list[str]:
        """message signed with every line, the signing one first: what a node
        signed with another line (while the secret rotates) is found too."""
        return [hmac.new(secret, message, hashlib.sha256).hexdigest() for secret in self._fresh()]

    def verify(self, message: bytes, signature: str) -> bool:
        """Whether any line signed message. Anything but 64 lower-case hex digits is
        refused first (hmac.compare_digest raises on non-ASCII text)."""
        if not SIGNATURE_RE.fullmatch(signature):
            return False
        return any(hmac.compare_digest(mine, signature) for mine in self.signatures(message))
