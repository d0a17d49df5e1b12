#!/usr/bin/env python3
"""Benchmark the mirror against pulling straight from the upstream and against
distribution's own pull-through cache, in ONE run on this machine.

    .venv/bin/python scripts/bench.py [--layer-mb 500] [--json out.json] [--quick] [--redirect]
        [--link-mbit 800 --conn-mbit 100 --rtt-ms 50] [--phases cold,resume] [--mirror-option NAME=VALUE]

Everything runs on 127.0.0.1: the harness upstream (distribution behind the
token server and the counting front door, relay mode unless --redirect), the
mirror (`mitmdump -s addon/registry_cache.py`, reverse mode, its own temp store)
and the peer (a second docker-registry with `proxy: remoteurl:` and the
upstream's credentials, its own temp storage). The machine is shared and noisy,
so every figure is a ratio against a baseline measured in the same run, and
repeated measurements are interleaved (direct, mirror, peer; direct, mirror,
peer; ...) and reported as the median of the per-repetition ratios.

Pull clients run in separate worker processes (spawned once), so that a
client's hashing does not share a GIL with the upstream's front door, which
runs in this process. Pulls use the harness's RegistryClient.pull, which
writes nowhere but hashes and verifies every byte. The blob-rate figure uses a
lean http.client reader that only counts bytes (checking Content-Length): it
measures what the server delivers, not how fast a Python client hashes.

The mirror runs from a copy of addon/ taken at start (or `--addon-rev REV`'s),
so edits to the checkout during a run cannot mix versions; the JSON records
which code was measured.

Cold pulls are measured twice: as is, and with memory "pre-touched" (a scratch
file of 1.25x the layer written and deleted right before the pull, for direct,
mirror and peer alike). On a VM whose balloon does free page reporting (this
one: Firecracker, virtio_balloon feature 5) pages free for ~2 s go back to the
host, and writing a new file into them costs 0.4-1.5 s per 500 MB instead of
0.1 s. The mirror's fill and the peer's store write a new file; the direct
pull writes nothing. The pre-touched figure is the one that transfers to a
machine without that balloon.

A slow line is modelled with --link-mbit (one shared line for all blob bytes
of the upstream and its CDN), --conn-mbit (a cap per upstream connection, as a
long lossy path or a CDN's per-connection shaping gives one TCP stream) and
--rtt-ms (each upstream request waits that long before its answer starts).
A direct pull uses one connection per blob, as Docker and containerd 1.x do;
the mirror's fill fetches a large blob in ranges over several.

The resume phase cuts the upstream's connection once, half-way through the
layer, and reports the upstream bytes the cold pull cost: through the mirror
(which resumes) and direct (a client that retries downloads it from byte 0).

The cluster phase runs three mirror nodes sharing a SeaweedFS bucket (weed
from PyPI, as the tests start it, reached on its own port): the upstream
copies when 8 concurrent cold pulls of a fresh image are spread over the
nodes, against three of distribution's caches on one shared storage root the
same way; and the time a replaced node, its store empty, takes to serve a
warm pull (from the object store), against a cold pull through a fresh node.
The tiers phase measures the warm blob rate of a node whose store is empty
(the blob comes from the object store) and then from its own store, against
the single-node mirror's, interleaved. Where a pull writes a new file (the
replaced and the fresh node, a node filling from the object store), memory is
pre-touched first (see pretouch; --no-pretouch: not).

Results: a table on stdout and JSON (default bench-results/latest.json).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import http.client
import json
import multiprocessing
import os
import platform
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from addon.cluster import parse_members, rank  # noqa: E402
from tests.harness.cluster import Cluster  # noqa: E402
from tests.harness.images import make_layer_file, push_image  # noqa: E402
from tests.harness.mirror import SCRIPT, Mirror  # noqa: E402
from tests.harness.peer import DistributionProxy, wait_upstream_quiet  # noqa: E402
from tests.harness.seaweedfs import SeaweedFS, weed_version  # noqa: E402
from tests.harness.skopeo import ClosedPort, make_skopeo_home, skopeo_copy  # noqa: E402
from tests.harness.upstream import ALICE, Upstream  # noqa: E402
from tests.harness.v2client import ALL_MANIFEST_TYPES, RegistryClient, parse_challenge  # noqa: E402

MB = 1_000_000  # rates and sizes in the table are decimal MB
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
TASK_TIMEOUT = 900


# =============================================================================
# Client tasks (run in the worker processes)
# =============================================================================
def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def task_ready(delay: float) -> int:
    time.sleep(delay)
    return os.getpid()


def task_pull(url: str, repo: str, tag: str, start_at: float) -> dict:
    """A full verified pull (manifest, config, layers) with RegistryClient; writes nowhere."""
    client = RegistryClient(url, timeout=300, verify=_verify())
    _sleep_until(start_at)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    result = client.pull(repo, tag)
    t1 = time.monotonic()
    return {"pid": os.getpid(), "start": t0, "end": t1, "seconds": t1 - t0, "bytes": result.bytes_fetched,
            "manifest_digest": result.manifest_digest, "cpu": time.process_time() - cpu0}


def task_pull_retrying(url: str, repo: str, tag: str, start_at: float) -> dict:
    """A pull that starts over once after a failure (as a client does with a
    broken layer download)."""
    _sleep_until(start_at)
    t0 = time.monotonic()
    try:
        result = task_pull(url, repo, tag, 0.0)
        result["retried"] = False
    except Exception:  # noqa: BLE001 - the cut is the point: pull again
        result = task_pull(url, repo, tag, 0.0)
        result["retried"] = True
    result["start"] = t0  # the wall time includes the broken attempt
    result["seconds"] = result["end"] - t0
    return result


def task_resolutions(url: str, repo: str, tag: str, threads: int, seconds: float, start_at: float) -> dict:
    """Warm image resolutions, as each new client of a rollout makes one:
    the /v2/ challenge, a token from the realm it names, a HEAD of the tag,
    a GET of the manifest by the digest the HEAD named. `threads` clients
    in this process loop for `seconds`; returns their count and latencies."""
    accept = ", ".join(ALL_MANIFEST_TYPES)
    stop_at = start_at + seconds
    latencies: list[float] = []
    errors: list[str] = []

    def one(conn: http.client.HTTPConnection) -> None:
        conn.request("GET", "/v2/")
        resp = conn.getresponse()
        resp.read()
        scheme, params = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
        realm = urlsplit(params["realm"])
        query = f"service={params.get('service', '')}&scope=repository:{repo}:pull"
        token_conn = conn if (realm.hostname, realm.port) == (conn.host, conn.port) else _conn(params["realm"])
        try:
            token_conn.request("GET", f"{realm.path}?{query}")
            answer = token_conn.getresponse()
            token = json.loads(answer.read())["token"]
        finally:
            if token_conn is not conn:
                token_conn.close()
        headers = {"Accept": accept, "Authorization": "Bearer " + token}
        conn.request("HEAD", f"/v2/{repo}/manifests/{tag}", headers=headers)
        resp = conn.getresponse()
        resp.read()
        digest = resp.headers["Docker-Content-Digest"]
        conn.request("GET", f"/v2/{repo}/manifests/{digest}", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != digest:
            raise RuntimeError(f"manifest GET by digest: HTTP {resp.status}")

    def client() -> None:
        conn = _conn(url, timeout=60)
        try:
            while time.monotonic() < stop_at:
                t0 = time.monotonic()
                try:
                    one(conn)
                    latencies.append(time.monotonic() - t0)
                except Exception as exc:  # noqa: BLE001 - counted, and the client goes on
                    errors.append(repr(exc)[:200])
                    conn.close()
                    conn = _conn(url, timeout=60)
        finally:
            conn.close()

    _sleep_until(start_at)
    cpu0 = time.process_time()
    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(seconds + 120)
    return {"pid": os.getpid(), "resolutions": len(latencies), "latencies_ms": [x * 1000 for x in latencies],
            "errors": errors[:5], "error_count": len(errors), "cpu": time.process_time() - cpu0}


def _verify() -> bool | str:
    """What clients trust: the upstream's CA with --https (set in the
    environment, so worker processes, the peer and skopeo trust it too)."""
    return os.environ.get("SSL_CERT_FILE") or True


def _conn(url: str, timeout: float = 300) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    if parts.scheme == "https":  # ssl's default context honours SSL_CERT_FILE
        conn = http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _token_headers(url: str, repo: str, tag: str) -> dict:
    """Authorization for pulling repo at url (via a manifest HEAD's challenge), or none."""
    conn = _conn(url)
    try:
        conn.request("HEAD", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ", ".join(ALL_MANIFEST_TYPES)})
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    if resp.status != 401:
        return {}
    scheme, params = parse_challenge(resp.headers.get("WWW-Authenticate", ""))
    if scheme != "bearer":
        raise RuntimeError(f"unexpected challenge from {url}: {resp.headers.get('WWW-Authenticate')}")
    token, _ = RegistryClient(url, verify=_verify()).fetch_token(params["realm"], params.get("service"),
                                               params.get("scope", "").split())
    return {"Authorization": "Bearer " + token}


def task_blob(url: str, repo: str, tag: str, digest: str, size: int, start_at: float) -> dict:
    """GET one blob (following one redirect, without the token), count its bytes; no hashing."""
    headers = _token_headers(url, repo, tag)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    _sleep_until(start_at)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    conn = _conn(url)
    redirected = None
    try:
        conn.request("GET", f"/v2/{repo}/blobs/{digest}", headers=headers)
        resp = conn.getresponse()
        if resp.status in (301, 302, 303, 307, 308):
            location = resp.getheader("Location")
            resp.read()
            conn.close()
            target = urlsplit(location)
            redirected = f"{target.scheme}://{target.netloc}"
            conn = _conn(redirected)
            conn.request("GET", target.path + ("?" + target.query if target.query else ""))
            resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"blob GET {digest} at {url}: HTTP {resp.status}: {resp.read(300)!r}")
        length = int(resp.getheader("Content-Length", "-1"))
        count = 0
        while True:
            n = resp.readinto(view)
            if not n:
                break
            count += n
    finally:
        conn.close()
    t1 = time.monotonic()
    if count != size or length != size:
        raise RuntimeError(f"blob {digest} at {url}: got {count} bytes, Content-Length {length}, expected {size}")
    return {"pid": os.getpid(), "start": t0, "end": t1, "seconds": t1 - t0, "bytes": count,
            "redirected_to": redirected, "cpu": time.process_time() - cpu0}


