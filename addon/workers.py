"""Where the mirror's blocking work runs, off mitmproxy's event loop.

Disk and SQLite work (store lookups, access decisions the mirror can make
alone, stale answers, metrics) runs in the local pool, and never queues
behind calls to registries. Measured before they were apart: with 40
manifest GETs hanging at one unanswering host, a stored blob took 60 s, the
upstream timeout, to be served.

Calls to registries run in threads of their registry's own: PER_REGISTRY per
registry the operator chose, and as many for all the registries proxy
clients name together (the caller passes UNLISTED as the key for those). A
registry that hangs holds only its own threads, so a call to any other
registry starts at once; with one shared pool of 4 x PER_REGISTRY threads,
4 hung registries made a healthy one's call wait for the hang. Threads are
made as calls need them, so an idle registry costs none.

A call whose client has left by the time a thread takes it up is not made:
mitmproxy does not cancel an addon's hook when its client disconnects, and a
backlog for a hung registry would otherwise go out anyway.

Re-hashing a blob whose file changed on disk (store.py) reads the whole
blob: it runs in a pool of its own, so a multi-GB re-hash never holds up hits.

Calls to the shared object store (records, lookups) run in a pool of their
own too: a store that hangs costs its timeout there, never disk work or a
registry's threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

LOCAL_THREADS = 8
REHASH_THREADS = 2
OBJECT_STORE_THREADS = 16
PER_REGISTRY = 16
UNLISTED = "registries nobody chose"  # the key they share


class ClientGone(Exception):
    """The client left while its call waited for a thread; the call was not made."""


class Workers:
    """The pools. Call from the event loop only (the registry map is not locked)."""

    def __init__(self) -> None:
        self._local = ThreadPoolExecutor(LOCAL_THREADS, thread_name_prefix="registry-cache-local")
        self._rehash = ThreadPoolExecutor(REHASH_THREADS, thread_name_prefix="registry-cache-rehash")
        self._registries: dict[str, ThreadPoolExecutor] = {}
        self._object_store: ThreadPoolExecutor | None = None  # made when first used

    async def local(self, fn, *args):
        """Run fn(*args), which touches only the disk, in the local pool."""
        return await asyncio.get_running_loop().run_in_executor(self._local, fn, *args)

    async def rehash(self, fn, *args):
        """Run fn(*args), which reads a whole blob, beside the local pool."""
        return await asyncio.get_running_loop().run_in_executor(self._rehash, fn, *args)

    async def object_store(self, fn, *args):
        """Run fn(*args), which may wait on the shared object store, in its own pool."""
        if self._object_store is None:
            self._object_store = ThreadPoolExecutor(OBJECT_STORE_THREADS, thread_name_prefix="registry-cache-s3")
        return await asyncio.get_running_loop().run_in_executor(self._object_store, fn, *args)

    async def upstream(self, key: str, fn, *args, wanted: Callable[[], bool] | None = None):
        """Run fn(*args), which may wait on a registry, in one of key's threads
        (key: the registry, or UNLISTED). If wanted() says no when a thread
        takes the call up, raise ClientGone instead."""
        pool = self._registries.get(key)
        if pool is None:
            pool = self._registries[key] = ThreadPoolExecutor(
                PER_REGISTRY, thread_name_prefix=f"registry-cache-upstream-{len(self._registries)}")

        def call():
            if wanted is not None and not wanted():
                raise ClientGone()
            return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(pool, call)

    def shutdown(self) -> None:
        for pool in (self._local, self._rehash, *self._registries.values(), *filter(None, [self._object_store])):
            pool.shutdown(wait=False, cancel_futures=True)
