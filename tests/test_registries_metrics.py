"""Unit tests: the registries allowlist and the metrics text."""

import pytest

from addon.metrics import Metrics
from addon.registries import DEFAULT_REGISTRIES, base_url_for, parse_registries


def test_registry_entries():
    registries = parse_registries(["docker.io,ghcr.io", "127.0.0.1:5001=http://127.0.0.1:5001", "quay.io=https://q.example/"])
    assert registries == {
        "docker.io": "https://registry-1.docker.io",
        "ghcr.io": "https://ghcr.io",
        "127.0.0.1:5001": "http://127.0.0.1:5001",
        "quay.io": "https://q.example",
    }
    assert base_url_for("GHCR.io", registries) == "https://ghcr.io"
    assert base_url_for("evil.example", registries) is None
    assert set(parse_registries(DEFAULT_REGISTRIES)) == set(DEFAULT_REGISTRIES)


@pytest.mark.parametrize("entry", ["bad host", "a=ftp://x", "a=http://x/path", "a=http://u:p@x", "-x", "a=notaurl"])
def test_bad_registry_entries_are_refused(entry):
    with pytest.raises(ValueError):
        parse_registries([entry])


def test_metrics_render_prometheus_and_stats():
    m = Metrics()
    m.count("requests_total", 1, "blob", "hit")
    m.count("requests_total", 2, "blob", "miss")
    m.count("blob_bytes_served_total", 300, "store")
    m.count("upstream_blob_bytes_total", 100)
    m.count("upstream_errors_total", 1, "429")
    gauges = {"fills_in_flight": 1, "store_bytes": 5, "store_blobs": 2, "store_limit_bytes": 10, "evictions_total": 3}
    text = m.prometheus(gauges)
    assert 'registry_cache_requests_total{kind="blob",outcome="miss"} 2' in text
    assert "registry_cache_bytes_saved 200" in text
    assert "# TYPE registry_cache_bytes_saved gauge" in text  # it can dip while a fill runs ahead
    assert "# TYPE registry_cache_fills_in_flight gauge" in text
    stats = m.stats(gauges)
    assert stats["requests"] == {"blob": {"hit": 1, "miss": 2}}
    assert stats["bytes"] == {"served": {"store": 300}, "fetched_upstream": 100, "fetched_from_tiers": {},
                              "saved": 200}
    assert stats["upstream_errors"] == {"429": 1} and stats["evictions"] == 3