# =============================================================================
# /proc sampling: RSS and CPU of the processes under test
# =============================================================================
def _stat_fields(path: str) -> list[str] | None:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on


def _cpu_ticks(path: str) -> int | None:
    fields = _stat_fields(path)
    return None if fields is None else int(fields[11]) + int(fields[12])  # utime + stime


def _status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KB
    except OSError:
        return None


class ProcSampler:
    """Samples RSS (and per-thread CPU for `threads_of`) of named pids while a phase runs.

    At start it resets each process's VmHWM (writing 5 to /proc/PID/clear_refs,
    where allowed), so the VmHWM read at the end is the phase's own peak; RSS is
    also polled every `interval` seconds as a cross-check.
    """

    def __init__(self, pids: dict[str, int | None], threads_of: tuple[str, ...] = (), interval: float = 0.02):
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self.threads_of = set(threads_of)
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.result: dict[str, dict] = {}

    def __enter__(self) -> "ProcSampler":
        self._cpu0, self._hwm_reset, self._rss_max = {}, {}, {}
        self._threads: dict[str, dict[int, list]] = {n: {} for n in self.threads_of}
        for name, pid in self.pids.items():
            self._cpu0[name] = _cpu_ticks(f"/proc/{pid}/stat")
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
                self._hwm_reset[name] = True
            except OSError:
                self._hwm_reset[name] = False
            self._rss_max[name] = _rss_kb(pid) or 0
        self._sample_threads(initial=True)
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)
        self._thread.start()
        return self

    def _sample_threads(self, initial: bool = False) -> None:
        for name in self.threads_of:
            pid = self.pids.get(name)
            if not pid:
                continue
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            seen = self._threads[name]
            for tid in tids:
                ticks = _cpu_ticks(f"/proc/{pid}/task/{tid}/stat")
                if ticks is None:
                    continue
                tid = int(tid)
                if tid not in seen:
                    seen[tid] = [ticks if initial else 0, ticks]  # a new thread started at 0
                else:
                    seen[tid][1] = ticks

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):
            for name, pid in self.pids.items():
                rss = _rss_kb(pid)
                if rss and rss > self._rss_max[name]:
                    self._rss_max[name] = rss
            n += 1
            if n % 5 == 0:
                self._sample_threads()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_threads()
        wall = time.monotonic() - self.t0
        for name, pid in self.pids.items():
            cpu1 = _cpu_ticks(f"/proc/{pid}/stat")
            hwm = _status_kb(pid, "VmHWM")
            entry = {
                "wall_s": wall,
                "cpu_s": (cpu1 - self._cpu0[name]) / CLK_TCK if cpu1 is not None and self._cpu0[name] is not None else None,
                "rss_polled_peak_mb": self._rss_max[name] / 1024,
                "vmhwm_mb": hwm / 1024 if hwm else None,
                "vmhwm_is_phase_peak": self._hwm_reset[name],
            }
            entry["peak_rss_mb"] = max(v for v in (entry["rss_polled_peak_mb"],
                                                   entry["vmhwm_mb"] if self._hwm_reset[name] else None) if v)
            if name in self._threads:
                threads = []
                for tid, (first, last) in self._threads[name].items():
                    used = (last - first) / CLK_TCK
                    if used > 0:
                        threads.append({"tid": tid, "main": tid == pid, "cpu_s": used})
                threads.sort(key=lambda t: -t["cpu_s"])
                entry["threads"] = threads
            self.result[name] = entry


# =============================================================================
# The code under test, pinned for the whole run
# =============================================================================
def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout


def snapshot_addon(dest: Path, rev: str | None) -> dict:
    """Copy addon/ (the working tree's, or `rev`'s) to dest/addon; describe what was copied.

    The mirror runs from this copy, so edits to the checkout during a run
    cannot mix two versions of the addon in one measurement (or one process).
    """
    dest.mkdir(parents=True)
    info = {"head": _git("rev-parse", "HEAD").strip()}
    if rev is None:
        shutil.copytree(ROOT / "addon", dest / "addon", ignore=shutil.ignore_patterns("__pycache__"))
        info["source"] = "working tree"
        info["dirty_files"] = _git("status", "--porcelain", "--", "addon").splitlines()
    else:
        commit = _git("rev-parse", "--verify", rev + "^{commit}").strip()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "addon"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        info["source"] = f"git {rev}"
        info["commit"] = commit
    hasher = hashlib.sha256()
    for path in sorted((dest / "addon").rglob("*.py")):
        hasher.update(path.relative_to(dest).as_posix().encode() + b"\0" + path.read_bytes())
    info["sha256_of_py_files"] = hasher.hexdigest()
    return info


class PinnedMirror(Mirror):
    """The harness's Mirror, running the addon from a snapshot instead of the checkout."""

    script: Path | None = None

    def command(self) -> list[str]:
        cmd = super().command()
        if self.script is not None:
            assert cmd[1:3] == ["-s", str(SCRIPT)], cmd
            cmd[2] = str(self.script)
        return cmd


# =============================================================================
# Helpers
# =============================================================================
def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread(values):
    values = [v for v in values if v is not None]
    return (min(values), max(values)) if values else (None, None)


def run_clients(pool, fn, args_list, lead: float | None = None) -> dict:
    """Run one task per args tuple in the worker pool, all starting at the same moment."""
    if lead is None:
        lead = 0.1 if len(args_list) == 1 else 0.4
    start_at = time.monotonic() + lead
    futures = [pool.submit(fn, *args, start_at) for args in args_list]
    results = [f.result(timeout=TASK_TIMEOUT) for f in futures]
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    total = sum(r["bytes"] for r in results)
    return {
        "clients": len(results),
        "wall_s": end - start,
        "bytes": total,
        "aggregate_mb_s": total / MB / (end - start),
        "start_skew_s": max(r["start"] for r in results) - start,
        "distinct_pids": len({r["pid"] for r in results}),
        "client_cpu_s": sum(r["cpu"] for r in results),
        "per_client": results,
    }


def settle() -> None:
    """Start a timed phase with no dirty pages from the previous one being written back."""
    os.sync()
    time.sleep(0.2)


FILL_RE = r"fill: stored {digest} \((\d+) bytes\) in ([\d.]+)s"


def wait_fills(mirror: Mirror, digests, start_line: int, timeout: float = 300) -> dict:
    """Wait until the mirror logged 'fill: stored' for each digest; return digest -> fill seconds."""
    out = {}
    for digest in digests:
        m = mirror.wait_for_log(FILL_RE.format(digest=digest), timeout, start=start_line)
        out[digest] = float(m.group(2))
    return out


def fill_failures(mirror: Mirror, start_line: int) -> list[str]:
    return [line for line in mirror.lines[start_line:] if "failed" in line or "Traceback" in line
            or "error" in line.lower()]


