"""Where the mirror's blocking work runs, off mitmproxy's event loop.

Two pools, so that a registry that stops answering cannot stall the store:
disk and SQLite work (store lookups, access decisions the mirror can make
alone, stale answers, metrics) never queue behind calls to registries. And one
registry holds at most PER_REGISTRY of the threads that talk to registries, so
a hung one (or a tarpit a proxy client names) leaves the others served.
Measured before: with 40 manifest GETs hanging at one unanswering host, a
stored blob took 60 s, the upstream timeout, to be served.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

LOCAL_THREADS = 8
UPSTREAM_THREADS = 64
PER_REGISTRY = 16


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

    async def upstream(self, registry: str, fn, *args):
        """Run fn(*args), which may wait on registry, in one of its slots."""
        slots = self._slots.get(registry)
        if slots is None:
            slots = self._slots[registry] = _RegistrySlots()
        slots.users += 1
        try:
            async with slots.semaphore:
                return await asyncio.get_running_loop().run_in_executor(self._upstream, fn, *args)
        finally:
            slots.users -= 1
            if slots.users == 0:
                del self._slots[registry]  # registries a client names are not kept

    def shutdown(self) -> None:
        for pool in (self._local, self._upstream):
            pool.shutdown(wait=False, cancel_futures=True)
