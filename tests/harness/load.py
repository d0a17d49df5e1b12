"""Many clients at once: some pulling an image the mirror holds, some one it
does not. Shared by tests/test_e2e_load.py and scripts/loadtest.py."""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field

from .v2client import RegistryClient


@dataclass
class LoadResult:
    durations: dict[str, list[float]] = field(default_factory=lambda: {"warm": [], "cold": []})
    errors: list[str] = field(default_factory=list)
    verified_bytes: int = 0
    wall: float = 0.0

    def summary(self) -> dict:
        out = {"wall_s": round(self.wall, 3), "errors": len(self.errors), "verified_bytes": self.verified_bytes}
        for kind, values in self.durations.items():
            if values:
                ordered = sorted(values)
                out[kind] = {
                    "pulls": len(values),
                    "p50_s": round(statistics.median(ordered), 3),
                    "p95_s": round(ordered[max(0, int(len(ordered) * 0.95) - 1)], 3),
                    "max_s": round(ordered[-1], 3),
                }
        return out


def run_load(mirror_url: str, warm, cold, warm_clients: int = 50, cold_clients: int = 10,
             timeout: float = 300.0) -> LoadResult:
    """All clients start together (a barrier); each pull verifies every digest
    (RegistryClient.pull raises on any mismatch) against the pushed image."""
    result = LoadResult()
    lock = threading.Lock()
    jobs = [("warm", warm)] * warm_clients + [("cold", cold)] * cold_clients
    barrier = threading.Barrier(len(jobs))

    def pull(kind, image):
        try:
            barrier.wait(timeout)
            start = time.monotonic()
            pulled = RegistryClient(mirror_url).pull(image.repo, image.tag)
            elapsed = time.monotonic() - start
            if pulled.manifest_digest != image.digest or pulled.layers != image.layers:
                raise AssertionError(f"{kind}: got {pulled.manifest_digest}, expected {image.digest}")
            with lock:
                result.durations[kind].append(elapsed)
                result.verified_bytes += pulled.bytes_fetched
        except Exception as exc:  # noqa: BLE001 - every failure is counted, none is fatal
            with lock:
                result.errors.append(f"{kind}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=pull, args=job, daemon=True) for job in jobs]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        if t.is_alive():
            result.errors.append("a client did not finish in time")
    result.wall = time.monotonic() - start
    return result
