"""``faceattrs predict --engine ray``: the per-face analysis of ``faceattrs predict`` on Ray
Data, for folders of millions of photos and for clusters.

    faceattrs predict ../shared/data/photos --engine ray --out r.parquet
    faceattrs predict paths.txt --engine ray --address auto --num-workers 16 --out r.jsonl

Sources, read into one Ray Dataset of ``(image, path, bytes)`` rows:

- files, folders and globs, as the single-process command takes them (expanded here, on
  the driver, by :func:`faceattrs.predict_files.expand_inputs`, so that the positions and
  the error records are the same); a list file (``.txt`` / ``.lst``: one file, folder,
  glob or URI such as ``s3://bucket/a.jpg`` a line; blank lines and ``#`` lines skipped)
  stands for its lines;
- a Parquet table (``.parquet``, a file or a folder of them), read by
  ``ray.data.read_parquet``: a ``path`` column (paths or URIs, read by the workers)
  and/or a ``bytes`` column (encoded images), and optionally an integer ``image`` column
  (the records' ``image``; null without it).

A pool of Ray actors (:class:`Analyzer`, one :class:`faceattrs.predict.FaceAnalyzer` and
one model load each) turns batches of rows into records, the very records of the
single-process command (the same :meth:`FaceAnalyzer.run`), bad files included as error
records. Each output row holds the record's scalar columns (as ``--out x.csv`` has them)
and the whole record as JSON (``record``). The rows stream back to the driver in input
order, which writes them to ``--out``: ``.jsonl`` (or JSON lines on stdout), ``.csv`` or
``.parquet`` (one file, those columns), under a temporary name renamed only when every
input is in it exactly once: the output is complete or absent. (For a write spread over
the cluster, :func:`predict_dataset` returns the Dataset itself.) On a cluster, relative
paths (resolved in the driver's folder), ``--model`` and the photos must be reachable
from every node at the same path (a shared file system), or be URIs; faceattrs must be
installed on every node.

A worker that dies (killed, out of memory, a lost node) is restarted by Ray and its batch
run again (Ray Data's defaults for actor pools: ``max_restarts`` and ``max_task_retries``
unbounded).

Ray is imported inside the functions of this module only: it is an optional extra
(``pip install -e ".[ray]"``), and the single-process command never loads it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .exceptions import FaceattrsError
from .io import atomic_path, clean_stale_temps
from .photo import PhotoConfig, PhotoError
from .predict_files import expand_inputs, flat_record, record_columns

log = logging.getLogger(__name__)

RAY_MISSING = (
    "--engine ray needs Ray: pip install -e '.[ray]' (or: pip install 'ray[data]' pyarrow)"
)
LIST_SUFFIXES = (".txt", ".lst")
OUT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# Tests only: a path; the first worker to reach its second batch creates the file and
# exits abruptly (os._exit), once, as a killed process would (tests/test_distributed.py).
CRASH_ONCE_ENV = "FACEATTRS_TEST_CRASH_ONCE"
INT_COLUMNS = ("image", "face", "x", "y", "w", "h")
URI_THREADS = 8  # URIs a worker reads at once (network latency, not CPU)
ROW_GROUP = 16_384  # rows of a Parquet row group (about 16 MB of records)


def import_ray():
    """``ray`` with ``ray.data``, or one line saying what to install."""
    try:  # an optional extra: imported here only, never by the single-process command
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise FaceattrsError(RAY_MISSING) from None
    return ray


# ---------------------------------------------------------------- sources


def is_uri(path) -> bool:
    return "://" in str(path)


def read_list_file(path: Path) -> list[str]:
    """The lines of a list file, without blank and ``#`` lines."""
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise FaceattrsError(f"{path}: cannot be read ({e.strerror or e})") from None
    return [s for s in (line.strip() for line in text.splitlines()) if s and not s[0] == "#"]


def source_paths(sources: list[str]) -> list[str]:
    """Files, folders, globs, list files and URIs -> the input list (the single-process
    command's for the same files, folders and globs; URIs kept as written, after them)."""
    local, uris, empty = [], [], []
    for src in map(str, sources):
        lines = [src]
        if Path(src).suffix.lower() in LIST_SUFFIXES and Path(src).is_file():
            lines = read_list_file(Path(src))
            if not lines:
                log.warning("%s: no paths in it", src)
        for line in lines:
            (uris if is_uri(line) else local).append(line)
    files = [p for p, _ in expand_inputs(local, empty)] if local else []
    for message in empty:
        log.warning(message)
    paths = files + list(dict.fromkeys(uris))
    if not paths:
        raise FaceattrsError(empty[0] if empty else "no input files")
    return paths


