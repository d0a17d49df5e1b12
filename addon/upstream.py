"""The mirror's own HTTP client, used for blob fills, manifests and access checks.

Fills run in threads outside mitmproxy's flow machinery (so they outlive the
client that started them), which means they need their own client. It follows
the upstream's redirects itself (Docker Hub sends blob GETs to a CDN) and never
sends the client's Authorization header to a redirect target. TLS verification
follows mitmproxy's upstream options, which an addon-owned client would
otherwise not inherit.

It also remembers which registries let a request time out (accepted the
connection, or not even that, and never answered): a hung registry, or a
network path that went silent, would otherwise cost every request the whole
timeout before the mirror answered from its store.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import requests
import requests.adapters
import urllib3.exceptions

from . import oci
from .oci import ALL_MANIFEST_TYPES  # sent with our own HEADs (also importable from here)
from .registries import origin_of

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
MAX_RELAYED_BODY = 32 << 20  # a manifest answer larger than this is refused
CONNECT_TIMEOUT = 15.0
READ_TIMEOUT = 60.0  # longest silence tolerated mid-body before a fill fails
ANSWER_TIMEOUT = 30  # for manifests, pings and HEADs: the upstream_timeout option's default
# After a registry let a request time out, it is asked again (by one request)
# only after this long; meanwhile answers the store has are given at once.
QUIET_FOR = 30.0
MAX_HUNG_REMEMBERED = 1000


class AnswerTooLarge(Exception):
    """The upstream's answer to a relayed request is over MAX_RELAYED_BODY."""


class OwnAddress(requests.exceptions.InvalidURL):
    """A request (or a redirect) would go to the mirror's own listening address."""


@dataclass
class Answer:
    """An upstream response read whole (manifests, pings: small bodies)."""

    status: int
    headers: Mapping[str, str]  # case-insensitive
    body: bytes
    # What the hall made of it, kept with it: a ping's or an anonymous
    # token's answer is given again to every client of a rollout (responses.relayed).
    made: dict = field(default_factory=dict, compare=False, repr=False)


class BlobSource:
    """One blob's bytes at the upstream, for a fill: `source(start, end)` GETs
    bytes [start, end), `source()` the whole blob.

    The first GET goes to the registry with the client's credentials, and
    follows its redirect (Docker Hub's: a signed CDN URL). Later ranges (a
    resume, the chunks of a large blob) go straight to the URL that answered,
    without the credentials if that is a CDN's: one redirect, not one per
    chunk. When that URL has expired (the CDN answers 401, 403 or 410), the
    registry is asked once more for a fresh one.
    """

    EXPIRED = (401, 403, 410)

    def __init__(self, client: "UpstreamClient", url: str, authorization: str | None):
        self.client = client
        self.url = url
        self.authorization = authorization
        self._redirected_to: str | None = None  # where the registry last sent us

    def __call__(self, start: int = 0, end: int | None = None) -> requests.Response:
        target = self._redirected_to
        if target is not None:
            response = self.client.get_blob(target, None, start, end)
            if response.status_code not in self.EXPIRED:
                response.redirected = True
                return response
            response.close()
            log.info("upstream: %s answered %d; asking the registry for a fresh redirect",
                     target.split("?", 1)[0], response.status_code)
        response = self.client.get_blob(self.url, self.authorization, start, end)
        if response.redirected:
            self._redirected_to = response.url
        return response


