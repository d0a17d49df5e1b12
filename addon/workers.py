"""Where the mirror's blocking work runs, off mitmproxy's event loop.

Two pools, so that a registry that stops answering cannot stall the store:
disk and SQLite work (store lookups, access decisions the mirror can make
alone, stale answers, metrics) never queue behind calls to registries.
Measured before: with 40 manifest GETs hanging at one unanswering host, a
stored blob took 60 s, the upstream timeout, to be served.

Calls to registries take a slot first: PER_REGISTRY per registry the operator
chose, and as many for all the registries proxy clients name together (the
caller passes UNLISTED as the key for those), so hung hosts a client names
(any number of them) hold at most that many threads, and the operator's
registries keep the rest. A call whose client has left while it waited for a
slot is not made: mitmproxy does not cancel an addon's hook when its client
disconnects, and a backlog for a hung registry would otherwise go out anyway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

LOCAL_THREADS = 8
UPSTREAM_THREADS = 64
PER_REGISTRY = 16
UNLISTED = "registries nobody chose"  # the slot key they share


class ClientGone(Exception):
    """The client left while its call waited for a slot; the call was not made."""


@dataclass
class _RegistrySlots:
    semaphore: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(PER_REGISTRY))
    users: int = 0  # calls holding or waiting for a slot


class Workers:
    """The two pools. Call from the event loop only (the slot map is not locked)."""

    def __init__(self) -> None:
        self._local = ThreadPoolExecutor(LOCAL_THREADS, thread_name_prefix="registry-cache-local")
        self._upstream = ThreadPoolExecutor(UPSTREAM_THREADS, thread_name_prefix="registry-cache-upstream")
        self._slots: dict[str, _RegistrySlots] = {}

    async def local(self, fn, *args):
        """Run fn(*args), which touches only the disk, in the local pool."""
        return await asyncio.get_running_loop().run_in_executor(self._local, fn, *args)

    async def upstream(self, key: str, fn, *args, wanted: Callable[[], bool] | None = None):
        """Run fn(*args), which may wait on a registry, in one of key's slots
        (key: the registry, or UNLISTED); if wanted() says no once a slot is
        free, raise ClientGone instead."""
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = _RegistrySlots()
        slots.users += 1
        try:
            async with slots.semaphore:
                if wanted is not None and not wanted():
                    raise ClientGone()
                return await asyncio.get_running_loop().run_in_executor(self._upstream, fn, *args)
        finally:
            slots.users -= 1
            if slots.users == 0:
                del self._slots[key]

    def shutdown(self) -> None:
        for pool in (self._local, self._upstream):
            pool.shutdown(wait=False, cancel_futures=True)
