#!/usr/bin/env python3
"""Administer a registry-cache store: list, measure, verify, purge and seed it.

    .venv/bin/python scripts/cachectl.py [--cache-dir DIR] COMMAND [options]

    ls      [--json]                one line per blob: digest, size, last access,
                                    repositories the upstream was seen to serve it in
    du      [--json]                bytes, blob count, size limit, manifests, part files
    verify                          re-hash every blob; drop the bad ones (exit 1 if any)
    purge   [--older-than DAYS] [--repo NAME] [--to-size SIZE] [--dry-run]
    import  [ROOT ...] [--containerd ROOT] [--distribution ROOT] [--copy]

DIR defaults to the addon's own default (`$XDG_CACHE_HOME/registry-cache`, else
`~/.cache/registry-cache`); give the mirror's `cache_dir` if it sets one. Every
path in it comes from addon/layout.py, as the mirror's do.

--registries NAME=URL,...: the mirror records a registry by the URL it fetched
from (the access index's key), not by the name clients used. Given the
mirror's own mapping (its `registries` option, and its reverse-mode upstream
as NAME=URL), `ls` shows that name and `purge --repo NAME/repo` matches it.
Why an option and not a name recorded in the index: the mapping is the
operator's configuration, which they have at hand, and the index keeps one
key, the one the access gate needs, for records old and new alike.

Safe while the mirror runs: the store is a diskcache directory (SQLite, shared
by processes), blobs are committed by an atomic rename, and this tool never
touches part files it did not make (a fill in progress holds a lock on its
own, and this tool does not sweep the ones a killed mirror left behind: the
mirror does that when it starts). Removals only happen if the index still
names the file that was looked at, so a blob stored again meanwhile is kept,
and a client already reading a removed blob keeps reading it. Run it as the
user that owns the store, or as root: root then works in the store as that
user (effective uid and gid), so that what it creates stays usable by the
mirror, and reads import sources as root.

import: seeds the store from content stores already on this machine:

- containerd: `<root>/io.containerd.content.v1.content/blobs/sha256/<hex>`
  (root: /var/lib/containerd; rootless: ~/.local/share/containerd; Docker with
  the containerd image store: /var/lib/docker/containerd/daemon);
- distribution (docker-registry) filesystem storage:
  `<root>/docker/registry/v2/blobs/sha256/<xx>/<hex>/data` (root:
  /var/lib/registry, Debian's package: /var/lib/docker-registry).

Without ROOTs or options, those standard places are probed. Every blob is
verified (its sha256 must equal its name) before it is committed; bad ones are
reported and skipped. On the same filesystem a blob is hard-linked into the
store (no copy; both stores then share that file, which is immutable in both);
otherwise, or with --copy, it is copied into a part file and committed.

Imported blobs have NO repository association: the mirror does not know which
repositories they belong to, so before serving one for repository R to a
client, its access gate asks the upstream (a blob HEAD with that client's
token for R), exactly as for a blob another client's pull fetched. A private
layer imported from a local store is therefore still served only to clients
the upstream lets pull a repository that contains it. What an import saves is
the blob bytes, never an access check.

Exit status: 0 success; 1 `verify` dropped blobs, or `import` skipped bad or
failed blobs; 2 usage or environment errors (no store, unreadable paths, ...);
130 interrupted.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import errno
import hashlib
import json
import os
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import diskcache  # noqa: E402

from addon.access import SeenIndex  # noqa: E402
from addon.layout import DEFAULT_CACHE_SIZE, CacheLayout, default_cache_dir, format_size, parse_size  # noqa: E402
from addon.registries import DEFAULT_REGISTRIES, DOCKER_HUB_NAME, origin_of, parse_registries  # noqa: E402
from addon.store import PART_SUFFIX, BlobEntry, DiskBlobStore  # noqa: E402

DEFAULT_NEW_STORE_SIZE = DEFAULT_CACHE_SIZE  # the addon's cache_size default
DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")
CHUNK = 1 << 20
HEX = frozenset("0123456789abcdef")
CONTAINERD_CONTENT = "io.containerd.content.v1.content"
CONTAINERD_ROOTS = ("/var/lib/containerd", "~/.local/share/containerd", "/var/lib/docker/containerd/daemon")
DISTRIBUTION_ROOTS = ("/var/lib/registry", "/var/lib/docker-registry")
LINK_FALLBACK = {errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EROFS}


class CtlError(Exception):
    """A failure to report in one line, with exit status 2."""


class AdminStore(DiskBlobStore):
    """The mirror's store, opened by an admin tool next to a running mirror."""

    def sweep_orphaned_parts(self) -> int:
        # Sweeping is the mirror's job at its start. A sweep from here could
        # race a fill between creating its part file and locking it.
        return 0


