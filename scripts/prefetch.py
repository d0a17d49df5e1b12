#!/usr/bin/env python3
"""Warm a running mirror's store with a list of images (e.g. nightly, from cron
or a systemd timer), so that the next morning's pulls are served from disk.

    .venv/bin/python scripts/prefetch.py --mirror http://mirror.lan:5000 \
        [--platform linux/amd64 ...|--all-platforms] [--file images.txt] [IMAGE ...]

It is an ordinary registry client OF THE MIRROR: it pulls each image through
the mirror exactly as containerd would, so the mirror fills its store the same
way it does for any client (one upstream copy per blob, verified before it is
kept). Nothing here touches the store directly, so it works against a mirror on
another machine and needs no access to its files.

Per image: the reference is resolved with a manifest GET (the full Accept list,
so the digest is the one runtimes get), an index is narrowed to the wanted
platforms (default: this machine's), then for the config and every layer the
mirror is asked with a HEAD first. A blob HEAD the mirror answers from its
store carries ``X-Registry-Cache: hit``: that blob is "already cached" and is
not downloaded. Any other answer (a HEAD the mirror passed upstream because it
does not hold the blob, or a mirror that does not send the header) leads to a
GET through the mirror, following its 307 to the blob port; the bytes are
hashed and counted as they stream and then discarded. "Fetched" therefore means
"moved through the mirror by this run", which for a blob the mirror did not
hold means one upstream download into its store.

Platforms: ``--platform`` picks index entries the way containerd compares them
(``linux/arm64`` is ``linux/arm64/v8``, ``linux/arm`` is ``linux/arm/v7``); a
requested platform an index lacks is reported and skipped, and the image fails
only if none matches (a fleet's arm64-less images should not fail every
night). ``--all-platforms`` takes every entry except buildx's attestation
manifests (provenance, SBOM), which runtimes never pull.

Images of other registries (``ghcr.io/org/app``) are asked for the way
containerd asks a mirror: with ``?ns=<registry host>`` on every request. A
registry missing from the mirror's ``registries`` option is refused (403), and
the image is reported as failed, naming that registry. Docker Hub images (no
host, or ``docker.io``) go without ``ns``: they are the mirror's own (reverse
mode) upstream, which for a Docker Hub mirror is where ``ns=docker.io`` leads
anyway.

Credentials (``--username`` with ``--password-stdin`` or ``REGISTRY_PASSWORD``)
are only ever sent to the token realm named in a Bearer challenge (the
upstream's auth server, fetched directly, never through the mirror), or to the
mirror itself if the registry asks for Basic auth. One rule for both: the
password goes over HTTPS, or to this machine (loopback), and over plain HTTP to
another machine only with ``--insecure-auth``. A mirror on the LAN speaks plain
HTTP, so a registry that wants Basic auth through it needs that option; token
servers (Docker Hub's, ghcr.io's, quay.io's) are HTTPS and need nothing. The
registry token goes to the mirror, never to the blob port the mirror redirects
to: requests drops the Authorization header when a redirect changes host or
port, and this script keeps it that way (no auth objects on the session, no
.netrc).

Network: HTTPS is verified against the system's CAs (``SSL_CERT_FILE``,
``SSL_CERT_DIR``), requests' own, ``REQUESTS_CA_BUNDLE`` and any ``--ca FILE``,
all together; ``HTTPS_PROXY``, ``HTTP_PROXY`` and ``NO_PROXY`` apply to every
request, as curl and containerd read them.

Safe to re-run (cached blobs cost a HEAD each) and to interrupt: Ctrl-C prints
the partial summary and exits 130 (SIGTERM: 143); a fill the mirror started
completes on its own even when its client goes away.

A blob the mirror served but did not keep (larger than its cache_size, disk
full, an unwritable store: its log says which) fails its image, so a nightly
run that warms nothing does not pass unnoticed. When the mirror says so with
the bytes (``X-Registry-Cache: miss, not stored`` from its blob port: a blob
larger than its cache_size, or a disk already full), that is known at once;
otherwise the mirror is asked until ``--keep-wait`` passes.

Exit status: 0 every image warmed, 1 at least one failed, 2 bad usage,
130/143 interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform as platform_module
import re
import shutil
import signal
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests
import requests.adapters
import requests.certs
import urllib3

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from addon import oci  # noqa: E402  (the registry protocol; imports no mitmproxy)
from addon.oci import (DOCKER_LIST, DOCKER_MANIFEST, DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED,  # noqa: E402
                       INDEX_TYPES, MAX_MANIFEST, OCI_INDEX, OCI_MANIFEST)

# ------------------------------------------------------------------ constants
# Everything a runtime accepts, best first. Leaving a type out makes a registry
# down-convert (Docker Hub: to schema1), and the digest would not be the one
# containerd or docker resolve, so their pulls would miss the warmed manifest.
ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, DOCKER_SCHEMA1_SIGNED])
# Layers that do not live in the registry (Windows base layers) are not fetched.
FOREIGN_LAYER_TYPES = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)
DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
CACHE_HEADER = "X-Registry-Cache"  # "hit" on blob HEADs the mirror answers from its store
NOT_STORED = "not stored"  # in it on the blob port's answer: the mirror serves this blob but will not keep it

CHUNK = 1 << 20
MAX_INDEX_DEPTH = 3  # an index may point at an index; not endlessly
CONNECT_TIMEOUT = 10.0
RETRYABLE_STATUS = (429, 500, 502, 503, 504)

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
ANY_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
HOST_RE = re.compile(r"^(?:localhost|[A-Za-z0-9.-]*\.[A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+(?=:))(?::\d{1,5})?$")


class PrefetchError(Exception):
    """This image (or blob) could not be warmed; the message says why, for a human."""


class Interrupted(BaseException):
    """SIGTERM (systemd stopping the job): like Ctrl-C's KeyboardInterrupt, a
    BaseException, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


