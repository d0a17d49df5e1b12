#!/usr/bin/env python3
"""Load figures: N clients pulling a stored image and M pulling a new one, at
once, through one mitmdump (the real upstream and mirror the tests use).

    .venv/bin/python scripts/loadtest.py [--warm 50] [--cold 10] [--layer-mb 20]

Prints per-kind pull times (p50/p95/max), errors, upstream copies of the new
image, and mitmdump's peak RSS. Everything listens on 127.0.0.1 and is stopped
at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.harness.images import make_layer, push_image  # noqa: E402
from tests.harness.load import run_load  # noqa: E402
from tests.harness.mirror import Mirror  # noqa: E402
from tests.harness.upstream import ALICE, Upstream  # noqa: E402
from tests.harness.v2client import RegistryClient  # noqa: E402


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warm", type=int, default=50, help="clients pulling a stored image")
    ap.add_argument("--cold", type=int, default=10, help="clients pulling an image not stored yet")
    ap.add_argument("--layer-mb", type=float, default=20, help="size of each image's biggest layer")
    args = ap.parse_args()
    big = int(args.layer_mb * 1_000_000)
    with tempfile.TemporaryDirectory(prefix="registry-cache-load-") as tmp, \
            Upstream(workdir=str(Path(tmp) / "upstream")) as upstream:
        warm = push_image(upstream.url, "load/warm", "v1", [make_layer(big, 1), make_layer(big // 4, 2)], auth=ALICE)
        cold = push_image(upstream.url, "load/cold", "v1", [make_layer(big, 3), make_layer(big // 4, 4)], auth=ALICE)
        with Mirror(Path(tmp) / "mirror", [f"reverse:{upstream.url}"]) as mirror:
            RegistryClient(mirror.url).pull(warm.repo, warm.tag)
            mirror.wait_for_log(rf"access: .*/{warm.repo} is public", 60)
            upstream.reset_counters()
            result = run_load(mirror.url, warm, cold, warm_clients=args.warm, cold_clients=args.cold)
            summary = result.summary()
            summary["upstream_copies_of_new_image"] = round(
                sum(upstream.counters.blob_bytes_for(d) for d, _ in cold.blobs) / cold.blob_bytes, 3)
            summary["upstream_bytes_of_stored_image"] = sum(upstream.counters.blob_bytes_for(d) for d, _ in warm.blobs)
            summary["mitmdump_peak_rss_mb"] = round(peak_rss_mb(mirror.proc.pid), 1)
            summary["image_mb"] = {"warm": warm.blob_bytes / 1e6, "cold": cold.blob_bytes / 1e6}
    print(json.dumps(summary, indent=1))
    for error in result.errors[:20]:
        print("ERROR", error)
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
