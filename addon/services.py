"""The services the hooks hand requests to, built from the Settings.

A change of options at run time (mitmweb lets operators make one) rebuilds
only what it touches, and what is running goes on with what it started with:
a new cache_dir opens a new Storage while the old one is retired once its
fills end (storage.py); a new cache_size resizes the store in place; the
blob server is started again only when its address changes. Services are
cheap objects built again on every change; a request in flight keeps the
ones it started with.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .blobs import BlobPath
from .blobserver import BlobServer
from .cluster import Membership
from .cluster_secret import ClusterSecret
from .credentials import MirrorAccounts, read_accounts
from .fill import Fill
from .layout import format_size
from .manifest_relay import ManifestRelay
from .metrics import Metrics
from .own_addresses import OwnAddresses
from .peers import PeerEndpoint, Peers
from .settings import Settings
from .sources import Tiers
from .storage import Storage
from .tokens import TokenEndpoint, TokenRelay
from .upstream import UpstreamClient
from .workers import Workers

log = logging.getLogger("registry_cache")


class Services:
    def __init__(self, metrics: Metrics, workers: Workers, own: OwnAddresses,
                 on_fill_finished: Callable[[Fill], None], retire: Callable[[Storage], None]):
        self.metrics, self.workers, self.own = metrics, workers, own
        self._on_fill_finished = on_fill_finished
        self._retire = retire  # runs a retired Storage's retire() in the background
        self.settings: Settings | None = None
        self.upstream: UpstreamClient | None = None
        self.tokens: TokenRelay | None = None
        self.accounts: MirrorAccounts | None = None
        self.storage: Storage | None = None
        self.blob_server: BlobServer | None = None
        self.blobs: BlobPath | None = None
        self.manifests: ManifestRelay | None = None
        self.token_endpoint: TokenEndpoint | None = None
        self.shared = None  # shared_blobs.SharedBlobs: the object store's blobs (s3_bucket)
        self.records = None  # shared_records.SharedRecords: what nodes learned, in the object store
        self.secret: ClusterSecret | None = None  # cluster_secret_file
        self.peers: Peers | None = None  # the other nodes (cluster_members)
        self.draining = threading.Event()  # SIGTERM came (drain.py): no new fills for other nodes
        self.tiers: Tiers | None = None

    def apply(self, new: Settings) -> None:
        """Build what `new` needs that the current settings did not give.
        Raises ValueError or OSError (the options cannot be used)."""
        old, self.settings = self.settings, new
        if self.upstream is None:
            self.upstream = UpstreamClient(verify=new.upstream_verify, answer_timeout=new.upstream_timeout,
                                           is_own=self.own.is_own)
            self.tokens = TokenRelay(self.upstream)
        else:
            self.upstream.answer_timeout = new.upstream_timeout
            if new.upstream_verify != old.upstream_verify:
                self.upstream.set_verify(new.upstream_verify)
        announce = old is None or new.layout != old.layout
        if announce:
            retired, self.storage = self.storage, Storage(new.layout, new.cache_size, self.upstream,
                                                          self._fill_finished, new.fetch_policy)
            if retired is not None:
                self._retire(retired)
        else:
            if new.cache_size != old.cache_size:
                self.storage.resize(new.cache_size)
            self.storage.fills.policy = new.fetch_policy  # for fills started from now on
        storage = self.storage
        if self.blob_server is None or (new.blob_host, new.blob_port) != (old.blob_host, old.blob_port):
            self._start_blob_server(new)
            announce = True
        else:
            self.blob_server.serve_from(storage.store, storage.fills, storage.access.index.served_by)
        if old is None or (new.upstream_credentials, new.registries) != (old.upstream_credentials, old.registries):
            self.accounts = MirrorAccounts(read_accounts(new.upstream_credentials, new.chosen_origin),
                                           self.upstream, self.tokens) if new.upstream_credentials else None
        secret_changed = old is None or new.cluster_secret_file != old.cluster_secret_file
        if secret_changed:
            self.secret = ClusterSecret(new.cluster_secret_file) if new.cluster_secret_file else None
        if old is None or new.s3 != old.s3 or secret_changed:
            self._open_shared(new)
            announce = True
        if old is None or (new.cluster, new.blob_port) != (old.cluster, old.blob_port) or secret_changed:
            self._open_cluster(new)
            announce = True
        storage.share(self.records)
        self.tiers = Tiers(self.shared, self.peers) if self.shared is not None or self.peers is not None else None
        self._serve_cluster(new, storage)
        self.own.forget()
        self.blobs = BlobPath(storage, self.blob_server, self.upstream, self.workers, new, self.tiers)
        self.manifests = ManifestRelay(storage, self.upstream, self.workers, self.metrics, new, self.accounts,
                                       self.records)
        self.token_endpoint = TokenEndpoint(self.tokens, self.workers, new,
                                            on_unreachable=lambda registry: self.manifests.forget_ping(registry))
        if announce:
            used, count = storage.store.usage()
            log.info("registry-cache: store %s (%d blobs, %s of %s); blob server on %s:%d%s",
                     new.layout.root, count, format_size(used), format_size(new.cache_size),
                     self.blob_server.host, self.blob_server.port, new.ns_docker_io_note())
            if new.s3 is not None:
                log.info("registry-cache: shared tier: bucket %s%s, keys under %r", new.s3.bucket,
                         f" at {new.s3.endpoint}" if new.s3.endpoint else "", new.s3.prefix)
            if self.peers is not None:
                me = self.peers.me
                log.info("registry-cache: cluster of %s; this node is %s",
                         ", ".join(m.id for m in self.peers.membership.members) or new.cluster.dns_name,
                         me.id if me else "not among them")

    def _open_cluster(self, new: Settings) -> None:
        """The other nodes (cluster_members), as this node sees them."""
        if self.peers is not None:
            self.peers.close()
            self.peers = None
        cluster = new.cluster
        if cluster is None:
            return
        if cluster.dns_name:
            membership = Membership(dns_name=cluster.dns_name, port=cluster.dns_port, me=cluster.address)
            membership.start()
        else:
            membership = Membership(cluster.members, me=cluster.address)
        self.peers = Peers(membership, self.secret, new.blob_port, cluster.address)

    def _serve_cluster(self, new: Settings, storage: Storage) -> None:
        """The blob server signs with the cluster secret and answers other nodes."""
        if self.secret is None:
            self.blob_server.serve_cluster(None, None)
            return
        access = storage.access
        endpoint = PeerEndpoint(self.secret, storage.fills, self.tiers or Tiers(), self.upstream,
                                lambda registry, repo, digest, authorization:
                                access.vouch(registry, repo, digest, authorization),
                                new.reverse_upstreams | new.listed_origins, self.draining)
        self.blob_server.serve_cluster(self.secret, endpoint, self._node_id)

    def _node_id(self) -> str:
        """This node's member id now ("" while the members do not include it yet)."""
        me = self.peers.me if self.peers is not None else None
        return me.id if me else ""

    def _open_shared(self, new: Settings) -> None:
        """The object store of s3_bucket (boto3 is imported only then)."""
        if self.shared is not None:
            self.shared.close()
            self.records.close()
            self.shared = self.records = None
        if new.s3 is None:
            return
        from .objectstore import ObjectStoreConfig
        from .shared_blobs import SharedBlobs
        from .shared_records import SharedRecords

        config = ObjectStoreConfig(bucket=new.s3.bucket, endpoint=new.s3.endpoint, prefix=new.s3.prefix,
                                   region=new.s3.region, timeout=float(new.s3.timeout),
                                   down_for=float(new.s3.retry_after))
        self.shared = SharedBlobs(config, lambda digest: self.storage.store.open(digest), self.metrics,
                                  new.s3.connections)
        self.records = SharedRecords(self.shared.objects, self.secret)

    def _fill_finished(self, fill: Fill) -> None:
        """Each fill, as it ends (in its thread)."""
        self._on_fill_finished(fill)
        tiers = self.tiers
        if tiers is not None:
            tiers.finished(fill)

    def _start_blob_server(self, new: Settings) -> None:
        if self.blob_server is not None:
            self.blob_server.stop()
        self.blob_server = None
        storage = self.storage
        try:
            self.blob_server = BlobServer(storage.store, storage.fills, new.blob_host, new.blob_port,
                                          metrics=self.metrics, proven=storage.access.index.served_by)
        except OSError as exc:
            raise OSError(f"blob server cannot listen on {new.blob_host}:{new.blob_port}: {exc}") from None
        self.blob_server.start()

    def in_progress(self) -> dict[str, int]:
        """What a drain waits for (drain.py), besides the requests being answered."""
        counts = {"fills": self.storage.fills.in_flight(), "blob transfers": self.blob_server.sending}
        if self.shared is not None and self.shared.available():  # (uploads wait while it is down)
            counts["uploads"] = self.shared.uploader.pending()
        return counts

    def health(self) -> dict:
        """The health endpoint's details: degraded parts are reported, not fatal."""
        report: dict = {"fills_in_flight": self.storage.fills.in_flight(),
                        "object_store": "off" if self.shared is None else
                        "up" if self.shared.available() else "down"}
        if self.peers is not None:
            me = self.peers.me
            report["cluster"] = {"node": me.id if me else None,
                                 "members": [m.id for m in self.peers.membership.members],
                                 "down": [m.id for m in self.peers.membership.down_members()]}
        return report

    def gauges(self) -> dict[str, float]:
        return self.storage.gauges()

    def close(self) -> None:
        if self.peers is not None:
            self.peers.close()
        if self.shared is not None:
            self.records.close()
            self.shared.close()
        if self.blob_server is not None:
            self.blob_server.stop()
        if self.upstream is not None:
            self.upstream.close()
        if self.storage is not None:
            self.storage.close()
