"""benchmarks/bench_serve.py's counting: every request of every round is counted, with its
latency (no server: the rounds' sends are stand-ins)."""

from __future__ import annotations

import math

import pytest
from conftest import load_script

pytest.importorskip("httpx", reason="the load test needs httpx")
bench = load_script("bench_serve")


@pytest.mark.parametrize("n", range(0, 13))
def test_rounds_send_every_request(n):
    sizes = bench.round_sizes(n, 4)
    assert sum(sizes) == n and len(sizes) == min(n, 4) and all(k >= 1 for k in sizes)
    assert max(sizes, default=0) - min(sizes, default=0) <= 1


def test_large_uploads_count_every_round():
    """``--large 5``: five requests, counted and timed over all rounds (it sent four and
    kept the last round's one latency: NaN percentiles)."""
    sent, after = [], []

    def send(k):  # k answers, each taking a known time
        sent.append(k)
        first = sum(sent[:-1])
        return bench.Tally([(0.1 * (first + i + 1), 200) for i in range(k)], set(), 0.5)

    res = bench.summary(bench.in_rounds(5, 4, send, lambda: after.append(1)))
    assert sum(sent) == 5 and len(after) == len(sent) == 4
    assert res["requests"] == 5 and res["statuses"] == {"200": 5}
    assert res["seconds"] == 2.0 and res["req_per_s"] == 2.5
    assert all(math.isfinite(res[p]) for p in ("p50_ms", "p95_ms", "p99_ms"))
    assert res["p50_ms"] == pytest.approx(300.0)  # the middle of 100..500 ms: all rounds


def test_summary_of_one_or_no_answer_has_no_nan():
    one = bench.summary(bench.Tally([(0.2, 200), (0.1, 413)], {"1"}, 1.0))
    assert one["p50_ms"] == one["p99_ms"] == 200.0
    assert one["statuses"] == {"200": 1, "413": 1} and one["retry_after"] == ["1"]
    none = bench.summary(bench.Tally([(0.1, "ReadError")], set(), 1.0))
    assert none["p50_ms"] is None and none["statuses"] == {"ReadError": 1}
