"""Training speed: end-to-end images/s against the bare model step, bf16 against fp32.

    python benchmarks/bench_train.py                      # cpu preset, the figures in docs/training.md
    python benchmarks/bench_train.py --preset paper --steps 4 --repeats 1
    python benchmarks/bench_train.py --data ../shared/data/utkface48.csv.gz threads=2

End-to-end = what ``faceattrs train`` does per batch: sampler draw, ``index_select`` of
uint8 faces on the device, augmentation, forward, loss, backward, AdamW and the lr
schedule (``training.train_one_epoch``). Bare = forward, loss, backward and AdamW on a
random float tensor of the same shape, precision and memory format. Runs alternate
(bare, end-to-end, bare, ...) and the median of the paired ratios is reported, so that
load from other processes on a shared machine hits both alike. Also printed: bf16 against fp32
end-to-end, validation time and the resulting epoch time of the preset.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from faceattrs.augment import Augmenter, minority_classes
from faceattrs.devices import select_device, use_bf16
from faceattrs.model import FaceResNet
from faceattrs.training import (
    HEADS,
    epoch_order,
    evaluate_heads,
    make_optimizer,
    make_scheduler,
    model_config,
    multitask_loss,
    resolve_config,
    sampler_weights,
    train_one_epoch,
)

SHARES = [0.43, 0.19, 0.15, 0.16, 0.07]  # ethnicity mix of the training split


def synthetic(n: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    eth = torch.from_numpy(np.random.default_rng(0).choice(5, n, p=SHARES))
    return {
        "image": torch.randint(0, 256, (n, 48, 48), generator=g, dtype=torch.uint8).to(device),
        "gender": torch.randint(0, 2, (n,), generator=g).to(device),
        "ethnicity": eth.long().to(device),
    }


def real(path: str, split: str, device) -> dict[str, torch.Tensor]:
    from faceattrs.prepare import load_faces

    faces = load_faces(path).subset(split)
    return {
        "image": torch.from_numpy(faces.images).to(device),
        "gender": torch.from_numpy(faces.gender.astype(np.int64)).to(device),
        "ethnicity": torch.from_numpy(faces.ethnicity.astype(np.int64)).to(device),
    }


class Bench:
    """Model, optimiser, schedule and augmenter built as ``training.fit`` builds them."""

    def __init__(self, cfg, data, device, bf16: bool):
        self.cfg, self.data, self.device, self.bf16 = cfg, data, device, bf16
        torch.manual_seed(cfg.seed)
        self.model = FaceResNet(model_config(cfg)).to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = torch.compile(self.model) if cfg.compile else self.model
        self.opt = make_optimizer(self.model.parameters(), cfg.lr, cfg.weight_decay)
        self.sched = make_scheduler(self.opt, 100, 10_000)
        self.loss_fn = multitask_loss(cfg)
        eth = data["ethnicity"].cpu().numpy()
        self.aug = Augmenter(cfg.augment, minority_classes(eth, cfg.augment.minority_ratio))
        self.aug = self.aug.to(device)
        self.weights = sampler_weights(eth)

    def end_to_end(self, steps: int) -> float:
        """Images/s of ``steps`` training batches, sampler draw included."""
        sync(self.device)
        t = time.perf_counter()
        n = len(self.data["image"])
        order = epoch_order(self.weights, n, self.cfg.seed, 1).to(self.device)
        order = order[: steps * self.cfg.batch_size]
        out = train_one_epoch(
            self.net, self.loss_fn, self.data, order, self.opt,
            lambda b: self.aug(b["image"], b["ethnicity"]),
            batch_size=self.cfg.batch_size, scheduler=self.sched, bf16=self.bf16,
            channels_last=self.cfg.channels_last, progress=False,
        )  # fmt: skip
        sync(self.device)
        return out["images"] / (time.perf_counter() - t)

    def bare(self, steps: int) -> float:
        """Images/s of the model step alone on random tensors of the same shape."""
        b = self.cfg.batch_size
        x = torch.randn(b, 1, 48, 48, device=self.device)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batch = {"gender": torch.randint(0, 2, (b,), device=self.device),
                 "ethnicity": torch.randint(0, 5, (b,), device=self.device)}  # fmt: skip
        self.net.train()
        sync(self.device)
        t = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                out = self.net(x)
            loss, _ = self.loss_fn({k: v.float() for k, v in out.items()}, batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
        sync(self.device)
        return steps * b / (time.perf_counter() - t)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=12, help="batches per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of each kind")
    ap.add_argument("--bf16-steps", type=int, default=2, help="batches for bf16 vs fp32 (0: skip)")
    ap.add_argument("--data", help="prepared folder or CSV (default: random faces, same size)")
    ap.add_argument("--train-size", type=int, default=15558, help="faces in the training split")
    ap.add_argument("--val-size", type=int, default=1945, help="faces in the validation split")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args()

    cfg = resolve_config(args.preset, args.overrides)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = select_device(cfg.device)
    bf16 = use_bf16(cfg.bf16, device)
    if args.data:
        data, val = real(args.data, "train", device), real(args.data, "val", device)
    else:
        data, val = synthetic(args.train_size, device), synthetic(args.val_size, device)
    n_train = len(data["image"])
    print(f"preset {args.preset}: width {cfg.width}, batch {cfg.batch_size}, threads "
          f"{torch.get_num_threads()}, device {device}, bf16 {bf16}, channels_last "
          f"{cfg.channels_last}, compile {cfg.compile}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}")  # fmt: skip

    bench = Bench(cfg, data, device, bf16)
    bench.bare(2), bench.end_to_end(2)  # warm-up (allocator, oneDNN primitives, compile)
    bare, e2e = [], []
    for r in range(args.repeats):
        bare.append(bench.bare(args.steps))
        e2e.append(bench.end_to_end(args.steps))
        print(f"  run {r + 1}: bare {bare[-1]:.0f} img/s, end-to-end {e2e[-1]:.0f} img/s")
    bare_m, e2e_m = statistics.median(bare), statistics.median(e2e)
    ratio = statistics.median(e / b for e, b in zip(e2e, bare, strict=True))  # per pair
    res = {"preset": args.preset, "config": {"width": cfg.width, "batch_size": cfg.batch_size},
           "threads": torch.get_num_threads(), "device": str(device), "bf16": bf16,
           "bare_img_s": bare_m, "end_to_end_img_s": e2e_m, "ratio": ratio}  # fmt: skip

    t = time.perf_counter()
    evaluate_heads(bench.model, val, HEADS, batch_size=cfg.eval_batch_size, bf16=bf16,
                   channels_last=cfg.channels_last)  # fmt: skip
    res["val_seconds"] = time.perf_counter() - t
    res["epoch_seconds"] = n_train / e2e_m + res["val_seconds"]
    res["run_minutes_max"] = res["epoch_seconds"] * cfg.epochs / 60

    if args.bf16_steps > 0:
        runs = {}
        for flag in (False, True):
            b = Bench(cfg, data, device, flag)
            b.end_to_end(1)
            runs[flag] = b.end_to_end(args.bf16_steps)
        res.update(
            fp32_img_s=runs[False], bf16_img_s=runs[True], bf16_vs_fp32=runs[True] / runs[False]
        )

    print(f"end-to-end / bare model step: {ratio:.2f}  (median of {args.repeats} paired runs of "
          f"{args.steps} batches; medians {e2e_m:.0f} / {bare_m:.0f} img/s)")  # fmt: skip
    if "bf16_vs_fp32" in res:
        print(f"bf16 / fp32 end-to-end: {res['bf16_vs_fp32']:.2f}  ({res['bf16_img_s']:.1f} / "
              f"{res['fp32_img_s']:.1f} img/s, {args.bf16_steps} batches)")  # fmt: skip
    print(f"epoch: {res['epoch_seconds']:.0f} s ({n_train} faces at {e2e_m:.0f} img/s + "
          f"validation {res['val_seconds']:.0f} s); {cfg.epochs} epochs at most: "
          f"{res['run_minutes_max']:.0f} min")  # fmt: skip
    if args.json:
        from faceattrs.io import write_json_atomic

        write_json_atomic(args.json, res)


if __name__ == "__main__":
    main()