# ------------------------------------------------------------------ references
@dataclass(frozen=True)
class Reference:
    """An image reference, normalized the way docker and containerd read it."""

    registry: str  # "docker.io", "ghcr.io", "127.0.0.1:5000"
    repo: str  # "library/alpine"
    tag: str | None
    digest: str | None

    @property
    def ref(self) -> str:
        """What to ask the registry for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def ns(self) -> str | None:
        """containerd's ?ns= value: only for registries other than the mirror's own."""
        return None if self.registry == DOCKER_HUB else self.registry

    def __str__(self) -> str:
        name = self.repo if self.registry == DOCKER_HUB else f"{self.registry}/{self.repo}"
        if self.tag:
            name += f":{self.tag}"
        if self.digest:
            name += f"@{self.digest}"
        return name


def parse_reference(text: str) -> Reference:
    """``alpine``, ``library/alpine:3.20``, ``docker.io/library/nginx:1.27``,
    ``ghcr.io/org/app:tag``, ``repo@sha256:...`` -> Reference.

    The first path component is a registry host when it looks like one (has a
    dot or a port, or is ``localhost``), as in docker's reference grammar.
    Raises ValueError with a reason.
    """
    rest = text.strip()
    if not rest:
        raise ValueError("empty reference")
    digest = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not ANY_DIGEST_RE.match(digest):
            raise ValueError(f"not a digest: {digest!r}")
        if not DIGEST_RE.match(digest):
            raise ValueError(f"only sha256 digests are supported: {digest!r}")
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not TAG_RE.match(tag):
            raise ValueError(f"not a tag: {tag!r}")
    registry = DOCKER_HUB
    first, slash, remainder = rest.partition("/")
    if slash and HOST_RE.match(first):
        registry, rest = first.lower(), remainder
        if registry in DOCKER_HUB_ALIASES:
            registry = DOCKER_HUB
    if not rest:
        raise ValueError("no repository name")
    components = rest.split("/")
    for component in components:
        if not COMPONENT_RE.match(component):
            raise ValueError(f"not a repository name component (lowercase letters, digits, "
                             f"separators): {component!r}")
    if registry == DOCKER_HUB and len(components) == 1:
        rest = "library/" + rest  # Docker Hub's official images
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, rest, tag, digest)


def read_image_list(path: str) -> list[str]:
    """One reference per line; ``#`` starts a comment; blank lines are skipped."""
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    refs = []
    with stream:
        for number, line in enumerate(stream, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            if len(text.split()) > 1:
                raise ValueError(f"{path}:{number}: one image reference per line, got {text!r}")
            refs.append(text)
    return refs


# ------------------------------------------------------------------ platforms
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm",
                 "armel": "arm", "i386": "386", "i686": "386"}


@dataclass(frozen=True)
class Platform:
    os: str
    arch: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> "Platform":
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"not a platform (os/arch[/variant]): {text!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def of(cls, entry: dict) -> "Platform":
        p = entry.get("platform") or {}
        return cls(str(p.get("os", "")).lower(), str(p.get("architecture", "")).lower(),
                   str(p.get("variant", "")).lower())

    def normalized(self) -> tuple[str, str, str]:
        """Compare like containerd: arm64 means v8, arm means v7 unless said."""
        arch = _ARCH_ALIASES.get(self.arch, self.arch)
        variant = self.variant
        if arch == "arm64" and variant in ("", "v8"):
            variant = ""
        elif arch == "arm" and variant == "":
            variant = "v7"
        return self.os, arch, variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.arch, self.variant) if p)


def machine_platform() -> Platform:
    """The platform a runtime on this machine pulls (images are Linux images)."""
    machine = platform_module.machine().lower()
    if machine.startswith("armv7"):
        return Platform("linux", "arm", "v7")
    if machine.startswith("armv6"):
        return Platform("linux", "arm", "v6")
    return Platform("linux", _ARCH_ALIASES.get(machine, machine or "amd64"))


def is_attestation(entry: dict) -> bool:
    """buildx's provenance/SBOM entries: not images, and never pulled by runtimes."""
    annotations = entry.get("annotations") or {}
    p = entry.get("platform") or {}
    return annotations.get("vnd.docker.reference.type") == "attestation-manifest" or \
        (p.get("os") == "unknown" and p.get("architecture") == "unknown")