# -- helpers --------------------------------------------------------------------

def iso(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_size_arg(text: str) -> int:
    if text.strip() == "0":
        return 0
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if days < 0 or days != days:
        raise argparse.ArgumentTypeError(f"days must be zero or more: {text!r}")
    return days


class RegistryNames:
    """The names a registry recorded in the access index answers to.

    The mirror records a registry by the origin it fetched from
    (scheme://host:port), not by the name a client used: a mirror whose
    `registries` option maps docker.io elsewhere (docker.io=https://mirror.example),
    or a reverse-mode mirror of a Docker Hub mirror, records Docker Hub's
    blobs under that URL's host. Given the same NAME=URL entries as the
    mirror (--registries), docker.io/library/x finds them there. A
    registry always answers to its own host[:port] too, and Docker Hub
    (registry-1.docker.io) to docker.io whatever the entries say.
    """

    def __init__(self, entries: list[str] = ()):
        self._names: dict[str, list[str]] = {}  # origin -> names, the operator's first
        pairs = list(parse_registries(entries).items()) + list(parse_registries(DEFAULT_REGISTRIES).items())
        for name, url in pairs:
            names = self._names.setdefault(origin_of(url), [])
            if name not in names:
                names.append(name)

    def names_of(self, registry: str) -> list[str]:
        """Every name of a recorded registry: configured names first, then its host[:port]."""
        try:
            origin = origin_of(registry)
            parts = urlsplit(origin)
        except ValueError:  # not a URL: no record the mirror made
            return [registry]
        if not parts.hostname:
            return [registry]
        default_port = parts.port == (443 if parts.scheme == "https" else 80)
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        own = [host] if default_port else []
        own += [f"{host}:{parts.port}", origin, registry.rstrip("/")]
        if default_port:
            own.append(f"{parts.scheme}://{host}")
        names = list(self._names.get(origin, []))
        if DOCKER_HUB_NAME in names:
            names += DOCKER_HUB_ALIASES
        return list(dict.fromkeys(names + own))

    def name(self, registry: str, repo: str) -> str:
        """How ls and purge show a (registry, repository): docker.io/library/alpine."""
        return f"{self.names_of(registry)[0]}/{repo}"

    def repo_names(self, registry: str, repo: str) -> set[str]:
        """The names --repo accepts for one (registry, repository)."""
        registries = self.names_of(registry)
        names = {repo} | {f"{name}/{repo}" for name in registries}
        if DOCKER_HUB_NAME in registries and repo.startswith("library/"):  # Docker Hub's official images
            short = repo[len("library/"):]
            names |= {short} | {f"{name}/{short}" for name in (DOCKER_HUB_NAME, *DOCKER_HUB_ALIASES)}
        return names


_root_ids: tuple[int, int] | None = None  # (euid, egid) of root while it works as the store's owner


def act_as_owner(cache_dir: Path) -> None:
    """Work as the user that owns the store, so that whatever this creates in
    it (index journals, blob directories, part files) stays usable by the
    mirror. Root switches its effective uid and gid to the owner's (and back
    to root only to read import sources); anyone else must be that user."""
    global _root_ids
    try:
        stat = cache_dir.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CtlError(f"cannot read {cache_dir}: {exc.strerror}") from None
    if stat.st_uid == os.geteuid():
        return
    if os.geteuid() == 0:
        # Load what Python would import lazily later while any installation
        # (a root-only pyenv, say) is still readable: diskcache's file names.
        codecs.lookup("hex")
        _root_ids = (os.geteuid(), os.getegid())
        os.setegid(stat.st_gid)
        os.seteuid(stat.st_uid)
        return
    try:
        import pwd
        name = pwd.getpwuid(stat.st_uid).pw_name
    except (KeyError, ImportError):
        name = str(stat.st_uid)
    raise CtlError(
        f"{cache_dir} belongs to user {name} and this runs as uid {os.geteuid()}: files made here "
        f"would not be usable by the mirror. Run as {name}, or as root (which then acts as {name})"
    )


@contextlib.contextmanager
def source_access():
    """Read an import source with root's rights, if root dropped them for the store."""
    if _root_ids is None:
        yield
        return
    uid, gid = os.geteuid(), os.getegid()
    restore_ids(*_root_ids)
    try:
        yield
    finally:
        os.setegid(gid)
        os.seteuid(uid)


def restore_ids(euid: int, egid: int) -> None:
    os.seteuid(euid)  # first: only root may change the gid
    os.setegid(egid)


def open_store(layout: CacheLayout, *, create: bool = False, new_size: int | None = None) -> AdminStore:
    act_as_owner(layout.root)
    limit = layout.stored_size_limit()
    if limit is None:
        if not create:
            raise CtlError(f"no registry-cache store at {layout.root} (no {layout.blob_index.name}); "
                           f"give the mirror's cache_dir with --cache-dir")
        if layout.root.exists() and (not layout.root.is_dir() or any(layout.root.iterdir())):
            raise CtlError(f"{layout.root} is not empty and holds no registry-cache store; "
                           f"refusing to make one there")
        limit = new_size if new_size is not None else parse_size(DEFAULT_NEW_STORE_SIZE)
    try:
        return AdminStore(layout.blobs, limit)
    except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
        raise CtlError(f"cannot open the store at {layout.root}: {exc}") from None


class Repos:
    """Repositories each digest was seen in (the access index), read-only use."""

    def __init__(self, layout: CacheLayout):
        path = layout.access_db
        self._index = SeenIndex(path) if path.is_file() else None

    def of(self, digest: str) -> list[tuple[str, str]]:
        return sorted(self._index.repos_of(digest)) if self._index else []

    def close(self) -> None:
        if self._index:
            self._index.close()


def manifest_counts(layout: CacheLayout) -> tuple[int, int]:
    """(manifests kept, tags remembered) in the mirror's manifest store."""
    db = layout.manifest_index
    if not db.is_file():
        return 0, 0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60)
    try:
        row = con.execute("SELECT TOTAL(key LIKE 'manifest:%'), TOTAL(key LIKE 'tag:%') FROM Cache").fetchone()
    except sqlite3.Error as exc:
        raise CtlError(f"cannot read the manifest store {db}: {exc}") from None
    finally:
        con.close()
    return int(row[0]), int(row[1])


