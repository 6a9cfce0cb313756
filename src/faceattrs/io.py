"""Atomic file writes: write to a temporary file in the same folder, then rename.

A crash mid-write never leaves a half-written checkpoint or result behind. The temporary
file's name carries the writer's process id (``.NAME.PID.tmpXXXXXXXX.SUFFIX``), so that
:func:`clean_stale_temps` can remove those of a killed run without touching a live one's.
Every write cleans its folder so, the first time a process writes there: a killed
writer's temporary files and staging folders, whatever their name, are removed by the
next run that writes in that folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)
# .NAME.PID.tmpXXXXXXXX.SUFFIX (ours) and .NAME.XXXXXXXX.SUFFIX (before the PID was added)
_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.tmp)?[a-z0-9_]{8}(?P<suffix>\.[^.]*)?$")
LEGACY_TEMP_AGE_S = 3600  # an untagged temp file this old belongs to no live writer
_CLEANED: set[str] = set()  # folders this process has cleaned (once each: a folder of
# thousands of annotated photos is not scanned again for each of them)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_once(path)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.{os.getpid()}.tmp", suffix=path.suffix, dir=path.parent
        )
    except OSError as e:  # errors name the file asked for, not our temporary name
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 (and some writers, e.g. safetensors, recreate the file):
        # results are meant to be shared, so give them the umask's usual mode
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename in (tmp, str(tmp)) or e.filename2 == str(path):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """UTF-8; a file name's undecodable bytes (surrogate escapes) become ``\\udcXX``."""
    write_bytes_atomic(path, text.encode("utf-8", "backslashreplace"))


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """``obj`` as JSON, with every NaN as null (``json.dumps`` would write the bare word
    NaN, which strict parsers refuse; NaN here means "no value", as an empty group's).
    Infinities stay (Python's json writes and reads them as Infinity): they carry meaning,
    e.g. the unbounded interval of an age bin calibrated on too few faces."""
    text = json.dumps(_no_nan(obj), indent=2, sort_keys=False, default=_jsonable)
    write_text_atomic(path, text + "\n")


def _no_nan(obj):
    """``obj`` with every NaN (Python or numpy, also inside arrays) as None.

    >>> _no_nan({"a": float("nan"), "b": [1.0, np.float32("inf")], "c": np.array([2.0, np.nan])})
    {'a': None, 'b': [1.0, inf], 'c': [2.0, None]}
    """
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_no_nan(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _no_nan(obj.tolist())
    if isinstance(obj, float | np.floating):
        return None if math.isnan(obj) else float(obj)
    return obj


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and rename the result onto ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        # ctypes: Linux only (the other systems never reach here)
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    ok = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    return ok


@contextmanager
def atomic_folder(path: str | os.PathLike):
    """Yield an empty staging folder next to ``path``; on success it takes ``path``'s place
    in one step (a folder already there is swapped out and removed), so a reader, or a run
    killed at any instant, sees the old folder or the new one, never a mix. On failure the
    staging folder is removed. Staging folders of killed writers are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_folders(path)
    _clean_once(path)
    stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.tmp", dir=path.parent))
    try:
        yield stage
        os.chmod(stage, 0o777 & ~_UMASK)  # mkdtemp makes 0700
        if not path.exists():
            os.rename(stage, path)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
            os.rename(stage, path)
        elif path.is_dir() and _exchange(stage, path):
            shutil.rmtree(stage, ignore_errors=True)  # now holds the old folder
        elif path.is_dir():  # no atomic swap here: the old folder is moved aside first
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.tmp", dir=path.parent))
            os.rename(path, old / "old")
            try:
                os.rename(stage, path)
            except BaseException:
                os.rename(old / "old", path)  # the former folder back in place
                old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            raise FileExistsError(f"{path} exists and is not a folder")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _clean_stale_folders(path: Path) -> None:
    prefix = f".{path.name}."
    try:
        entries = [e for e in os.scandir(path.parent) if e.name.startswith(prefix)]
    except OSError:
        return
    for e in entries:
        m = re.fullmatch(r"(\d+)\.tmp[a-z0-9_]{8}", e.name[len(prefix) :])
        if m and e.is_dir(follow_symlinks=False) and not _pid_alive(int(m[1])):
            shutil.rmtree(e.path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _clean_once(path: Path) -> None:
    """:func:`clean_stale_temps` of ``path``'s folder, the first time this process writes
    there (untagged temp files: only ``path``'s own, the folder may not be ours alone)."""
    folder = os.path.abspath(path.parent)
    if folder not in _CLEANED:
        _CLEANED.add(folder)
        clean_stale_temps(folder, [path.name])


def clean_stale_temps(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporary files and staging folders that killed writers left in
    ``folder``; returns them.

    A tagged temp file (``.NAME.PID.tmpXXXXXXXX`` followed by NAME's own suffix) or
    staging folder (``.NAME.PID.tmpXXXXXXXX``, :func:`atomic_folder`) is stale when the
    process PID is gone, whatever NAME. An untagged temp file (``.NAME.XXXXXXXX`` + NAME's
    suffix, written before the PID was in the name) is stale when over an hour old, and
    is taken only for NAME one of ``names`` when given: that pattern is loose, and the
    folder may not be ours alone (e.g. next to a results file). Files that are not ours
    never match.
    """
    only = set(names) if names is not None else None
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # missing or unreadable: nothing to clean
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m:
            continue
        tagged = m["pid"] is not None
        if tagged and m["suffix"] is None and entry.is_dir(follow_symlinks=False):
            if int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        if (m["suffix"] or "") != Path(m["name"]).suffix:
            continue
        if not tagged and only is not None and m["name"] not in only:
            continue
        if tagged:
            stale = int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))
        else:
            stale = time.time() - entry.stat().st_mtime > LEGACY_TEMP_AGE_S
        if stale:
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                continue
    if removed:
        log.info("removed %d temporary file(s) of an interrupted run in %s", len(removed), folder)
    return removed


def _jsonable(obj):
    """Turn numpy scalars and arrays into plain JSON values."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