# ------------------------------------------------------------------ output
def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def short(digest: str) -> str:
    return digest[:19]  # "sha256:" + 12 hex, as docker shows them


class Output:
    """Report lines to stdout; on a terminal, a live progress bar per blob.

    Without a terminal (cron, systemd, a pipe) there are no control characters
    at all: a log gets one plain line per blob, written once it is done.
    """

    def __init__(self, stream=sys.stdout, tty: bool | None = None):
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self._bar_shown = False

    def line(self, text: str = "", *, err: bool = False) -> None:
        """One line; ``err`` lines (failures) go to stderr, so that a cron job
        that discards stdout still mails them."""
        self.clear_bar()
        stream = sys.stderr if err else self.stream
        try:
            stream.write(text + "\n")
            stream.flush()
        except BrokenPipeError:
            pass

    def bar(self, label: str, total: int | None) -> "ProgressBar":
        return ProgressBar(self, label, total)

    def draw(self, text: str) -> None:
        if not self.tty:
            return
        self.stream.write("\r" + text[:self.columns()] + "\x1b[K")
        self.stream.flush()
        self._bar_shown = True

    @staticmethod
    def columns() -> int:
        """Usable width: one less than the terminal's, so a line never wraps."""
        return max(20, shutil.get_terminal_size((80, 24)).columns - 1)

    def clear_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._bar_shown = False


class ProgressBar:
    """``label [#####-----]  45%  12.3/27.1 MiB  8.4 MiB/s``, redrawn at most 10x a second."""

    INTERVAL = 0.1

    def __init__(self, out: Output, label: str, total: int | None):
        self.out = out
        self.label = label
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self._drawn = 0.0
        self._draw(force=True)

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 1e-6)

    def update(self, n: int) -> None:
        self.done += n
        self._draw()

    def _draw(self, force: bool = False) -> None:
        if not self.out.tty:
            return
        now = time.monotonic()
        if not force and now - self._drawn < self.INTERVAL:
            return
        self._drawn = now
        rate = f"{human(self.done / self.elapsed)}/s"
        if not self.total:
            self.out.draw(f"{self.label}  {human(self.done)}  {rate}")
            return
        fraction = min(self.done / self.total, 1.0)
        numbers = f" {fraction:4.0%} {human(self.done):>10}/{human(self.total)} {rate:>12}"  # fixed widths: a steady bar
        # The bar takes what the terminal's width leaves (10 to 30 columns).
        width = max(10, min(30, self.out.columns() - len(self.label) - len(numbers) - 3))
        filled = int(fraction * width)
        self.out.draw(f"{self.label} [{'#' * filled}{'-' * (width - filled)}]{numbers}")


@dataclass
class Summary:
    images_ok: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    layers_fetched: int = 0
    layers_cached: int = 0
    configs_fetched: int = 0
    configs_cached: int = 0
    bytes_fetched: int = 0
    platforms_missing: int = 0
    started: float = field(default_factory=time.monotonic)

    def count(self, kind: str, fetched: bool, size: int = 0) -> None:
        name = f"{'layers' if kind == 'layer' else 'configs'}_{'fetched' if fetched else 'cached'}"
        setattr(self, name, getattr(self, name) + 1)
        self.bytes_fetched += size if fetched else 0

    def lines(self, interrupted: bool) -> list[str]:
        elapsed = time.monotonic() - self.started
        out = ["Summary" + (" (interrupted: partial)" if interrupted else ""),
               f"  images:  {self.images_ok} ok, {len(self.failed)} failed",
               f"  layers:  {self.layers_fetched} fetched, {self.layers_cached} already cached",
               f"  configs: {self.configs_fetched} fetched, {self.configs_cached} already cached",
               f"  bytes fetched: {human(self.bytes_fetched)} ({self.bytes_fetched} bytes) in {elapsed:.1f} s"]
        if self.platforms_missing:
            out.append(f"  platforms not in their image's index: {self.platforms_missing}")
        out += [f"  FAILED {image}: {reason}" for image, reason in self.failed]
        return out


# ------------------------------------------------------------------ registry client
def describe(resp: requests.Response) -> str:
    """``HTTP 404 MANIFEST_UNKNOWN: manifest unknown`` from a registry error answer."""
    text = f"HTTP {resp.status_code}"
    try:
        errors = json.loads(resp.content[:65536]).get("errors") or []
    except (ValueError, AttributeError, requests.RequestException):
        errors = []
    for error in errors[:2]:
        if isinstance(error, dict):
            text += f" {error.get('code', '')}: {error.get('message', '')}".rstrip(": ")
            detail = error.get("detail")
            if isinstance(detail, str) and detail and detail not in text:
                text += f" ({detail[:200]})"
    return text


def read_at_most(resp: requests.Response, limit: int) -> bytes:
    """The body, but no more than ``limit`` bytes of it (a manifest is small)."""
    data = b""
    for chunk in resp.iter_content(64 * 1024):
        data += chunk
        if len(data) >= limit:
            break
    return data


