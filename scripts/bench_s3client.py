#!/usr/bin/env python3
"""Runs tests/harness/bench_s3client.py (its docstring says what it measures and how).

It drives the test harness's real parts (the upstream registry, the mirror as
a real mitmdump, distribution's cache, clients), so it lives with that harness;
this file keeps `.venv/bin/python scripts/bench_s3client.py` working as the README shows.
"""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
runpy.run_module("tests.harness.bench_s3client", run_name="__main__", alter_sys=True)
