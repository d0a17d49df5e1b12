"""The mirror's options: declared, parsed and checked in one place.

mitmproxy hands an addon its options one by one; the mirror reads them all at
once into a frozen `Settings`, so a request sees one consistent set and a
change at run time (mitmweb lets operators make one) can be compared field by
field to rebuild only what it touches.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import exceptions
from mitmproxy.proxy.mode_specs import ProxyMode, ReverseMode

from .cluster import Member, parse_member, parse_members
from .fill import FetchPolicy
from .layout import DEFAULT_CACHE_SIZE, CacheLayout, default_cache_dir, parse_size
from .registries import DEFAULT_REGISTRIES, DOCKER_HUB_NAME, DOCKER_HUB_URL, origin_of, parse_registries
from .upstream import ANSWER_TIMEOUT, QUIET_FOR

log = logging.getLogger(__name__)

OPEN_FILES_WANTED = 65536  # sockets, blob files and fill cursors: 1024 runs out under load


def declare(loader) -> None:
    """Register the mirror's options (mitmproxy's `load` hook)."""
    loader.add_option(
        "cache_dir", str, "",
        f"Directory of the blob store (default: {default_cache_dir()}).",
    )
    loader.add_option(
        "cache_size", str, DEFAULT_CACHE_SIZE,
        "Size limit of the blob store (e.g. 500m, 20g, 1t); least recently used blobs are evicted.",
    )
    loader.add_option(
        "registries", Sequence[str], list(DEFAULT_REGISTRIES),
        "Registries a request may name with containerd's ?ns= (name, or name=URL; comma-separated "
        "or repeated). Any other ns is refused. docker.io means https://registry-1.docker.io.",
    )
    loader.add_option(
        "serve_stale", bool, True,
        "While the upstream is unreachable, rate-limited (429) or failing (5xx), answer manifests "
        "from the store (a tag: its last known digest, marked stale) and /v2/ pings locally.",
    )
    loader.add_option(
        "upstream_timeout", int, ANSWER_TIMEOUT,
        "Seconds a registry may take to answer a manifest, ping or access check. Past that the "
        f"store answers (serve_stale), and for {QUIET_FOR:.0f}s what it can answer is not asked of "
        "that registry (one request asks again).",
    )
    loader.add_option(
        "tag_check_interval", int, 0,
        "Seconds a tag's answer from the registry may be reused for later pulls without asking it "
        "again (0: every pull checks its tags, with a HEAD). A tag moved upstream is seen up to this late.",
    )
    loader.add_option(
        "upstream_credentials", str, "",
        "A file in Docker's config.json format ({\"auths\": {\"docker.io\": {\"auth\": ...}}}) with accounts of "
        "the mirror's own: manifest GETs of public repositories are then made with them, so pulls count "
        "against those accounts' quotas, not the mirror's address.",
    )
    loader.add_option(
        "fill_chunk_threshold", str, "8m",
        "A fill's first request asks for this much of a blob (a Range); a blob up to this size comes in "
        "that one request, a larger one in ranges over fill_connections connections.",
    )
    loader.add_option(
        "fill_chunk_size", str, "8m",
        "Size of the ranges the rest of a larger blob is fetched in.",
    )
    loader.add_option(
        "fill_connections", int, 8,
        "Upstream connections one fill uses at once (1: one connection, as a direct pull does).",
    )
    loader.add_option(
        "blob_redirect", bool, True,
        "Send plain-HTTP clients a 307 to the blob port for blob bytes (fastest). "
        "When off, and always for TLS clients, mitmproxy streams the bytes itself.",
    )
    loader.add_option(
        "blob_host", str, "",
        "Address the blob server listens on (default: the proxy's own listen address).",
    )
    loader.add_option(
        "blob_port", str, "0",
        "Port of the blob server (0: any free port; set one if a firewall sits in between).",
    )
    loader.add_option(
        "blob_url", str, "",
        "Base URL clients use to reach the blob server, e.g. http://mirror.lan:5001 "
        "(default: the address the client connected to, with blob_port).",
    )
    loader.add_option(
        "mirror_url", str, "",
        "Base URL clients use to reach the mirror, e.g. http://mirror.lan:5000, named in the token realm "
        "it hands out in reverse mode (default: the address the client connected to). Set it behind a "
        "load balancer or NAT, where that address is the node's own.",
    )
    loader.add_option(
        "drain_timeout", int, 25,
        "After SIGTERM: seconds to go on serving while the fills and transfers in progress end (health "
        "answers 503 meanwhile, other nodes start no new fill here); the process stops sooner once they have.",
    )
    loader.add_option(
        "s3_bucket", str, "",
        "Bucket of a shared tier on S3-compatible object storage (AWS S3, MinIO, Ceph RGW, SeaweedFS): "
        "verified blobs, manifests, tags and access proofs every node can use. Empty: none. "
        "Credentials come the standard AWS way (environment, shared config files, SSO, IRSA).",
    )
    loader.add_option(
        "s3_endpoint", str, "",
        "URL of an S3-compatible server, e.g. http://minio.lan:9000 (empty: AWS S3).",
    )
    loader.add_option(
        "s3_prefix", str, "registry-cache/",
        "Keys in the bucket start with this (several mirrors can share a bucket).",
    )
    loader.add_option(
        "s3_region", str, "",
        "Region of the bucket (empty: from the AWS configuration, else us-east-1).",
    )
    loader.add_option(
        "s3_timeout", int, 5,
        "Seconds the object store may take to connect, or stay silent mid-answer. Past that (or on any "
        "other failure) nodes use their own store and the upstream, and leave it alone for s3_retry_after seconds.",
    )
    loader.add_option(
        "s3_retry_after", int, 30,
        "Seconds the object store is left alone after it failed (then one request asks it again).",
    )
    loader.add_option(
        "s3_connections", int, 1,
        "Connections a node reads one blob from the object store over: 1, one stream (a server nearby: "
        "least CPU); more, ranges over that many at once (AWS S3 gives one connection about 90 MB/s).",
    )
    loader.add_option(
        "cluster_members", str, "",
        "The blob servers (host:port) of every mirror node sharing the work, this one included, "
        "comma-separated; or dns:NAME:PORT for every address NAME resolves to (a Kubernetes headless "
        "service). Each blob is fetched upstream by one node, its owner. Needs blob_port and cluster_secret_file.",
    )
    loader.add_option(
        "cluster_secret_file", str, "",
        "A file whose first line is the secret mirror nodes sign their requests to each other and blob URLs "
        "with (any node then serves a blob URL another made), and key shared grants with; every line is "
        "accepted (rotating: add the new one below, then move it first, then drop the old one).",
    )
    loader.add_option(
        "cluster_address", str, "",
        "This node's blob server as the others reach it (host:port), when that is not the one member "
        "at a local address on blob_port.",
    )


def check_set_values(options) -> list[str]:
    """Messages for --set values of ours that mitmproxy cannot parse (serve_stale=yes).

    mitmproxy parses a script's --set values only once the script has
    registered its options, and a failure there ends the script's loading
    task without a word: mitmdump would run on as a plain proxy, caching
    nothing. Parsed here first, the caller logs them as errors, on which
    mitmdump exits at start. (Uses mitmproxy 12's option internals.)"""
    problems = []
    for name, value in list(options.deferred.items()):
        raw = getattr(value, "val", None)
        if raw is None or name not in options._options:  # not (yet) an option: someone else's
            continue
        try:
            options._parse_setval(options._options[name], raw)
        except exceptions.OptionsError as exc:
            problems.append(f"--set {name}={' '.join(raw)}: {exc}")
    return problems


@dataclass(frozen=True)
class Settings:
    """Everything the mirror reads from mitmproxy's options, checked."""

    layout: CacheLayout
    cache_size: int
    registries: dict[str, str] = field(hash=False)  # ns name -> base URL
    listed_origins: frozenset[str]  # the registries' origins (see registries.origin_of)
    reverse_upstreams: frozenset[str]  # origins of the reverse-mode upstreams
    serve_stale: bool
    upstream_timeout: int
    tag_check_interval: int
    upstream_verify: bool | str
    upstream_credentials: str  # path of the accounts file, or ""
    fetch_policy: FetchPolicy  # the fill_* options
    blob_redirect: bool
    blob_host: str  # where the blob server listens
    blob_port: int
    blob_url: str
    mirror_url: str = ""  # the token realm's base; empty: the address the client connected to
    s3: "S3Settings | None" = None  # the shared tier (s3_* options)
    cluster: "ClusterSettings | None" = None  # cluster_members, cluster_address
    cluster_secret_file: str = ""  # signs blob URLs and the nodes' requests (cluster_secret.py)
    drain_timeout: int = 25  # seconds SIGTERM waits for what is in progress (drain.py)

    @classmethod
    def read(cls, options: Any) -> "Settings":
        """Settings from mitmproxy's options; ValueError names what is wrong."""
        if options.upstream_timeout <= 0:
            raise ValueError("upstream_timeout must be a number of seconds > 0")
        if options.drain_timeout < 0:
            raise ValueError("drain_timeout must be a number of seconds >= 0")
        if options.tag_check_interval < 0:
            raise ValueError("tag_check_interval must be a number of seconds >= 0")
        try:
            registries = parse_registries(options.registries)
        except ValueError as exc:
            raise ValueError(f"registries: {exc}") from None
        try:
            port = int(options.blob_port)
        except ValueError:
            raise ValueError(f"blob_port is not a port number: {options.blob_port!r}") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"blob_port out of range: {port}")
        modes = [ProxyMode.parse(spec) for spec in options.mode]
        return cls(
            layout=CacheLayout.at(options.cache_dir),
            cache_size=parse_size(options.cache_size),
            registries=registries,
            listed_origins=frozenset(origin_of(url) for url in registries.values()),
            reverse_upstreams=frozenset(origin_of(mode.data) for mode in modes if isinstance(mode, ReverseMode)),
            serve_stale=options.serve_stale,
            upstream_timeout=options.upstream_timeout,
            tag_check_interval=options.tag_check_interval,
            upstream_verify=_upstream_verify(options),
            upstream_credentials=options.upstream_credentials,
            fetch_policy=_fetch_policy(options),
            blob_redirect=options.blob_redirect,
            blob_host=options.blob_host or _proxy_listen_host(modes, options.listen_host),
            blob_port=port,
            blob_url=_base_url("blob_url", options.blob_url),
            mirror_url=_base_url("mirror_url", options.mirror_url),
            s3=_s3_settings(options),
            cluster=_cluster_settings(options, port),
            cluster_secret_file=options.cluster_secret_file,
            drain_timeout=options.drain_timeout,
        )

    def origin_named(self, name: str) -> str | None:
        """The origin of the registry the operator chose (the reverse-mode
        upstream or one on `registries`) spelled host[:port], as the mirror
        writes it into the realms it hands out; None for any other name."""
        name = name.lower()
        for origin in sorted(self.reverse_upstreams | self.listed_origins):
            if host_port_of(origin) == name:
                return origin
        return None

    def chosen_origin(self, name: str) -> str | None:
        """A registry the operator chose, by its name on `registries`
        (docker.io) or by host[:port] (origin_named)."""
        url = self.registries.get(name.lower())
        return origin_of(url) if url else self.origin_named(name)

    def ns_docker_io_note(self) -> str:
        """A trap for operators, for the start-up line: with a reverse-mode
        upstream other than Docker Hub, containerd's ?ns=docker.io still goes
        to Docker Hub unless `registries` maps docker.io elsewhere."""
        hub = self.registries.get(DOCKER_HUB_NAME)
        if not self.reverse_upstreams or hub is None or origin_of(hub) in self.reverse_upstreams:
            return ""
        where = "Docker Hub" if hub == DOCKER_HUB_URL else hub
        return (f"; containerd's ?ns=docker.io goes to {where}, not to the reverse-mode upstream"
                " (set registries=docker.io=<its URL>,... if it mirrors Docker Hub)")