def is_loopback(host: str | None) -> bool:
    return host in ("localhost", "127.0.0.1", "::1") or (host or "").startswith("127.")


def trust_context(ca_files: list[str] = ()) -> ssl.SSLContext:
    """What HTTPS answers are verified against: the system's CAs (OpenSSL's
    default paths, which SSL_CERT_FILE and SSL_CERT_DIR move), requests' own
    list (certifi), REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, and every --ca file.
    Each adds to the others, so trusting a private CA for one registry never
    stops Docker Hub's auth server from verifying in the same run. Raises
    ValueError naming an unusable file."""
    context = ssl.create_default_context()
    context.load_verify_locations(requests.certs.where())
    extra = [os.environ[name] for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE") if os.environ.get(name)]
    for path in [*extra, *ca_files]:
        try:
            if os.path.isdir(path):
                context.load_verify_locations(capath=path)
            else:
                context.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot use the CA certificates in {path}: {exc.strerror or exc}") from None
    return context


class TrustingAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter, verifying TLS with trust_context() (directly and
    through a proxy's CONNECT tunnel)."""

    def __init__(self, context: ssl.SSLContext):
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy, **kwargs):
        kwargs["ssl_context"] = self._context
        return super().proxy_manager_for(proxy, **kwargs)


class MirrorClient:
    """A registry v2 client for one mirror URL, doing the Bearer token dance.

    Tokens come from the realm in the mirror's 401 challenge (the upstream's
    auth server, reached directly), are cached per realm, service and scope,
    and are re-fetched when a request is refused with 401 again (expired).

    The password goes over HTTPS, or to this machine (loopback), and over
    plain HTTP elsewhere only with ``insecure_auth``: the same rule for the
    token realm and for the mirror (which relays Basic credentials to a
    registry that asks for them).
    """

    def __init__(self, mirror: str, username: str | None = None, password: str | None = None,
                 timeout: float = 120.0, trust: ssl.SSLContext | None = None, insecure_auth: bool = False):
        self.mirror = mirror.rstrip("/")
        self.username = username
        self.password = password
        self.insecure_auth = insecure_auth
        self.timeout = (CONNECT_TIMEOUT, timeout)
        self.session = requests.Session()
        # No .netrc: it could put credentials back on a redirected request (to
        # the blob port). Proxies and CAs come from the environment all the
        # same, by hand: see _proxies and trust_context.
        self.session.trust_env = False
        adapter = TrustingAdapter(trust or trust_context())
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        self.session.headers["User-Agent"] = "registry-cache-prefetch/1"
        self._tokens: dict[tuple, tuple[str, float]] = {}  # (realm, service, scope) -> (token, expiry)
        self._scope_of: dict[tuple[str, str], tuple] = {}  # (registry, repo) -> token key

    @staticmethod
    def _proxies(url: str) -> dict[str, str]:
        """HTTPS_PROXY, HTTP_PROXY, ALL_PROXY for url, unless NO_PROXY names it
        (as curl, docker and containerd read them). A redirect (to the blob
        port) keeps the answer for the URL it came from."""
        return requests.utils.get_environ_proxies(url)

    # -- auth -----------------------------------------------------------------
    def _token_for(self, ref: Reference) -> str | None:
        key = self._scope_of.get((ref.registry, ref.repo))
        token = self._tokens.get(key) if key else None
        if token and token[1] > time.time():
            return token[0]
        return None

    def _password_may_go_to(self, url: str, whom: str) -> None:
        """Refuse (PrefetchError) to send the password over plain HTTP to
        another machine unless --insecure-auth allows it."""
        parts = urlsplit(url)
        if parts.scheme == "https" or is_loopback(parts.hostname) or self.insecure_auth:
            return
        raise PrefetchError(f"refusing to send the password over plain HTTP to {whom} ({parts.netloc}), where "
                            f"anyone on the network can read it; --insecure-auth allows it")

    def _answer(self, resp: requests.Response, ref: Reference) -> str | None:
        """An Authorization value answering a 401's challenges, or None if we cannot."""
        challenges = resp.headers.get("WWW-Authenticate", "")
        bearer = oci.bearer_challenge(challenges)
        if bearer is None:
            if not any(c.scheme == "basic" for c in oci.parse_challenges(challenges)) or not self.username:
                return None
            # The registry itself wants a password, and the mirror relays it there.
            self._password_may_go_to(resp.url, "the mirror")
            return self._basic()
        realm = bearer.realm
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PrefetchError(f"unusable token realm in the challenge: {realm!r}")
        authorization = None
        if self.username:
            self._password_may_go_to(realm, "the token realm")
            authorization = self._basic()
        request = oci.TokenRequest.for_challenge(bearer)
        try:
            answer = oci.request_token(self.session, realm, request, authorization=authorization,
                                       timeout=self.timeout, proxies=self._proxies(realm))
        except requests.RequestException as exc:
            raise PrefetchError("no token: " + self._unreachable(exc, realm, "the token server")) from None
        if answer.status_code == 401 and authorization:
            answer.close()
            raise PrefetchError(f"the token server {realm} refused the credentials of {self.username!r}")
        if answer.status_code != 200:
            with answer:
                raise PrefetchError(f"token from {realm}: {describe(answer)}")
        try:
            token = oci.read_token_answer(answer)
        except (oci.TokenError, requests.RequestException, urllib3.exceptions.HTTPError):
            raise PrefetchError(f"the token server {realm} answered without a token") from None
        key = (realm, request.service, bearer.params.get("scope"))
        self._tokens[key] = (token.token, time.time() + max(0.0, token.expires_in - 10))
        self._scope_of[(ref.registry, ref.repo)] = key
        return token.authorization

    def _basic(self) -> str:
        try:
            return oci.basic_authorization(self.username, self.password or "")
        except ValueError as exc:
            raise PrefetchError(f"cannot send these credentials: {exc}") from None

    # -- requests -------------------------------------------------------------
    def request(self, method: str, ref: Reference, path: str, *, headers: dict | None = None,
                stream: bool = False, allow_redirects: bool = True) -> requests.Response:
        """``method /v2/<repo>/<path>`` at the mirror, answering one 401 challenge."""
        url = f"{self.mirror}/v2/{ref.repo}/{path}"
        params = {"ns": ref.ns} if ref.ns else None
        headers = dict(headers or {})
        token = self._token_for(ref)
        if token:
            headers["Authorization"] = "Bearer " + token
        for attempt in range(2):
            try:
                resp = self.session.request(method, url, params=params, headers=headers, stream=stream,
                                            allow_redirects=allow_redirects, timeout=self.timeout,
                                            proxies=self._proxies(url))
            except requests.RequestException as exc:
                raise PrefetchError(self._unreachable(exc, url)) from None
            if resp.status_code != 401 or attempt:
                return resp
            authorization = self._answer(resp, ref)
            if authorization is None:
                return resp
            resp.close()
            headers["Authorization"] = authorization
        return resp

    def _unreachable(self, exc: requests.RequestException, url: str, role: str | None = None) -> str:
        """``cannot connect to HOST:PORT (the mirror's blob port): [Errno 111] ...``.

        requests' own message is a paragraph; the useful parts are which
        address failed (a redirect may have moved on to the blob port, which
        clients must reach too) and the system's reason.
        """
        failed = urlsplit(exc.request.url if exc.request is not None else url).netloc
        if role is None:
            role = "the mirror" if failed == urlsplit(self.mirror).netloc else "the mirror's blob port"
        text = str(exc)
        reason = re.search(r"\[Errno -?\d+\] [^'\")]*", text)
        untrusted = re.search(r"certificate verify failed: [^'\")(]*", text)
        if isinstance(exc, requests.Timeout):
            why = "timed out"
        elif untrusted:
            why = f"TLS {untrusted.group(0).strip()} (CERTIFICATE_VERIFY_FAILED); a private CA: --ca FILE"
        else:
            why = reason.group(0) if reason else text[:300]
        verb = "cannot connect to" if isinstance(exc, requests.ConnectionError) else "request to"
        return f"{verb} {failed} ({role}): {why}"

    def manifest(self, ref: Reference, reference: str) -> tuple[dict, str, str]:
        """(parsed manifest, media type, digest), checked against any digest we know."""
        resp = self.request("GET", ref, f"manifests/{reference}", headers={"Accept": ACCEPT}, stream=True)
        with resp:
            if resp.status_code != 200:
                raise self.refusal(resp, ref, f"manifest {reference}")
            body = read_at_most(resp, MAX_MANIFEST + 1)
        if len(body) > MAX_MANIFEST:
            raise PrefetchError(f"manifest {reference} is larger than {human(MAX_MANIFEST)}")
        media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            manifest = json.loads(body)
        except ValueError:
            raise PrefetchError(f"manifest {reference} is not JSON ({media_type or 'no content type'})") from None
        if not isinstance(manifest, dict):
            raise PrefetchError(f"manifest {reference} is not a JSON object")
        if manifest.get("mediaType") and media_type in ("", "application/json", "application/octet-stream",
                                                        "text/plain"):
            media_type = manifest["mediaType"]
        digest = oci.sha256_digest(body)
        header = resp.headers.get("Docker-Content-Digest")
        if media_type not in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED):  # signed schema1: digest excludes signatures
            try:
                oci.check_manifest(body, resp.headers, reference)
            except oci.ManifestMismatch as exc:
                raise PrefetchError(str(exc)) from None
        elif header:
            digest = header
        return manifest, media_type, digest

    def refusal(self, resp: requests.Response, ref: Reference, what: str) -> PrefetchError:
        """A readable error for a non-200 answer, naming the registry when ns was refused."""
        text = describe(resp)
        # A 403 may also be the other registry's own refusal: say "the mirror
        # refused" only when its answer names the registry or the mirror.
        if ref.ns and resp.status_code in (400, 403) and (ref.ns in text or "mirror" in text.lower()):
            return PrefetchError(f"the mirror refused registry {ref.ns} ({text}); it fetches only the "
                                 "registries it is configured for")
        if resp.status_code == 401:
            hint = "" if self.username else "; a private image needs --username"
            return PrefetchError(f"{what}: not authorized ({text}){hint}")
        if resp.status_code == 404:
            return PrefetchError(f"{what}: not found ({text})")
        return PrefetchError(f"{what}: {text}")


