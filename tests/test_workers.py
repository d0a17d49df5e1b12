"""Unit tests: the pools, and the bound on threads one registry may hold."""

import asyncio
import threading

import pytest

from addon.workers import LOCAL_THREADS, PER_REGISTRY, ClientGone, Workers

WAIT = 30


class Hangs:
    """A registry call that blocks until released, counting who got a thread."""

    def __init__(self):
        self.release = threading.Event()
        self.running = 0
        self._cond = threading.Condition()

    def __call__(self):
        with self._cond:
            self.running += 1
            self._cond.notify_all()
        return self.release.wait(WAIT)

    def wait_running(self, count):
        with self._cond:
            return self._cond.wait_for(lambda: self.running >= count, WAIT)


def test_a_hung_registry_holds_only_its_share_and_nobody_queues_behind_it():
    async def scenario():
        workers = Workers()
        hangs = Hangs()
        try:
            hung = [asyncio.ensure_future(workers.upstream("http://hung", hangs)) for _ in range(PER_REGISTRY + 8)]
            assert await asyncio.to_thread(hangs.wait_running, PER_REGISTRY)
            # Another registry and the disk are served while the hung one waits.
            assert await asyncio.wait_for(workers.upstream("http://other", lambda: "other"), WAIT) == "other"
            assert await asyncio.wait_for(workers.local(lambda: "local"), WAIT) == "local"
            assert hangs.running == PER_REGISTRY and not any(t.done() for t in hung)
            hangs.release.set()
            assert await asyncio.wait_for(asyncio.gather(*hung), WAIT) == [True] * (PER_REGISTRY + 8)
            assert hangs.running == PER_REGISTRY + 8
        finally:
            hangs.release.set()
            workers.shutdown()

    asyncio.run(scenario())


def test_many_hung_registries_never_delay_a_healthy_one():
    """With one pool of 4 x PER_REGISTRY threads, four registries each
    holding PER_REGISTRY hung calls left a fifth no thread: its call waited
    for the hang to end."""
    async def scenario():
        workers = Workers()
        hangs = Hangs()
        try:
            hung = [asyncio.ensure_future(workers.upstream(f"http://hung-{n}", hangs))
                    for n in range(6) for _ in range(PER_REGISTRY)]
            assert await asyncio.to_thread(hangs.wait_running, 6 * PER_REGISTRY)
            assert await asyncio.wait_for(workers.upstream("http://healthy", lambda: "ok"), WAIT) == "ok"
            assert not any(t.done() for t in hung)
        finally:
            hangs.release.set()
            workers.shutdown()

    asyncio.run(scenario())


def test_an_error_in_a_call_frees_its_thread():
    async def scenario():
        workers = Workers()

        def fails():
            raise OSError("down")

        try:
            for _ in range(PER_REGISTRY + 1):
                with pytest.raises(OSError):
                    await asyncio.wait_for(workers.upstream("http://r", fails), WAIT)
            assert await asyncio.wait_for(workers.upstream("http://r", lambda: 1), WAIT) == 1
        finally:
            workers.shutdown()

    asyncio.run(scenario())


def test_a_call_whose_client_left_while_it_waited_is_not_made():
    async def scenario():
        workers = Workers()
        calls = []
        try:
            with pytest.raises(ClientGone):
                await asyncio.wait_for(workers.upstream("k", calls.append, 1, wanted=lambda: False), WAIT)
            assert calls == []
            assert await asyncio.wait_for(workers.upstream("k", calls.append, 2, wanted=lambda: True), WAIT) is None
            assert calls == [2]
        finally:
            workers.shutdown()

    asyncio.run(scenario())


def test_whether_the_client_still_waits_is_asked_when_the_call_starts_not_when_it_is_queued():
    """A call queued behind a hung registry's full share, whose client
    leaves while it waits, is not made once a thread is free."""
    async def scenario():
        workers = Workers()
        hangs = Hangs()
        calls, asked = [], []
        client_left = threading.Event()

        def wanted():
            asked.append(client_left.is_set())
            return not client_left.is_set()

        try:
            hung = [asyncio.ensure_future(workers.upstream("http://r", hangs)) for _ in range(PER_REGISTRY)]
            assert await asyncio.to_thread(hangs.wait_running, PER_REGISTRY)
            queued = asyncio.ensure_future(workers.upstream("http://r", calls.append, "sent", wanted=wanted))
            await asyncio.sleep(0)  # one turn of the loop: the call is queued, its client still there
            assert asked == []  # not asked while it waits
            client_left.set()
            hangs.release.set()
            with pytest.raises(ClientGone):
                await asyncio.wait_for(queued, WAIT)
            assert calls == [] and asked == [True]
            await asyncio.wait_for(asyncio.gather(*hung), WAIT)
        finally:
            hangs.release.set()
            workers.shutdown()

    asyncio.run(scenario())


def test_a_rehash_does_not_hold_up_the_local_pool():
    async def scenario():
        workers = Workers()
        hangs = Hangs()
        try:
            rehashes = [asyncio.ensure_future(workers.rehash(hangs)) for _ in range(LOCAL_THREADS + 2)]
            assert await asyncio.to_thread(hangs.wait_running, 1)
            assert await asyncio.wait_for(workers.local(lambda: "hit"), WAIT) == "hit"
        finally:
            hangs.release.set()
            await asyncio.wait_for(asyncio.gather(*rehashes), WAIT)
            workers.shutdown()

    asyncio.run(scenario())
