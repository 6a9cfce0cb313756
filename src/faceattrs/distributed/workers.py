"""The workers of ``--engine ray``: one :class:`Analyzer` a Ray actor (one
:class:`faceattrs.predict.FaceAnalyzer`, one model load), batches of ``(image, path,
bytes)`` rows in, Arrow tables of records out (:func:`records_table`)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

from ..exceptions import FaceattrsError
from ..photo import PhotoError
from ..predict_files import flat_record, record_columns
from .sources import fetch, is_uri

# Tests only: a path; the first worker to reach its second batch creates the file and
# exits abruptly (os._exit), once, as a killed process would (tests/test_distributed.py).
CRASH_ONCE_ENV = "FACEATTRS_TEST_CRASH_ONCE"
INT_COLUMNS = ("image", "face", "x", "y", "w", "h")
URI_THREADS = 8  # URIs a worker reads at once (network latency, not CPU)


class WorkerError(FaceattrsError):
    """A FaceattrsError in a worker (a model it cannot load), to be one line on the driver."""


def _text(value) -> str | None:
    """A path column's value as text (binary columns hold file-system bytes)."""
    if value is None or isinstance(value, str):
        return value
    return os.fsdecode(value)


def _crash_once(calls: int) -> None:
    marker = os.environ.get(CRASH_ONCE_ENV)
    if not marker or calls < 1:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(1)  # no exception, no clean-up: as a process killed by the system


def arrow_type(column: str, heads):
    import pyarrow as pa  # comes with ray[data] (an optional extra)

    if column in INT_COLUMNS:
        return pa.int64()
    if column in ("file", "detection", "error", "age_bin", "record") or column in heads:
        return pa.string()
    return pa.float64()


def _utf8(value):
    """Text Arrow can hold: a non-UTF-8 file name's odd bytes as ``\\udcXX`` (as in CSV)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def records_table(records: list[dict], models):
    """Records -> an Arrow table: the CSV columns (:func:`record_columns`) and ``record``
    (the whole record as JSON, as ``--out x.jsonl`` has it)."""
    import pyarrow as pa  # comes with ray[data] (an optional extra)

    columns = record_columns(models)
    rows = [flat_record(r) for r in records]
    arrays = [
        pa.array([_utf8(row.get(c)) for row in rows], arrow_type(c, models.class_names))
        for c in columns
    ]
    arrays.append(pa.array([json.dumps(r) for r in records], pa.string()))
    return pa.Table.from_arrays(arrays, names=[*columns, "record"])


class Analyzer:
    """A Ray actor: one :class:`FaceAnalyzer` (one model load), batches of ``(image, path,
    bytes)`` rows in, record rows out (:func:`records_table`)."""

    def __init__(self, model, analyzer: dict, detect: bool, pillow_limit, cwd: str):
        # the model and the photo path load in the actor, never in the driver
        from .. import photo as photomod
        from ..predict import FaceAnalyzer

        if os.path.isdir(cwd):  # relative paths as the driver meant them (a shared folder)
            os.chdir(cwd)
        photomod.worker_start(pillow_limit)  # one OpenCV thread, the driver's Pillow guard
        self.detect, self.calls, self.failed = detect, 0, None
        self.io = ThreadPoolExecutor(URI_THREADS, thread_name_prefix="faceattrs-uri")
        try:
            self.analyzer = FaceAnalyzer(model, photo_workers="threads", streams=1, **analyzer)
        except FaceattrsError as e:  # raised at the first batch: a failed start would be
            self.failed = WorkerError(str(e))  # restarted without end

    def __call__(self, batch):
        if self.failed is not None:
            raise self.failed
        _crash_once(self.calls)
        self.calls += 1
        n = batch.num_rows
        cols = {c: batch.column(c).to_pylist() for c in ("image", "path", "bytes")
                if c in batch.column_names}  # fmt: skip
        images = cols.get("image", [None] * n)
        paths = [_text(p) for p in cols.get("path", [None] * n)]
        blobs = cols.get("bytes", [None] * n)
        remote = [i for i in range(n) if blobs[i] is None and paths[i] and is_uri(paths[i])]
        fetched = dict(zip(remote, self.io.map(fetch, [paths[i] for i in remote]), strict=True))
        records: list[list[dict]] = [[] for _ in range(n)]
        run, rows = [], []  # what goes through the analyzer, and its row
        for i, (path, blob) in enumerate(zip(paths, blobs, strict=True)):
            src = blob if blob is not None else fetched.get(i, path)
            if src is None:
                src = PhotoError("no path and no bytes in this row")
            if isinstance(src, PhotoError):
                records[i] = [{"file": path, "image": images[i], "error": str(src)}]
            else:
                run.append(src)
                rows.append(i)
        for item in self.analyzer.run(run, detect=self.detect):
            i = rows[item.index]
            for rec in item.records:
                if rec.get("error") and path_named(paths[i], run[item.index]):
                    rec["error"] = f"{paths[i]}: {rec['error']}"
                rec.update(file=paths[i], image=images[i])
            records[i] = item.records
        return records_table([r for rs in records for r in rs], self.analyzer.models)


def path_named(path: str | None, src) -> bool:
    """An error of an image read from bytes names no file: prefix its path."""
    return path is not None and not isinstance(src, str | os.PathLike)
