"""End to end: 50 clients pulling a stored image and 10 pulling a new one,
all at once, through one mitmdump: no errors, every digest verified, one
upstream copy of the new image."""

from __future__ import annotations

from tests.harness.images import make_layer, push_image
from tests.harness.load import run_load
from tests.harness.mirror import Mirror
from tests.harness.upstream import ALICE
from tests.harness.v2client import RegistryClient


def test_fifty_warm_and_ten_cold_clients_at_once(upstream, tmp_path):
    warm = push_image(upstream.url, "load/warm", "v1",
                      [make_layer(1_500_000, 21001), make_layer(700_000, 21002), make_layer(300_000, 21003)],
                      auth=ALICE)
    cold = push_image(upstream.url, "load/cold", "v1",
                      [make_layer(2_000_000, 21004), make_layer(500_000, 21005)], auth=ALICE)
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"]) as mirror:
        RegistryClient(mirror.url).pull(warm.repo, warm.tag)
        mirror.wait_for_log(rf"access: .*/{warm.repo} is public", 60)
        upstream.reset_counters()
        result = run_load(mirror.url, warm, cold, warm_clients=50, cold_clients=10)
        print("load:", result.summary())
        assert result.errors == []
        assert len(result.durations["warm"]) == 50 and len(result.durations["cold"]) == 10
        # The stored image cost nothing upstream; the new one exactly one copy.
        for digest, size in warm.blobs:
            assert upstream.counters.blob_bytes_for(digest) == 0
        for digest, size in cold.blobs:
            assert upstream.counters.blob_bytes_for(digest) == size
