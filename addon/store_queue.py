"""Work for the object store, done in the background, oldest first, while it answers.

Blob uploads (shared_blobs.Uploader) and small records (shared_records) go
out this way, so a request never waits on the object store to write. A few
threads take the oldest item while the store is available; while it is down
they wait (looking again every RETRY_EVERY seconds) and the queue keeps at
most `limit` items, dropping the oldest past that (what is dropped is only
not shared: the next miss elsewhere fetches it once more). An item whose
turn found the store down goes back to the front.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)

RETRY_EVERY = 1.0  # seconds between looks at a store that is down, while items wait


class StoreQueue:
    def __init__(self, available: Callable[[], bool], send: Callable[[Hashable, object], bool], *,
                 threads: int, name: str, limit: int, latest_wins: bool):
        """send(key, value) does one item and returns True to be tried again
        later (the store was down). latest_wins: a value queued for a key that
        waits replaces it (records: last writer wins); otherwise a key that
        waits or is in progress is not queued again (blobs: same bytes)."""
        self._available = available
        self._send = send
        self._limit = limit
        self._latest_wins = latest_wins
        self._waiting: collections.OrderedDict[Hashable, object] = collections.OrderedDict()
        self._busy: set[Hashable] = set()
        self._cond = threading.Condition()
        self._closed = False
        for i in range(threads):
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True).start()

    def put(self, key: Hashable, value: object = None) -> Hashable | None:
        """Queue an item; the key dropped to stay within the limit, if any."""
        with self._cond:
            if self._closed or (not self._latest_wins and (key in self._waiting or key in self._busy)):
                return None
            self._waiting[key] = value
            self._waiting.move_to_end(key)
            dropped = self._waiting.popitem(last=False)[0] if len(self._waiting) > self._limit else None
            self._cond.notify()
            return dropped

    def pending(self) -> int:
        """Items waiting or in progress."""
        with self._cond:
            return len(self._waiting) + len(self._busy)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._waiting and self._available()):
                    self._cond.wait(RETRY_EVERY if self._waiting else None)
                if self._closed:
                    return
                key, value = self._waiting.popitem(last=False)
                self._busy.add(key)
            again = False
            try:
                again = self._send(key, value)
            except Exception:  # noqa: BLE001 - one item's failure must not stop the others
                log.exception("object store: %s failed", str(key)[:200])
            finally:
                with self._cond:
                    self._busy.discard(key)
                    if again and key not in self._waiting:  # a newer value queued meanwhile wins
                        self._waiting[key] = value
                        self._waiting.move_to_end(key, last=False)