# ------------------------------------------------------------------ the prefetcher
class Prefetcher:
    """Pulls images through the mirror, keeping the score in ``summary``."""

    def __init__(self, client: MirrorClient, out: Output, platforms: list[Platform] | None,
                 retries: int = 2, keep_wait: float = 30.0):
        self.client = client
        self.out = out
        self.platforms = platforms  # None: every platform of an index
        self.retries = retries
        self.keep_wait = keep_wait
        self.summary = Summary()
        self._done: set[tuple[str, str]] = set()  # (registry, digest) warmed in this run
        self._not_kept: list[str] = []  # digests of the current image the mirror did not keep
        self.current: str | None = None  # the image being warmed (named if interrupted)

    def image(self, text: str) -> None:
        """Warm one image; a failure is reported and counted, never raised."""
        try:
            ref = parse_reference(text)
        except ValueError as exc:
            self._fail(text, f"not an image reference: {exc}")
            return
        name = str(ref)
        self.current = name
        try:
            fetched = self._image(ref)
        except PrefetchError as exc:
            self._fail(name, str(exc))
            return
        self.summary.images_ok += 1
        self.out.line(f"ok {name}" + (f": {human(fetched)} fetched" if fetched else ": already cached"))

    def _fail(self, name: str, reason: str) -> None:
        self.summary.failed.append((name, reason))
        self.out.line(f"FAILED {name}: {reason}", err=True)

    def _image(self, ref: Reference) -> int:
        self.out.line(f"{ref}")
        manifest, media_type, digest = self.client.manifest(ref, ref.ref)
        before = self.summary.bytes_fetched
        self._not_kept = []
        self._walk(ref, manifest, media_type, digest, depth=0)
        if self._not_kept:
            raise PrefetchError(f"the mirror served but did not keep {len(self._not_kept)} blob(s) "
                                f"({', '.join(short(d) for d in self._not_kept)}): larger than its "
                                f"cache_size, disk full or store unwritable; its log says which")
        return self.summary.bytes_fetched - before

    def _walk(self, ref: Reference, manifest: dict, media_type: str, digest: str, depth: int) -> None:
        indent = "  " * (depth + 1)
        if media_type in INDEX_TYPES or (not media_type and "manifests" in manifest):
            if depth >= MAX_INDEX_DEPTH:
                raise PrefetchError(f"indexes nested deeper than {MAX_INDEX_DEPTH} levels")
            for entry in self._select(ref, manifest, digest, indent):
                child_digest = entry.get("digest", "")
                if not DIGEST_RE.match(child_digest):
                    raise PrefetchError(f"index {short(digest)} lists an unsupported digest {child_digest!r}")
                child, child_type, got = self.client.manifest(ref, child_digest)
                self.out.line(f"{indent}{str(Platform.of(entry)) or 'manifest'}: {short(got)}")
                self._walk(ref, child, child_type or entry.get("mediaType", ""), got, depth + 1)
            return
        for kind, desc in self._blobs(manifest, media_type, digest):
            self._blob(ref, kind, desc, indent)

    def _select(self, ref: Reference, index: dict, digest: str, indent: str) -> list[dict]:
        """The index entries to warm: the wanted platforms, or all of them."""
        entries = [e for e in index.get("manifests") or [] if isinstance(e, dict)]
        images = [e for e in entries if not is_attestation(e)]
        if self.platforms is None:
            self.out.line(f"{indent}index {short(digest)}: all {len(images)} platforms")
            return images
        chosen, missing = [], []
        for wanted in self.platforms:
            match = [e for e in images if Platform.of(e).normalized() == wanted.normalized()]
            if match:
                chosen += [e for e in match[:1] if e not in chosen]
            else:
                missing.append(str(wanted))
        if not chosen:
            available = ", ".join(str(Platform.of(e)) for e in images) or "nothing"
            raise PrefetchError(f"no manifest for {', '.join(missing)} in the index (it has {available})")
        if missing:
            self.summary.platforms_missing += len(missing)
            self.out.line(f"{indent}index {short(digest)} has no {', '.join(missing)}: skipped")
        return chosen

    @staticmethod
    def _blobs(manifest: dict, media_type: str, digest: str) -> list[tuple[str, dict]]:
        """(kind, descriptor) of the config and the layers of an image manifest."""
        if manifest.get("schemaVersion") == 1:  # legacy: layers only, sizes unknown
            seen, blobs = set(), []
            for layer in manifest.get("fsLayers") or []:
                blob = layer.get("blobSum")
                if blob and blob not in seen:
                    seen.add(blob)
                    blobs.append(("layer", {"digest": blob}))
            return blobs
        if "layers" not in manifest or not isinstance(manifest.get("config"), dict):
            raise PrefetchError(f"manifest {short(digest)} ({media_type or 'unknown type'}) is not an image "
                                "manifest or index")
        blobs = [("config", manifest["config"])]
        for layer in manifest["layers"]:
            if not isinstance(layer, dict):
                continue
            if layer.get("mediaType") in FOREIGN_LAYER_TYPES or layer.get("urls"):
                continue  # not in the registry: clients fetch it from its urls
            blobs.append(("layer", layer))
        return blobs

    def _blob(self, ref: Reference, kind: str, desc: dict, indent: str) -> None:
        digest = desc.get("digest", "")
        size = desc.get("size") if isinstance(desc.get("size"), int) else None
        if not DIGEST_RE.match(digest):
            raise PrefetchError(f"{kind} {digest!r}: only sha256 digests can be cached")
        label = f"{indent}{kind:<6} {short(digest)}"
        # The HEAD is asked even for a blob this run already fetched (shared by
        # several images): it lets the mirror learn that this repository holds
        # it too, which its access gate would otherwise check at pull time.
        if self._cached(ref, digest) or (ref.registry, digest) in self._done:
            self.summary.count(kind, fetched=False)
            self.out.line(f"{label}  already cached" + (f" ({human(size)})" if size is not None else ""))
            return
        for attempt in range(self.retries + 1):
            try:
                count, seconds, said = self._fetch(ref, digest, size, label)
                break
            except RetryableError as exc:
                if attempt == self.retries:
                    raise PrefetchError(f"{kind} {digest}: {exc}") from None
                self.out.line(f"{label}  {exc}; trying again")
                time.sleep(min(2 ** attempt, 10))
        self.summary.count(kind, fetched=True, size=count)
        line = f"{label}  fetched {human(count)} in {seconds:.2f} s ({human(count / max(seconds, 1e-6))}/s)"
        if NOT_STORED in said.lower():  # no use waiting for it to be stored
            self._not_kept.append(digest)
            self.out.line(f"{line}, but the mirror did not keep it (it said so: {CACHE_HEADER}: {said})", err=True)
            return
        if not self._kept(ref, digest):
            self._not_kept.append(digest)
            self.out.line(f"{line}, but the mirror did not keep it", err=True)
            return
        self._done.add((ref.registry, digest))
        self.out.line(line)

    def _kept(self, ref: Reference, digest: str) -> bool:
        """Did the mirror store the blob we just downloaded? Asked until it
        says so or keep_wait passes (its commit follows our last byte)."""
        deadline = time.monotonic() + self.keep_wait
        delay = 0.02
        while not self._cached(ref, digest):
            if time.monotonic() + delay > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        return True

    def _cached(self, ref: Reference, digest: str) -> bool:
        """Does the mirror hold this blob (and let us read it)? A HEAD costs no download.

        Redirects are not followed: a HEAD the mirror passes upstream may be
        answered with the upstream's CDN redirect, which says nothing either way.
        """
        resp = self.client.request("HEAD", ref, f"blobs/{digest}", allow_redirects=False)
        resp.close()
        return resp.status_code == 200 and resp.headers.get(CACHE_HEADER, "").lower() == "hit"

    def _fetch(self, ref: Reference, digest: str, size: int | None, label: str) -> tuple[int, float, str]:
        """GET the blob through the mirror (and its blob port), hash it, discard it.
        Returns (bytes, seconds, the answer's X-Registry-Cache: "miss, not
        stored" when the mirror serves a blob it will not keep)."""
        resp = self.client.request("GET", ref, f"blobs/{digest}", stream=True)
        with resp:
            if resp.status_code in RETRYABLE_STATUS:
                raise RetryableError(describe(resp))
            if resp.history and resp.status_code != 200:
                # The mirror handed the blob to its blob port, which no longer
                # has it: the mirror's upstream fetch failed in between.
                raise RetryableError(f"the mirror's blob port answered {describe(resp)}")
            if resp.status_code != 200:
                raise self.client.refusal(resp, ref, f"blob {digest}")
            said = resp.headers.get(CACHE_HEADER, "")
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else size
            if size is not None and total is not None and total != size:
                raise PrefetchError(f"blob {digest}: the mirror announces {total} bytes, the manifest says {size}")
            hasher = hashlib.sha256()
            bar = self.out.bar(label, total)
            try:
                while True:
                    try:
                        # raw, undecoded: a blob is bytes, whatever Content-Encoding says
                        chunk = resp.raw.read(CHUNK, decode_content=False)
                    except (urllib3.exceptions.HTTPError, OSError) as exc:
                        raise RetryableError(f"transfer broke after {bar.done} bytes "
                                             f"({exc.__class__.__name__})") from None
                    if not chunk:
                        break
                    hasher.update(chunk)
                    bar.update(len(chunk))
            finally:
                self.out.clear_bar()
        count, seconds = bar.done, bar.elapsed
        if total is not None and count != total:
            raise RetryableError(f"received {count} of {total} bytes")
        got = "sha256:" + hasher.hexdigest()
        if got != digest:
            raise PrefetchError(f"blob {digest}: the bytes received have digest {got}")
        return count, seconds, said