def hash_fd(fd: int, algorithm: str) -> tuple[str, int]:
    hasher = hashlib.new(algorithm)
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        hasher.update(chunk)
        offset += len(chunk)
    return f"{algorithm}:{hasher.hexdigest()}", offset


# -- ls, du --------------------------------------------------------------------

def cmd_ls(args) -> int:
    store = open_store(args.layout)
    repos = Repos(args.layout)
    try:
        rows = [(entry, repos.of(entry.digest)) for entry in store.entries()]
    finally:
        repos.close()
        store.close()
    if args.json:
        json.dump([{
            "digest": entry.digest,
            "size": entry.size,
            "stored": iso(entry.stored_at),
            "last_access": iso(entry.accessed_at),
            "repositories": [{"registry": registry, "repository": repo, "name": args.names.name(registry, repo)}
                             for registry, repo in seen],
        } for entry, seen in rows], sys.stdout, indent=1)
        print()
        return 0
    for entry, seen in rows:
        names = ",".join(args.names.name(registry, repo) for registry, repo in seen) or "-"
        print(f"{entry.digest}  {entry.size:>12}  {iso(entry.accessed_at)}  {names}")
    return 0


def cmd_du(args) -> int:
    store = open_store(args.layout)
    try:
        entries = store.entries()
        used, count = store.usage()
        limit = store.size_limit
        parts = []
        for path in args.layout.fills.glob("*" + PART_SUFFIX):
            try:
                parts.append(path.stat().st_size)
            except FileNotFoundError:
                pass  # committed or discarded meanwhile
    finally:
        store.close()
    manifests, tags = manifest_counts(args.layout)
    blob_bytes = sum(entry.size for entry in entries)
    report = {
        "cache_dir": str(args.cache_dir),
        "blobs": count,
        "blob_bytes": blob_bytes,
        "total_bytes": used,  # blobs plus the index: what the size limit counts
        "size_limit": limit,
        "manifests": manifests,
        "tags": tags,
        "part_files": len(parts),
        "part_bytes": sum(parts),
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"store       {args.cache_dir}")
    print(f"blobs       {count} ({format_size(blob_bytes)}, {blob_bytes} bytes)")
    print(f"total       {format_size(used)} ({used} bytes, blobs and index; what the limit counts)")
    print(f"size limit  {format_size(limit)} ({limit} bytes, {100 * used / limit:.0f}% used)" if limit else
          "size limit  unknown")
    print(f"manifests   {manifests} (and {tags} tags)")
    print(f"part files  {len(parts)} ({format_size(sum(parts))}): fills in progress, or left by a killed mirror")
    return 0