def probe_components(workdir: Path, size: int) -> dict:
    """What the fill's own steps cost on this machine, right now, for `size` bytes:
    sha256; pwrite of a new file (first write; then again into the pages just
    freed by deleting the first, see Bench.pretouch); fsync."""
    data = os.urandom(1 << 20)
    chunks = max(1, size // len(data))
    hasher = hashlib.sha256()
    t0 = time.monotonic()
    for _ in range(chunks):
        hasher.update(data)
    out = {"bytes": chunks * len(data), "sha256_mb_s": chunks * len(data) / MB / (time.monotonic() - t0)}
    for key in ("pwrite_mb_s", "pwrite_again_mb_s"):
        path = workdir / "probe.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            t0 = time.monotonic()
            for i in range(chunks):
                os.pwrite(fd, data, i * len(data))
            out[key] = chunks * len(data) / MB / (time.monotonic() - t0)
            if key == "pwrite_mb_s":
                t0 = time.monotonic()
                os.fsync(fd)
                out["fsync_s"] = time.monotonic() - t0
        finally:
            os.close(fd)
            path.unlink()
    return out


def version_of(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unavailable"


# =============================================================================
# The benchmark
# =============================================================================
class Bench:
    def __init__(self, args):
        self.args = args
        self.size = int(args.layer_mb * MB)
        self.reps = args.reps
        self.results: dict = {"errors": []}
        self.tmp = Path(tempfile.mkdtemp(prefix="registry-cache-bench-"))
        self.shm: Path | None = None
        self.upstream: Upstream | None = None
        self.pool = None
        self.mirror: Mirror | None = None
        self.peer: DistributionProxy | None = None
        self.closed_port: ClosedPort | None = None
        self._mirrors = 0
        self.seaweed: SeaweedFS | None = None

    # ------------------------------------------------------------------ logging
    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t_start:7.1f}s] {text}", flush=True)

    def error(self, where: str, exc: BaseException, mirror: Mirror | None = None) -> None:
        entry = {"where": where, "error": f"{type(exc).__name__}: {exc}",
                 "traceback": traceback.format_exc()}
        if mirror is not None:
            entry["mirror_log_tail"] = mirror.log_text()[-6000:]
            entry["mirror_returncode"] = mirror.proc.poll() if mirror.proc else None
        self.results["errors"].append(entry)
        self.say(f"ERROR in {where}: {entry['error']}")

    # ------------------------------------------------------------------ processes
    def new_mirror(self, label: str) -> Mirror:
        self._mirrors += 1
        options = {"ssl_verify_upstream_trusted_ca": self.upstream.ca_cert_path} if self.args.https else {}
        options.update(option.split("=", 1) for option in self.args.mirror_option)
        m = PinnedMirror(self.tmp / f"mirror-{self._mirrors}-{label}", [f"reverse:{self.upstream.url}"],
                         options=options)
        m.script = self.script
        t0 = time.monotonic()
        m.start()
        self.results.setdefault("mirror_start_s", []).append(time.monotonic() - t0)
        # "Cold" means the blobs are not stored, not that the process just
        # started: one ping (and token) through it first, as a running mirror has seen.
        RegistryClient(m.url, verify=_verify()).ping()
        return m

    def stop_mirror(self, m: Mirror) -> dict:
        """Stop a mirror; return its lifetime VmHWM (MB) and the last log lines."""
        hwm = _status_kb(m.proc.pid, "VmHWM") if m.proc and m.proc.poll() is None else None
        m.stop()
        shutil.rmtree(m.workdir, ignore_errors=True)
        return {"vmhwm_mb": hwm / 1024 if hwm else None, "returncode": m.proc.returncode if m.proc else None}

    def new_peer(self) -> DistributionProxy:
        p = DistributionProxy(self.upstream.url, username=ALICE[0], password=ALICE[1],
                              workdir=str(tempfile.mkdtemp(prefix="peer-", dir=self.tmp))).start()
        RegistryClient(p.url, verify=_verify()).ping()
        return p

    def stop_peer(self, p: DistributionProxy) -> None:
        p.stop()
        shutil.rmtree(p.workdir, ignore_errors=True)

    def registry_pid(self) -> int | None:
        proc = getattr(self.upstream, "_proc", None)  # the upstream's distribution process
        return proc.pid if proc is not None else None

    # ------------------------------------------------------------------ setup
    def push(self, repo: str, seed: int):
        layer_path = self.tmp / f"layer-{seed}.tar.gz"
        try:
            layer = make_layer_file(str(layer_path), self.size, seed)
            image = push_image(self.upstream.url, repo, "v1", [layer], auth=ALICE, verify=_verify())
        finally:
            layer_path.unlink(missing_ok=True)
        return image

    def setup(self) -> None:
        a = self.args
        self.results["addon"] = snapshot_addon(self.tmp / "code", a.addon_rev)
        self.script = self.tmp / "code" / "addon" / "registry_cache.py"
        self.say(f"mirror code: {self.results['addon']['source']} "
                 f"({self.results['addon'].get('commit') or self.results['addon']['head'][:12]}"
                 f"{', DIRTY: ' + str(len(self.results['addon'].get('dirty_files', []))) + ' changed file(s)' if self.results['addon'].get('dirty_files') else ''})")
        self.say(f"probing sha256 / write / fsync speed in {self.tmp}")
        self.results["probe"] = probe_components(self.tmp, self.size)
        link_rate = a.link_mbit * 1e6 / 8 if a.link_mbit else None
        conn_rate = a.conn_mbit * 1e6 / 8 if a.conn_mbit else None
        self.upstream = Upstream(redirect_blobs=a.redirect, workdir=str(self.tmp / "upstream"),
                                 link_rate=link_rate, conn_rate=conn_rate, request_delay=a.rtt_ms / 1000,
                                 https=a.https).start()
        if a.https:
            os.environ["SSL_CERT_FILE"] = self.upstream.ca_cert_path  # before any client process starts
        self.say(f"upstream at {self.upstream.url} ({'CDN redirect' if a.redirect else 'relay'} mode); "
                 f"pushing images with one {self.size / MB:.0f} MB layer")
        t0 = time.monotonic()
        self.image = self.push("bench/main", 1)
        self.fresh = {"mirror": self.push("bench/fresh-mirror", 2), "peer": self.push("bench/fresh-peer", 3)}
        if "cluster" in a.phases:
            self.fresh.update({"cluster": self.push("bench/fresh-cluster", 4),
                               "peers-shared": self.push("bench/fresh-peers-shared", 5)})
        self.results["push_s"] = time.monotonic() - t0
        self.layer_digest, self.layer_size = self.image.layers[0]
        self.results["image"] = {"repo": self.image.repo, "digest": self.image.digest,
                                 "blob_bytes": self.image.blob_bytes, "layer_bytes": self.layer_size,
                                 "config_bytes": len(self.image.config)}
        self.say(f"pushed 3 images in {self.results['push_s']:.1f}s; starting {a.workers} client worker processes")
        ctx = multiprocessing.get_context("spawn")
        self.pool = concurrent.futures.ProcessPoolExecutor(max_workers=a.workers, mp_context=ctx)
        pids = [f.result(timeout=120) for f in [self.pool.submit(task_ready, 1.0) for _ in range(a.workers)]]
        self.results["worker_pids"] = sorted(set(pids))
        self.closed_port = ClosedPort()
        if not a.no_skopeo and shutil.which("skopeo"):
            base = Path("/dev/shm") if os.path.isdir("/dev/shm") else self.tmp
            self.shm = Path(tempfile.mkdtemp(prefix="registry-cache-bench-", dir=base))
            self.results["skopeo_dest_fs"] = str(base)

    # ------------------------------------------------------------------ phases
    def phase_cold(self) -> None:
        """Per repetition: direct pull, cold pull through a fresh mirror, through a fresh peer;
        then the same three with memory pre-touched (see pretouch); then skopeo."""
        variants = [("cold", False)] + ([] if self.args.no_pretouch else [("cold_pretouched", True)])
        for rep in range(self.reps):
            for key, touch in variants:
                out = self.results.setdefault(key, {"direct": [], "mirror": [], "peer": []})
                self.cold_rep(rep, out, touch)
            if self.shm is not None:
                self.cold_skopeo(rep, self.results["cold"])

    def pretouch(self, enabled: bool) -> float | None:
        """Write and delete a scratch file 1.25x the layer, right before a timed cold pull.

        This VM's balloon (free page reporting) hands pages that stay free for
        ~2 s back to the hypervisor, and touching them again costs a host fault
        per page: a new 500 MB file costs 0.4-1.3 s to write instead of 0.1 s.
        Pages freed just now are reused first, so a fill (or the peer's store)
        that starts within a second writes into memory the host still backs,
        as on a machine without this balloon. Done for direct pulls too.
        """
        if not enabled:
            return None
        path = self.tmp / "pretouch.bin"
        data = os.urandom(1 << 20)
        t0 = time.monotonic()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for i in range(int(self.size * 1.25) // len(data) + 1):
                os.pwrite(fd, data, i * len(data))
        finally:
            os.close(fd)
            path.unlink()
        return time.monotonic() - t0

    def cold_rep(self, rep: int, out: dict, touch: bool) -> None:
        image = self.image
        tag = f"cold rep {rep + 1}/{self.reps}{', pre-touched' if touch else ''}"
        self.say(f"{tag}: direct pull")
        settle()
        self.upstream.reset_counters()
        t = self.pretouch(touch)
        with ProcSampler({"bench": os.getpid(), "registry": self.registry_pid()}) as s:
            r = run_clients(self.pool, task_pull, [(self.upstream.url, image.repo, image.tag)])
        out["direct"].append({"seconds": r["wall_s"], "client_cpu_s": r["client_cpu_s"], "procs": s.result,
                              "pretouch_s": t,
                              "upstream_copies": self.upstream.counters.blob_bytes / image.blob_bytes})

        self.say(f"{tag}: pull through a fresh mirror")
        m = self.new_mirror("cold")
        entry = None
        try:
            settle()
            self.upstream.reset_counters()
            line0 = len(m.lines)
            t = self.pretouch(touch)
            with ProcSampler({"mitmdump": m.proc.pid, "bench": os.getpid(), "registry": self.registry_pid()},
                             threads_of=("mitmdump",)) as s:
                r = run_clients(self.pool, task_pull, [(m.url, image.repo, image.tag)])
                t_client_done = time.monotonic()
                fills = wait_fills(m, [d for d, _ in image.blobs], line0)
                stored_after = time.monotonic() - t_client_done
            entry = {
                "seconds": r["wall_s"], "client_cpu_s": r["client_cpu_s"], "procs": s.result, "pretouch_s": t,
                "fill_s": fills[self.layer_digest], "stored_after_client_s": stored_after,
                "upstream_copies": self.upstream.counters.blob_bytes / image.blob_bytes,
                "manifest_digest_ok": r["per_client"][0]["manifest_digest"] == image.digest,
            }
            out["mirror"].append(entry)
        except Exception as exc:  # noqa: BLE001 - report and go on
            self.error(f"{tag}: mirror pull", exc, m)
        finally:
            life = self.stop_mirror(m)
            if entry is not None:
                entry["lifetime"] = life
            self.results.setdefault("mitmdump_lifetime_vmhwm_mb", []).append(life["vmhwm_mb"])

        if self.args.no_peer:
            return
        self.say(f"{tag}: pull through a fresh peer")
        p = self.new_peer()
        try:
            settle()
            self.upstream.reset_counters()
            t = self.pretouch(touch)
            with ProcSampler({"peer": p.pid, "bench": os.getpid(), "registry": self.registry_pid()}) as s:
                r = run_clients(self.pool, task_pull, [(p.url, image.repo, image.tag)])
                quiet = wait_upstream_quiet(self.upstream)
            out["peer"].append({"seconds": r["wall_s"], "client_cpu_s": r["client_cpu_s"], "procs": s.result,
                                "pretouch_s": t, "upstream_copies": quiet / image.blob_bytes})
        except Exception as exc:  # noqa: BLE001
            self.error(f"{tag}: peer pull", exc)
            self.results["errors"][-1]["peer_log_tail"] = p.logs()[-6000:]
        finally:
            self.stop_peer(p)

    def skopeo_pull(self, primary: str, mirror: str | None, label: str) -> float:
        home = make_skopeo_home(str(self.tmp / f"skopeo-home-{label}"), primary=primary, mirror=mirror)
        dest = self.shm / f"dest-{label}-{time.monotonic_ns()}"
        settle()
        t0 = time.monotonic()
        try:
            skopeo_copy(f"{primary}/{self.image.repo}:{self.image.tag}", str(dest), home, timeout=TASK_TIMEOUT)
            return time.monotonic() - t0
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    def cold_skopeo(self, rep: int, out: dict) -> None:
        out.setdefault("skopeo_direct", [])
        out.setdefault("skopeo_mirror", [])
        self.say(f"cold rep {rep + 1}/{self.reps}: skopeo direct, then through a fresh mirror")
        try:
            out["skopeo_direct"].append(self.skopeo_pull(self.upstream.host_port, None, "direct"))
        except Exception as exc:  # noqa: BLE001
            self.error(f"cold rep {rep + 1}: skopeo direct", exc)
            return
        m = self.new_mirror("cold-skopeo")
        try:
            self.upstream.reset_counters()
            line0 = len(m.lines)
            seconds = self.skopeo_pull(self.closed_port.host_port, m.host_port, "mirror")
            wait_fills(m, [self.layer_digest], line0)
            out["skopeo_mirror"].append({"seconds": seconds,
                                         "upstream_copies": self.upstream.counters.blob_bytes / self.image.blob_bytes})
        except Exception as exc:  # noqa: BLE001
            self.error(f"cold rep {rep + 1}: skopeo through the mirror", exc, m)
        finally:
            self.stop_mirror(m)

    def start_main(self) -> None:
        """The long-lived mirror and peer for the warm phases, warmed by one pull each."""
        image = self.image
        self.say("starting the main mirror and peer; warming both with one pull")
        self.mirror = self.new_mirror("main")
        line0 = len(self.mirror.lines)
        with ProcSampler({"mitmdump": self.mirror.proc.pid}) as s:
            r = run_clients(self.pool, task_pull, [(self.mirror.url, image.repo, image.tag)])
            wait_fills(self.mirror, [d for d, _ in image.blobs], line0)
        self.results["main_mirror_warmup"] = {"seconds": r["wall_s"], "procs": s.result}
        self.peer = self.new_peer()
        run_clients(self.pool, task_pull, [(self.peer.url, image.repo, image.tag)])
        wait_upstream_quiet(self.upstream)

    def phase_warm(self) -> None:
        image = self.image
        out = self.results.setdefault("warm", {"direct": [], "mirror": [], "peer": [],
                                              "skopeo_direct": [], "skopeo_mirror": []})
        for rep in range(self.reps):
            self.say(f"warm rep {rep + 1}/{self.reps}: direct, mirror, peer")
            for name, url in (("direct", self.upstream.url), ("mirror", self.mirror.url), ("peer", self.peer.url)):
                settle()
                self.upstream.reset_counters()
                pid = {"mirror": self.mirror.proc.pid, "peer": self.peer.pid}.get(name)
                try:
                    with ProcSampler({name: pid} if pid else {}) as s:
                        r = run_clients(self.pool, task_pull, [(url, image.repo, image.tag)])
                    if name != "direct":
                        wait_upstream_quiet(self.upstream, quiet=0.5)
                    out[name].append({"seconds": r["wall_s"], "client_cpu_s": r["client_cpu_s"],
                                      "procs": s.result,
                                      "upstream_blob_bytes": self.upstream.counters.blob_bytes})
                except Exception as exc:  # noqa: BLE001
                    self.error(f"warm rep {rep + 1}: {name}", exc, self.mirror if name == "mirror" else None)
            if self.shm is not None:
                try:
                    out["skopeo_direct"].append(self.skopeo_pull(self.upstream.host_port, None, "direct"))
                    out["skopeo_mirror"].append(self.skopeo_pull(self.closed_port.host_port,
                                                                 self.mirror.host_port, "mirror"))
                except Exception as exc:  # noqa: BLE001
                    self.error(f"warm rep {rep + 1}: skopeo", exc, self.mirror)

    def phase_rates(self) -> None:
        image = self.image
        out = self.results.setdefault("rates", {})
        plan = [("mirror", 1), ("peer", 1), ("mirror", self.args.clients), ("peer", self.args.clients)]
        reps = self.args.rate_reps
        for rep in range(reps):
            self.say(f"warm blob rate rep {rep + 1}/{reps}: 1 and {self.args.clients} clients, mirror and peer")
            for name, n in plan:
                server = self.mirror if name == "mirror" else self.peer
                pid = self.mirror.proc.pid if name == "mirror" else self.peer.pid
                settle()
                self.upstream.reset_counters()
                try:
                    with ProcSampler({name: pid}, threads_of=(name,)) as s:
                        r = run_clients(self.pool, task_blob, [(server.url, image.repo, image.tag,
                                                                self.layer_digest, self.layer_size)] * n)
                    r.pop("per_client")
                    r["procs"] = s.result
                    r["upstream_blob_bytes"] = self.upstream.counters.blob_bytes
                    out.setdefault(f"{name}_{n}", []).append(r)
                except Exception as exc:  # noqa: BLE001
                    self.error(f"blob rate rep {rep + 1}: {name} x{n}", exc, self.mirror if name == "mirror" else None)

    def phase_copies(self) -> None:
        """8 concurrent cold pulls of a fresh image through the (warm-elsewhere) mirror and peer."""
        out = self.results.setdefault("copies8", {})
        n = self.args.cold_clients
        for name in ("mirror", "peer"):
            image = self.fresh[name]
            self.say(f"{n} concurrent cold pulls of a fresh image through the {name}")
            server = self.mirror if name == "mirror" else self.peer
            pid = self.mirror.proc.pid if name == "mirror" else self.peer.pid
            settle()
            self.upstream.reset_counters()
            line0 = len(self.mirror.lines)
            try:
                with ProcSampler({name: pid}) as s:
                    r = run_clients(self.pool, task_pull, [(server.url, image.repo, image.tag)] * n)
                    if name == "mirror":
                        wait_fills(self.mirror, [d for d, _ in image.blobs], line0)
                    quiet = wait_upstream_quiet(self.upstream)
                r.pop("per_client")
                snap = self.upstream.counters.snapshot()
                out[name] = {**r, "procs": s.result, "upstream_blob_bytes": quiet,
                             "upstream_copies": quiet / image.blob_bytes,
                             "upstream_gets_by_digest": snap["blob_gets_by_digest"],
                             "image_blob_bytes": image.blob_bytes}
            except Exception as exc:  # noqa: BLE001
                self.error(f"{n} concurrent cold pulls: {name}", exc, self.mirror if name == "mirror" else None)

    # ------------------------------------------------------------------ several nodes
    def object_store(self) -> SeaweedFS:
        if self.seaweed is None:
            self.say("starting SeaweedFS (weed mini) for the shared tier")
            self.seaweed = SeaweedFS(bucket="bench").start()
            self.results["seaweedfs"] = weed_version()
        return self.seaweed

    def s3_options(self, prefix: str) -> tuple[dict, dict]:
        store = self.object_store()
        options = {"s3_bucket": store.bucket, "s3_endpoint": store.direct_endpoint, "s3_prefix": prefix}
        if self.args.https:
            options["ssl_verify_upstream_trusted_ca"] = self.upstream.ca_cert_path
        return options, store.client_env()

    def new_cluster(self, nodes: int, prefix: str) -> Cluster:
        options = {"ssl_verify_upstream_trusted_ca": self.upstream.ca_cert_path} if self.args.https else {}
        options.update(option.split("=", 1) for option in self.args.mirror_option)

        class Node(PinnedMirror):
            script = self.script

        self._mirrors += 1
        return Cluster(self.tmp / f"cluster-{self._mirrors}", self.upstream, nodes, self.object_store(), prefix,
                       options=options, mirror_class=Node, s3_endpoint=self.object_store().direct_endpoint)

    def phase_cluster(self) -> None:
        """8 concurrent cold pulls spread over 3 nodes sharing an object store,
        and over 3 of distribution's caches on one storage root; then a node
        replaced by an empty one serves a warm pull, against a cold pull
        through a fresh node (same image, from the upstream)."""
        out = self.results.setdefault("cluster", {"replaced": [], "cold_fresh_node": []})
        n = self.args.cold_clients
        image = self.fresh["cluster"]
        cluster = self.new_cluster(3, "bench-cluster/")
        self.say(f"{n} concurrent cold pulls of a fresh image spread over 3 mirror nodes (one object store)")
        try:
            cluster.start()
            for node in cluster.nodes:
                RegistryClient(node.url, verify=_verify()).ping()
            settle()
            self.upstream.reset_counters()
            lines = [len(node.lines) for node in cluster.nodes]
            r = run_clients(self.pool, task_pull, [(cluster.nodes[i % 3].url, image.repo, image.tag)
                                                   for i in range(n)])
            for node, line0 in zip(cluster.nodes, lines):
                wait_fills(node, [d for d, _ in image.blobs], line0)
            quiet = wait_upstream_quiet(self.upstream)
            r.pop("per_client")
            out["copies"] = {**r, "upstream_blob_bytes": quiet, "upstream_copies": quiet / image.blob_bytes,
                             "image_blob_bytes": image.blob_bytes}
            for digest, _ in image.blobs:  # in the object store before a node is replaced
                owner = cluster.blob_ports.index(rank(parse_members(cluster.members), digest)[0].port)
                cluster.nodes[owner].wait_for_log(rf"object store: (uploaded|already holds) {digest}", 300)
        except Exception as exc:  # noqa: BLE001
            self.error("cluster: cold pulls over 3 nodes", exc, cluster.nodes[0])
        if not self.args.no_peer:
            self.cluster_peers_copies(out, n)
        try:
            for rep in range(self.reps):
                self.say(f"replaced node rep {rep + 1}/{self.reps}: an empty node serves a warm pull; "
                         f"a fresh node without the object store pulls cold")
                old = cluster.nodes[2]
                old.stop()
                shutil.rmtree(old.workdir, ignore_errors=True)
                cluster.nodes[2] = node = cluster.make_node(2)
                t0 = time.monotonic()
                node.start()
                started = time.monotonic() - t0
                settle()
                self.upstream.reset_counters()
                line0 = len(node.lines)
                self.pretouch(not self.args.no_pretouch)
                r = run_clients(self.pool, task_pull, [(node.url, image.repo, image.tag)])
                wait_fills(node, [d for d, _ in image.blobs], line0)
                out["replaced"].append({"seconds": r["wall_s"], "start_s": started,
                                        "upstream_blob_bytes": self.upstream.counters.blob_bytes})
                m = self.new_mirror("cold-fresh-node")
                try:
                    settle()
                    self.upstream.reset_counters()
                    line0 = len(m.lines)
                    self.pretouch(not self.args.no_pretouch)
                    r = run_clients(self.pool, task_pull, [(m.url, image.repo, image.tag)])
                    wait_fills(m, [d for d, _ in image.blobs], line0)
                    out["cold_fresh_node"].append({"seconds": r["wall_s"],
                                                   "upstream_blob_bytes": self.upstream.counters.blob_bytes})
                finally:
                    self.stop_mirror(m)
        except Exception as exc:  # noqa: BLE001
            self.error("cluster: replaced node", exc, cluster.nodes[2])
        finally:
            cluster.stop()
            shutil.rmtree(cluster.workdir, ignore_errors=True)

    def cluster_peers_copies(self, out: dict, n: int) -> None:
        image = self.fresh["peers-shared"]
        shared = tempfile.mkdtemp(prefix="peers-shared-", dir=self.tmp)
        peers = []
        self.say(f"{n} concurrent cold pulls spread over 3 of distribution's caches on one storage root")
        try:
            for _ in range(3):
                p = DistributionProxy(self.upstream.url, username=ALICE[0], password=ALICE[1],
                                      workdir=str(tempfile.mkdtemp(prefix="peer-", dir=self.tmp)), rootdir=shared)
                peers.append(p.start())
                RegistryClient(p.url, verify=_verify()).ping()
            settle()
            self.upstream.reset_counters()
            r = run_clients(self.pool, task_pull, [(peers[i % 3].url, image.repo, image.tag) for i in range(n)])
            quiet = wait_upstream_quiet(self.upstream)
            r.pop("per_client")
            out["peer_copies"] = {**r, "upstream_blob_bytes": quiet, "upstream_copies": quiet / image.blob_bytes}
        except Exception as exc:  # noqa: BLE001
            self.error("cluster: distribution on shared storage", exc)
        finally:
            for p in peers:
                self.stop_peer(p)

    def phase_tiers(self) -> None:
        """Warm blob rate of a node with an empty store (from the object store),
        then from its own store, against the single-node mirror (interleaved)."""
        image = self.image
        out = self.results.setdefault("tiers", {"object_store": [], "local": [], "single": []})
        options, env = self.s3_options("bench-tiers/")
        self._mirrors += 1
        seed = PinnedMirror(self.tmp / f"mirror-{self._mirrors}-s3-seed", [f"reverse:{self.upstream.url}"],
                            options=options, env=env)
        seed.script = self.script
        self.say("putting the main image's blobs in the object store (one pull through a node using it)")
        try:
            seed.start()
            line0 = len(seed.lines)
            run_clients(self.pool, task_pull, [(seed.url, image.repo, image.tag)])
            for digest, _ in image.blobs:
                seed.wait_for_log(rf"object store: (uploaded|already holds) {digest}", 300, start=line0)
        finally:
            self.stop_mirror(seed)
        for rep in range(self.args.rate_reps):
            self.say(f"tiers rep {rep + 1}/{self.args.rate_reps}: blob rate from the object store, the node's "
                     f"own store, the single-node mirror")
            self._mirrors += 1
            node = PinnedMirror(self.tmp / f"mirror-{self._mirrors}-s3-empty", [f"reverse:{self.upstream.url}"],
                                options=options, env=env)
            node.script = self.script
            try:
                node.start()
                RegistryClient(node.url, verify=_verify()).ping()
                for name, url in (("object_store", node.url), ("local", node.url), ("single", self.mirror.url)):
                    settle()
                    self.upstream.reset_counters()
                    line0 = len(node.lines)
                    self.pretouch(name == "object_store" and not self.args.no_pretouch)  # (a new file is written)
                    r = run_clients(self.pool, task_blob, [(url, image.repo, image.tag, self.layer_digest,
                                                            self.layer_size)])
                    if name == "object_store":
                        wait_fills(node, [self.layer_digest], line0)
                    r.pop("per_client")
                    r["upstream_blob_bytes"] = self.upstream.counters.blob_bytes
                    out[name].append(r)
            except Exception as exc:  # noqa: BLE001
                self.error(f"tiers rep {rep + 1}", exc, node)
            finally:
                self.stop_mirror(node)

    def phase_resume(self) -> None:
        """A cold pull whose upstream connection is cut once, half-way through
        the layer: the mirror resumes; a direct client starts over."""
        image = self.image
        out = self.results.setdefault("resume", {"direct": [], "mirror": []})
        for rep in range(self.reps):
            self.say(f"resume rep {rep + 1}/{self.reps}: direct pull cut at 50% (retried), then through a fresh mirror")
            settle()
            self.upstream.reset_counters()
            self.upstream.set_fault(self.layer_digest, "cut", at=self.layer_size // 2, times=1)
            try:
                r = run_clients(self.pool, task_pull_retrying, [(self.upstream.url, image.repo, image.tag)])
                out["direct"].append({"seconds": r["wall_s"], "retried": r["per_client"][0]["retried"],
                                      "upstream_copies": self.upstream.counters.blob_bytes / image.blob_bytes})
            except Exception as exc:  # noqa: BLE001
                self.error(f"resume rep {rep + 1}: direct", exc)
            finally:
                self.upstream.clear_faults()
            m = self.new_mirror("resume")
            try:
                settle()
                self.upstream.reset_counters()
                self.upstream.set_fault(self.layer_digest, "cut", at=self.layer_size // 2, times=1)
                line0 = len(m.lines)
                r = run_clients(self.pool, task_pull, [(m.url, image.repo, image.tag)])
                fills = wait_fills(m, [d for d, _ in image.blobs], line0)
                resumed = any("resuming at byte" in line for line in m.lines[line0:])
                out["mirror"].append({"seconds": r["wall_s"], "fill_s": fills[self.layer_digest], "resumed": resumed,
                                      "upstream_copies": self.upstream.counters.blob_bytes / image.blob_bytes})
            except Exception as exc:  # noqa: BLE001
                self.error(f"resume rep {rep + 1}: mirror", exc, m)
            finally:
                self.upstream.clear_faults()
                self.stop_mirror(m)

    def phase_resolutions(self) -> None:
        """Warm image resolutions per second (challenge, token, HEAD by tag,
        GET by digest) with many clients at once: a rollout is mostly this.
        Direct and mirror interleaved; the upstream requests each cost."""
        a, image = self.args, self.image
        procs = min(a.workers, 8)
        threads = max(1, -(-a.resolve_clients // procs))
        out = self.results.setdefault("resolutions", {"direct": [], "mirror": []})
        targets = {"direct": self.upstream.url, "mirror": self.mirror.url}
        for rep in range(self.reps):
            for name in (("direct", "mirror") if rep % 2 == 0 else ("mirror", "direct")):
                self.say(f"resolutions rep {rep + 1}/{self.reps}: {procs * threads} clients for "
                         f"{a.resolve_seconds:.0f} s, {name}")
                settle()
                self.upstream.reset_counters()
                tokens0 = self.upstream.tokens_issued
                start_at = time.monotonic() + 0.5
                pid = self.mirror.proc.pid if name == "mirror" else self.registry_pid()
                cpu0 = (_cpu_ticks(f"/proc/{pid}/stat"), _cpu_ticks(f"/proc/{pid}/task/{pid}/stat")) if pid else (None, None)
                try:
                    futures = [self.pool.submit(task_resolutions, targets[name], image.repo, image.tag, threads,
                                                a.resolve_seconds, start_at) for _ in range(procs)]
                    results = [f.result(timeout=TASK_TIMEOUT) for f in futures]
                    count = sum(r["resolutions"] for r in results)
                    latencies = sorted(x for r in results for x in r["latencies_ms"])
                    snap = self.upstream.counters.snapshot()
                    cpu1 = (_cpu_ticks(f"/proc/{pid}/stat"), _cpu_ticks(f"/proc/{pid}/task/{pid}/stat")) if pid else (None, None)
                    cpu_ms = [(b - a) / CLK_TCK * 1000 / max(count, 1) if a is not None and b is not None else None
                              for a, b in zip(cpu0, cpu1)]
                    out[name].append({
                        # CPU of the process answering (mitmdump, or the upstream registry), and of its main
                        # thread (mitmdump's event loop, what bounds it), per resolution; includes the 0.5 s lead
                        "cpu_ms_per_resolution": cpu_ms[0], "main_thread_cpu_ms_per_resolution": cpu_ms[1],
                        "clients": procs * threads, "per_s": count / a.resolve_seconds,
                        "p50_ms": latencies[len(latencies) // 2] if latencies else None,
                        "errors": sum(r["error_count"] for r in results),
                        "upstream_requests_per_resolution": (len(snap["requests"]) + self.upstream.tokens_issued
                                                             - tokens0) / max(count, 1),
                        "upstream_manifest_gets": snap["manifest_gets"],
                    })
                except Exception as exc:  # noqa: BLE001
                    self.error(f"resolutions rep {rep + 1}: {name}", exc, self.mirror)

    def phase_pull_costs(self) -> None:
        """Upstream manifest GETs (Docker Hub's pulls) and HEADs per warm pull,
        per client: through the mirror and through distribution's cache."""
        out = self.results.setdefault("pull_costs", {})
        image = self.image
        for name, server in (("mirror", self.mirror), ("peer", self.peer)):
            clients = {"v2": lambda url=server.url: run_clients(self.pool, task_pull, [(url, image.repo, image.tag)])}
            if not self.args.no_skopeo:
                hp = server.url.split("//", 1)[1]
                clients["skopeo"] = lambda hp=hp: self.skopeo_pull(self.closed_port.host_port, hp, f"costs-{name}")
            for client, pull in clients.items():
                try:
                    pull()  # warm for this client
                    wait_upstream_quiet(self.upstream)
                    self.upstream.reset_counters()
                    pull()
                    snap = self.upstream.counters.snapshot()
                    out.setdefault(name, {})[client] = {"manifest_gets": snap["manifest_gets"],
                                                       "manifest_heads": snap["manifest_heads"]}
                except Exception as exc:  # noqa: BLE001
                    self.error(f"pull costs: {client} through the {name}", exc, self.mirror)

    def phase_manifest_latency(self) -> None:
        image = self.image
        n = self.args.manifest_gets
        self.say(f"manifest latency: {n} GETs by tag, direct / mirror / peer interleaved")
        token = RegistryClient(self.upstream.url, verify=_verify()).fetch_token(
            self.upstream.token_realm, self.upstream.service, [f"repository:{image.repo}:pull"])[0]
        targets = {"direct": self.upstream.url, "mirror": self.mirror.url, "peer": self.peer.url}
        conns = {name: _conn(url, timeout=60) for name, url in targets.items()}
        headers = {"Accept": ", ".join(ALL_MANIFEST_TYPES), "Authorization": "Bearer " + token}
        times = {name: [] for name in targets}
        by_digest = {name: [] for name in targets}

        def get(name: str, reference: str = image.tag) -> float:
            conn = conns[name]
            t0 = time.perf_counter()
            conn.request("GET", f"/v2/{image.repo}/manifests/{reference}", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            dt = time.perf_counter() - t0
            if resp.status != 200 or "sha256:" + hashlib.sha256(body).hexdigest() != image.digest:
                raise RuntimeError(f"manifest GET via {name}: HTTP {resp.status}, {body[:200]!r}")
            return dt

        sampler = ProcSampler({"mitmdump": self.mirror.proc.pid})
        try:
            with sampler:
                for _ in range(5):  # connections, token checks, code paths warmed
                    for name in targets:
                        get(name)
                order = list(targets)
                for i in range(n):
                    for name in (order if i % 2 == 0 else order[::-1]):
                        times[name].append(get(name) * 1000)
                        by_digest[name].append(get(name, image.digest) * 1000)
        except Exception as exc:  # noqa: BLE001
            self.error("manifest latency", exc, self.mirror)
        finally:
            for conn in conns.values():
                conn.close()
        self.results["manifest_ms"] = times
        self.results["manifest_by_digest_ms"] = by_digest
        self.results["manifest_procs"] = {"procs": sampler.result}

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        self.t_start = time.monotonic()
        a = self.args
        self.results["config"] = {
            "layer_mb": a.layer_mb, "layer_bytes": self.size, "reps": self.reps, "quick": a.quick,
            "rate_reps": a.rate_reps, "redirect": a.redirect, "https": a.https, "clients": a.clients, "cold_clients": a.cold_clients,
            "manifest_gets": a.manifest_gets, "pretouch": not a.no_pretouch, "link_mbit": a.link_mbit,
            "conn_mbit": a.conn_mbit, "rtt_ms": a.rtt_ms, "phases": a.phases, "mirror_options": a.mirror_option,
        }
        self.results["machine"] = {
            "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": platform.python_version(),
            "mitmproxy": version_of([str(Path(sys.executable).with_name("mitmdump")), "--version"]),
            "docker_registry": version_of(["docker-registry", "--version"]),
            "skopeo": version_of(["skopeo", "--version"]),
            "kernel": platform.release(),
        }
        try:
            self.setup()
            phases = {"cold": [self.phase_cold], "resume": [self.phase_resume], "warm": [self.phase_warm],
                      "rates": [self.phase_rates], "copies": [self.phase_copies],
                      "manifest": [self.phase_manifest_latency], "resolutions": [self.phase_resolutions],
                      "pullcosts": [self.phase_pull_costs], "cluster": [self.phase_cluster],
                      "tiers": [self.phase_tiers]}
            wanted = [name for name in phases if name in a.phases]
            needs_main = ("warm", "rates", "copies", "manifest", "resolutions", "pullcosts", "tiers")
            if set(wanted) & set(needs_main):
                wanted.insert(wanted.index(next(n for n in wanted if n in needs_main)), "main")
                phases["main"] = [self.start_main]
            for phase in [p for name in wanted for p in phases[name]]:
                try:
                    phase()
                except Exception as exc:  # noqa: BLE001 - one broken phase must not hide the others
                    self.error(phase.__name__, exc, self.mirror)
            if self.mirror is not None and self.mirror.proc.poll() is None:
                hwm = _status_kb(self.mirror.proc.pid, "VmHWM")
                self.results["main_mirror_vmhwm_end_mb"] = hwm / 1024 if hwm else None
                self.results["main_mirror_fill_failures"] = fill_failures(self.mirror, 0)
            if self.upstream is not None:
                self.results["upstream_errors"] = self.upstream.errors()
            self.results["probe_end"] = probe_components(self.tmp, self.size)
        finally:
            self.teardown()
        self.results["machine"]["loadavg_end"] = os.getloadavg()
        self.results["total_s"] = time.monotonic() - self.t_start
        return self.results

    def teardown(self) -> None:
        if self.mirror is not None:
            life = self.stop_mirror(self.mirror)
            self.results.setdefault("mitmdump_lifetime_vmhwm_mb", []).append(life["vmhwm_mb"])
        if self.peer is not None:
            self.stop_peer(self.peer)
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.closed_port is not None:
            self.closed_port.close()
        if self.upstream is not None:
            self.upstream.stop()
        if self.seaweed is not None:
            self.seaweed.stop()
        if self.shm is not None:
            shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


# =============================================================================
# Summary and table
# =============================================================================
def paired_ratio(num: list, den: list):
    ratios = [a / b for a, b in zip(num, den) if a is not None and b]
    return median(ratios), ratios


def secs(entries):
    return [e["seconds"] if isinstance(e, dict) else e for e in entries]


def summarize(res: dict) -> dict:
    s: dict = {}
    cold, warm, rates = res.get("cold", {}), res.get("warm", {}), res.get("rates", {})
    for key in ("cold", "cold_pretouched"):
        c = res.get(key)
        if not c:
            continue
        d, m, p = secs(c["direct"]), secs(c["mirror"]), secs(c["peer"])
        s[f"{key}_direct_s"], s[f"{key}_mirror_s"], s[f"{key}_peer_s"] = median(d), median(m), median(p)
        s[f"{key}_ratio_mirror_direct"], s[f"{key}_ratios"] = paired_ratio(m, d)
        s[f"{key}_ratio_peer_direct"], _ = paired_ratio(p, d)
        s[f"{key}_fill_s"] = median([e["fill_s"] for e in c["mirror"]])
    cold_all = [e for key in ("cold", "cold_pretouched") for e in res.get(key, {}).get("mirror", [])]
    peer_all = [e for key in ("cold", "cold_pretouched") for e in res.get(key, {}).get("peer", [])]
    s["copies_1_mirror"] = [e["upstream_copies"] for e in cold_all]
    s["copies_1_peer"] = [e["upstream_copies"] for e in peer_all]
    if cold:
        if cold.get("skopeo_mirror"):
            sm, sd = secs(cold["skopeo_mirror"]), cold["skopeo_direct"]
            s["skopeo_cold_ratio"], _ = paired_ratio(sm, sd)
            s["skopeo_cold_mirror_s"], s["skopeo_cold_direct_s"] = median(sm), median(sd)
    if warm:
        d, m, p = secs(warm["direct"]), secs(warm["mirror"]), secs(warm["peer"])
        s["warm_direct_s"], s["warm_mirror_s"], s["warm_peer_s"] = median(d), median(m), median(p)
        s["warm_ratio_mirror_direct"], s["warm_ratios"] = paired_ratio(m, d)
        s["warm_ratio_peer_direct"], _ = paired_ratio(p, d)
        s["warm_upstream_blob_bytes_mirror"] = [e["upstream_blob_bytes"] for e in warm["mirror"]]
        if warm.get("skopeo_mirror"):
            s["skopeo_warm_ratio"], _ = paired_ratio(warm["skopeo_mirror"], warm["skopeo_direct"])
            s["skopeo_warm_mirror_s"], s["skopeo_warm_direct_s"] = median(warm["skopeo_mirror"]), median(warm["skopeo_direct"])
    for key in list(rates):
        s[f"rate_{key}_mb_s"] = median([r["aggregate_mb_s"] for r in rates[key]])
    for n in sorted({int(k.split("_")[1]) for k in rates}):
        mk, pk = f"mirror_{n}", f"peer_{n}"
        if mk in rates and pk in rates:
            s[f"rate_ratio_{n}"], s[f"rate_ratios_{n}"] = paired_ratio(
                [r["aggregate_mb_s"] for r in rates[mk]], [r["aggregate_mb_s"] for r in rates[pk]])
    resume = res.get("resume", {})
    if resume.get("mirror"):
        s["resume_copies_mirror"] = [e["upstream_copies"] for e in resume["mirror"]]
        s["resume_mirror_s"] = median(secs(resume["mirror"]))
    if resume.get("direct"):
        s["resume_copies_direct"] = [e["upstream_copies"] for e in resume["direct"]]
        s["resume_direct_s"] = median(secs(resume["direct"]))
    c8 = res.get("copies8", {})
    for name in ("mirror", "peer"):
        if name in c8:
            s[f"copies_8_{name}"] = c8[name]["upstream_copies"]
            s[f"cold8_{name}_s"] = c8[name]["wall_s"]
    ms = res.get("manifest_ms", {})
    if ms.get("direct") and ms.get("mirror"):
        s["manifest_direct_ms"] = median(ms["direct"])
        s["manifest_mirror_ms"] = median(ms["mirror"])
        s["manifest_added_ms"] = s["manifest_mirror_ms"] - s["manifest_direct_ms"]
        # Paired: each mirror GET minus the direct GET made next to it.
        s["manifest_added_paired_ms"] = median([a - b for a, b in zip(ms["mirror"], ms["direct"])])
        if ms.get("peer"):
            s["manifest_peer_ms"] = median(ms["peer"])
            s["manifest_peer_added_ms"] = s["manifest_peer_ms"] - s["manifest_direct_ms"]
    bd = res.get("manifest_by_digest_ms", {})
    if bd.get("direct") and bd.get("mirror"):
        s["manifest_digest_direct_ms"], s["manifest_digest_mirror_ms"] = median(bd["direct"]), median(bd["mirror"])
        s["manifest_digest_added_paired_ms"] = median([a - b for a, b in zip(bd["mirror"], bd["direct"])])
        if bd.get("peer"):
            s["manifest_digest_peer_added_paired_ms"] = median([a - b for a, b in zip(bd["peer"], bd["direct"])])
    rs = res.get("resolutions", {})
    if rs.get("direct") and rs.get("mirror"):
        s["resolve_direct_per_s"] = median([r["per_s"] for r in rs["direct"]])
        s["resolve_mirror_per_s"] = median([r["per_s"] for r in rs["mirror"]])
        s["resolve_ratio"], s["resolve_ratios"] = paired_ratio([r["per_s"] for r in rs["mirror"]],
                                                               [r["per_s"] for r in rs["direct"]])
        s["resolve_p50_ms"] = {name: median([r["p50_ms"] for r in rs[name] if r["p50_ms"]]) for name in rs}
        s["resolve_upstream_per"] = {name: median([r["upstream_requests_per_resolution"] for r in rs[name]])
                                     for name in rs}
        s["resolve_errors"] = sum(r["errors"] for name in rs for r in rs[name])
        s["resolve_cpu_ms"] = {name: (median([r["cpu_ms_per_resolution"] for r in rs[name] if r.get("cpu_ms_per_resolution")]),
                                      median([r["main_thread_cpu_ms_per_resolution"] for r in rs[name]
                                              if r.get("main_thread_cpu_ms_per_resolution")]))
                               for name in rs}
    cl = res.get("cluster", {})
    if cl.get("copies"):
        s["cluster_copies"] = cl["copies"]["upstream_copies"]
        s["cluster_cold8_s"] = cl["copies"]["wall_s"]
    if cl.get("peer_copies"):
        s["cluster_peer_copies"] = cl["peer_copies"]["upstream_copies"]
        s["cluster_peer_cold8_s"] = cl["peer_copies"]["wall_s"]
    if cl.get("replaced") and cl.get("cold_fresh_node"):
        rp, cf = secs(cl["replaced"]), secs(cl["cold_fresh_node"])
        s["replaced_warm_s"], s["fresh_cold_s"] = median(rp), median(cf)
        s["replaced_ratio"], s["replaced_ratios"] = paired_ratio(rp, cf)
        s["replaced_upstream_bytes"] = [e["upstream_blob_bytes"] for e in cl["replaced"]]
        s["replaced_start_s"] = median([e["start_s"] for e in cl["replaced"]])
    ti = res.get("tiers", {})
    if ti.get("single"):
        for name in ("object_store", "local", "single"):
            s[f"tier_{name}_mb_s"] = median([r["aggregate_mb_s"] for r in ti[name]])
        for name in ("object_store", "local"):
            s[f"tier_{name}_ratio"], s[f"tier_{name}_ratios"] = paired_ratio(
                [r["aggregate_mb_s"] for r in ti[name]], [r["aggregate_mb_s"] for r in ti["single"]])
        s["tier_upstream_bytes"] = [r["upstream_blob_bytes"] for name in ("object_store", "local") for r in ti[name]]
    s["pull_costs"] = res.get("pull_costs", {})
    n = res.get("config", {}).get("clients")
    rss4 = [r["procs"]["mirror"]["peak_rss_mb"] for r in rates.get(f"mirror_{n}", [])]
    s["rss_warm_concurrent_mb"] = max(rss4) if rss4 else None
    # Overall: every phase's peak of every mitmdump process (each phase resets
    # VmHWM, so a lifetime VmHWM read at stop covers only the time since the last reset).
    peaks = [v for v in res.get("mitmdump_lifetime_vmhwm_mb", []) if v]

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "procs" and isinstance(value, dict):
                    peaks.extend(value[name]["peak_rss_mb"] for name in ("mitmdump", "mirror") if name in value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in res.items() if k != "summary"})
    s["rss_overall_mb"] = max(peaks) if peaks else None
    if c8.get("mirror"):
        s["rss_cold8_mb"] = c8["mirror"]["procs"]["mirror"]["peak_rss_mb"]
    return s


def where_time_goes(res: dict) -> list[str]:
    """CPU seconds per component during the cold pulls (medians over repetitions)."""
    lines = []
    ncpu = res.get("machine", {}).get("cpus") or 1

    def med(entries, fn):
        return median([fn(e) for e in entries if "procs" in e])

    def proc_cpu(name):
        return lambda e: e["procs"].get(name, {}).get("cpu_s") or 0.0

    def busy(entries, names):
        """CPU-s of everything measured / (wall of the pull, until stored, x CPUs).

        The sampled phase also holds the workers' synchronized-start lead
        (idle), so the wall is the client's own plus the wait for 'stored'."""
        def one(e):
            total = sum(proc_cpu(n)(e) for n in names) + e["client_cpu_s"]
            wall = e["seconds"] + e.get("stored_after_client_s", 0.0)
            return total / (wall * ncpu)
        return med(entries, one)

    def main_thread(e):
        return sum(t["cpu_s"] for t in e["procs"]["mitmdump"]["threads"] if t["main"])

    def non_main(e):
        # Process CPU includes threads that already exited (a short fill can
        # end between two per-thread samples); the event-loop thread never exits.
        return proc_cpu("mitmdump")(e) - main_thread(e)

    def busiest(e):
        return next((t["cpu_s"] for t in e["procs"]["mitmdump"]["threads"] if not t["main"]), 0.0)

    for key, label in (("cold", "as is"), ("cold_pretouched", "memory pre-touched")):
        cold = res.get(key, {})
        if not cold:
            continue
        lines.append(f"[{label}]")
        if cold.get("mirror"):
            entries = cold["mirror"]
            wall = med(entries, lambda e: e["seconds"])
            fill_cpu = med(entries, busiest)
            other_cpu = med(entries, non_main)
            lines.append(f"cold pull through the mirror: client done in {wall:.2f}s; the fill logged 'stored' after "
                         f"{med(entries, lambda e: e['fill_s']):.2f}s (incl. commit fsync), "
                         f"{med(entries, lambda e: e['stored_after_client_s']):.2f}s after the client finished")
            lines.append(f"  CPU-s until stored: mitmdump {med(entries, proc_cpu('mitmdump')):.2f} [event-loop thread "
                         f"{med(entries, main_thread):.2f}, other threads {other_cpu:.2f} (fill, blob server, io pool); "
                         f"busiest one sampled (the fill: recv+sha256+pwrite) {fill_cpu:.2f}], "
                         f"client {med(entries, lambda e: e['client_cpu_s']):.2f}, "
                         f"front door+token (bench process) {med(entries, proc_cpu('bench')):.2f}, "
                         f"upstream distribution {med(entries, proc_cpu('registry')):.2f}; all together "
                         f"{busy(entries, ('mitmdump', 'bench', 'registry')) * 100:.0f}% of {ncpu} CPUs")
            if wall:
                lines.append(f"  mitmdump's non-event-loop threads used {other_cpu / wall * 100:.0f}% of one CPU over "
                             f"the client's pull; client-visible rate {res['image']['layer_bytes'] / MB / wall:.0f} MB/s")
        if cold.get("direct"):
            entries = cold["direct"]
            lines.append(f"cold pull direct: {med(entries, lambda e: e['seconds']):.2f}s; CPU-s client "
                         f"{med(entries, lambda e: e['client_cpu_s']):.2f}, front door+token "
                         f"{med(entries, proc_cpu('bench')):.2f}, distribution {med(entries, proc_cpu('registry')):.2f}; "
                         f"all together {busy(entries, ('bench', 'registry')) * 100:.0f}% of {ncpu} CPUs")
        if cold.get("peer"):
            entries = cold["peer"]
            lines.append(f"cold pull through the peer: {med(entries, lambda e: e['seconds']):.2f}s; CPU-s client "
                         f"{med(entries, lambda e: e['client_cpu_s']):.2f}, peer {med(entries, proc_cpu('peer')):.2f}, "
                         f"front door+token {med(entries, proc_cpu('bench')):.2f}, distribution "
                         f"{med(entries, proc_cpu('registry')):.2f} (until upstream traffic settles, incl. its 2nd fetch)")
    probes = [p for p in (res.get("probe"), res.get("probe_end")) if p]
    if probes and res.get("image"):
        size = res["image"]["layer_bytes"]

        def each(fn):
            return " / ".join(f"{fn(p):.2f}" for p in probes)

        lines.append(f"this machine, for the {size / MB:.0f} MB layer (probed at start / end of the run): sha256 "
                     f"{each(lambda p: size / (p['sha256_mb_s'] * MB))} s; pwrite of a new file "
                     f"{each(lambda p: size / (p['pwrite_mb_s'] * MB))} s, again right after into the pages just "
                     f"freed {each(lambda p: size / (p['pwrite_again_mb_s'] * MB))} s; fsync {each(lambda p: p['fsync_s'])} s")
    return lines


def fmt(v, spec=".2f", none="n/a"):
    return none if v is None else format(v, spec)


def table(res: dict, s: dict) -> str:
    cfg = res["config"]
    n, n8 = cfg["clients"], cfg["cold_clients"]
    rows = []

    def row(figure, mirror, baseline, ratio):
        rows.append((figure, mirror, baseline, ratio))

    def rng(values):
        lo, hi = spread(values)
        return "" if lo is None or len(values) < 2 else f" [{lo:.2f}..{hi:.2f}]"

    for key, label in (("cold", "cold pull, RegistryClient (s)"),
                       ("cold_pretouched", "cold pull, memory pre-touched (s)")):
        if f"{key}_mirror_s" not in s:
            continue
        row(label, fmt(s.get(f"{key}_mirror_s")), f"direct {fmt(s.get(f'{key}_direct_s'))}",
            fmt(s.get(f"{key}_ratio_mirror_direct")) + rng(s.get(f"{key}_ratios", [])))
        row("  same through the peer (s)", f"peer {fmt(s.get(f'{key}_peer_s'))}",
            f"direct {fmt(s.get(f'{key}_direct_s'))}", fmt(s.get(f"{key}_ratio_peer_direct")) + " (peer/direct)")
    if "skopeo_cold_ratio" in s:
        row("cold pull, skopeo to tmpfs dir (s)", fmt(s.get("skopeo_cold_mirror_s")),
            f"direct {fmt(s.get('skopeo_cold_direct_s'))}", fmt(s.get("skopeo_cold_ratio")))
    row("warm pull, RegistryClient (s)", fmt(s.get("warm_mirror_s")), f"direct {fmt(s.get('warm_direct_s'))}",
        fmt(s.get("warm_ratio_mirror_direct")) + rng(s.get("warm_ratios", [])))
    row("  same through the peer (s)", f"peer {fmt(s.get('warm_peer_s'))}", f"direct {fmt(s.get('warm_direct_s'))}",
        fmt(s.get("warm_ratio_peer_direct")) + " (peer/direct)")
    if "skopeo_warm_ratio" in s:
        row("warm pull, skopeo to tmpfs dir (s)", fmt(s.get("skopeo_warm_mirror_s")),
            f"direct {fmt(s.get('skopeo_warm_direct_s'))}", fmt(s.get("skopeo_warm_ratio")))
    for k in (1, n):
        row(f"warm blob rate, {k} client{'s' if k > 1 else ''} (MB/s{', sum' if k > 1 else ''})",
            fmt(s.get(f"rate_mirror_{k}_mb_s"), ".0f"), f"peer {fmt(s.get(f'rate_peer_{k}_mb_s'), '.0f')}",
            fmt(s.get(f"rate_ratio_{k}")) + rng(s.get(f"rate_ratios_{k}", [])))
    c1m, c1p = s.get("copies_1_mirror", []), s.get("copies_1_peer", [])
    def copies(values):
        return "n/a" if not values else f"{min(values):.2f}" if min(values) == max(values) else \
            f"{min(values):.2f}..{max(values):.2f}"
    row("upstream copies, 1 cold pull", copies(c1m), f"peer {copies(c1p)}",
        f"(upstream blob bytes / image bytes; {len(c1m)} pulls each)")
    if "resume_copies_mirror" in s or "resume_copies_direct" in s:
        row("upstream copies, cold pull cut at 50% once", copies(s.get("resume_copies_mirror", [])),
            f"direct, retried {copies(s.get('resume_copies_direct', []))}",
            f"pull {fmt(s.get('resume_mirror_s'))}s vs direct {fmt(s.get('resume_direct_s'))}s")
    row(f"upstream copies, {n8} concurrent cold pulls", fmt(s.get("copies_8_mirror")),
        f"peer {fmt(s.get('copies_8_peer'))}",
        f"wall {fmt(s.get('cold8_mirror_s'))}s vs peer {fmt(s.get('cold8_peer_s'))}s")
    row("manifest GET by tag, median (ms)", fmt(s.get("manifest_mirror_ms")), f"direct {fmt(s.get('manifest_direct_ms'))}",
        f"added {fmt(s.get('manifest_added_ms'), '+.2f')} ms (paired {fmt(s.get('manifest_added_paired_ms'), '+.2f')})")
    row("  same through the peer (ms)", f"peer {fmt(s.get('manifest_peer_ms'))}",
        f"direct {fmt(s.get('manifest_direct_ms'))}", f"added {fmt(s.get('manifest_peer_added_ms'), '+.2f')} ms")
    row("manifest GET by digest, added (ms, paired median)", fmt(s.get("manifest_digest_added_paired_ms"), "+.2f"),
        f"peer {fmt(s.get('manifest_digest_peer_added_paired_ms'), '+.2f')}",
        f"direct {fmt(s.get('manifest_digest_direct_ms'))} ms")
    if "resolve_ratio" in s:
        row(f"warm resolutions/s, {res['resolutions']['mirror'][0]['clients']} clients",
            fmt(s["resolve_mirror_per_s"], ".0f"), f"direct {fmt(s['resolve_direct_per_s'], '.0f')}",
            fmt(s["resolve_ratio"]) + rng(s.get("resolve_ratios", []))
            + f" (p50 {fmt(s['resolve_p50_ms'].get('mirror'), '.0f')} vs {fmt(s['resolve_p50_ms'].get('direct'), '.0f')} ms;"
            f" upstream requests each {fmt(s['resolve_upstream_per'].get('mirror'))} vs"
            f" {fmt(s['resolve_upstream_per'].get('direct'))}; {s['resolve_errors']} errors)")
        mirror_cpu, direct_cpu = s["resolve_cpu_ms"].get("mirror", (None,) * 2), s["resolve_cpu_ms"].get("direct", (None,) * 2)
        row("  CPU ms per resolution", f"{fmt(mirror_cpu[0])} (main thread {fmt(mirror_cpu[1])})",
            f"upstream {fmt(direct_cpu[0])}", "mitmdump / the upstream registry, medians")
    for client, costs in sorted(s.get("pull_costs", {}).get("mirror", {}).items()):
        peer = s["pull_costs"].get("peer", {}).get(client, {})
        row(f"upstream manifest GETs per warm pull, {client}", str(costs["manifest_gets"]),
            f"peer {peer.get('manifest_gets', 'n/a')}",
            f"(HEADs {costs['manifest_heads']} vs peer {peer.get('manifest_heads', 'n/a')})")
    if "cluster_copies" in s:
        row(f"upstream copies, {n8} concurrent cold pulls over 3 nodes", fmt(s["cluster_copies"]),
            f"distribution x3, one storage {fmt(s.get('cluster_peer_copies'))}",
            f"wall {fmt(s.get('cluster_cold8_s'))}s vs {fmt(s.get('cluster_peer_cold8_s'))}s")
    if "replaced_ratio" in s:
        row("warm pull, a replaced node with an empty store (s)", fmt(s["replaced_warm_s"]),
            f"cold pull, fresh node {fmt(s['fresh_cold_s'])}",
            fmt(s["replaced_ratio"]) + rng(s.get("replaced_ratios", []))
            + f" (upstream bytes {max(s['replaced_upstream_bytes'])}; node start {fmt(s['replaced_start_s'])}s)")
    if "tier_single_mb_s" in s:
        row("warm blob rate, store empty: from the object store (MB/s)", fmt(s["tier_object_store_mb_s"], ".0f"),
            f"single node {fmt(s['tier_single_mb_s'], '.0f')}",
            fmt(s.get("tier_object_store_ratio")) + rng(s.get("tier_object_store_ratios", [])))
        row("warm blob rate, the same node's own store next (MB/s)", fmt(s["tier_local_mb_s"], ".0f"),
            f"single node {fmt(s['tier_single_mb_s'], '.0f')}",
            fmt(s.get("tier_local_ratio")) + rng(s.get("tier_local_ratios", []))
            + f" (upstream bytes {max(s['tier_upstream_bytes'])})")
    row(f"mitmdump peak RSS, warm {n}-client download (MB)", fmt(s.get("rss_warm_concurrent_mb"), ".0f"), "", "")
    row(f"mitmdump peak RSS, {n8} cold clients (MB)", fmt(s.get("rss_cold8_mb"), ".0f"), "", "")
    row("mitmdump peak RSS, overall (MB)", fmt(s.get("rss_overall_mb"), ".0f"), "", "")

    rows = [r for r in rows if not (r[1].endswith("n/a") and r[2] in ("", "n/a") or r[2].endswith(" n/a"))]
    widths = [max(len(r[i]) for r in rows + [("figure", "mirror", "baseline", "ratio mirror/baseline")])
              for i in range(4)]
    header = ("figure", "mirror", "baseline", "ratio mirror/baseline")
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer-mb", type=float, default=None, help="layer size in MB (default 500; 100 with --quick)")
    ap.add_argument("--json", default=str(ROOT / "bench-results" / "latest.json"), help="where to write the results")
    ap.add_argument("--quick", action="store_true", help="~100 MB layer, single repetitions")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of timed figures (default 3; 1 with --quick)")
    ap.add_argument("--redirect", action="store_true", help="upstream answers blob GETs with a CDN redirect")
    ap.add_argument("--https", action="store_true",
                    help="the upstream (front door, token server, CDN) serves HTTPS, as Docker Hub does")
    ap.add_argument("--rate-reps", type=int, default=None,
                    help="repetitions of the warm blob rates, which are short transfers (default 2 x reps; 1 with --quick)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients for the warm blob rate")
    ap.add_argument("--cold-clients", type=int, default=8, help="concurrent cold pulls for the copies figure")
    ap.add_argument("--manifest-gets", type=int, default=50, help="manifest GETs per target for the latency")
    ap.add_argument("--addon-rev", default=None,
                    help="benchmark addon/ as of this git revision (default: a copy of the working tree's, "
                         "taken at start)")
    ap.add_argument("--no-skopeo", action="store_true", help="skip the skopeo pulls")
    ap.add_argument("--link-mbit", type=float, default=None,
                    help="pace the upstream's blob bytes through one shared link of this many Mbit/s "
                         "(the slow line the mirror is for; default: loopback speed)")
    ap.add_argument("--conn-mbit", type=float, default=None,
                    help="cap each upstream connection at this many Mbit/s, within the --link-mbit line "
                         "(a long path or a CDN shaping one TCP stream; default: no cap)")
    ap.add_argument("--rtt-ms", type=float, default=0.0,
                    help="each upstream request waits this long before its answer (a distant server)")
    ap.add_argument("--phases", default="cold,resume,warm,rates,copies,manifest,resolutions,pullcosts,cluster,tiers",
                    help="comma-separated phases to run (default: all): cold, resume, warm, rates, copies, manifest, "
                         "resolutions, pullcosts, cluster, tiers")
    ap.add_argument("--resolve-clients", type=int, default=32, help="concurrent clients resolving a warm image")
    ap.add_argument("--resolve-seconds", type=float, default=8.0, help="how long they resolve, per repetition")
    ap.add_argument("--mirror-option", action="append", default=[], metavar="NAME=VALUE",
                    help="a --set option for the mirror under test (repeatable), e.g. fill_connections=4")
    ap.add_argument("--no-peer", action="store_true", help="skip the cold pulls through the peer")
    ap.add_argument("--no-pretouch", action="store_true",
                    help="skip the second set of cold pulls made with memory pre-touched")
    args = ap.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if args.layer_mb is None:
        args.layer_mb = 100 if args.quick else 500
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.rate_reps is None:
        args.rate_reps = 1 if args.quick else 2 * args.reps
    args.workers = max(args.clients, args.cold_clients)

    bench = Bench(args)
    results = bench.run()
    summary = summarize(results)
    results["summary"] = summary
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))

    cfg = results["config"]
    print()
    print(f"registry-cache benchmark: one {cfg['layer_bytes'] / MB:.0f} MB layer + config, "
          f"{'CDN-redirect' if cfg['redirect'] else 'relay'} {'HTTPS' if cfg.get('https') else 'HTTP'} upstream"
          f"{', link ' + str(args.link_mbit) + ' Mbit/s' if args.link_mbit else ', loopback link'}"
          f"{', ' + str(args.conn_mbit) + ' Mbit/s per connection' if args.conn_mbit else ''}"
          f"{', ' + str(args.rtt_ms) + ' ms per request' if args.rtt_ms else ''}, "
          f"{cfg['reps']} rep(s) (medians; "
          f"[min..max] of paired ratios), {results['machine']['cpus']} CPUs, load "
          f"{results['machine']['loadavg_start'][0]:.2f} -> {results['machine']['loadavg_end'][0]:.2f}")
    addon = results.get("addon", {})
    print(f"mirror code: {addon.get('source', '?')} = {addon.get('commit') or addon.get('head', '?')}"
          f"{' + uncommitted changes: ' + ', '.join(addon['dirty_files']) if addon.get('dirty_files') else ''}"
          f" (addon/*.py sha256 {addon.get('sha256_of_py_files', '?')[:16]})")
    print(table(results, summary))
    print()
    print("where time goes (cold pulls):")
    for line in where_time_goes(results):
        print("  " + line)
    print()
    print("notes: pulls = RegistryClient.pull in a worker process (hashes + verifies, writes nowhere); blob rate = "
          "plain reader counting bytes (no hashing), 307 to the mirror's blob server followed; RSS from "
          "/proc VmHWM (reset per phase) and 20 ms VmRSS polling; 'memory pre-touched' = a scratch file of "
          "1.25x the layer written and deleted just before each cold pull (see the module docstring).")
    if results["errors"]:
        print(f"\n{len(results['errors'])} ERROR(S) (details in the JSON):")
        for e in results["errors"]:
            print(f"  {e['where']}: {e['error']}")
    print(f"\ntotal {results['total_s']:.0f}s; JSON: {out}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