def host_port_of(origin: str) -> str:
    """"https://ghcr.io:443" -> "ghcr.io"; "http://10.0.0.1:5000" -> "10.0.0.1:5000"."""
    scheme, _, rest = origin.partition("://")
    host, _, port = rest.rpartition(":")
    return host if port == ("443" if scheme == "https" else "80") else rest


@dataclass(frozen=True)
class S3Settings:
    """Where the shared tier lives (see objectstore.ObjectStoreConfig)."""

    bucket: str
    endpoint: str
    prefix: str
    region: str
    timeout: int
    retry_after: int
    connections: int = 1


@dataclass(frozen=True)
class ClusterSettings:
    """Who the other nodes are, and how this one knows them."""

    members: tuple[Member, ...]  # a static list; empty with dns_name
    dns_name: str  # resolves to every node (dns:NAME:PORT)
    dns_port: int
    address: Member | None  # this node, when given (cluster_address)


def _base_url(name: str, value: str) -> str:
    """An http(s) URL the mirror appends its own paths to (a path prefix is
    kept, for a proxy in front that strips it). A typo here would send every
    client elsewhere, so it is checked at start."""
    value = value.strip().rstrip("/")
    if not value:
        return ""
    parts = urlsplit(value)
    try:
        port = parts.port  # raises on a port out of range or not a number
    except ValueError:
        raise ValueError(f"{name}: not a valid port in {value!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0 or parts.username is not None \
            or any(c in value for c in '?#"\\') or any(c.isspace() for c in value):
        raise ValueError(f"{name} must be http(s)://HOST[:PORT][/PATH] with no query or user, not {value!r}")
    return value


def _s3_settings(options) -> S3Settings | None:
    if not options.s3_bucket:
        if options.s3_endpoint:
            raise ValueError("s3_endpoint is set but s3_bucket is not")
        return None
    endpoint = options.s3_endpoint.rstrip("/")
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"s3_endpoint must be an http:// or https:// URL, not {options.s3_endpoint!r}")
    prefix = options.s3_prefix
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if options.s3_timeout <= 0 or options.s3_retry_after <= 0:
        raise ValueError("s3_timeout and s3_retry_after must be numbers of seconds > 0")
    if not 1 <= options.s3_connections <= 64:
        raise ValueError(f"s3_connections must be 1 to 64, not {options.s3_connections}")
    return S3Settings(options.s3_bucket, endpoint, prefix, options.s3_region, options.s3_timeout,
                      options.s3_retry_after, options.s3_connections)


