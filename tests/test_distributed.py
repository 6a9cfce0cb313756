"""``faceattrs predict --engine ray`` (faceattrs.distributed) on a local Ray instance.

One Ray instance (2 CPUs, no dashboard) serves every test of the module; the tests that
need Ray skip with a reason when it is not installed (``pip install -e ".[ray]"``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_PHOTOS

from faceattrs.cli import main
from faceattrs.exceptions import FaceattrsError
from faceattrs.predict_files import flat_record

try:  # the optional extra
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install -e '.[ray]')")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module: 2 CPUs, a small object store, no dashboard."""
    if ray is None:
        pytest.skip("Ray is not installed (pip install -e '.[ray]')")
    env = dict(os.environ)  # Ray sets variables and signal handlers: the later tests' back
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
    os.environ.clear()
    os.environ.update(env)
    for s, handler in handlers.items():
        signal.signal(s, handler)


# run_dir (the tiny bundle, gender calibrated at 2) and photos are conftest's session
# fixtures: the tests only read them.


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def single_process(args: list[str], out: Path) -> list[dict]:
    assert main(["predict", *args, "--out", str(out)]) in (0, 1)
    return read_jsonl(out)


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    """The same records: files, faces, boxes, labels, errors equal; numbers within 1e-5."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key in ("gender", "ethnicity", "age") and a[key] is not None:
                assert a[key].keys() == b[key].keys()
                for k, v in a[key].items():
                    if isinstance(v, dict):
                        assert v.keys() == b[key][k].keys()
                        assert np.allclose(list(v.values()), list(b[key][k].values()), atol=1e-5)
                    elif isinstance(v, float | list):
                        assert np.allclose(v, b[key][k], atol=1e-5), (key, k)
                    else:
                        assert v == b[key][k], (key, k)
            elif key == "score":
                assert a[key] == pytest.approx(b[key], abs=1e-5)
            else:
                assert a[key] == b[key], key


@needs_ray
def test_ray_parquet_holds_the_single_process_records(local_ray, run_dir, photos, tmp_path):
    """``--engine ray --out r.parquet`` on the shared photos: the same records as the
    single-process command, as JSON (``record``) and as the CSV's columns."""
    want = single_process([str(SHARED_PHOTOS), "--model", str(run_dir)], tmp_path / "s.jsonl")
    assert len({r["file"] for r in want}) == len(photos)
    out = tmp_path / "r.parquet"
    args = ["predict", str(SHARED_PHOTOS), "--model", str(run_dir), "--engine", "ray"]
    assert main([*args, "--out", str(out)]) == 0
    rows = pq.read_table(out).to_pylist()
    assert [r["image"] for r in rows] == list(range(len(photos)))  # in input order
    assert_same_records([json.loads(r.pop("record")) for r in rows], want)
    flat = [flat_record(r) for r in want]
    assert [{k: r[k] for k in f} for r, f in zip(rows, flat, strict=True)] == flat
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet", "s.jsonl"]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, photos) -> Path:
    """Two photos, bad files, and a list file naming them, a missing file and two URIs."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "ok").mkdir()
    for p in photos[:2]:
        (d / "ok" / p.name).write_bytes(p.read_bytes())
    (d / "ok" / "text.jpg").write_text("hello")
    (d / "ok" / "zero.png").write_bytes(b"")
    (d / "ok" / "truncated.jpg").write_bytes(photos[2].read_bytes()[:700])
    lines = [str(d / "ok"), "# a comment", "", str(d / "missing.jpg")]
    lines += [(d / "ok" / photos[0].name).as_uri(), (d / "gone.jpg").as_uri()]
    (d / "list.txt").write_text("\n".join(lines) + "\n")
    return d


@needs_ray
def test_ray_bad_files_are_error_records(local_ray, run_dir, bad_inputs, tmp_path, caplog):
    """A list file of a folder, a missing file and URIs: bad files give error records as
    in the single-process command (the same bytes for the same local inputs), in input
    order; a URI is read by the workers; exit status 1."""
    d = bad_inputs
    want = single_process([str(d / "ok"), str(d / "missing.jpg"), "--model", str(run_dir)],
                          tmp_path / "s.jsonl")  # fmt: skip
    out = tmp_path / "r.jsonl"
    args = ["predict", str(d / "list.txt"), "--model", str(run_dir), "--engine", "ray"]
    with caplog.at_level("INFO", logger="faceattrs"):
        assert main([*args, "--num-workers", "1", "--batch-size", "2", "--out", str(out)]) == 1
    got = read_jsonl(out)
    assert_same_records(got[: len(want)], want)
    errors = {Path(r["file"]).name: r["error"] for r in got if "error" in r}
    assert "not an image" in errors["text.jpg"] and "empty file" in errors["zero.png"]
    assert "truncated" in errors["truncated.jpg"] and "no such file" in errors["missing.jpg"]
    uri, gone = got[len(want) :]
    assert uri["file"].startswith("file://") and uri["image"] == len(want)
    assert_same_records([{**uri, "file": None, "image": None}],
                        [{**want[0], "file": None, "image": None}])  # fmt: skip
    assert gone["file"].endswith("gone.jpg") and "cannot be read" in gone["error"]
    assert "8 file(s), 3 face(s), 5 failed" in caplog.text


@needs_ray
def test_a_killed_worker_is_retried_and_nothing_is_lost(local_ray, run_dir, photos, tmp_path):
    """A worker that dies mid-run (os._exit at its second batch, injected once through
    the environment) is restarted by Ray: the output still holds every photo once. (One
    worker: it has to be restarted for the run to end.)"""
    from faceattrs.distributed import predict_ray
    from faceattrs.distributed.workers import CRASH_ONCE_ENV

    marker = tmp_path / "crashed"
    out = tmp_path / "r.jsonl"
    counts = predict_ray(
        [str(SHARED_PHOTOS)], str(run_dir), out=str(out), batch_size=4, num_workers=1,
        ray_remote_args={"runtime_env": {"env_vars": {CRASH_ONCE_ENV: str(marker)}}},
    )  # fmt: skip
    assert marker.exists()  # a worker did die
    assert int(marker.read_text()) > 0
    recs = read_jsonl(out)
    assert [r["image"] for r in recs] == list(range(len(photos)))
    assert [Path(r["file"]).name for r in recs] == [p.name for p in photos]
    assert counts == {"files": len(photos), "faces": len(photos), "failed": 0}


@needs_ray
def test_predict_dataset_reads_a_parquet_table(local_ray, run_dir, photos, tmp_path):
    """The Python API: a Parquet table of bytes (and paths, some without bytes) in, a Ray
    Dataset of records out; a table that names neither is one clear error."""
    from faceattrs.distributed import predict_dataset

    chosen = photos[:3]
    table = pa.table({
        "path": [str(p) for p in chosen],
        "bytes": pa.array([chosen[0].read_bytes(), None, b"junk"], pa.binary()),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "t.parquet")
    ds = predict_dataset(str(tmp_path / "t.parquet"), str(run_dir), num_workers=1)
    rows = ds.take_all()
    got = {r["file"]: json.loads(r["record"]) for r in rows}
    assert set(got) == {str(p) for p in chosen}
    assert all(r["image"] is None for r in got.values())  # no image column: no position
    want = single_process([str(p) for p in chosen[:2]] + ["--model", str(run_dir)],
                          tmp_path / "s.jsonl")  # fmt: skip
    for w in want:
        assert_same_records([{**got[w["file"]], "image": 0}], [{**w, "image": 0}])
    assert got[str(chosen[2])]["error"].startswith(f"{chosen[2]}: ")
    pq.write_table(pa.table({"name": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(FaceattrsError, match="'path'.*'bytes'"):
        predict_dataset(str(tmp_path / "bad.parquet"))


# ------------------------------------------------------------------ without Ray running


def test_without_ray_one_line_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as when absent
    img = tmp_path / "a.jpg"
    img.write_bytes(b"")
    assert main(["predict", str(img), "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install -e '.[ray]'" in err, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--address", "auto"], "go with --engine ray"),
        (["--engine", "ray", "--annotate", "pics"], "not available with --engine ray"),
        (["--engine", "ray", "--num-workers", "0"], "at least 1"),
        (["--out", "r.parquet"], "Parquet is written with --engine ray"),
    ],
)
def test_engine_options_are_checked_in_one_line(extra, message, capsys, tmp_path):
    img = tmp_path / "a.jpg"
    img.write_bytes(b"")
    assert main(["predict", str(img), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_an_incomplete_run_writes_nothing(tmp_path):
    """The driver's count: an input missing (or twice) in what the workers returned, and
    the output is not written."""
    if ray is None:
        pytest.skip("pyarrow comes with Ray, which is not installed")
    from faceattrs.distributed.output import Tally, write_records

    class Rows:  # what a Ray Dataset hands the driver, one input short
        def iter_batches(self, **kw):
            rec = {"file": "a.jpg", "image": 0, "error": "a.jpg: no face found"}
            yield pa.table({"image": [0], "face": pa.array([None], pa.int64()),
                            "error": [rec["error"]], "record": [json.dumps(rec)]})  # fmt: skip

    out = tmp_path / "r.jsonl"
    with pytest.raises(FaceattrsError, match="lost 1 and repeated 0 of 2"):
        write_records(Rows(), out, 2)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert write_records(Rows(), out, 1) == {"files": 1, "faces": 0, "failed": 1}
    tally = Tally(2)
    tally.add([0, 0, 1, 1], [0, 1, 0, 0], [None] * 4)  # input 1's face 0 twice
    with pytest.raises(FaceattrsError, match="lost 0 and repeated 1 of 2"):
        tally.check()


def test_the_single_process_command_imports_no_ray(run_dir, tmp_path):
    args = ["predict", str(tmp_path / "none.jpg"), "--model", str(run_dir)]
    code = f"""
import sys
from faceattrs.cli import main
assert main({[*args, "--out", str(tmp_path / "r.jsonl")]!r}) == 1
assert "ray" not in sys.modules, "ray imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_error_in_a_worker_is_one_line():
    """Ray gives the driver a worker's exception as traceback text: a WorkerError (a model
    the worker cannot load) comes out as itself, anything else as Ray raised it."""
    if ray is None:
        pytest.skip("Ray is not installed (pip install -e '.[ray]')")
    from faceattrs.distributed import WorkerError, _user_errors

    text = 'Traceback...\n  File "x.py", line 1\n'
    text += "faceattrs.distributed.workers.WorkerError: bad model\n\nmore"
    with pytest.raises(WorkerError, match="^bad model$"), _user_errors(ray):
        raise ray.exceptions.RayError(text)
    with pytest.raises(ray.exceptions.RayError), _user_errors(ray):
        raise ray.exceptions.RayError("ValueError: a bug")