# -- verify ---------------------------------------------------------------------

def check_blob(entry: BlobEntry) -> str | None:
    """What is wrong with a stored blob, or None. Raises PermissionError."""
    algorithm, _, _hex = entry.digest.partition(":")
    if algorithm not in hashlib.algorithms_guaranteed:
        return f"unknown digest algorithm {algorithm!r}"
    try:
        fd = os.open(entry.path, os.O_RDONLY)
    except FileNotFoundError:
        return "file missing"
    try:
        actual, size = hash_fd(fd, algorithm)
    except PermissionError:
        raise
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    finally:
        os.close(fd)
    if size != entry.size:
        return f"file has {size} bytes, the index says {entry.size}"
    if actual != entry.digest:
        return f"content hashes to {actual}"
    return None


def cmd_verify(args) -> int:
    store = open_store(args.layout)
    started = time.monotonic()
    checked = intact = changed = 0
    checked_bytes = 0
    dropped: dict[str, int] = {}
    unreadable = []
    try:
        for entry in store.entries():
            try:
                problem = check_blob(entry)
            except PermissionError as exc:
                unreadable.append(entry.digest)
                print(f"cannot check {entry.digest}: {exc.strerror} ({entry.path})", file=sys.stderr)
                continue
            checked += 1
            checked_bytes += entry.size
            if problem is None:
                intact += 1
            elif store.drop(entry):
                kind = "missing" if problem == "file missing" else "corrupt"
                dropped[kind] = dropped.get(kind, 0) + 1
                print(f"dropped {entry.digest}: {problem}")
            else:  # evicted or stored again while it was being checked: nothing left to judge
                changed += 1
                print(f"left {entry.digest}: {problem}, but it was removed or stored again meanwhile")
    finally:
        store.close()
    total_dropped = sum(dropped.values())
    detail = ", ".join(f"{n} {kind}" for kind, n in sorted(dropped.items()))
    print(f"verify: {checked} blobs ({format_size(checked_bytes)}) checked in {time.monotonic() - started:.1f} s: "
          f"{intact} intact, {total_dropped} dropped{f' ({detail})' if detail else ''}"
          + (f", {changed} changed while checked" if changed else "")
          + (f", {len(unreadable)} could not be read" if unreadable else ""))
    if total_dropped:
        return 1
    return 2 if unreadable else 0


