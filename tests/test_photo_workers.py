"""The analyzer's photo workers (``photo_workers``: threads or processes): the same
records either way, a worker process that dies, ``auto``, scripts without a main guard,
a killed parent, Pillow's guard. ``run_dir`` and ``image_files`` are session fixtures in
conftest.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import child_env, descendants, outliving, read_line
from photo_helpers import png_header

from faceattrs.exceptions import FaceattrsError
from faceattrs.photo import PhotoError
from faceattrs.predict import FaceAnalyzer


def test_photo_worker_processes_give_the_same_records(run_dir, image_files, caplog):
    """Worker processes (paths) and threads (arrays) together give the records of threads
    alone, in order, errors included; a worker process that dies leaves the rest to
    threads, with a warning, and loses nothing."""
    threads = FaceAnalyzer(run_dir, batch_size=3, photo_workers="threads")
    procs = FaceAnalyzer(run_dir, batch_size=3, photo_workers="processes")
    want = threads.analyze(image_files, detect=False, on_error="record")
    assert len(want) == 13 and "error" in want[5] and want[4]["image"] == 4
    assert procs.analyze(image_files, detect=False, on_error="record") == want
    items = list(procs.run(image_files[:3], detect=False, keep_images=True))
    assert all(i.image is not None and i.image.shape[2] == 3 for i in items)
    with pytest.raises(PhotoError, match="not an image"):
        procs.analyze(image_files, detect=False)
    pid = next(iter(procs._procs._processes))
    os.kill(pid, signal.SIGKILL)
    got = procs.analyze(image_files, detect=False, on_error="record")
    assert got == want
    assert "photo worker processes stopped or could not start" in caplog.text
    assert procs.photo_workers == "threads" and procs._procs is None
    caplog.clear()

    def no_processes(*a, **k):  # a platform without process support
        raise OSError(38, "Function not implemented")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("faceattrs.predict.ProcessPoolExecutor", no_processes)
        none = FaceAnalyzer(run_dir, batch_size=3, photo_workers="processes")
        assert "could not start" in caplog.text and none.photo_workers == "threads"
        assert none.analyze(image_files, detect=False, on_error="record") == want
    with pytest.raises(FaceattrsError, match="photo_workers must be one of"):
        FaceAnalyzer(run_dir, photo_workers="fork")


def test_photo_workers_auto_takes_processes_for_many_paths(run_dir, image_files, monkeypatch):
    from faceattrs import predict as predict_mod

    auto = FaceAnalyzer(run_dir)  # "auto"
    auto.workers = 2  # as on a two-core CPU
    want = FaceAnalyzer(run_dir, photo_workers="threads").analyze(
        image_files, detect=False, on_error="record"
    )
    monkeypatch.setattr(predict_mod, "PROCESSES_FROM", 12)  # 11 paths: threads
    assert auto.analyze(image_files, detect=False, on_error="record") == want
    assert auto._procs is None
    monkeypatch.setattr(predict_mod, "PROCESSES_FROM", 11)
    assert auto.analyze(image_files, detect=False, on_error="record") == want
    assert auto._procs is not None and auto.photo_workers == "auto"


def test_photo_worker_processes_do_not_run_the_calling_script(run_dir, image_files, tmp_path):
    """A script without an ``if __name__ == "__main__"`` guard: its worker processes do not
    run its top level again (spawn would), and its records are those of threads."""
    marker, out = tmp_path / "ran.txt", tmp_path / "out.json"
    files = [str(f) for f in image_files if isinstance(f, str | Path)]
    script = tmp_path / "script.py"
    script.write_text(
        "import json, sys\n"
        "from faceattrs.predict import FaceAnalyzer\n"
        f"open({str(marker)!r}, 'a').write('ran\\n')\n"
        f"an = FaceAnalyzer({str(run_dir)!r}, photo_workers='processes')\n"
        f"recs = an.analyze({files!r}, detect=False, on_error='record')\n"
        f"json.dump(recs, open({str(out)!r}, 'w'))\n"
    )
    subprocess.run([sys.executable, str(script)], check=True, timeout=120)
    assert marker.read_text() == "ran\n"
    want = FaceAnalyzer(run_dir).analyze(files, detect=False, on_error="record")
    assert json.loads(out.read_text()) == json.loads(json.dumps(want))


KILLED_PARENT = """
import sys, time
from faceattrs.predict import FaceAnalyzer
an = FaceAnalyzer(sys.argv[1], photo_workers="processes", threads=1)
an.analyze(sys.argv[2:], detect=False, on_error="record")  # the workers are up and idle
print("ready", flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree in /proc")
def test_photo_worker_processes_end_when_their_parent_is_killed(run_dir, image_files):
    """``kill -9`` of a program whose analyzer has worker processes (``faceattrs predict``
    on 16 photos or more): the workers and the resource tracker end within seconds, not
    wait on their pipes forever."""
    files = [str(f) for f in image_files if isinstance(f, str | Path)]
    cmd = [sys.executable, "-c", KILLED_PARENT, str(run_dir), *files]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert read_line(proc, 120) == "ready\n"
        children = descendants(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert len(children) >= 2  # the photo workers (two on two cores) and the resource tracker
    assert outliving(children, 5.0) == []


def test_photo_workers_decode_under_the_callers_pillow_guard(run_dir, tmp_path):
    """Worker processes take the calling process's Pillow guard: a program keeps it in its
    workers too (the same answer as in threads), a faceattrs command lifts it in both."""
    from faceattrs.photo import PhotoConfig, pillow_limit_lifted

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20000, 20000))  # 400 megapixels in the header, no pixels
    cfg = PhotoConfig(max_pixels=0)
    for workers in ("threads", "processes"):
        an = FaceAnalyzer(run_dir, photo=cfg, photo_workers=workers)
        (rec,) = an.analyze([str(bomb)], on_error="record")
        assert "refused by Pillow's own pixel limit" in rec["error"], (workers, rec)
        with pillow_limit_lifted():
            an = FaceAnalyzer(run_dir, photo=cfg, photo_workers=workers)
            (rec,) = an.analyze([str(bomb)], on_error="record")
        assert "truncated or corrupt" in rec["error"], (workers, rec)