def parquet_columns(source: str) -> list[str]:
    """The input columns of a Parquet table (``path``, ``bytes``, ``image``), checked."""
    import pyarrow.dataset as pads  # comes with ray[data]

    try:
        schema = pads.dataset(source, format="parquet").schema
    except (OSError, ValueError) as e:
        raise FaceattrsError(f"{source}: cannot be read as a Parquet table ({e})") from None
    cols = [c for c in ("image", "path", "bytes") if c in schema.names]
    if "path" not in cols and "bytes" not in cols:
        raise FaceattrsError(
            f"{source}: a Parquet table of photos needs a 'path' (paths or URIs) or a 'bytes' "
            f"(encoded images) column; it has {', '.join(schema.names) or 'none'}"
        )
    if "path" not in cols and "image" not in cols:
        raise FaceattrsError(
            f"{source}: a table of bytes needs a 'path' or an 'image' column to name its rows"
        )
    return cols


def plan_sources(sources: list[str]) -> tuple[str, list[str]]:
    """``("parquet", [table, column, ...])`` or ``("paths", paths)``, checked on the driver
    before Ray starts."""
    tables = [s for s in map(str, sources) if Path(s).suffix.lower() == ".parquet"]
    if tables:
        if len(sources) > 1:
            raise FaceattrsError(f"{tables[0]}: a Parquet table must be the only source")
        return "parquet", [tables[0], *parquet_columns(tables[0])]
    return "paths", source_paths(sources)