# -- purge ----------------------------------------------------------------------

def pick_lru(entries: list[BlobEntry], used: int, target: int) -> list[BlobEntry]:
    """Least recently used entries to remove so that `used` gets to `target`."""
    victims = []
    for entry in entries:  # already in LRU order
        if used <= target:
            break
        victims.append(entry)
        used -= entry.size
    return victims


def cmd_purge(args) -> int:
    if args.older_than is None and args.to_size is None and args.repo is None:
        raise CtlError("purge: say what to remove: --older-than DAYS, --to-size SIZE and/or --repo NAME")
    store = open_store(args.layout)
    repos = Repos(args.layout)
    verb = "would remove" if args.dry_run else "removed"
    removed: list[BlobEntry] = []
    seen_in: dict[str, list[tuple[str, str]]] = {}

    def report(entry: BlobEntry, why: str) -> None:
        names = ",".join(args.names.name(r, n) for r, n in seen_in.get(entry.digest, [])) or "-"
        print(f"{verb} {entry.digest}  {entry.size} bytes  last access {iso(entry.accessed_at)}  {names}  ({why})")
        removed.append(entry)

    try:
        entries = store.entries()
        for entry in entries:
            seen_in[entry.digest] = repos.of(entry.digest)
        if args.older_than is not None or args.repo is not None:
            cutoff = time.time() - args.older_than * 86400 if args.older_than is not None else None
            why = []
            if cutoff is not None:
                why.append(f"not read for {args.older_than:g} days")
            if args.repo is not None:
                why.append(f"only seen in {args.repo}")
            for entry in entries:
                if cutoff is not None and entry.accessed_at >= cutoff:
                    continue
                if args.repo is not None:
                    seen = seen_in[entry.digest]
                    if not seen or not all(args.repo in args.names.repo_names(r, n) for r, n in seen):
                        continue
                if args.dry_run or store.drop(entry, unless_read_since=cutoff is not None):
                    report(entry, ", ".join(why))
        if args.to_size is not None:
            gone = {entry.digest for entry in removed}
            used = store.usage()[0] - (sum(e.size for e in removed) if args.dry_run else 0)
            if args.dry_run:
                for entry in pick_lru([e for e in entries if e.digest not in gone], used, args.to_size):
                    report(entry, f"least recently used, to get under {format_size(args.to_size)}")
            else:
                for _round in range(5):  # blobs read meanwhile are kept; pick again
                    victims = pick_lru(store.entries(), store.usage()[0], args.to_size)
                    if not victims:
                        break
                    for entry in victims:
                        if store.drop(entry, unless_read_since=True):
                            seen_in.setdefault(entry.digest, repos.of(entry.digest))
                            report(entry, f"least recently used, to get under {format_size(args.to_size)}")
        used, count = store.usage()
    finally:
        repos.close()
        store.close()
    freed = sum(entry.size for entry in removed)
    if args.dry_run:
        print(f"purge (dry run): would remove {len(removed)} blobs ({format_size(freed)}); "
              f"the store holds {count} blobs, {format_size(used)}")
    else:
        print(f"purge: removed {len(removed)} blobs ({format_size(freed)}); "
              f"the store now holds {count} blobs, {format_size(used)}")
    return 0


# -- import ---------------------------------------------------------------------

@dataclass
class Source:
    kind: str  # "containerd" or "distribution"
    root: Path
    blobs: Path  # the sha256 directory

    def candidates(self):
        """(digest or None, path) of every blob file, in name order."""
        if self.kind == "containerd":
            paths = sorted(self.blobs.iterdir())
        else:
            paths = sorted(path / "data" for prefix in sorted(self.blobs.iterdir()) if prefix.is_dir()
                           for path in prefix.iterdir())
        for path in paths:
            hex_ = path.name if self.kind == "containerd" else path.parent.name
            valid = len(hex_) == 64 and set(hex_) <= HEX and path.is_file()
            if self.kind == "distribution" and valid and path.parent.parent.name != hex_[:2]:
                valid = False
            yield (f"sha256:{hex_}" if valid else None), path


