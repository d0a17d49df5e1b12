"""Unit tests: the two pools, and the bound on threads one registry may hold."""

import asyncio
import threading

import pytest

from addon.workers import PER_REGISTRY, ClientGone, Workers

WAIT = 30


def test_a_hung_registry_holds_only_its_share_and_nobody_queues_behind_it():
    async def scenario():
        workers = Workers()
        release = threading.Event()
        running = []
        started = threading.Condition()

        def hangs():
            with started:
                running.append(1)
                started.notify_all()
            return release.wait(WAIT)

        def wait_running(count):
            with started:
                return started.wait_for(lambda: len(running) >= count, WAIT)

        try:
            hung = [asyncio.ensure_future(workers.upstream("http://hung", hangs)) for _ in range(PER_REGISTRY + 8)]
            assert await asyncio.to_thread(wait_running, PER_REGISTRY)
            # Another registry and the disk are served while the hung one waits.
            assert await asyncio.wait_for(workers.upstream("http://other", lambda: "other"), WAIT) == "other"
            assert await asyncio.wait_for(workers.local(lambda: "local"), WAIT) == "local"
            assert len(running) == PER_REGISTRY and not any(t.done() for t in hung)
            release.set()
            assert await asyncio.wait_for(asyncio.gather(*hung), WAIT) == [True] * (PER_REGISTRY + 8)
            assert len(running) == PER_REGISTRY + 8
            assert workers._slots == {}  # registries a client named are not kept
        finally:
            release.set()
            workers.shutdown()

    asyncio.run(scenario())


def test_an_error_in_a_call_frees_its_slot():
    async def scenario():
        workers = Workers()

        def fails():
            raise OSError("down")

        try:
            for _ in range(PER_REGISTRY + 1):
                try:
                    await asyncio.wait_for(workers.upstream("http://r", fails), WAIT)
                except OSError:
                    pass
            assert await asyncio.wait_for(workers.upstream("http://r", lambda: 1), WAIT) == 1
            assert workers._slots == {}
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
            assert calls == [] and workers._slots == {}
            assert await asyncio.wait_for(workers.upstream("k", calls.append, 2, wanted=lambda: True), WAIT) is None
            assert calls == [2]
        finally:
            workers.shutdown()

    asyncio.run(scenario())
