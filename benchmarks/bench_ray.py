"""Photos/s of ``faceattrs predict`` in one process against ``--engine ray`` with 1 and 2
workers, on the same folder (figures in docs/distributed.md).

The folder is the shared photos copied ``--copies`` times (distinct files, so nothing is
read twice). Each configuration runs as the command a user types, start-up included (a
Ray run starts its local instance, its workers import faceattrs and load the model, and
stops it again), on two folder sizes: the difference of the two wall times over the
difference of the sizes is the steady rate (photos/s once running), and what remains of
the larger run is the fixed start-up cost. Ratios are against the single-process
command's. Every configuration's records are checked against the single-process ones
(byte for byte: the Ray output comes back in input order).

Run: ``python benchmarks/bench_ray.py --photos ../shared/data/photos --copies 20,100``
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "single process": [],
    "ray, 1 worker": ["--engine", "ray", "--num-workers", "1"],
    "ray, 2 workers": ["--engine", "ray", "--num-workers", "2"],
}


def make_folder(photos: Path, copies: int, out: Path) -> int:
    """``copies`` copies of every photo of ``photos`` in ``out``; returns their number."""
    out.mkdir(parents=True)
    files = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    for k in range(copies):
        for p in files:
            shutil.copyfile(p, out / f"{k:04d}_{p.name}")
    return copies * len(files)


def timed(args: list[str]) -> float:
    """Wall time of one ``faceattrs predict`` command (its output to a log file)."""
    t0 = time.perf_counter()
    with open(args[args.index("--out") + 1] + ".log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "faceattrs", "predict", *args],
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): faceattrs predict {' '.join(args)}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "data" / "photos")
    ap.add_argument("--copies", default="20,100", help="two folder sizes, in copies of --photos")
    ap.add_argument("--model", help="run folder (default: the bundled model)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the runs; each time is the fastest of its rounds")  # fmt: skip
    args = ap.parse_args()
    small, large = (int(c) for c in args.copies.split(","))
    model = ["--model", args.model] if args.model else []
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        tmp = Path(tmp)
        sizes = {c: make_folder(args.photos, c, tmp / f"x{c}") for c in (small, large)}
        times: dict[str, dict[int, float]] = {name: {} for name in CONFIGS}
        for _ in range(args.rounds):
            for copies in (small, large):  # configurations interleaved: a VM's speed drifts
                for i, (name, extra) in enumerate(CONFIGS.items()):
                    out = str(tmp / f"r{copies}_{i}.jsonl")
                    t = timed([str(tmp / f"x{copies}"), *model, *extra, "--out", out])
                    times[name][copies] = min(t, times[name].get(copies, t))
                    print(f"{name:>15}: {sizes[copies]} photos in {t:.1f} s", flush=True)
        same = {
            name: all((tmp / f"r{c}_{i}.jsonl").read_bytes() == (tmp / f"r{c}_0.jsonl").read_bytes()
                      for c in (small, large))
            for i, name in enumerate(CONFIGS)
        }  # fmt: skip
        n0, n1 = sizes[small], sizes[large]
        print(f"\ncores: {os.cpu_count()}; folders of {n0} and {n1} photos; "
              f"{sys.executable} -m faceattrs predict DIR [--engine ray --num-workers N]")  # fmt: skip
        print("| command | photos/s, end to end | ratio | steady photos/s | ratio | "
              "start-up | same records |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        base_end = base_rate = None
        for name, t in times.items():
            end = n1 / t[large]
            rate = (n1 - n0) / (t[large] - t[small])
            fixed = t[large] - n1 / rate
            base_end, base_rate = base_end or end, base_rate or rate
            print(f"| {name} | {end:.1f} | {end / base_end:.2f} | {rate:.1f} | "
                  f"{rate / base_rate:.2f} | {fixed:.1f} s | {'yes' if same[name] else 'NO'} |")  # fmt: skip
        ceiling = driver_ceiling(tmp / f"r{large}_0.jsonl", tmp)
        print("\nthe driver alone writes " + ", ".join(f"{r:,.0f} records/s to {s}"
                                                     for s, r in ceiling.items()))  # fmt: skip


def driver_ceiling(records_file: Path, tmp: Path, batches: int = 400) -> dict[str, float]:
    """Records/s the driver alone writes (``write_records`` on batches handed to it as Ray
    would, without Ray): the most the whole cluster can deliver through one driver."""
    import json
    from types import SimpleNamespace

    from faceattrs.distributed.output import write_records
    from faceattrs.distributed.workers import records_table

    records = [json.loads(line) for line in records_file.read_text().splitlines()][:64]
    rec = next(r for r in records if "error" not in r)
    heads = [h for h, v in rec.items() if isinstance(v, dict) and "probabilities" in v]
    models = SimpleNamespace(class_names={h: list(rec[h]["probabilities"]) for h in heads},
                             bin_labels=list(rec["age"]["bin_probabilities"]))  # fmt: skip
    table = records_table(records, models)

    class Batches:  # what iter_batches hands the driver
        def iter_batches(self, **kw):
            return (table for _ in range(batches))

    rates = {}
    for suffix in (".jsonl", ".parquet"):
        t0 = time.perf_counter()
        write_records(Batches(), tmp / f"ceiling{suffix}", None)
        rates[suffix] = batches * len(records) / (time.perf_counter() - t0)
    return rates


if __name__ == "__main__":
    main()
