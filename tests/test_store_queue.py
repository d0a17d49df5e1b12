"""StoreQueue (addon/store_queue.py): the background queue that blob uploads
and shared records go out through. The object store is a stand-in here;
tests/test_e2e_shared_tier.py and test_e2e_shared_records.py run the queue
against SeaweedFS."""

from __future__ import annotations

import threading

from addon.store_queue import StoreQueue

WAIT = 10


class Store:
    """Records what was sent; `up` says whether it answers; `gate` holds each send."""

    def __init__(self, up: bool = True):
        self.up = up
        self.sent: list = []
        self.refused = 0  # sends that found it down
        self.gate: threading.Event | None = None
        self.entered = threading.Event()  # a send began
        self.cond = threading.Condition()

    def available(self) -> bool:
        return self.up

    def send(self, key, value) -> bool:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(WAIT)
        with self.cond:
            if not self.up:
                self.refused += 1
                self.cond.notify_all()
                return True
            self.sent.append((key, value))
            self.cond.notify_all()
            return False

    def wait_sent(self, count: int) -> list:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.sent) >= count, WAIT), self.sent
            return list(self.sent)


def test_items_go_out_oldest_first_and_a_waiting_key_takes_the_latest_value():
    store = Store(up=False)
    queue = StoreQueue(store.available, store.send, threads=1, name="t", limit=10, latest_wins=True)
    try:
        queue.put("a", 1)
        queue.put("b", 1)
        queue.put("a", 2)  # waits still: replaced, and now the newest
        assert queue.pending() == 2
        store.up = True
        queue.put("c", 1)  # wakes the thread
        assert store.wait_sent(3) == [("b", 1), ("a", 2), ("c", 1)]
    finally:
        queue.close()


def test_without_latest_wins_a_key_waiting_or_in_progress_is_not_queued_again():
    store = Store()
    store.gate = threading.Event()
    queue = StoreQueue(store.available, store.send, threads=1, name="t", limit=10, latest_wins=False)
    try:
        queue.put("a")
        queue.put("b")
        queue.put("b")
        queue.put("a")  # in progress (or waiting): not again
        assert queue.pending() == 2
        store.gate.set()
        assert store.wait_sent(2) == [("a", None), ("b", None)]
        queue.put("a")  # done: may go again
        assert store.wait_sent(3)[2] == ("a", None)
    finally:
        queue.close()


def test_past_the_limit_the_oldest_is_dropped_and_named():
    store = Store(up=False)
    queue = StoreQueue(store.available, store.send, threads=1, name="t", limit=2, latest_wins=False)
    try:
        assert queue.put("a") is None and queue.put("b") is None
        assert queue.put("c") == "a"
        assert queue.pending() == 2
    finally:
        queue.close()


def test_an_item_that_found_the_store_down_goes_back_to_the_front_and_out_once_it_answers():
    store = Store()
    store.gate = threading.Event()
    queue = StoreQueue(store.available, store.send, threads=1, name="t", limit=10, latest_wins=False)
    try:
        queue.put("a")
        assert store.entered.wait(WAIT)  # taken up; its send waits at the gate
        queue.put("b")
        store.up = False  # the store goes down before a's send
        store.gate.set()
        with store.cond:
            assert store.cond.wait_for(lambda: store.refused == 1, WAIT)
        store.up = True  # a went back to the front: it goes out before b
        assert store.wait_sent(2) == [("a", None), ("b", None)]
    finally:
        queue.close()


def test_a_send_that_raises_does_not_stop_the_queue():
    store = Store()
    failed = threading.Event()

    def send(key, value):
        if key == "bad":
            failed.set()
            raise RuntimeError("one item's own fault")
        return store.send(key, value)

    queue = StoreQueue(store.available, send, threads=1, name="t", limit=10, latest_wins=False)
    try:
        queue.put("bad")
        queue.put("good")
        assert failed.wait(WAIT)
        assert store.wait_sent(1) == [("good", None)]
    finally:
        queue.close()