def detect(root: Path, kind: str | None = None) -> Source:
    """The content store at root, of the given kind or whichever is there."""
    root = root.expanduser()
    layouts = []
    if kind in (None, "containerd"):
        layouts += [("containerd", root / CONTAINERD_CONTENT / "blobs" / "sha256")]
        if root.name == CONTAINERD_CONTENT:
            layouts += [("containerd", root / "blobs" / "sha256")]
    if kind in (None, "distribution"):
        layouts += [("distribution", root / "docker" / "registry" / "v2" / "blobs" / "sha256")]
    for found_kind, blobs in layouts:
        try:
            if blobs.is_dir():
                os.listdir(blobs)  # readable?
                return Source(found_kind, root, blobs)
        except PermissionError:
            raise CtlError(f"cannot read {blobs}: permission denied (run as a user that can read it)") from None
    if not root.is_dir():
        raise CtlError(f"{root}: no such directory")
    wanted = {
        "containerd": f"a containerd root ({CONTAINERD_CONTENT}/blobs/sha256 in it)",
        "distribution": "a distribution storage root (docker/registry/v2/blobs/sha256 in it)",
        None: f"a containerd root ({CONTAINERD_CONTENT}/blobs/sha256) or a distribution storage "
              f"root (docker/registry/v2/blobs/sha256)",
    }[kind]
    raise CtlError(f"{root} is not {wanted}")


def sources_from(args) -> list[Source]:
    sources = [detect(Path(root)) for root in args.roots]
    sources += [detect(Path(root), "containerd") for root in args.containerd]
    sources += [detect(Path(root), "distribution") for root in args.distribution]
    if sources:
        return sources
    denied = []
    for kind, roots in (("containerd", CONTAINERD_ROOTS), ("distribution", DISTRIBUTION_ROOTS)):
        for root in roots:
            try:
                sources.append(detect(Path(root), kind))
            except CtlError as exc:
                if "permission denied" in str(exc):
                    denied.append(str(exc))
    if not sources:
        raise CtlError("import: no content store found in the standard places ("
                       + ", ".join(CONTAINERD_ROOTS + DISTRIBUTION_ROOTS) + "); name one with "
                       "--containerd ROOT or --distribution ROOT" + ("; " + "; ".join(denied) if denied else ""))
    for source in sources:
        print(f"found a {source.kind} store at {source.root}")
    return sources


@dataclass
class ImportStats:
    linked: int = 0
    copied: int = 0
    bytes: int = 0
    already: int = 0
    bad: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    ignored: int = 0


def import_one(store: AdminStore, digest: str, path: Path, allow_link: bool, stats: ImportStats) -> None:
    with source_access():
        size = path.stat().st_size
    if size > store.size_limit:
        stats.failed.append(digest)
        print(f"skipped {digest}: {size} bytes, larger than the store's size limit", file=sys.stderr)
        return
    part = None
    how = "copied"
    if allow_link:
        try:
            part = store.link_part(digest, path)
            how = "linked"
        except OSError as exc:
            if exc.errno not in LINK_FALLBACK:
                raise
    try:
        if part is not None:
            actual, length = hash_fd(part.fd, "sha256")  # what is committed is what was hashed
        else:
            if store.disk_space_left() < size:
                stats.failed.append(digest)
                print(f"skipped {digest}: not enough free disk for {size} bytes", file=sys.stderr)
                return
            part = store.new_part(digest)
            actual, length = copy_hashing(path, part.fd)
        if actual != digest:
            stats.bad.append(digest)
            print(f"bad {digest}: {path} hashes to {actual}; skipped", file=sys.stderr)
            return
        store.commit(digest, part, length)
        fd, part = part.fd, None  # committed: no longer ours to discard
        os.close(fd)
    finally:
        if part is not None:
            os.close(part.fd)
            store.discard_part(part)
    stats.bytes += length
    if how == "linked":
        stats.linked += 1
    else:
        stats.copied += 1
    print(f"imported {digest}  {length} bytes  ({how})")


