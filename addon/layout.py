"""The cache directory: one home for where the mirror keeps what it verified.

Both the addon and `scripts/cachectl.py` open the same directory, often at
the same time, so they must agree on its layout. This module says it once and
imports nothing of ours and nothing of mitmproxy's (cachectl reads a store
without loading mitmproxy):

    <cache_dir>/                diskcache's blob index (cache.db) and blob files
    <cache_dir>/fills/          part files of fills in progress (store.py)
    <cache_dir>/access.sqlite3  which repositories were seen to hold a digest (access.py)
    <cache_dir>/manifests/      manifests by digest and tags' last digests (manifests.py)

The size limit of the blob store lives in diskcache's Settings table; a store
opened again keeps the limit it has unless told otherwise.
"""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

FILLS_DIR = "fills"
ACCESS_DB = "access.sqlite3"
MANIFESTS_DIR = "manifests"
BLOB_INDEX = "cache.db"  # diskcache.core.DBNAME
DEFAULT_CACHE_SIZE = "20g"

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/registry-cache, else ~/.cache/registry-cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "registry-cache"


def parse_size(text: str) -> int:
    """'20g', '512M', '1.5T', '1000000' -> bytes (binary units)."""
    match = _SIZE_RE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 500m, 20g, 1t)")
    number, unit = match.groups()
    size = int(float(number) * 1024 ** " kmgt".index(unit.lower() or " "))
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size


def format_size(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as parse_size reads them)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class CacheLayout:
    """The paths of one cache directory."""

    root: Path

    @classmethod
    def at(cls, cache_dir: str | os.PathLike | None) -> "CacheLayout":
        """The layout at cache_dir ('' or None: the default), ~ expanded."""
        return cls(Path(cache_dir).expanduser() if cache_dir else default_cache_dir())

    @property
    def blobs(self) -> Path:
        """diskcache's directory of the blob store (its index and files)."""
        return self.root

    @property
    def fills(self) -> Path:
        return self.root / FILLS_DIR

    @property
    def access_db(self) -> Path:
        return self.root / ACCESS_DB

    @property
    def manifests(self) -> Path:
        return self.root / MANIFESTS_DIR

    @property
    def blob_index(self) -> Path:
        return self.root / BLOB_INDEX

    @property
    def manifest_index(self) -> Path:
        """diskcache's index of the manifest store (manifests.py)."""
        return self.manifests / BLOB_INDEX

    def stored_size_limit(self) -> int | None:
        """The size limit the blob store was last opened with (diskcache keeps
        it in its Settings table), or None if there is no store here. Open an
        existing store with this limit: another value would be written over it."""
        if not self.blob_index.is_file():
            return None
        con = sqlite3.connect(f"file:{self.blob_index}?mode=ro", uri=True, timeout=60)
        try:
            row = con.execute("SELECT value FROM Settings WHERE key = 'size_limit'").fetchone()
        except sqlite3.OperationalError:
            return None  # not a diskcache directory
        finally:
            con.close()
        return int(row[0]) if row else None
