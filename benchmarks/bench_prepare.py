"""Benchmark ``faceattrs prepare``: cold (nothing cached) and cached, with peak memory.

    python benchmarks/bench_prepare.py --data ../shared/data/utkface48.csv.gz

Each run is a fresh ``faceattrs prepare`` process, timed from outside, so the figures
include interpreter start-up and imports, as a user sees them. Peak memory is the child's
maximum resident set size.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_once(data: str, out: Path) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "faceattrs", "prepare", "--data", data, "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, max over children
    return seconds, max(peak, before) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/utkface48.csv.gz")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "prepared"
        cold, peak = run_once(args.data, out)
        cached, _ = run_once(args.data, out)
    print(f"prepare cold:   {cold:6.2f} s  (budget 30 s)   peak RSS {peak:7.0f} MiB (budget 2048)")
    print(f"prepare cached: {cached:6.2f} s  (budget 2 s)    cold/cached = {cold / cached:.1f}x")


if __name__ == "__main__":
    main()