def copy_hashing(source: Path, fd: int) -> tuple[str, int]:
    hasher = hashlib.sha256()
    count = 0
    with source_access():
        src = open(source, "rb")
    with src:
        while chunk := src.read(CHUNK):
            hasher.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
            count += len(chunk)
    return "sha256:" + hasher.hexdigest(), count


def cmd_import(args) -> int:
    sources = sources_from(args)
    created_by_root = os.geteuid() == 0 and not args.layout.root.exists()
    store = open_store(args.layout, create=True, new_size=args.cache_size)
    stats = ImportStats()
    started = time.monotonic()
    evictions_before = store.evictions
    try:
        for source in sources:
            with source_access():
                candidates = list(source.candidates())
            for digest, path in candidates:
                if digest is None:
                    stats.ignored += 1
                    continue
                if digest in store:
                    stats.already += 1
                    continue
                try:
                    import_one(store, digest, path, not args.copy, stats)
                except FileNotFoundError:
                    continue  # removed from the source meanwhile (its garbage collection)
                except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
                    stats.failed.append(digest)
                    print(f"failed {digest}: {exc}", file=sys.stderr)
        evicted = store.evictions - evictions_before
        used, count = store.usage()
    finally:
        store.close()
    imported = stats.linked + stats.copied
    print(f"import: {imported} blobs imported ({stats.linked} linked, {stats.copied} copied, "
          f"{format_size(stats.bytes)}) in {time.monotonic() - started:.1f} s; {stats.already} already stored; "
          f"{len(stats.bad)} bad (skipped); {len(stats.failed)} failed"
          + (f"; {stats.ignored} files ignored (not named by a sha256 digest)" if stats.ignored else ""))
    if evicted:
        print(f"import: the store evicted {evicted} least recently used blobs to stay under its size limit")
    print(f"import: the store holds {count} blobs, {format_size(used)}. Imported blobs are served for a "
          f"repository only after the upstream confirms that client may pull it there.")
    if created_by_root:
        print(f"import: made the new store {args.cache_dir} as root. If the mirror runs as another user, "
              f"hand it over first: chown -R USER {args.cache_dir}", file=sys.stderr)
    return 1 if stats.bad or stats.failed else 0