def input_dataset(plan: tuple[str, list[str]], batch_size: int, workers: int = 1):
    """``(Ray Dataset of (image, path, bytes) rows, number of inputs or None, rows per
    worker call)``; None: a Parquet table, whose positions only the workers see (no
    completeness count). A path list is cut into blocks of ``batch_size`` rows, or fewer
    so that each of the ``workers`` has one."""
    ray = import_ray()
    import pyarrow as pa

    kind, values = plan
    if kind == "parquet":
        return ray.data.read_parquet(values[0]).select_columns(values[1:]), None, batch_size
    batch_size = min(batch_size, -(-len(values) // workers))
    # bytes, not str: a file name that is not valid UTF-8 survives Arrow
    table = pa.table(
        {
            "image": pa.array(np.arange(len(values)), pa.int64()),
            "path": pa.array([os.fsencode(p) for p in values], pa.binary()),
        }
    )
    blocks = [table.slice(s, batch_size) for s in range(0, len(values), batch_size)]
    return ray.data.from_arrow(blocks), len(values), batch_size


# ---------------------------------------------------------------- the workers


def _text(value) -> str | None:
    """A path column's value as text (binary columns hold file-system bytes)."""
    if value is None or isinstance(value, str):
        return value
    return os.fsdecode(value)


def read_uri(uri: str) -> bytes:
    """The bytes of a URI (``s3://``, ``gs://``, ``file://``, ...), via pyarrow.fs."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(path) as fh:
            return fh.read()
    except (OSError, ValueError, pa.ArrowException) as e:
        raise PhotoError(f"{uri}: cannot be read ({str(e).splitlines()[0]})") from None


def _fetch(uri: str) -> bytes | PhotoError:
    try:
        return read_uri(uri)
    except PhotoError as e:
        return e


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
    import pyarrow as pa

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
    import pyarrow as pa

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
        from . import photo as photomod
        from .predict import FaceAnalyzer

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
        fetched = dict(zip(remote, self.io.map(_fetch, [paths[i] for i in remote]), strict=True))
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


# ---------------------------------------------------------------- the dataset


def connect(address: str | None = None):
    """Join the Ray cluster at ``address`` (``auto``, ``ray://HOST:10001``), or start a
    local instance; nothing when Ray is already running in this process. Returns whether
    it started (or joined) one here (to shut it down after)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address)
        else:
            from .devices import cpu_cores

            # Ray runs its workers at nice 15: beside any other work they would get a
            # sliver of the CPU; here they run as the single-process command would
            ray.init(
                num_cpus=cpu_cores(), include_dashboard=False, _system_config={"worker_niceness": 0}
            )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"--address {address}" if address else "a local Ray instance"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FaceattrsError(f"{where}: Ray did not start ({first})") from None
    return True


def predict_dataset(
    sources,
    model=None,
    *,
    address: str | None = None,
    num_workers: int | None = None,
    batch_size: int = 64,
    detect: bool = True,
    photo: PhotoConfig | None = None,
    backend: str = "torch",
    device: str = "cpu",
    dtype: str = "fp32",
    threads: int | None = None,
    ray_remote_args: dict | None = None,
):
    """The records of every face of ``sources`` as a (lazy) Ray Dataset, one row a record.

    ``sources``: one path or a list (files, folders, globs, list files, URIs; or one
    Parquet table: see the module docstring). ``model``, ``batch_size`` (images per worker
    call, faces per model call), ``detect``, ``photo``, ``backend``, ``device``, ``dtype``:
    as :class:`faceattrs.predict.FaceAnalyzer` takes them. ``threads``: CPUs (and model
    threads) of each worker (default 1); ``num_workers``: the size of the actor pool
    (default: the cluster's CPUs / ``threads``); ``device="cuda"`` gives each worker a
    GPU. ``address``: joins that cluster (without it, and with Ray not yet running here,
    a local instance starts). ``ray_remote_args``: more options of each actor (``memory``,
    ``runtime_env``, ...). Rows: the CSV columns of ``--out x.csv`` and ``record``, the
    record as JSON; in input order when iterated (``preserve_order``).

    >>> ds = predict_dataset("photos/", model="runs/cpu")  # doctest: +SKIP
    >>> ds.write_parquet("results/")  # doctest: +SKIP
    """
    return _dataset(sources, model, address=address, num_workers=num_workers,
                    batch_size=batch_size, detect=detect, photo=photo, backend=backend,
                    device=device, dtype=dtype, threads=threads,
                    ray_remote_args=ray_remote_args)[0]  # fmt: skip


def _dataset(sources, model=None, *, address=None, num_workers=None, batch_size=64,
             detect=True, photo=None, backend="torch", device="cpu", dtype="fp32",
             threads=None, ray_remote_args=None):  # fmt: skip
    """:func:`predict_dataset`, and the number of inputs (None: unknown to the driver)."""
    ray = import_ray()
    from PIL import Image

    from .bundle import resolve

    sources = [sources] if isinstance(sources, str | os.PathLike) else list(sources)
    if batch_size < 1:
        raise FaceattrsError(f"batch size must be at least 1, got {batch_size}")
    if num_workers is not None and num_workers < 1:
        raise FaceattrsError(f"--num-workers must be at least 1, got {num_workers}")
    if model is not None:  # a bad --model: one line here, before any worker starts
        model = str(resolve(model).path.resolve())
    plan = plan_sources(sources)
    connect(address)
    cpus = threads or 1
    if num_workers is None:
        num_workers = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
    data, n, per_call = input_dataset(plan, batch_size, num_workers)
    # Ray Data restarts a pool's actors and retries their tasks without limit by default
    # (max_restarts / max_task_retries -1; tests/test_distributed.py kills one)
    remote = {"num_cpus": cpus, "num_gpus": 1 if str(device).startswith("cuda") else None}
    remote.update(ray_remote_args or {})
    # a fixed pool takes every CPU, which a Parquet read's tasks also need: that pool grows
    # from one worker instead (a list of paths needs no read tasks)
    pool = ray.data.ActorPoolStrategy(size=num_workers)
    if n is None:
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=num_workers)
    options = {"batch_size": batch_size, "photo": photo, "backend": backend,
               "device": device, "dtype": dtype, "threads": cpus}  # fmt: skip
    ds = data.map_batches(
        Analyzer,
        fn_constructor_kwargs={"model": model, "analyzer": options, "detect": detect,
                               "pillow_limit": Image.MAX_IMAGE_PIXELS, "cwd": os.getcwd()},
        batch_size=per_call,
        batch_format="pyarrow",
        compute=pool,
        **remote,
    )  # fmt: skip
    ds.context.execution_options.preserve_order = True
    return ds, n


# ---------------------------------------------------------------- the command


class Tally:
    """Counts of the output, and the check that every input is in it exactly once: an
    input's records are one error record or faces 0, 1, ...: one of them has face 0."""

    def __init__(self, inputs: int | None):
        self.inputs = inputs
        self.firsts = np.zeros(inputs or 0, np.int64)
        self.counts = {"files": 0, "faces": 0, "failed": 0}

    def add(self, image, face, error) -> None:
        """Columns of a batch of records (lists, None for null)."""
        image = np.array([-1 if i is None else i for i in image], np.int64)
        failed = np.array([e is not None for e in error], bool)
        first = failed | np.array([f == 0 for f in face], bool)
        self.counts["failed"] += int(failed.sum())
        self.counts["faces"] += int((~failed).sum())
        self.counts["files"] += int(first.sum())
        if self.inputs is not None:
            np.add.at(self.firsts, image[first], 1)

    def check(self) -> dict:
        if self.inputs is not None:
            missing, twice = int((self.firsts == 0).sum()), int((self.firsts > 1).sum())
            if missing or twice:
                raise FaceattrsError(
                    f"the Ray run lost {missing} and repeated {twice} of {self.inputs} "
                    "input(s); nothing was written"
                )
        return self.counts


def check_out(out) -> None:
    """FaceattrsError before any work for an ``--out`` this engine cannot write."""
    if out is None:
        return
    path = Path(out)
    if is_uri(out):
        raise FaceattrsError(f"--out {out}: name a file of this machine, not a URI")
    if path.suffix.lower() not in OUT_SUFFIXES:
        raise FaceattrsError(f"--out {out}: use a .jsonl, .csv or .parquet name")
    if path.is_dir():
        raise FaceattrsError(f"--out {out}: is a folder; name a .jsonl, .csv or .parquet file")
    if path.parent.exists() and not path.parent.is_dir():
        raise FaceattrsError(f"--out {out}: {path.parent} is not a folder")


@contextmanager
def _text_out(out, binary: bool = False):
    """A stream: stdout (``out`` None) or a temporary file renamed onto ``out`` at the end."""
    if out is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    clean_stale_temps(Path(out).parent, [Path(out).name])  # of a killed run
    with atomic_path(out) as tmp:
        if binary:
            with open(tmp, "wb") as fh:
                yield fh
            return
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
            yield fh


def write_records(ds, out, inputs: int | None) -> dict:
    """Stream ``ds`` to the driver, in input order, into ``out``: a ``.jsonl`` (or stdout),
    ``.csv`` or ``.parquet`` file, renamed into place only when every input is in it once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tally = Tally(inputs)
    kind = Path(out).suffix.lower() if out is not None else ".jsonl"
    with _text_out(out, binary=kind == ".parquet") as fh:
        table, rows = None, []  # Parquet: row groups of ROW_GROUP rows, not one per batch
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            tally.add(*(batch.column(c).to_pylist() for c in ("image", "face", "error")))
            if kind == ".parquet":
                table = table or pq.ParquetWriter(fh, batch.schema)
                rows.append(batch)
                if sum(len(b) for b in rows) >= ROW_GROUP:
                    table.write_table(pa.concat_tables(rows))
                    rows = []
            elif kind == ".csv":
                if table is None:
                    table = csv.DictWriter(fh, [c for c in batch.column_names if c != "record"])
                    table.writeheader()
                table.writerows(batch.drop_columns(["record"]).to_pylist())
            else:
                fh.write("".join(r + "\n" for r in batch.column("record").to_pylist()))
        if kind == ".parquet" and table is not None:
            if rows:
                table.write_table(pa.concat_tables(rows))
            table.close()
        counts = tally.check()  # before the rename: an incomplete output is not written
    return counts


def predict_ray(
    sources,
    model=None,
    *,
    out=None,
    address: str | None = None,
    annotate_dir=None,
    explain_dir=None,
    photo_workers: str = "auto",
    settings=None,
    **options,
) -> dict:
    """``faceattrs predict --engine ray``: the records of ``sources`` into ``out`` (a
    ``.jsonl`` / ``.csv`` file, a ``.parquet`` folder, or JSON lines on stdout), complete
    or absent. ``options``: :func:`predict_dataset`'s; the other arguments are
    :func:`faceattrs.predict_files.predict_files`'s (pictures are not drawn here; the
    workers decode and detect in threads, whatever ``photo_workers`` says). Returns
    ``{"files", "faces", "failed"}`` counts."""
    if annotate_dir or explain_dir:
        raise FaceattrsError("--annotate and --explain are not available with --engine ray")
    if settings is not None:  # the command's checked settings (faceattrs.settings)
        options = {"batch_size": settings.batch_size, "photo": settings.photo,
                   "backend": settings.backend, "device": settings.device,
                   "dtype": settings.dtype, "threads": settings.threads, **options}  # fmt: skip
    ray = import_ray()
    check_out(out)
    started = not ray.is_initialized()
    try:
        ds, inputs = _dataset(sources, model, address=address, **options)
        with _user_errors(ray):
            return write_records(ds, out, inputs)
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


class WorkerError(FaceattrsError):
    """A FaceattrsError in a worker (a model it cannot load), to be one line on the driver."""


@contextmanager
def _user_errors(ray):
    """A :class:`WorkerError` as itself. Ray hands the driver a worker's exception as the
    text of its traceback only, where the class's name and the message end a line."""
    try:
        yield
    except ray.exceptions.RayError as e:
        found = re.findall(rf"{re.escape(WorkerError.__module__)}\.WorkerError: (.+)", str(e))
        if not found:
            raise
        raise WorkerError(found[-1]) from None
