"""The inputs of ``--engine ray``: files, folders, globs, list files, URIs or one Parquet
table, checked on the driver (:func:`plan_sources`) and read into one Ray Dataset of
``(image, path, bytes)`` rows (:func:`input_dataset`); the bytes of a URI
(:func:`read_uri`, on the workers)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from ..exceptions import FaceattrsError
from ..photo import PhotoError
from ..predict_files import expand_inputs

log = logging.getLogger(__name__)

RAY_MISSING = (
    "--engine ray needs Ray: pip install -e '.[ray]' (or: pip install 'ray[data]' pyarrow)"
)
LIST_SUFFIXES = (".txt", ".lst")


def import_ray():
    """``ray`` with ``ray.data``, or one line saying what to install."""
    try:  # an optional extra: imported here only, never by the single-process command
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise FaceattrsError(RAY_MISSING) from None
    return ray


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
    import pyarrow.dataset as pads  # comes with ray[data] (an optional extra)

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
    import pyarrow as pa  # comes with ray[data] (an optional extra)

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


def read_uri(uri: str) -> bytes:
    """The bytes of a URI (``s3://``, ``gs://``, ``file://``, ...), via pyarrow.fs."""
    import pyarrow as pa  # comes with ray[data] (an optional extra)
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        with fs.open_input_stream(path) as fh:
            return fh.read()
    except (OSError, ValueError, pa.ArrowException) as e:
        raise PhotoError(f"{uri}: cannot be read ({str(e).splitlines()[0]})") from None


def fetch(uri: str) -> bytes | PhotoError:
    """:func:`read_uri`, its error returned rather than raised (a worker's thread pool)."""
    try:
        return read_uri(uri)
    except PhotoError as e:
        return e