# -- command line ---------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", type=Path, default=argparse.SUPPRESS, metavar="DIR",
                        help=f"the mirror's cache_dir (default: {default_cache_dir()})")
    common.add_argument("--registries", action="append", default=argparse.SUPPRESS, metavar="NAME=URL,...",
                        help="the mirror's registries option, if it maps a name to another URL (e.g. "
                             "docker.io=https://mirror.example), and its reverse-mode upstream as NAME=URL: "
                             "ls shows, and purge --repo matches, a registry by that name; repeatable")
    parser = argparse.ArgumentParser(
        prog="cachectl.py", parents=[common],
        description="Administer a registry-cache store. Safe while the mirror runs.",
        epilog="Exit status: 0 success; 1 verify dropped blobs / import skipped blobs; "
               "2 usage or environment error. See each command's --help.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ls = commands.add_parser("ls", parents=[common], help="list blobs, least recently used first",
                             description="One line per stored blob, least recently used (next to be "
                                         "evicted) first: digest, size in bytes, last access (UTC), and the "
                                         "repositories the upstream was seen to serve it in ('-': none, "
                                         "e.g. imported blobs).")
    ls.add_argument("--json", action="store_true", help="a JSON array instead")
    ls.set_defaults(func=cmd_ls)

    du = commands.add_parser("du", parents=[common], help="store size, blob count, limit, manifests",
                             description="Total bytes (blobs plus index, what the size limit counts), blob "
                                         "count and bytes, the store's size limit, manifests and tags kept, "
                                         "part files in fills/.")
    du.add_argument("--json", action="store_true", help="a JSON object instead")
    du.set_defaults(func=cmd_du)

    verify = commands.add_parser("verify", parents=[common], help="re-hash every blob, drop bad ones",
                                 description="Re-hash every stored blob against its digest and size. A blob "
                                             "whose content does not match, or whose file is missing, is "
                                             "dropped (the next pull fetches it again). Exit status 1 if any "
                                             "blob was dropped. Access times are left as they are.")
    verify.set_defaults(func=cmd_verify)

    purge = commands.add_parser(
        "purge", parents=[common], help="remove blobs by age, repository or to a size",
        description="Remove blobs. --older-than and --repo select blobs matching all of the given "
                    "conditions; then --to-size removes least recently used blobs until the store is "
                    "under SIZE. A blob read since it was listed is kept (by --older-than and --to-size). "
                    "Prints each blob removed.",
    )
    purge.add_argument("--older-than", type=parse_days, metavar="DAYS",
                       help="blobs not read for more than DAYS days (fractions allowed)")
    purge.add_argument("--to-size", type=parse_size_arg, metavar="SIZE",
                       help="evict least recently used blobs until the store is under SIZE (500m, 10g, 0)")
    purge.add_argument("--repo", metavar="NAME",
                       help="blobs seen in repository NAME and in no other (library/alpine, "
                            "docker.io/library/alpine, ghcr.io/org/app, host:port/repo); a registry's "
                            "name matches wherever the mirror fetched it from, given the mirror's mapping "
                            "with --registries; blobs seen in no repository (imported) never match")
    purge.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    purge.set_defaults(func=cmd_purge)

    imp = commands.add_parser(
        "import", parents=[common], help="seed the store from containerd or distribution storage",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Seed the store from content stores on this machine. Every blob is verified (sha256 of its\n"
            "content equals its name) before it is committed; bad ones are reported and skipped.\n"
            "Same filesystem: hard-linked into the store (no copy); else copied.\n\n"
            "Access rules are those of a fill: imported blobs belong to no repository, so the mirror\n"
            "serves one for repository R only after the upstream accepts that client's token for it\n"
            "in R (a blob HEAD). A private layer stays private.\n\n"
            "Layouts:\n"
            f"  containerd:   ROOT/{CONTAINERD_CONTENT}/blobs/sha256/<hex>\n"
            "  distribution: ROOT/docker/registry/v2/blobs/sha256/<xx>/<hex>/data\n"
            "Without ROOTs, probes " + ", ".join(CONTAINERD_ROOTS + DISTRIBUTION_ROOTS) + "."
        ),
    )
    imp.add_argument("roots", nargs="*", metavar="ROOT", help="a containerd root or distribution root (detected)")
    imp.add_argument("--containerd", action="append", default=[], metavar="ROOT",
                     help="a containerd root, e.g. /var/lib/containerd (repeatable)")
    imp.add_argument("--distribution", action="append", default=[], metavar="ROOT",
                     help="a distribution filesystem storage root, e.g. /var/lib/registry (repeatable)")
    imp.add_argument("--copy", action="store_true",
                     help="always copy, never hard-link (the store then pins no space of the source)")
    imp.add_argument("--cache-size", type=parse_size_arg, metavar="SIZE",
                     help=f"size limit if this creates a new store (default {DEFAULT_NEW_STORE_SIZE}, the addon's); "
                          f"an existing store keeps its own")
    imp.set_defaults(func=cmd_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.layout = CacheLayout.at(getattr(args, "cache_dir", None))
    args.cache_dir = args.layout.root
    try:
        args.names = RegistryNames(getattr(args, "registries", None) or [])
    except ValueError as exc:
        parser.error(f"--registries: {exc}")
    global _root_ids
    try:
        return args.func(args)
    except CtlError as exc:
        print(f"cachectl: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cachectl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # e.g. `cachectl ls | head`: not an error; keep the exit flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if _root_ids is not None:  # main() may be called again in this process (tests)
            restore_ids(*_root_ids)
            _root_ids = None


if __name__ == "__main__":
    sys.exit(main())
