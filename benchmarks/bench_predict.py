"""Speed of the photo path against the bare models (figures in docs/photos.md).

For each backend (PyTorch fp32, PyTorch bf16, onnxruntime fp32, and onnxruntime int8 on
an export from ``faceattrs export --int8``: ``--backends torch-fp32,onnx-int8 --onnx-int8
DIR``) it prints, from one run:

- latency: median time of one 200x200 photo end to end (decode, detect, crop, every
  model, records) against the bare models' forward time for one face;
- throughput: faces/s on a folder of N one-face photos against the bare models' batched
  rate on the same faces, three times: through an already loaded ``FaceAnalyzer`` (the
  steady state) with its photos decoded and detected in threads (the API's default) and
  in worker processes, and as ``faceattrs predict`` does it (``predict_files``: loading
  the models, starting its photo worker processes and their first-call warm-up
  included, records written to a file). The bare rate is timed
  two ways, each batch on every core and each batch split over the analyzer's streams
  (two halves at once, one thread each, on a 2-core CPU), and the ratios are taken against the faster.
  The streams' bare rate and the loaded analyzer's two folder runs are repeated in
  ``--rounds`` interleaved rounds (a VM's speed drifts by 10 % or more from one minute to
  the next): each round's ratios are against that round's bare rate, and the median is
  printed with the range.

"Every model" is the multitask model plus the age model (coarse classifier + per-bin
regressors). Without ``--model`` it is the default model bundled in the package (and
``--onnx-int8`` its int8 export); ``--model random`` times random-init full-width
models instead (speed does not depend on the weights). A measurement that would take longer than ``--budget`` seconds
uses fewer faces (bf16 on a CPU without native bf16 is very slow) and says so.

The photo path alone (decode, detect, align, crop), per detector, comes first;
``--photo-only`` stops there.

Run: ``python benchmarks/bench_predict.py --photos ../shared/data/photos [--photo-only]``
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from faceattrs.bundle import DEFAULT_INT8_DIR, DEFAULT_MODEL_DIR, resolve
from faceattrs.photo import extract_faces, load_image
from faceattrs.predict import FaceAnalyzer, cpu_cores
from faceattrs.predict_files import predict_files


def make_bundle(out: Path) -> Path:
    """Full-width random-init multitask + two-stage age model, saved as a run folder."""
    from faceattrs.age import AgeModel, save_age_model
    from faceattrs.age.regress import BinRegressors
    from faceattrs.checkpoint import save_checkpoint
    from faceattrs.model import FaceResNet, ModelConfig

    torch.manual_seed(0)
    save_checkpoint(out, "best", FaceResNet(ModelConfig()), {"epoch": 0, "score": 0.0})
    coarse = FaceResNet(ModelConfig(heads={"age_bin": 6})).eval()
    reg = BinRegressors(coarse.embed_dim, 6).eval()
    model = AgeModel(coarse=coarse, regressors=reg, edges=np.array([16, 26, 29, 37, 53]))
    save_age_model(out / "age", model, out, {})
    return out


def make_folder(photos: list[Path], n: int, out: Path) -> list[Path]:
    """``n`` distinct JPEG files: the photos in turn, mirrored every other round."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = load_image(photos[i % len(photos)])
        if (i // len(photos)) % 2:
            img = img[:, ::-1]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, "JPEG", quality=95)
        path = out / f"{i:05d}.jpg"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def bare(models, faces: np.ndarray) -> None:
    models.outputs(faces)  # what the analyzer runs: one pass for a network with an age head