def _cluster_settings(options, blob_port: int) -> ClusterSettings | None:
    spec = options.cluster_members.strip()
    if not spec:
        return None
    if not options.cluster_secret_file:
        raise ValueError("cluster_members needs cluster_secret_file: nodes trust only requests signed with it")
    if blob_port == 0:
        raise ValueError("cluster_members needs a fixed blob_port: members are the nodes' blob servers")
    address = parse_member(options.cluster_address) if options.cluster_address else None
    if spec.startswith("dns:"):
        name, sep, port = spec[4:].rpartition(":")
        if not sep or not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"cluster_members: dns:NAME:PORT, not {spec!r}")
        return ClusterSettings((), name, int(port), address)
    try:
        members = tuple(parse_members(spec))
    except ValueError as exc:
        raise ValueError(f"cluster_members: {exc}") from None
    if address is not None and address not in members:
        raise ValueError(f"cluster_address {address.id} is not among cluster_members")
    return ClusterSettings(members, "", 0, address)


def _fetch_policy(options) -> FetchPolicy:
    """The fill_* options, checked."""
    threshold, chunk = parse_size(options.fill_chunk_threshold), parse_size(options.fill_chunk_size)
    if not 1 <= options.fill_connections <= 64:
        raise ValueError(f"fill_connections must be 1 to 64, not {options.fill_connections}")
    if min(threshold, chunk) < 1 << 20:
        raise ValueError("fill_chunk_threshold and fill_chunk_size must be 1m or more")
    return FetchPolicy(first_request=threshold, chunk_size=chunk, connections=options.fill_connections)


def _upstream_verify(options) -> bool | str:
    """requests' `verify` from mitmproxy's own upstream TLS options."""
    if options.ssl_insecure:
        return False
    return options.ssl_verify_upstream_trusted_ca or options.ssl_verify_upstream_trusted_confdir or True


def _proxy_listen_host(modes: list[ProxyMode], listen_host: str) -> str:
    """The one address all proxy modes listen on, else all interfaces."""
    hosts = {mode.listen_host(listen_host) for mode in modes}
    return hosts.pop() if len(hosts) == 1 else ""


def raise_open_files_limit() -> None:
    """Lift the soft limit on open files towards the hard one. Each blob a
    client downloads holds its socket and a file; the usual soft limit of
    1024 ends in "too many open files" at a few hundred concurrent pulls."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        log.info("registry-cache: open files limit raised from %d to %d", soft, wanted)