class UpstreamClient:
    def __init__(self, verify: bool | str = True, user_agent: str = "registry-cache",
                 answer_timeout: float = ANSWER_TIMEOUT, is_own: Callable[[str, int], bool] | None = None):
        self.answer_timeout = answer_timeout
        # (host, port) -> is that the mirror itself? (own_addresses.py). Checked
        # before every request and redirect, in the calling (worker) thread.
        self.is_own = is_own
        self._timed_out: dict[str, float] = {}  # registry origin -> when it last timed out (monotonic)
        self._lock = threading.Lock()
        self.session = requests.Session()
        self.session.trust_env = False  # no surprise proxies from the environment
        self.set_verify(verify)
        adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=64, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.user_agent = user_agent

    def set_verify(self, verify: bool | str) -> None:
        """TLS verification of upstreams (mitmproxy's ssl_insecure and CA options)."""
        self.session.verify = verify
        if verify is False:
            # The operator chose this (ssl_insecure): say it once, not per call.
            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
            log.warning("upstream: TLS certificates of upstream registries are not checked (ssl_insecure)")

    def refuse_own(self, url: str) -> None:
        if self.is_own is None:
            return
        parts = urlsplit(url)
        if parts.hostname and self.is_own(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)):
            raise OwnAddress(f"{parts.scheme}://{parts.netloc} is the mirror itself; not asking it")

    def get_blob(self, url: str, authorization: str | None, start: int = 0,
                 end: int | None = None) -> requests.Response:
        """GET a blob, following redirects; the body is left unread (stream).
        With start or end, only bytes [start, end) are asked for (a Range;
        end None: to the last byte). The caller checks what came back."""
        headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
        if authorization:
            headers["Authorization"] = authorization
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        for hops in range(MAX_REDIRECTS + 1):
            self.refuse_own(url)
            response = self.session.get(
                url,
                headers=headers,
                stream=True,
                allow_redirects=False,
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
            )
            if not response.is_redirect:
                response.redirected = hops > 0  # answered by a CDN, not by the registry itself
                return response
            location = response.headers["Location"]
            response.close()
            url = urljoin(url, location)
            # The redirect target (a CDN with a signed URL) must never see the
            # client's token; Docker Hub's CDN even refuses such requests.
            headers.pop("Authorization", None)
            log.debug("upstream: blob redirected to %s", url.split("?", 1)[0])
        raise requests.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects for a blob")

    def blob_source(self, url: str, authorization: str | None) -> "BlobSource":
        """What a fill fetches one blob's bytes with (see BlobSource)."""
        return BlobSource(self, url, authorization)

    def fetch(self, method: str, url: str, headers: dict[str, str], body: bytes | None = None) -> Answer:
        """Relay a small request (manifest, ping) with the client's headers.

        The body comes back exactly as sent (no content decoding), and no
        default header of ours is added to what the client sent. A body cut
        short (the upstream closed, reset or went silent mid-body) raises
        requests.ConnectionError like an unreachable upstream: relaying it as a
        complete 200 would hand the client a broken manifest.
        """
        headers = {"Accept": None, "User-Agent": None, **headers, "Accept-Encoding": "identity"}
        response = self._answered(url, lambda timeout: self.session.request(
            method, url, headers=headers, data=body, stream=True, allow_redirects=False, timeout=timeout))
        with response:
            try:
                body = b"" if method == "HEAD" else response.raw.read(MAX_RELAYED_BODY + 1, decode_content=False)
            except urllib3.exceptions.HTTPError as exc:  # not a requests.RequestException
                raise requests.ConnectionError(f"upstream answer cut short: {exc}") from exc
        if len(body) > MAX_RELAYED_BODY:
            raise AnswerTooLarge(f"upstream answer larger than {MAX_RELAYED_BODY} bytes")
        expected = response.headers.get("Content-Length", "")
        if method != "HEAD" and expected.isdigit() and len(body) != int(expected):
            raise requests.ConnectionError(f"upstream answer cut short: {len(body)} of {expected} bytes")
        return Answer(response.status_code, response.headers, body)

    def head(self, url: str, authorization: str | None) -> tuple[int, Mapping[str, str]]:
        """HEAD with the client's credentials: (status, case-insensitive headers). No redirects:
        a 2xx or 3xx from the registry itself answers "may this client read it"."""
        headers = {"User-Agent": self.user_agent, "Accept": ALL_MANIFEST_TYPES}
        if authorization:
            headers["Authorization"] = authorization
        response = self._answered(url, lambda timeout: self.session.head(
            url, headers=headers, allow_redirects=False, timeout=timeout))
        response.close()
        status = 200 if response.is_redirect else response.status_code
        return status, response.headers

    def anonymous_token(self, challenge: str | list[str], repo: str) -> str | None:
        """A pull token for repo, with no credentials, from the realm of the
        Bearer challenge among those in `challenge` (WWW-Authenticate: one
        value or its lines). None if there is none, or no token was given."""
        bearer = oci.bearer_challenge(challenge)
        if bearer is None or not bearer.realm.lower().startswith(("https://", "http://")):
            return None
        self.refuse_own(bearer.realm)
        request = oci.TokenRequest.for_challenge(bearer, scopes=[f"repository:{repo}:pull"])
        try:
            return oci.fetch_token(self.session, bearer.realm, request, headers={"User-Agent": self.user_agent},
                                   timeout=self._answer_timeouts()).token
        except oci.TokenError:
            return None

    def _answer_timeouts(self) -> tuple[float, float]:
        """(connect, read) for small answers: upstream_timeout bounds both."""
        return min(CONNECT_TIMEOUT, self.answer_timeout), self.answer_timeout

    def _answered(self, url: str, send) -> requests.Response:
        """send(timeout), remembering whether the registry answered at all."""
        registry = origin_of(url)
        self.refuse_own(url)
        try:
            response = send(self._answer_timeouts())
        except requests.Timeout:
            with self._lock:
                self._timed_out[registry] = time.monotonic()
                if len(self._timed_out) > MAX_HUNG_REMEMBERED:  # hosts proxy clients named
                    newest = sorted(self._timed_out.items(), key=lambda item: item[1])[-MAX_HUNG_REMEMBERED // 2:]
                    self._timed_out = dict(newest)
            raise
        if self._timed_out and urlsplit(url).path.rstrip("/") != "/v2":
            # Any answer ends the quiet time, but a ping's: a registry whose
            # front answers /v2/ while its manifests hang would otherwise get
            # every pull's full timeout back.
            with self._lock:
                self._timed_out.pop(registry, None)
        return response

    def in_quiet_time(self, registry: str) -> bool:
        """hung() without taking a turn to ask: for decisions that need not
        ask (and must not wait for a thread that would)."""
        with self._lock:
            since = self._timed_out.get(registry)
        return since is not None and time.monotonic() - since < max(QUIET_FOR, self.answer_timeout)

    def hung(self, registry: str) -> bool:
        """Did registry let a request time out less than QUIET_FOR ago (or
        upstream_timeout, if longer: else a second caller would ask while the
        first still waits)? Once that is over, one caller gets False (and asks
        it); the others keep getting True until that request is answered or
        times out too."""
        now = time.monotonic()
        with self._lock:
            since = self._timed_out.get(registry)
            if since is None:
                return False
            if now - since < max(QUIET_FOR, self.answer_timeout):
                return True
            self._timed_out[registry] = now  # this caller's turn to ask
            return False

    def close(self) -> None:
        self.session.close()
