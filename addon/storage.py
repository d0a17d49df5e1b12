"""Everything the mirror keeps in one cache directory, opened and retired together.

The blob store, the fills that write into it, the access gate with its index
of what the upstream vouched for, and the manifest store all live in one
cache directory (layout.py). When cache_dir changes at run time (mitmweb lets
operators change options), a new Storage opens and the old one is retired:
its running fills finish into the store they started with and vouch on the
gate they started with, and only then is it closed. Closing it under them
made them commit into a closed store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .access import AccessGate, SeenIndex
from .fill import FetchPolicy, Fill, Fills
from .layout import CacheLayout
from .manifests import ManifestStore
from .store import DiskBlobStore
from .upstream import UpstreamClient

log = logging.getLogger(__name__)


class Storage:
    def __init__(self, layout: CacheLayout, size_limit: int, upstream: UpstreamClient,
                 on_fill_finished: Callable[[Fill], None], policy: FetchPolicy):
        self.layout = layout
        self.store = DiskBlobStore(layout.blobs, size_limit)
        self.fills = Fills(self.store, max_stored_size=size_limit, on_finished=on_fill_finished, policy=policy)
        self.access = AccessGate(SeenIndex(layout.access_db), upstream)
        self.manifests = ManifestStore(layout.manifests)
        self.closed = False

    def share(self, records) -> None:
        """Share what this directory learns with other nodes, and take in what
        they learned (shared_records.SharedRecords; None: this node alone)."""
        self.access.shared = records
        self.manifests.shared = records

    def resize(self, size_limit: int) -> None:
        """cache_size changed: evict to the new limit; fills started from now on use it."""
        self.store.resize(size_limit)
        self.fills.max_stored_size = size_limit

    def gauges(self) -> dict[str, float]:
        used, count = self.store.usage()
        return {
            "fills_in_flight": self.fills.in_flight(),
            "store_bytes": used,
            "store_blobs": count,
            "store_limit_bytes": self.store.size_limit,
            "evictions_total": self.store.evictions,
        }

    async def retire(self) -> None:
        """Close once the fills running now have finished (event loop)."""
        running = self.fills.running()
        if running:
            log.info("registry-cache: %s closes once its %d running fill(s) end", self.layout.root, len(running))
        for fill in running:
            await fill.wait_finished()
        self.close()

    def close(self) -> None:
        self.closed = True
        self.access.close()
        self.manifests.close()
        self.store.close()
