"""scripts/cachectl.py, the store's admin tool, and the store methods it uses.

Unit level: a real DiskBlobStore in a temp directory, cachectl's main() run in
this process (ls, du, verify, purge, import from fake containerd and
distribution layouts). End to end: the real upstream (distribution), mirrors
running in mitmdump, cachectl run as a separate process next to them, and an
import from the upstream's own storage root into a running mirror's store.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from addon.access import SeenIndex
from addon.layout import CacheLayout
from addon.manifests import ManifestStore, StoredManifest
from addon.registries import origin_of
from addon.store import DiskBlobStore
from tests.harness.fresh import fresh_image, unique_seed
from tests.harness.mirror import Mirror
from tests.harness.upstream import ALICE
from tests.harness.v2client import RegistryClient
from tests.test_store import digest_of, put

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cachectl.py"
_spec = importlib.util.spec_from_file_location("cachectl", SCRIPT)
cachectl = importlib.util.module_from_spec(_spec)
sys.modules["cachectl"] = cachectl  # dataclasses look their module up there
_spec.loader.exec_module(cachectl)

REGISTRY = "https://registry-1.docker.io"
OTHER = "http://127.0.0.1:5999"
DAY = 86400.0
RUN_TIMEOUT = 120


def blob(seed: int, size: int = 10_000) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32) + bytes([seed % 256]) * (size % 32)


def set_access_time(cache_dir: Path, digest: str, when: float) -> None:
    con = sqlite3.connect(cache_dir / "cache.db", isolation_level=None, timeout=60)
    try:
        assert con.execute("UPDATE Cache SET access_time = ? WHERE key = ?", (when, digest)).rowcount == 1
    finally:
        con.close()


def access_times(cache_dir: Path) -> dict[str, float]:
    con = sqlite3.connect(cache_dir / "cache.db", timeout=60)
    try:
        return dict(con.execute("SELECT key, access_time FROM Cache").fetchall())
    finally:
        con.close()


def stored_digests(cache_dir: Path) -> set[str]:
    con = sqlite3.connect(cache_dir / "cache.db", timeout=60)
    try:
        return {key for (key,) in con.execute("SELECT key FROM Cache")}
    finally:
        con.close()


def ctl(capsys, *argv) -> tuple[int, str, str]:
    code = cachectl.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_ctl(*argv) -> subprocess.CompletedProcess:
    """cachectl as its own process, as an admin runs it."""
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, cwd=ROOT)


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def store(cache_dir):
    s = DiskBlobStore(cache_dir, size_limit=1 << 30)
    yield s
    s.close()


@pytest.fixture
def seen(cache_dir, store):
    index = SeenIndex(cache_dir / "access.sqlite3")
    yield index
    index.close()


@pytest.fixture
def three(store, seen, cache_dir):
    """a: seen in library/alpine only; b: in library/alpine and ghcr-ish app; c: in no repository.
    Access times: a oldest (10 days), b 5 days, c now."""
    a, b, c = put(store, blob(1, 30_000)), put(store, blob(2, 20_000)), put(store, blob(3, 10_000))
    seen.record(REGISTRY, "library/alpine", a)
    seen.record(REGISTRY, "library/alpine", b)
    seen.record(OTHER, "org/app", b)
    now = time.time()
    set_access_time(cache_dir, a, now - 10 * DAY)
    set_access_time(cache_dir, b, now - 5 * DAY)
    set_access_time(cache_dir, c, now)
    return a, b, c


# -- the store methods cachectl uses --------------------------------------------------

def test_store_entries_are_in_lru_order_and_listing_touches_nothing(store, three, cache_dir):
    a, b, c = three
    before = access_times(cache_dir)
    entries = store.entries()
    assert [e.digest for e in entries] == [a, b, c]
    assert [e.size for e in entries] == [30_000, 20_000, 10_000]
    assert all(e.path.is_file() and e.path.parent.parent.parent == cache_dir for e in entries)
    assert access_times(cache_dir) == before


def test_store_drop_only_removes_the_entry_that_was_listed(store, cache_dir):
    data = blob(7)
    digest = put(store, data)
    listed = store.entries()[0]
    put(store, data)  # committed again (a new file) since it was listed
    assert not store.drop(listed)
    assert digest in store
    fresh = store.entries()[0]
    store.open(digest).close()  # read since it was listed
    assert not store.drop(fresh, unless_read_since=True)
    assert digest in store
    assert store.drop(fresh)
    assert digest not in store and not fresh.path.exists()
    assert not store.drop(fresh)  # already gone


def test_store_link_part_commits_the_same_inode(store, tmp_path):
    data = blob(8, 50_000)
    source = tmp_path / "source"
    source.write_bytes(data)
    digest = digest_of(data)
    part = store.link_part(digest, source)
    assert Path(part.path).parent == store.fills_dir
    store.commit(digest, part, len(data))
    os.close(part.fd)
    entry = store.entries()[0]
    assert entry.path.stat().st_ino == source.stat().st_ino
    assert source.read_bytes() == data  # the source is untouched
    assert list(store.fills_dir.iterdir()) == []
    with store.open(digest).file as f:
        assert f.read() == data


def test_stored_size_limit(tmp_path):
    assert CacheLayout(tmp_path / "none").stored_size_limit() is None
    s = DiskBlobStore(tmp_path / "c", size_limit=123_456_789)
    try:
        assert CacheLayout(tmp_path / "c").stored_size_limit() == 123_456_789  # while open...
    finally:
        s.close()
    assert CacheLayout(tmp_path / "c").stored_size_limit() == 123_456_789  # ...and after


# -- ls, du ------------------------------------------------------------------------------

def test_ls_lists_blobs_lru_first_with_their_repositories(capsys, three, cache_dir):
    a, b, c = three
    code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "ls")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [a, b, c]
    assert lines[0].split()[1:] == ["30000", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(
        access_times(cache_dir)[a])), "docker.io/library/alpine"]
    assert lines[1].split()[3] == "127.0.0.1:5999/org/app,docker.io/library/alpine"
    assert lines[2].split()[3] == "-"

    code, out, _ = ctl(capsys, "ls", "--json", "--cache-dir", cache_dir)  # --cache-dir after the command
    assert code == 0
    rows = json.loads(out)
    assert [row["digest"] for row in rows] == [a, b, c]
    assert rows[1]["repositories"] == [
        {"registry": OTHER, "repository": "org/app", "name": "127.0.0.1:5999/org/app"},
        {"registry": REGISTRY, "repository": "library/alpine", "name": "docker.io/library/alpine"},
    ]
    assert rows[2]["repositories"] == [] and rows[2]["size"] == 10_000
    assert all(row["last_access"].endswith("Z") for row in rows)


def test_du_reports_bytes_count_limit_manifests_and_parts(capsys, store, three, cache_dir):
    manifests = ManifestStore(cache_dir / "manifests")
    for n in range(3):
        body = json.dumps({"n": n}).encode()
        manifests.put(StoredManifest(digest_of(body), "application/json", body))
    manifests.remember_tag(REGISTRY, "library/alpine", "latest", digest_of(b"x"))
    manifests.close()
    live = store.new_part(digest_of(b"in flight"))
    os.write(live.fd, b"12345")
    try:
        code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "du", "--json")
        assert code == 0
        report = json.loads(out)
        assert report["blobs"] == 3 and report["blob_bytes"] == 60_000
        assert report["total_bytes"] >= 60_000 and report["size_limit"] == 1 << 30
        assert (report["manifests"], report["tags"]) == (3, 1)
        assert (report["part_files"], report["part_bytes"]) == (1, 5)
        code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "du")
        assert code == 0
        assert "blobs       3 (58.6 KiB, 60000 bytes)" in out
        assert "size limit  1.0 GiB (1073741824 bytes" in out
        assert "manifests   3 (and 1 tags)" in out
    finally:
        os.close(live.fd)
        store.discard_part(live)


def test_a_missing_store_is_a_clear_error(capsys, tmp_path):
    code, _, err = ctl(capsys, "--cache-dir", tmp_path / "nowhere", "ls")
    assert code == 2
    assert "no registry-cache store at" in err and "--cache-dir" in err
    assert not (tmp_path / "nowhere").exists()  # looking created nothing


# -- verify ---------------------------------------------------------------------------------

def test_verify_drops_a_flipped_byte_and_a_missing_file(capsys, store, cache_dir):
    good, rotten, missing = (put(store, blob(n, 40_000)) for n in (11, 12, 13))
    entries = {e.digest: e for e in store.entries()}
    path = entries[rotten].path
    before = path.stat()
    with open(path, "r+b") as f:  # bit rot: one byte flipped, mtime as it was
        f.seek(1234)
        byte = f.read(1)[0]
        f.seek(1234)
        f.write(bytes([byte ^ 1]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    entries[missing].path.unlink()
    times = access_times(cache_dir)

    code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "verify")
    assert code == 1
    assert f"dropped {rotten}: content hashes to sha256:" in out
    assert f"dropped {missing}: file missing" in out
    assert "verify: 3 blobs (117.2 KiB) checked" in out
    assert "1 intact, 2 dropped (1 corrupt, 1 missing)" in out
    assert stored_digests(cache_dir) == {good}
    assert not path.exists()
    assert access_times(cache_dir)[good] == times[good]  # verifying is not reading

    code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "verify")
    assert code == 0
    assert "1 intact, 0 dropped" in out


def test_verify_of_an_empty_store(capsys, store, cache_dir):
    code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "verify")
    assert code == 0 and "verify: 0 blobs" in out


# -- purge ----------------------------------------------------------------------------------

def test_purge_older_than_by_last_access_and_dry_run(capsys, three, cache_dir):
    a, b, c = three
    code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "purge", "--older-than", "4", "--dry-run")
    assert code == 0
    assert [line.split()[:3] for line in out.splitlines()[:-1]] == [
        ["would", "remove", a], ["would", "remove", b]]
    assert "would remove 2 blobs" in out
    assert stored_digests(cache_dir) == {a, b, c}  # nothing removed

    code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "purge", "--older-than", "7")
    assert code == 0
    assert out.splitlines()[0].startswith(f"removed {a}  30000 bytes  last access ")
    assert "docker.io/library/alpine  (not read for 7 days)" in out.splitlines()[0]
    assert "purge: removed 1 blobs (29.3 KiB); the store now holds 2 blobs" in out
    assert stored_digests(cache_dir) == {b, c}


def test_purge_older_than_keeps_a_blob_read_since_it_was_listed(store, three, cache_dir):
    a, b, c = three
    entry = store.entries()[0]
    assert entry.digest == a
    store.open(a).close()  # a client read it just now
    assert not store.drop(entry, unless_read_since=True)
    assert a in store


def test_purge_to_size_evicts_least_recently_used_first(capsys, store, three, cache_dir):
    a, b, c = three
    used = store.usage()[0]
    target = used - 30_000 - 5_000  # a is not enough, a and b are
    code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "purge", "--to-size", target, "--dry-run")
    assert code == 0
    assert [line.split()[2] for line in out.splitlines()[:-1]] == [a, b]
    assert stored_digests(cache_dir) == {a, b, c}
    code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "purge", "--to-size", target)
    assert code == 0
    assert [line.split()[1] for line in out.splitlines()[:-1]] == [a, b]
    assert stored_digests(cache_dir) == {c}
    assert store.usage()[0] <= target
    code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "purge", "--to-size", "1g")
    assert code == 0 and "removed 0 blobs" in out


def test_purge_repo_removes_blobs_seen_only_there(capsys, three, cache_dir):
    a, b, c = three
    for name in ("library/alpine", "docker.io/library/alpine", "alpine", f"{REGISTRY}/library/alpine"):
        code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "purge", "--repo", name, "--dry-run")
        assert code == 0
        assert [line.split()[2] for line in out.splitlines()[:-1]] == [a], name  # b is also in org/app
    code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "purge", "--repo", "library/alpine")
    assert code == 0 and out.startswith(f"removed {a}")
    assert stored_digests(cache_dir) == {b, c}  # c (no repository) never matches
    code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "purge", "--repo", "127.0.0.1:5999/org/app",
                       "--older-than", "6")
    assert code == 0 and "removed 0 blobs" in out  # b is in two repositories
    code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "purge", "--repo", "nothing/here")
    assert code == 0 and "removed 0 blobs" in out


def test_purge_repo_by_registry_name_wherever_the_mirror_fetched_it(capsys, store, seen, cache_dir):
    """The mirror records a registry by the origin it fetched from (with the
    port spelled out), so a registry-qualified --repo must be translated:
    Docker Hub itself is https://registry-1.docker.io:443 in the index, and a
    mirror whose registries option maps docker.io elsewhere records that URL."""
    hub, mapped, ghcr, other = (put(store, blob(n)) for n in (90, 91, 92, 93))
    seen.record(origin_of(REGISTRY), "library/big", hub)  # as the mirror records Docker Hub
    seen.record(origin_of("http://127.0.0.1:5999"), "library/big", mapped)  # docker.io=http://127.0.0.1:5999
    seen.record(origin_of("https://ghcr.io"), "org/app", ghcr)
    seen.record(origin_of("http://127.0.0.1:5998"), "library/big", other)  # another registry's library/big

    def purged(*argv) -> list[str]:
        code, out, err = ctl(capsys, "--cache-dir", cache_dir, "purge", "--dry-run", *argv)
        assert code == 0, err
        return sorted(line.split()[2] for line in out.splitlines()[:-1])

    for name in ("docker.io/library/big", "docker.io/big", "big", "registry-1.docker.io/library/big"):
        assert purged("--repo", name) == [hub], name
    mapping = ["--registries", "docker.io=http://127.0.0.1:5999,ghcr.io"]
    for name in ("docker.io/library/big", "docker.io/big", "index.docker.io/library/big"):
        assert purged("--repo", name, *mapping) == sorted([hub, mapped]), name
    assert purged("--repo", "127.0.0.1:5999/library/big", *mapping) == [mapped]  # its host still names it
    assert purged("--repo", "127.0.0.1:5998/library/big") == [other]
    assert purged("--repo", "127.0.0.1:5998/big") == []  # library/ is Docker Hub's alone
    assert purged("--repo", "library/big") == sorted([hub, mapped, other])  # unqualified: any registry
    assert purged("--repo", "ghcr.io/org/app") == [ghcr]
    assert purged("--repo", "ghcr.io:443/org/app") == [ghcr]

    code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "ls", "--json", *mapping)
    names = {row["digest"]: [r["name"] for r in row["repositories"]] for row in json.loads(out)}
    assert names == {hub: ["docker.io/library/big"], mapped: ["docker.io/library/big"],
                     ghcr: ["ghcr.io/org/app"], other: ["127.0.0.1:5998/library/big"]}
    with pytest.raises(SystemExit) as exit_:
        cachectl.main(["--cache-dir", str(cache_dir), "ls", "--registries", "docker.io=ftp://x"])
    assert exit_.value.code == 2 and "--registries: not a registry URL" in capsys.readouterr().err


def test_reading_a_store_loads_no_mitmproxy(three, cache_dir):
    """cachectl runs where the mirror's store is, not necessarily where mitmproxy is."""
    for command in (["ls"], ["du"], ["purge", "--to-size", "1g", "--dry-run"]):
        done = subprocess.run([sys.executable, "-X", "importtime", str(SCRIPT), "--cache-dir", str(cache_dir),
                               *command], capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        imported = [line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
        assert "addon.layout" in imported and "diskcache" in imported  # the check sees imports at all
        assert not [name for name in imported if name.split(".")[0] == "mitmproxy"], command


def test_purge_needs_a_selection_and_valid_arguments(capsys, three, cache_dir):
    code, _, err = ctl(capsys, "--cache-dir", cache_dir, "purge")
    assert code == 2 and "--older-than DAYS, --to-size SIZE and/or --repo NAME" in err
    with pytest.raises(SystemExit) as exit_:
        cachectl.main(["--cache-dir", str(cache_dir), "purge", "--to-size", "lots"])
    assert exit_.value.code == 2
    assert "not a size: 'lots'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cachectl.main(["--cache-dir", str(cache_dir), "purge", "--older-than", "-1"])
    assert len(stored_digests(cache_dir)) == 3


def test_no_command_touches_a_live_part_file(capsys, store, three, cache_dir, tmp_path):
    """A fill in progress (its part file locked, as the mirror's are) survives every command."""
    live = store.new_part(digest_of(b"filling"))
    os.write(live.fd, b"half")
    orphan = store.fills_dir / "sha256-dead.x.part"  # left by a killed mirror: the mirror sweeps it
    orphan.write_bytes(b"old")
    source = fake_containerd(tmp_path / "ctrd", [blob(40)])[0]
    try:
        for argv in (["ls"], ["du"], ["verify"], ["purge", "--to-size", "0"], ["import", source]):
            ctl(capsys, "--cache-dir", cache_dir, *argv)
            assert Path(live.path).read_bytes() == b"half"
            assert orphan.exists()
    finally:
        os.close(live.fd)
        store.discard_part(live)


# -- import -------------------------------------------------------------------------------------

def fake_containerd(root: Path, blobs: list[bytes], corrupt: list[bytes] = ()) -> tuple[Path, list[str]]:
    """A containerd root: content blobs by hex name, plus an ingest in progress and stray files."""
    content = root / "io.containerd.content.v1.content"
    (content / "blobs" / "sha256").mkdir(parents=True)
    (content / "ingest" / "x").mkdir(parents=True)
    (content / "ingest" / "x" / "data").write_bytes(b"partial download")
    (content / "blobs" / "sha256" / "not-a-digest").write_bytes(b"stray")
    digests = []
    for data in blobs:
        digests.append(digest_of(data))
        (content / "blobs" / "sha256" / digests[-1][7:]).write_bytes(data)
    for data in corrupt:  # named by the digest of other bytes
        digests.append(digest_of(data + b"!"))
        (content / "blobs" / "sha256" / digests[-1][7:]).write_bytes(data)
    return root, digests


def fake_distribution(root: Path, blobs: list[bytes], corrupt: list[bytes] = ()) -> tuple[Path, list[str]]:
    """A distribution storage root: blobs/sha256/<xx>/<hex>/data, plus repository links."""
    base = root / "docker" / "registry" / "v2"
    (base / "repositories" / "library" / "x" / "_layers").mkdir(parents=True)
    digests = []
    for data, good in [(d, True) for d in blobs] + [(d, False) for d in corrupt]:
        digest = digest_of(data if good else data + b"!")
        hex_ = digest[7:]
        (base / "blobs" / "sha256" / hex_[:2] / hex_).mkdir(parents=True)
        (base / "blobs" / "sha256" / hex_[:2] / hex_ / "data").write_bytes(data)
        digests.append(digest)
    return root, digests


def test_import_containerd_links_verified_blobs_and_skips_a_corrupt_one(capsys, store, cache_dir, tmp_path):
    good = [blob(20, 70_000), blob(21, 1)]
    root, (d1, d2, bad) = fake_containerd(tmp_path / "containerd", good, corrupt=[blob(22, 5_000)])
    code, out, err = ctl(capsys, "--cache-dir", cache_dir, "import", "--containerd", root)
    assert code == 1  # something was skipped
    assert f"imported {d1}  70000 bytes  (linked)" in out
    assert f"imported {d2}  1 bytes  (linked)" in out
    assert f"bad {bad}: " in err and "skipped" in err
    assert "import: 2 blobs imported (2 linked, 0 copied" in out and "1 bad (skipped)" in out
    assert "1 files ignored" in out  # the stray name; the ingest is not looked at
    assert stored_digests(cache_dir) == {d1, d2}
    source = root / "io.containerd.content.v1.content" / "blobs" / "sha256"
    entry = {e.digest: e for e in store.entries()}[d1]
    assert entry.path.stat().st_ino == (source / d1[7:]).stat().st_ino  # a hard link: no copy
    assert list(store.fills_dir.iterdir()) == []  # the bad one's part file is gone too
    assert (source / bad[7:]).exists()  # the source store is left alone
    with store.open(d1).file as f:
        assert f.read() == good[0]
    # imported blobs belong to no repository
    code, out, _ = ctl(capsys, "--cache-dir", cache_dir, "ls", "--json")
    assert all(row["repositories"] == [] for row in json.loads(out))


def test_import_distribution_by_copy(capsys, store, cache_dir, tmp_path):
    good = [blob(30, 100_000), blob(31, 2_000)]
    root, (d1, d2, bad) = fake_distribution(tmp_path / "registry", good, corrupt=[blob(32, 3_000)])
    code, out, err = ctl(capsys, "--cache-dir", cache_dir, "import", "--distribution", root, "--copy")
    assert code == 1
    assert f"imported {d1}  100000 bytes  (copied)" in out and f"imported {d2}  2000 bytes  (copied)" in out
    assert f"bad {bad}" in err
    assert stored_digests(cache_dir) == {d1, d2}
    hex_ = d1[7:]
    entry = {e.digest: e for e in store.entries()}[d1]
    src = root / "docker/registry/v2/blobs/sha256" / hex_[:2] / hex_ / "data"
    assert entry.path.stat().st_ino != src.stat().st_ino
    assert entry.path.read_bytes() == good[0]
    assert list(store.fills_dir.iterdir()) == []


def test_import_detects_layouts_skips_stored_blobs_and_makes_a_new_store(capsys, tmp_path):
    ctrd, ctrd_digests = fake_containerd(tmp_path / "containerd", [blob(50), blob(51)])
    dist, dist_digests = fake_distribution(tmp_path / "registry", [blob(51), blob(52)])
    new = tmp_path / "new-store"
    code, out, err = ctl(capsys, "--cache-dir", new, "import", ctrd, dist, "--cache-size", "500m")
    assert code == 0
    assert "import: 3 blobs imported" in out and "1 already stored" in out  # blob 51 is in both
    # root made it: the operator hears whose it is now (a mirror run as another user needs it)
    assert ("made the new store" in err and "chown -R" in err) == (os.geteuid() == 0)
    assert stored_digests(new) == set(ctrd_digests) | set(dist_digests)
    assert CacheLayout(new).stored_size_limit() == 500 << 20
    # the content directory itself is accepted as a containerd root as well
    code, out, _ = ctl(capsys, "--cache-dir", new, "import", ctrd / "io.containerd.content.v1.content")
    assert code == 0 and "import: 0 blobs imported" in out and "2 already stored" in out


def test_import_refuses_what_is_not_a_store(capsys, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("not a cache")
    ctrd, _ = fake_containerd(tmp_path / "containerd", [blob(60)])
    code, _, err = ctl(capsys, "--cache-dir", tmp_path / "busy", "import", ctrd)
    assert code == 2 and "is not empty and holds no registry-cache store" in err
    code, _, err = ctl(capsys, "--cache-dir", tmp_path / "c", "import", "--distribution", ctrd)
    assert code == 2 and "is not a distribution storage root" in err
    code, _, err = ctl(capsys, "--cache-dir", tmp_path / "c", "import", tmp_path / "missing")
    assert code == 2 and "no such directory" in err
    assert not (tmp_path / "c").exists()


def test_import_keeps_imports_under_the_size_limit(capsys, tmp_path):
    cache = tmp_path / "small"
    small = DiskBlobStore(cache, size_limit=200_000)
    small.close()
    root, digests = fake_containerd(tmp_path / "containerd", [blob(70, 300_000), blob(71, 60_000)])
    code, out, err = ctl(capsys, "--cache-dir", cache, "import", root)
    assert code == 1
    too_big = digest_of(blob(70, 300_000))
    assert f"skipped {too_big}: 300000 bytes, larger than the store's size limit" in err
    assert stored_digests(cache) == {digest_of(blob(71, 60_000))}


def test_help_for_every_command_and_exit_codes_as_a_process(three, cache_dir):
    for argv in ([], ["ls"], ["du"], ["verify"], ["purge"], ["import"]):
        done = run_ctl(*argv, "--help")
        assert done.returncode == 0, done.stderr
        assert "usage: cachectl.py" in done.stdout
    assert "Access rules are those of a fill" in run_ctl("import", "--help").stdout
    done = run_ctl("--cache-dir", cache_dir, "du")
    assert done.returncode == 0 and "blobs       3 " in done.stdout
    done = run_ctl("--cache-dir", cache_dir)
    assert done.returncode == 2 and "required: COMMAND" in done.stderr


NOBODY = 65534


@pytest.fixture
def shared_dir():
    """A directory other users can reach (pytest's own tmp tree is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="cachectl-owner-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_root_works_in_the_store_as_its_owner_and_reads_sources_as_root(shared_dir, tmp_path):
    cache = shared_dir / "cache"
    DiskBlobStore(cache, size_limit=1 << 30).close()
    for path in [cache, *cache.rglob("*")]:
        os.lchown(path, NOBODY, NOBODY)
    # a source only root can read (pytest's tmp tree is 0700 root)
    root, digests = fake_containerd(tmp_path / "containerd", [blob(80, 20_000), blob(81, 30_000)])
    done = run_ctl("--cache-dir", cache, "import", root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("(copied)") == 2  # nobody may not link root's files: copied
    assert stored_digests(cache) == set(digests)
    done = run_ctl("--cache-dir", cache, "purge", "--to-size", "70k")
    assert done.returncode == 0 and "removed 1 blobs" in done.stdout, done.stdout + done.stderr
    for name in ("ls", "du", "verify"):
        done = run_ctl("--cache-dir", cache, name)
        assert done.returncode == 0, done.stdout + done.stderr
    made_by_root = [str(p) for p in [cache, *cache.rglob("*")] if p.lstat().st_uid != NOBODY]
    assert made_by_root == []  # the mirror (running as nobody) can use everything


def test_another_user_is_told_whose_store_it_is(capsys, store, cache_dir, monkeypatch):
    owner = cache_dir.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1000 if owner else 1000)  # neither owner nor root
    code, _, err = ctl(capsys, "--cache-dir", cache_dir, "ls")
    assert code == 2
    assert "belongs to user" in err and "Run as" in err and "or as root" in err


# -- end to end -------------------------------------------------------------------------------

def test_e2e_ls_of_a_running_mirror_then_import_into_another_running_mirror(upstream, pushed_images, tmp_path):
    alpine, private = pushed_images.alpine, pushed_images.private
    with Mirror(tmp_path / "a", [f"reverse:{upstream.url}"]) as first:
        RegistryClient(first.url).pull(alpine.repo, alpine.tag)
        first.wait_stored([d for d, _ in alpine.blobs], RUN_TIMEOUT)
        done = run_ctl("--cache-dir", first.cache_dir, "ls", "--json")
        assert done.returncode == 0, done.stderr
        rows = {row["digest"]: row for row in json.loads(done.stdout)}
        assert set(rows) == {d for d, _ in alpine.blobs}
        for digest, size in alpine.blobs:
            assert rows[digest]["size"] == size
            assert [(r["registry"], r["repository"]) for r in rows[digest]["repositories"]] == \
                [(upstream.url, alpine.repo)]

    layer = private.layers[0][0]
    with Mirror(tmp_path / "b", [f"reverse:{upstream.url}"]) as second:
        # import from the upstream's own storage, into the store of a mirror that is running
        done = run_ctl("--cache-dir", second.cache_dir, "import", "--distribution", upstream.rootdir)
        assert done.returncode == 0, done.stdout + done.stderr
        same_fs = os.stat(upstream.rootdir).st_dev == os.stat(second.cache_dir).st_dev
        assert f"imported {layer}  {private.layers[0][1]} bytes  ({'linked' if same_fs else 'copied'})" \
            in done.stdout
        upstream.reset_counters()

        # Access rules apply to imported blobs: the private layer is in the store,
        # yet an anonymous client naming it through a public repository gets no bytes...
        anonymous = RegistryClient(second.url)
        for repo in (alpine.repo, private.repo):
            resp = anonymous.request("GET", f"/v2/{repo}/blobs/{layer}")
            assert resp.status_code in (401, 403, 404), (repo, resp.status_code)
            assert len(resp.content) < private.layers[0][1]
            second.wait_for_log(rf"GET {repo} blob {layer} denied", timeout=30)  # the gate said no
        # ...nor does alice through a repository that does not hold it.
        resp = RegistryClient(second.url, *ALICE).request("GET", f"/v2/{alpine.repo}/blobs/{layer}")
        assert resp.status_code == 404
        assert upstream.counters.blob_bytes == 0

        # Those who may pull get everything from the imported blobs: no blob bytes upstream.
        result = RegistryClient(second.url).pull(alpine.repo, alpine.tag)
        assert result.layers == alpine.layers
        assert RegistryClient(second.url, *ALICE).pull(private.repo, private.tag).layers == private.layers
        assert upstream.counters.blob_bytes == 0
        assert upstream.counters.blob_gets == 0
        assert upstream.counters.blob_heads >= len(alpine.blobs) + len(private.blobs)  # the gate asked

        done = run_ctl("--cache-dir", second.cache_dir, "verify")
        assert done.returncode == 0, done.stdout + done.stderr
        assert " 0 dropped" in done.stdout
    # the upstream's files are intact (the store holds links to them, and read them only)
    with open(upstream.blob_path(layer), "rb") as f:
        assert digest_of(f.read()) == layer


def test_e2e_purge_a_registry_qualified_repo_of_a_mirror_whose_docker_io_is_elsewhere(upstream, tmp_path):
    """A Docker Hub mirror in front of another URL (here the harness's
    upstream): its blobs are recorded under that URL's host, and
    `purge --repo docker.io/...` finds them given the mirror's mapping."""
    big = fresh_image(upstream, 400_000, repo=f"library/big{unique_seed()}")
    small = fresh_image(upstream, 100_000)
    with Mirror(tmp_path / "m", [f"reverse:{upstream.url}"]) as mirror:
        for image in (big, small):
            RegistryClient(mirror.url).pull(image.repo, image.tag)
        mirror.wait_stored([d for image in (big, small) for d, _ in image.blobs], RUN_TIMEOUT)
        name = f"docker.io/{big.repo}"
        done = run_ctl("--cache-dir", mirror.cache_dir, "purge", "--repo", name)
        assert done.returncode == 0 and "removed 0 blobs" in done.stdout, done.stdout + done.stderr
        done = run_ctl("--cache-dir", mirror.cache_dir, "purge", "--repo", name,
                       "--registries", f"docker.io={upstream.url}")
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"removed {len(big.blobs)} blobs" in done.stdout and f"  {name}  (only seen in {name})" in done.stdout
        assert stored_digests(mirror.cache_dir) == {d for d, _ in small.blobs}
        # The mirror goes on: the purged image is fetched again, the other one served from the store.
        upstream.reset_counters()
        RegistryClient(mirror.url).pull(small.repo, small.tag)
        assert upstream.counters.blob_bytes == 0
        RegistryClient(mirror.url).pull(big.repo, big.tag)
        assert upstream.counters.blob_bytes == big.blob_bytes
