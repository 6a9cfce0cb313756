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

By concept: ``sources`` (the inputs, checked on the driver, as one Ray Dataset; URIs),
``workers`` (the :class:`~faceattrs.distributed.workers.Analyzer` actor, records as Arrow
tables), ``output`` (the driver's write of ``--out``, complete or absent); here, the entry
points: :func:`connect`, :func:`predict_dataset`, :func:`predict_ray`.

Ray is imported inside the functions of this package only: it is an optional extra
(``pip install -e ".[ray]"``), and the single-process command never loads it.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

from ..exceptions import FaceattrsError
from ..photo import PhotoConfig
from .output import check_out, write_records
from .sources import import_ray, input_dataset, plan_sources
from .workers import Analyzer, WorkerError


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
            from ..devices import cpu_cores  # torch: only when this process starts Ray

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
    # Pillow's pixel limit and the model's heads, read here: the driver loads no network
    from PIL import Image

    from ..bundle import resolve

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