class RetryableError(Exception):
    """A transfer that broke or a temporary refusal (429/5xx): worth another try."""


# ------------------------------------------------------------------ command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="prefetch.py",
        description="Warm a running registry-cache mirror with images, by pulling them through it.",
        epilog="Proxies: HTTPS_PROXY, HTTP_PROXY and NO_PROXY apply to the mirror, its blob port and "
               "token servers, as for curl and containerd (put the mirror in NO_PROXY if the proxy cannot "
               "reach it). Exit status: 0 all images warmed, 1 some failed, 2 bad usage, 130 interrupted "
               "(Ctrl-C), 143 stopped (SIGTERM).")
    ap.add_argument("images", nargs="*", metavar="IMAGE",
                    help="image references: alpine, library/alpine:3.20, ghcr.io/org/app:tag, repo@sha256:...")
    ap.add_argument("--mirror", required=True, help="the mirror's URL, e.g. http://mirror.lan:5000")
    ap.add_argument("-f", "--file", action="append", default=[],
                    help="file with one image reference per line (# comments); '-' reads stdin; repeatable")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--platform", action="append", default=None, metavar="OS/ARCH[/VARIANT]",
                       help=f"platform to warm from multi-arch images; repeatable (default: this "
                            f"machine's, {machine_platform()})")
    which.add_argument("--all-platforms", action="store_true", help="warm every platform of multi-arch images")
    ap.add_argument("--username", help="registry user, for private images (token from the upstream's auth server)")
    ap.add_argument("--password-stdin", action="store_true",
                    help="read the password from stdin (default: $REGISTRY_PASSWORD)")
    ap.add_argument("--insecure-auth", action="store_true",
                    help="also send the password over plain HTTP to another machine: to a plain-HTTP token "
                         "server, or to a plain-HTTP mirror for a registry that asks for Basic auth (the "
                         "mirror relays it). Anyone on the network can then read it. Without it the password "
                         "goes over HTTPS, or to this machine, only")
    ap.add_argument("--ca", action="append", default=[], metavar="FILE",
                    help="also trust the CA certificate(s) in FILE (PEM) for HTTPS: a token server or mirror "
                         "with a private CA; repeatable. Added to the system's CAs, requests' own, "
                         "SSL_CERT_FILE/SSL_CERT_DIR and REQUESTS_CA_BUNDLE")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to wait for the mirror's next bytes (default 120)")
    ap.add_argument("--retries", type=int, default=2,
                    help="extra attempts for a blob whose transfer broke or got 429/5xx (default 2)")
    ap.add_argument("--keep-wait", type=float, default=30.0,
                    help="seconds the mirror may take to confirm it stored a blob just downloaded (it "
                         "sends the last byte before it syncs the file to disk); longer: not kept (default 30)")
    args = ap.parse_args(argv)
    if "://" not in args.mirror:
        args.mirror = "http://" + args.mirror
    parts = urlsplit(args.mirror)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        ap.error(f"--mirror wants scheme://host[:port], got {args.mirror!r}")
    try:
        args.platforms = None if args.all_platforms else \
            [Platform.parse(p) for p in args.platform] if args.platform else [machine_platform()]
    except ValueError as exc:
        ap.error(str(exc))
    if args.password_stdin and "-" in args.file:
        ap.error("--password-stdin and --file - both want stdin")
    if args.password_stdin and not args.username:
        ap.error("--password-stdin needs --username")
    if args.username and not args.password_stdin and "REGISTRY_PASSWORD" not in os.environ:
        ap.error("--username needs --password-stdin or $REGISTRY_PASSWORD")
    try:
        args.trust = trust_context(args.ca)
    except ValueError as exc:
        ap.error(str(exc))
    try:
        for path in args.file:
            args.images += read_image_list(path)
    except (OSError, ValueError) as exc:
        ap.error(str(exc))
    if not args.images:
        ap.error("no images given (arguments or --file)")
    args.images = list(dict.fromkeys(args.images))  # each once, in order
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    password = None
    if args.username:
        password = sys.stdin.readline().rstrip("\r\n") if args.password_stdin else os.environ.get("REGISTRY_PASSWORD")
    out = Output()
    client = MirrorClient(args.mirror, args.username, password, args.timeout, args.trust, args.insecure_auth)
    prefetcher = Prefetcher(client, out,
                            args.platforms, retries=max(0, args.retries), keep_wait=max(0.0, args.keep_wait))

    def on_sigterm(signum, frame):
        raise Interrupted(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    which = "all platforms" if args.platforms is None else ", ".join(map(str, args.platforms))
    out.line(f"Prefetching {len(args.images)} image(s) through {args.mirror} ({which})")
    code = None
    try:
        for image in args.images:
            prefetcher.image(image)
    except KeyboardInterrupt:
        code = 130
    except Interrupted as exc:
        code = exc.code
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if code is not None:
        out.line(f"Interrupted while warming {prefetcher.current}; the mirror finishes fills it started.")
    for line in prefetcher.summary.lines(interrupted=code is not None):
        out.line(line)
    if code is not None:
        return code
    return 1 if prefetcher.summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