def median_ms(fn, reps: int, budget: float) -> tuple[float, int]:
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < reps and (time.perf_counter() - start < budget or len(times) < 3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, len(times)


def batched_rate(models, faces: np.ndarray, batch_size: int, streams: int) -> float:
    """Faces/s of the bare models on ``faces`` in batches, each split over ``streams``
    threads as the analyzer does (``FaceAnalyzer._predict``)."""
    size = -(-batch_size // streams)
    with ThreadPoolExecutor(streams) as pool:

        def run(batch):
            parts = [batch[s : s + size] for s in range(0, len(batch), size)]
            list(pool.map(lambda part: bare(models, part), parts))

        run(faces[:batch_size])  # warm-up
        t = time.perf_counter()
        for s in range(0, len(faces), batch_size):
            run(faces[s : s + batch_size])
    return len(faces) / (time.perf_counter() - t)


def bench(name, model, backend, dtype, paths, crops, args) -> dict:
    """One backend's latency and throughput figures."""
    kw = {"backend": backend, "dtype": dtype, "batch_size": args.batch_size}
    # the bare models two ways: one call at a time on every core, and as the analyzer runs
    # them (its streams); the ratios are taken against the faster. torch's thread count is
    # process-wide, so the one-stream analyzer is timed before the default one is made.
    single = FaceAnalyzer(model, **kw, streams=1, threads=cpu_cores(), photo_workers="threads")
    t = time.perf_counter()
    bare(single.models, crops[:8])
    per_face = (time.perf_counter() - t) / 8
    n = int(min(len(paths), max(16, args.budget / (1 + args.rounds / 2) / per_face)))
    spec = single.models.bundle.input
    faces = np.stack([f.crop for p in paths[:n] for f in extract_faces(load_image(p), spec=spec)])
    one_stream_rate = batched_rate(single.models, faces, args.batch_size, 1)

    def folder(a) -> float:
        """Faces/s of the folder's ``n`` photos through analyzer ``a``."""
        t = time.perf_counter()
        records = a.analyze([str(p) for p in paths[:n]], on_error="record")
        return sum("error" not in r for r in records) / (time.perf_counter() - t)

    single.analyze([str(p) for p in paths[:4]])  # its photo threads load their detectors
    one_stream_folder = folder(single)  # through a one-stream analyzer, for comparison
    del single
    an = FaceAnalyzer(model, **kw, photo_workers="threads")
    m = an.models
    one_ms, _ = median_ms(lambda: bare(m, crops[:1]), args.repeats, min(30, args.budget / 4))
    it = iter(range(10**9))
    e2e_ms, reps = median_ms(
        lambda: an.analyze(paths[next(it) % 24]), args.repeats, min(30, args.budget / 4)
    )
    procs = FaceAnalyzer(model, **kw, photo_workers="processes")
    for a in (an, procs):
        a.analyze([str(p) for p in paths[:4]])  # photo threads / workers are ready

    # the bare rate and the folder through the loaded (warm) analyzer, photos in threads
    # and in worker processes, interleaved round by round: the VM's speed drifts by 10 %
    # or more between minutes, so each round's ratios are taken against that round's bare
    # rate and the medians reported with their spread
    rounds = []
    for _ in range(args.rounds):
        streams_rate = batched_rate(m, faces, args.batch_size, an.streams)
        bare_rate = max(one_stream_rate, streams_rate)
        warm, procs_rate = folder(an), folder(procs)
        rounds.append((streams_rate, bare_rate, warm, procs_rate))
    streams, an, procs = an.streams, None, None
    with tempfile.TemporaryDirectory() as tmp:  # the command: loads the models, writes records
        t = time.perf_counter()
        counts = predict_files(
            [str(p) for p in paths[:n]],
            model,
            out=Path(tmp) / "r.jsonl",
            backend=backend,
            dtype=dtype,
            batch_size=args.batch_size,
        )
        folder_s = time.perf_counter() - t
    med = [statistics.median(col) for col in zip(*rounds, strict=True)]
    return {
        "name": name,
        "one_face_ms": one_ms,
        "photo_ms": e2e_ms,
        "photo_reps": reps,
        "streams_rate": med[0],
        "bare_rate": med[1],
        "warm_rate": med[2],
        "procs_rate": med[3],
        "warm_ratios": [r[2] / r[1] for r in rounds],
        "procs_ratios": [r[3] / r[1] for r in rounds],
        "one_stream_rate": one_stream_rate,
        "streams": streams,
        "one_stream_folder": one_stream_folder,
        "folder_rate": counts["faces"] / folder_s,
        "n": n,
        "faces": counts["faces"],
        "failed": counts["failed"],
    }


def spread(ratios: list[float]) -> str:
    """``median (min-max of R rounds)`` of per-round ratios."""
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}"
    return (
        f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}, "
        f"{len(ratios)} rounds)"
    )


