#!/usr/bin/env python3
"""Which S3 client library for the shared tier? Measured against SeaweedFS in ONE run.

    .venv/bin/python scripts/bench_s3client.py [--mb 500] [--reps 3] [--json out.json]

Needs boto3 and minio in the venv (`pip install minio`: it is measured, not a
dependency). Starts the harness's SeaweedFS (weed mini on loopback) and, for
each candidate, in a fresh worker process each time (so memory and import
state are its own):

- install size: the library and the dependencies it adds to the mirror's
  (mitmproxy, requests, diskcache already bring urllib3, certifi, ...);
- import time: `import` plus making one client (what mitmdump start-up pays);
- streaming GET of a large object straight from weed's S3 port, read in
  1 MiB pieces (MB/s), against a plain `requests` GET of a presigned URL
  of the same object in the same run (the baseline: no client library at all);
- multipart upload of the same size from a file (MB/s), against one plain
  streaming `requests` PUT of a presigned URL;
- peak RSS of the worker for each operation.

Medians of --reps interleaved repetitions; the ratio column is against the
`requests` baseline of the same repetition.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PIECE = 1 << 20
PART = 64 << 20
LIBS = ("boto3", "minio", "requests")
ALREADY_THERE = ("mitmproxy", "requests", "diskcache")  # the mirror's own dependencies


# -- install size ---------------------------------------------------------------
def _requirements(dist: str) -> set[str]:
    names = set()
    for req in md.requires(dist) or []:
        if "extra ==" in req:
            continue
        names.add(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def _closure(dist: str) -> set[str]:
    seen, todo = set(), [dist.lower()]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        todo.extend(_requirements(name))
    return seen


def _installed_bytes(dist: str) -> int:
    d = md.distribution(dist)
    return sum((Path(d.locate_file(f)).stat().st_size for f in d.files or []
                if Path(d.locate_file(f)).is_file()), 0)


def install_size(lib: str) -> tuple[int, list[str]]:
    base = set().union(*(_closure(n) for n in ALREADY_THERE))
    added = sorted(_closure(lib) - base) if lib != "requests" else []
    return sum(_installed_bytes(n) for n in added), added


# -- workers (one process per measurement) ----------------------------------------
def _client(lib: str, endpoint: str, key: str, secret: str):
    if lib == "boto3":
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                            aws_access_key_id=key, aws_secret_access_key=secret,
                            config=Config(s3={"addressing_style": "path"},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))
    if lib == "minio":
        from minio import Minio
        return Minio(endpoint.split("//")[1], access_key=key, secret_key=secret, secure=False,
                     region="us-east-1")
    import requests
    return requests.Session()


def _peak_rss_mb() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that
    over from the parent across fork and exec, so every worker would show at
    least the benchmark's own."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(args) -> dict:
    t0 = time.perf_counter()
    client = _client(args.lib, args.endpoint, args.key, args.secret)
    result = {"import_s": time.perf_counter() - t0}
    if args.op == "get":
        t0 = time.perf_counter()
        n = 0
        if args.lib == "boto3":
            body = client.get_object(Bucket=args.bucket, Key=args.object)["Body"]
            for chunk in body.iter_chunks(PIECE):
                n += len(chunk)
        elif args.lib == "minio":
            response = client.get_object(args.bucket, args.object)
            for chunk in response.stream(PIECE):
                n += len(chunk)
            response.release_conn()
        else:
            with client.get(args.url, stream=True, timeout=60) as response:
                response.raise_for_status()
                for chunk in response.iter_content(PIECE):
                    n += len(chunk)
        result["seconds"] = time.perf_counter() - t0
        result["bytes"] = n
    elif args.op == "put":
        key = f"{args.object}.up.{args.lib}"
        t0 = time.perf_counter()
        if args.lib == "boto3":
            from boto3.s3.transfer import TransferConfig
            client.upload_file(args.file, args.bucket, key,
                               Config=TransferConfig(multipart_threshold=PART, multipart_chunksize=PART))
        elif args.lib == "minio":
            client.fput_object(args.bucket, key, args.file, part_size=PART)
        else:
            with open(args.file, "rb") as f:
                response = client.put(args.url, data=f, timeout=120,
                                      headers={"Content-Length": str(os.path.getsize(args.file))})
                response.raise_for_status()
        result["seconds"] = time.perf_counter() - t0
        result["bytes"] = os.path.getsize(args.file)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def run_worker(lib: str, op: str, store, obj: str, path: str, url: str = "") -> dict:
    cmd = [sys.executable, __file__, "--worker", lib, op, "--endpoint", store.direct_endpoint,
           "--key", store.access_key, "--secret", store.secret_key, "--bucket", store.bucket,
           "--object", obj, "--file", path, "--url", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(f"{lib} {op} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--worker", nargs=2)
    for name in ("endpoint", "key", "secret", "bucket", "object", "file", "url"):
        parser.add_argument(f"--{name}", default="")
    args = parser.parse_args()
    if args.worker:
        args.lib, args.op = args.worker
        print(json.dumps(worker(args)))
        return

    from tests.harness.seaweedfs import SeaweedFS, weed_version

    with tempfile.TemporaryDirectory() as tmp, SeaweedFS() as store:
        path = os.path.join(tmp, "big")
        with open(path, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        s3 = store.client(endpoint=store.direct_endpoint)
        s3.upload_file(path, store.bucket, "big")
        get_url = s3.generate_presigned_url("get_object", Params={"Bucket": store.bucket, "Key": "big"})
        put_url = s3.generate_presigned_url("put_object", Params={"Bucket": store.bucket, "Key": "big.up.requests"})
        runs: dict[tuple[str, str], list[dict]] = {}
        for rep in range(args.reps):
            for lib in LIBS:
                for op, url in (("import", ""), ("get", get_url), ("put", put_url)):
                    runs.setdefault((lib, op), []).append(run_worker(lib, op, store, "big", path, url))
            print(f"repetition {rep + 1}/{args.reps} done", file=sys.stderr)

        def med(lib, op, field):
            return statistics.median(r[field] for r in runs[(lib, op)])

        def rate(lib, op):
            return statistics.median(r["bytes"] / r["seconds"] / 1e6 for r in runs[(lib, op)])

        def ratio(lib, op):
            return statistics.median(
                (a["bytes"] / a["seconds"]) / (b["bytes"] / b["seconds"])
                for a, b in zip(runs[(lib, op)], runs[("requests", op)]))

        report = {"weed": weed_version(), "mb": args.mb, "reps": args.reps, "libs": {}}
        print(f"SeaweedFS {report['weed']}, {args.mb} MB object, {args.reps} repetitions (medians)")
        print(f"{'library':10} {'install MB':>10} {'import+client s':>16} {'GET MB/s':>9} {'vs requests':>11} "
              f"{'GET RSS MB':>10} {'PUT MB/s':>9} {'vs requests':>11} {'PUT RSS MB':>10}")
        for lib in LIBS:
            size, added = install_size(lib)
            version = md.version(lib)
            row = {"version": version, "install_bytes": size, "adds": added,
                   "import_s": med(lib, "import", "import_s"), "import_rss_mb": med(lib, "import", "peak_rss_mb"),
                   "get_mb_s": rate(lib, "get"), "get_ratio": ratio(lib, "get"),
                   "get_rss_mb": med(lib, "get", "peak_rss_mb"),
                   "put_mb_s": rate(lib, "put"), "put_ratio": ratio(lib, "put"),
                   "put_rss_mb": med(lib, "put", "peak_rss_mb")}
            report["libs"][lib] = row
            print(f"{lib + ' ' + version:10} {size / 1e6:10.1f} {row['import_s']:16.3f} {row['get_mb_s']:9.0f} "
                  f"{row['get_ratio']:11.2f} {row['get_rss_mb']:10.0f} {row['put_mb_s']:9.0f} "
                  f"{row['put_ratio']:11.2f} {row['put_rss_mb']:10.0f}")
            if added:
                print(f"{'':10} adds: {', '.join(added)}")
        print("baseline 'requests': a presigned URL, one streaming GET / one PUT (no multipart)")
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
