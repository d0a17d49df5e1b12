"""Counters for the people who run the mirror, as Prometheus text and JSON.

Served by the mirror itself at /_registry_cache/metrics and
/_registry_cache/stats on its own listening port; these paths never reach an
upstream. Counters are updated from the event loop, fill threads and blob
server threads alike, hence the lock.
"""

from __future__ import annotations

import threading
from collections import defaultdict

PREFIX = "registry_cache_"
METRICS_PATH = "/_registry_cache/metrics"
STATS_PATH = "/_registry_cache/stats"

# name: (type, help). Labelled counters are keyed by a tuple of label values.
DESCRIPTIONS = {
    "requests_total": ("counter", "Registry requests by kind and outcome (hit, miss, pass, stale, denied, error, fill-failed)."),
    "blob_bytes_served_total": ("counter", "Blob bytes sent to clients, from the store or from a fill in progress."),
    "upstream_blob_bytes_total": ("counter", "Blob bytes fetched from upstream registries."),
    "tier_blob_bytes_total": ("counter", "Blob bytes fills got instead from the shared object store or another node, by tier."),
    "object_store_uploads_total": ("counter", "Verified blobs uploaded to the shared object store, by result (stored, present, refused, failed)."),
    # A gauge: upstream bytes are counted when a fill ends, served bytes as
    # they go out, so the difference dips while a fill runs ahead of its clients.
    "bytes_saved": ("gauge", "Blob bytes sent to clients minus blob bytes fetched upstream, since start."),
    "fill_failures_total": ("counter", "Fills that ended without a verified blob, by reason."),
    "upstream_errors_total": ("counter", "Upstream failures (connection, 429, 5xx) by status."),
    "evictions_total": ("counter", "Blobs evicted from the store to keep it under its size limit."),
    "fills_in_flight": ("gauge", "Blobs being fetched from an upstream right now."),
    "store_bytes": ("gauge", "Bytes used by the blob store."),
    "store_blobs": ("gauge", "Blobs in the store."),
    "store_limit_bytes": ("gauge", "Size limit of the blob store."),
    "upstream_ratelimit_limit": ("gauge", "Pulls the registry allows in its window (its ratelimit-limit header)."),
    "upstream_ratelimit_remaining": ("gauge", "Pulls left in the registry's window (its ratelimit-remaining header)."),
}
LABELS = {
    "requests_total": ("kind", "outcome"),
    "blob_bytes_served_total": ("source",),
    "tier_blob_bytes_total": ("tier",),
    "object_store_uploads_total": ("result",),
    "fill_failures_total": ("reason",),
    "upstream_errors_total": ("status",),
    "upstream_ratelimit_limit": ("registry",),
    "upstream_ratelimit_remaining": ("registry",),
}


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, defaultdict] = {name: defaultdict(float) for name in LABELS}
        self._plain: dict[str, float] = defaultdict(float)

    def count(self, name: str, amount: float = 1, *labels: str) -> None:
        with self._lock:
            if name in LABELS:
                self._counters[name][labels] += amount
            else:
                self._plain[name] += amount

    def set(self, name: str, value: float, *labels: str) -> None:
        """A labelled gauge (a registry's rate limit): its latest value."""
        with self._lock:
            self._counters[name][labels] = value

    def snapshot(self, gauges: dict[str, float]) -> dict[str, dict | float]:
        """Every metric: labelled ones as {label tuple: value}, plain ones as a value."""
        with self._lock:
            values: dict[str, dict | float] = {name: dict(c) for name, c in self._counters.items()}
            values.update(self._plain)
        served = sum(values["blob_bytes_served_total"].values())
        values["bytes_saved"] = max(0.0, served - values.get("upstream_blob_bytes_total", 0.0))
        values.update(gauges)
        return values

    def prometheus(self, gauges: dict[str, float]) -> str:
        lines = []
        for name, value in self.snapshot(gauges).items():
            kind, help_text = DESCRIPTIONS[name]
            lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"]
            if isinstance(value, dict):
                for labels, number in sorted(value.items()):
                    pairs = ",".join(f'{key}="{_escape(val)}"' for key, val in zip(LABELS[name], labels))
                    lines.append(f"{PREFIX}{name}{{{pairs}}} {_number(number)}")
            else:
                lines.append(f"{PREFIX}{name} {_number(value)}")
        return "\n".join(lines) + "\n"

    def stats(self, gauges: dict[str, float]) -> dict:
        values = self.snapshot(gauges)
        requests: dict[str, dict[str, int]] = {}
        for (kind, outcome), number in values["requests_total"].items():
            requests.setdefault(kind, {})[outcome] = int(number)
        served = {source: int(n) for (source,), n in values["blob_bytes_served_total"].items()}
        return {
            "requests": requests,
            "bytes": {
                "served": served,
                "fetched_upstream": int(values.get("upstream_blob_bytes_total", 0)),
                "fetched_from_tiers": {tier: int(n) for (tier,), n in values["tier_blob_bytes_total"].items()},
                "saved": int(values["bytes_saved"]),
            },
            "fills_in_flight": int(values["fills_in_flight"]),
            "fill_failures": {reason: int(n) for (reason,), n in values["fill_failures_total"].items()},
            "upstream_errors": {status: int(n) for (status,), n in values["upstream_errors_total"].items()},
            "upstream_rate_limits": {
                registry: {"limit": int(limit), "remaining": int(values["upstream_ratelimit_remaining"].get((registry,), 0))}
                for (registry,), limit in values["upstream_ratelimit_limit"].items()},
            "object_store_uploads": {result: int(n) for (result,), n in values["object_store_uploads_total"].items()},
            "evictions": int(values.get("evictions_total", 0)),
            "store": {
                "bytes": int(values["store_bytes"]),
                "blobs": int(values["store_blobs"]),
                "limit_bytes": int(values["store_limit_bytes"]),
            },
        }


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)