def bn_folding(model: str, crops: np.ndarray, batch_size: int, dtypes, reps: int = 3) -> dict:
    """Bare batched faces/s of the multitask model with and without BatchNorm folded into
    the convs (what ``TorchBackend`` does), per dtype of ``dtypes`` ("fp32", "bf16"),
    runs alternated."""
    import copy

    from faceattrs.bundle import resolve
    from faceattrs.model import fuse_batchnorm

    plain = resolve(model).load_multitask()[0].eval().to(memory_format=torch.channels_last)
    fused = fuse_batchnorm(copy.deepcopy(plain))
    x = plain.input.normalise(torch.from_numpy(crops[:256]))
    out = {}
    for dt in dtypes:
        bf16 = dt == "bf16"
        rates = {"plain": [], "fused": []}
        for _ in range(reps):
            for name, net in (("plain", plain), ("fused", fused)):
                with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    net(x[:batch_size])  # warm-up
                    t = time.perf_counter()
                    for s in range(0, len(x), batch_size):
                        net(x[s : s + batch_size])
                rates[name].append(len(x) / (time.perf_counter() - t))
        out[dt] = {k: statistics.median(v) for k, v in rates.items()}
    return out


def photo_path(photos: list[Path], repeats: int) -> None:
    """Decode + detect + align + crop of one 200x200 photo (JPEG bytes in memory), per
    detector, from one run: median and fastest latency on one thread (the fastest is the
    cost without other jobs' interruptions), and the time per photo with two
    threads taking photos in turn (how ``FaceAnalyzer`` runs them). Budget: 8 ms."""
    from concurrent.futures import ThreadPoolExecutor

    from faceattrs.photo import PhotoConfig, dlib_missing

    data = [p.read_bytes() for p in photos]
    names = ["haar"] + ([] if dlib_missing() else ["dlib"])
    for name in names:
        cfg = PhotoConfig(detector=name)
        extract_faces(load_image(data[0]), cfg=cfg)  # models loaded before timing
        times = []
        for _ in range(repeats):
            for d in data:
                t = time.perf_counter()
                extract_faces(load_image(d), cfg=cfg)
                times.append(time.perf_counter() - t)

        def one(d, cfg=cfg):
            return extract_faces(load_image(d), cfg=cfg)

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, data[:2]))  # each thread loads its models
            t = time.perf_counter()
            list(pool.map(one, data * repeats))
            two = (time.perf_counter() - t) / (len(data) * repeats)
        print(
            f"photo path ({name}): decode + detect + align + crop of a 200x200 photo: median "
            f"{statistics.median(times) * 1e3:.2f} ms, fastest {min(times) * 1e3:.2f} ms (one "
            f"thread, {len(times)} photos), "
            f"{two * 1e3:.2f} ms per photo with two threads (budget 8 ms)",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=Path("../shared/data/photos"))
    ap.add_argument(
        "--model",
        help="a run folder (default: the bundled default model; 'random': random-init "
        "full-width models)",
    )
    ap.add_argument("--faces", type=int, default=1024, help="photos in the folder run")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=50, help="photos timed for the latency")
    ap.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of bare rate and folder runs"
    )
    ap.add_argument("--budget", type=float, default=300.0, help="seconds per backend, roughly")
    ap.add_argument("--backends", default="torch-fp32,onnx,torch-bf16")
    ap.add_argument("--photo-only", action="store_true", help="only the photo path's speed")
    ap.add_argument(
        "--onnx-int8",
        help="the int8 export that backend onnx-int8 runs (faceattrs export --int8; "
        "default: the bundled model's, src/faceattrs/assets/default_model_int8)",
    )
    args = ap.parse_args()
    specs = args.backends.split(",")
    known = {"torch-fp32", "torch-bf16", "torch", "onnx", "onnx-fp32", "onnx-int8"}
    if set(specs) - known:
        ap.error(f"--backends: unknown {sorted(set(specs) - known)}; use some of {sorted(known)}")
    if "onnx-int8" in specs and not args.onnx_int8:
        if args.model not in (None, str(DEFAULT_MODEL_DIR)):
            ap.error("backend onnx-int8 needs --onnx-int8 DIR (faceattrs export --int8 of --model)")
        args.onnx_int8 = str(DEFAULT_INT8_DIR)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    photos = sorted(args.photos.glob("*.jpg"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"load average at start {os.getloadavg()[0]:.2f}"
    )
    photo_path(photos, 5 if args.photo_only else 2)
    if args.photo_only:
        print(f"load average at end {os.getloadavg()[0]:.2f}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(DEFAULT_MODEL_DIR)
        if model == "random":
            model = str(make_bundle(Path(tmp) / "run"))
        paths = make_folder(photos, args.faces, Path(tmp) / "folder")
        t = time.perf_counter()
        spec = resolve(model).input  # crops as the model takes them (its input contract)
        crops = np.stack([f.crop for p in paths for f in extract_faces(load_image(p), spec=spec)])
        prep_ms = (time.perf_counter() - t) / len(paths) * 1e3
        print(
            f"{len(paths)} photos, {len(crops)} faces; decode + detect + crop alone: "
            f"{prep_ms:.2f} ms per photo (1 process)"
        )
        onnx_dir = None
        if {"onnx", "onnx-fp32"} & set(specs):
            from faceattrs.export import export_onnx

            onnx_dir = str(export_onnx(model, Path(tmp) / "onnx").parent)
        rows = []
        for spec in specs:
            backend, _, dtype = spec.partition("-")
            src = {"torch": model, "onnx": onnx_dir}[backend]
            if spec == "onnx-int8":
                src = args.onnx_int8
            rows.append(bench(spec, src, backend, dtype or "fp32", paths, crops, args))
            r = rows[-1]
            print(
                f"{r['name']:10s} latency: photo end to end {r['photo_ms']:6.1f} ms (median of "
                f"{r['photo_reps']}) vs bare models, one face on one stream {r['one_face_ms']:6.1f} ms\n"
                f"{'':10s} bare batched (batch {args.batch_size}, {r['faces']} faces): one call per "
                f"batch on {cpu_cores()} threads {r['one_stream_rate']:6.1f} faces/s, "
                f"{r['streams']} streams (as the analyzer) {r['streams_rate']:6.1f}\n"
                f"{'':10s} throughput ({r['faces']} faces from {r['n']} photos) against the "
                f"faster, {r['bare_rate']:6.1f} faces/s (medians): loaded analyzer, photo "
                f"threads {r['warm_rate']:6.1f}, ratio {spread(r['warm_ratios'])}, photo "
                f"processes {r['procs_rate']:6.1f}, ratio {spread(r['procs_ratios'])} (each "
                f"ratio a median of per-round ratios); predict command (loads the models, writes records; processes) "
                f"{r['folder_rate']:6.1f} = {r['folder_rate'] / r['bare_rate']:.2f}\n"
                f"{'':10s} the folder through a one-stream analyzer ({cpu_cores()} threads): "
                f"{r['one_stream_folder']:6.1f} faces/s; with {r['streams']} streams "
                f"{r['warm_rate'] / r['one_stream_folder']:.2f}x that",
                flush=True,
            )
        # only the dtypes benchmarked above (bf16 without native support is very slow)
        dtypes = [b.partition("-")[2] or "fp32" for b in args.backends.split(",")
                  if b.startswith("torch")]  # fmt: skip
        if dtypes:
            for dt, r in bn_folding(model, crops, args.batch_size, dtypes).items():
                print(
                    f"BN folded into the convs, multitask model bare batched, {dt}: "
                    f"{r['fused']:.1f} vs {r['plain']:.1f} faces/s = {r['fused'] / r['plain']:.2f}"
                )
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
