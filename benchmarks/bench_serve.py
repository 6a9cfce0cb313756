"""Load test of ``faceattrs serve`` over loopback (figures in docs/serve.md).

Starts ``faceattrs serve`` on a free 127.0.0.1 port and, bounded in count and time:

1. load: ``--requests`` POST /analyze of the shared photos (one photo each, in turn) from
   ``--clients`` concurrent clients; prints requests/s, p50/p95/p99 latency, errors (any
   status but 200) and the server's peak resident memory (VmHWM);
2. large uploads: ``--large`` requests of a ~9 MB JPEG (under the 10 MB limit), sent in
   up to four rounds (the server's memory after each: it must level off), and as many of
   a 12 MB body (refused, 413); every request of every round counted;
3. saturation: a second server with a queue of ``--sat-queue`` requests hit by
   ``--sat-clients`` clients: 503s with Retry-After, never a failure.

Run: ``python benchmarks/bench_serve.py --model runs/cpu --photos ../shared/data/photos``
(traffic goes to 127.0.0.1 only; each phase stops after ``--time-limit`` seconds.)
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

HOST = "127.0.0.1"  # loopback only


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory now and at its peak (Linux /proc), in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


class Server:
    """``faceattrs serve`` in a subprocess on a free loopback port."""

    def __init__(self, model: str, extra: list[str]):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "faceattrs", "serve", "--port", str(self.port)]
        cmd += ["--model", model] if model else []
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd + extra, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.log.seek(0)
                sys.exit("server did not start:\n" + self.log.read().decode())
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass
class Tally:
    """What the clients saw: ``(seconds, status)`` per request (status: the HTTP code, or
    the name of the client error), the Retry-After values of the 503s, the wall time."""

    lat: list[tuple[float, int | str]] = field(default_factory=list)
    retry_after: set[str] = field(default_factory=set)
    wall: float = 0.0

    def __add__(self, other: Tally) -> Tally:
        """Two runs together (their times added)."""
        return Tally(
            self.lat + other.lat, self.retry_after | other.retry_after, self.wall + other.wall
        )


def summary(t: Tally) -> dict:
    """Requests, requests/s, latency percentiles of the answered (200) requests (null
    when none was; one answer is every percentile), statuses, Retry-After values."""
    ok = [s for s, status in t.lat if status == 200]
    q = statistics.quantiles(ok, n=100) if len(ok) > 1 else [ok[0] if ok else None] * 99
    statuses = Counter(str(status) for _, status in t.lat)
    return {
        "requests": len(t.lat),
        "seconds": round(t.wall, 2),
        "req_per_s": round(len(t.lat) / t.wall, 2) if t.wall > 0 else None,
        **{
            f"p{p}_ms": None if q[p - 1] is None else round(q[p - 1] * 1000, 1)
            for p in (50, 95, 99)
        },
        "statuses": dict(sorted(statuses.items())),
        "retry_after": sorted(x for x in t.retry_after if x),
    }


async def send_all(url, bodies, n, clients, time_limit, explain=False) -> Tally:
    """``n`` POSTs of ``bodies`` (in turn) from ``clients`` concurrent clients."""
    tally, next_i = Tally(), 0
    deadline = time.monotonic() + time_limit
    target = url + "/analyze" + ("?explain=1" if explain else "")
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http):
        nonlocal next_i
        while next_i < n and time.monotonic() < deadline:
            name, data = bodies[next_i % len(bodies)]
            next_i += 1
            t0 = time.perf_counter()
            try:
                r = await http.post(target, files={"file": (name, data, "image/jpeg")})
                status = r.status_code
                if status == 503:
                    tally.retry_after.add(r.headers.get("retry-after"))
            except httpx.HTTPError as e:  # refused mid-upload, reset, timeout
                status = type(e).__name__
            tally.lat.append((time.perf_counter() - t0, status))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    tally.wall = time.perf_counter() - t0
    return tally


def hammer(url, bodies, n, clients, time_limit, explain=False) -> dict:
    """:func:`summary` of :func:`send_all`."""
    return summary(asyncio.run(send_all(url, bodies, n, clients, time_limit, explain)))


def round_sizes(n: int, rounds: int) -> list[int]:
    """``n`` requests over at most ``rounds`` rounds, as even as can be, none empty.

    >>> round_sizes(5, 4), round_sizes(2, 4), round_sizes(0, 4)
    ([2, 1, 1, 1], [1, 1], [])
    """
    rounds = min(rounds, n)
    return [n // rounds + (i < n % rounds) for i in range(rounds)]


def in_rounds(n: int, rounds: int, send: Callable[[int], Tally], after_round=None) -> Tally:
    """``n`` requests in up to ``rounds`` rounds (``send(k)`` sends ``k``), calling
    ``after_round()`` after each; the tally of every round together."""
    total = Tally()
    for k in round_sizes(n, rounds):
        total = total + send(k)
        if after_round is not None:
            after_round()
    return total


def big_jpeg(src: Path, target_mb: float) -> bytes:
    """A photo blown up with noise until its JPEG is just under ``target_mb``."""
    img = np.asarray(Image.open(src).convert("RGB"))
    rng = np.random.default_rng(0)
    side, prev = 1000, b""
    while True:
        big = np.asarray(Image.fromarray(img).resize((side, side)), np.int16)
        big = np.clip(big + rng.integers(-40, 41, big.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(big).save(buf, "JPEG", quality=95)
        if buf.tell() > target_mb * 1024 * 1024:
            return prev or buf.getvalue()
        prev, side = buf.getvalue(), side + 250


def show(title: str, res: dict) -> None:
    print(f"{title}: " + json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="run folder (default: the bundled model)")
    ap.add_argument("--photos", default="../shared/data/photos", help="folder of .jpg photos")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--explain", action="store_true", help="ask for Grad-CAM overlays too")
    ap.add_argument("--large", type=int, default=20, help="large uploads (0: skip)")
    ap.add_argument("--sat-requests", type=int, default=300)
    ap.add_argument("--sat-clients", type=int, default=48)
    ap.add_argument("--sat-queue", type=int, default=4)
    ap.add_argument("--time-limit", type=float, default=300, help="seconds per phase at most")
    ap.add_argument("--server-args", default="", help="more `faceattrs serve` options")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    photos = sorted(Path(args.photos).glob("*.jpg"))
    if not photos:
        sys.exit(f"no .jpg photos in {args.photos}")
    bodies = [(p.name, p.read_bytes()) for p in photos]
    extra = args.server_args.split()
    report = {"cpus": os.cpu_count(), "photos": len(photos)}

    server = Server(args.model, extra)
    try:
        hammer(server.url, bodies, 2 * args.clients, args.clients, 60)  # warm-up
        report["idle_rss_mb"] = round(memory_mb(server.proc.pid)["VmRSS"], 1)
        res = hammer(server.url, bodies, args.requests, args.clients, args.time_limit, args.explain)
        res["server_peak_rss_mb"] = round(memory_mb(server.proc.pid)["VmHWM"], 1)
        show(f"load ({args.clients} clients, explain={args.explain})", res)
        report["load"] = res
        if args.large:
            nine = [("big.jpg", big_jpeg(photos[0], 9.5))]
            twelve = [("huge.jpg", os.urandom(12 * 1024 * 1024))]
            before = memory_mb(server.proc.pid)
            rss = []  # resident memory after each round: it must level off
            res = summary(
                in_rounds(
                    args.large,
                    4,
                    lambda k: asyncio.run(send_all(server.url, nine, k, 4, args.time_limit)),
                    lambda: rss.append(round(memory_mb(server.proc.pid)["VmRSS"], 1)),
                )
            )
            res["upload_mb"] = round(len(nine[0][1]) / 2**20, 2)
            res["pixels"] = "x".join(map(str, Image.open(io.BytesIO(nine[0][1])).size))
            over = hammer(server.url, twelve, args.large, 4, args.time_limit)
            res["over_limit_statuses"] = over["statuses"]
            res["rss_before_mb"] = round(before["VmRSS"], 1)
            res["rss_after_each_round_mb"] = rss
            res["rss_after_over_limit_mb"] = round(memory_mb(server.proc.pid)["VmRSS"], 1)
            res["server_peak_rss_mb"] = round(memory_mb(server.proc.pid)["VmHWM"], 1)
            show("large uploads (4 clients)", res)
            report["large"] = res
    finally:
        server.close()

    sat = Server(args.model, extra + ["--queue", str(args.sat_queue)])
    try:
        res = hammer(sat.url, bodies, args.sat_requests, args.sat_clients, args.time_limit)
        res["server_peak_rss_mb"] = round(memory_mb(sat.proc.pid)["VmHWM"], 1)
        show(f"saturation (queue {args.sat_queue}, {args.sat_clients} clients)", res)
        report["saturation"] = res
    finally:
        sat.close()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
