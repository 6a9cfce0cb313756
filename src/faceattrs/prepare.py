"""Preparation: read -> validate -> de-duplicate -> split, written once for every later stage.

A prepared folder holds ``faces.npz`` (uint8 faces, labels, split), ``dedup_report.json``,
``removed.csv`` (every row not kept, and why), ``manifest.json`` (cache key, settings, a
SHA-256 of each file) and figures. Preparing the same input with the same settings again
reuses it (near-instant) once the files match their hashes.

Crash consistency: ``manifest.json`` is first replaced by an "incomplete" marker and
written last, so a folder whose preparation was killed is never taken for a prepared one
(neither by the cache check nor by :func:`load_prepared`).

    faceattrs prepare --data ../shared/data/utkface48.csv.gz --out prepared/utkface48
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import config as cfgmod
from .data import DataError, RawFaces, photo_files, read_faces
from .dataset import FaceSet
from .inputs import InputSpec
from .io import clean_stale_temps, write_json_atomic, write_text_atomic, write_with
from .labels import SPLITS

log = logging.getLogger(__name__)
FORMAT = "faceattrs-prepared-1"


@dataclass
class PrepareConfig:
    near_threshold: float = 0.98  # cosine similarity (pixels scaled to [-1, 1]) for near duplicates
    on_conflict: str = "keep"  # keep | drop: groups of copies whose labels disagree
    on_bad_row: str = "error"  # error | skip: invalid rows
    val_fraction: float = 0.1  # share of kept rows for validation
    test_fraction: float = 0.1  # share of kept rows for test
    seed: int = 0  # split seed
    # the stored faces' format (a model's input contract): 48/1 = 48x48 grayscale, what a
    # CSV holds; a photo folder may give others, e.g. 96/3 for a colour model (duplicates
    # are still found on the 48x48 grayscale faces, so the split is the CSV's)
    image_size: int = 48
    channels: int = 1
    crop: str = "utkface"  # the faces' framing (inputs.CROPS): dlib = dlib's face chip

    def __post_init__(self):
        cfgmod.check_choice(self, "on_conflict", ("keep", "drop"))
        cfgmod.check_choice(self, "on_bad_row", ("error", "skip"))
        cfgmod.check_range(self, "near_threshold", 0.0, 1.0, low_open=True)
        cfgmod.check_range(self, "val_fraction", 0.0, 1.0, low_open=True, high_open=True)
        cfgmod.check_range(self, "test_fraction", 0.0, 1.0, low_open=True, high_open=True)
        try:
            _ = self.spec
        except ValueError as e:
            raise cfgmod.ConfigError(str(e)) from None

    @property
    def spec(self) -> InputSpec:
        """The stored faces' format."""
        return InputSpec(size=self.image_size, channels=self.channels, crop=self.crop)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise cfgmod.ConfigError(
                f"val_fraction + test_fraction must be below 1 (no training faces left), "
                f"got {self.val_fraction} + {self.test_fraction}"
            )


def _key(path: Path, cfg: PrepareConfig) -> str:
    """Content hash of the input (file bytes, or each photo's name and bytes) + settings."""
    h = hashlib.sha256(FORMAT.encode())
    settings = cfgmod.to_dict(cfg)
    if (cfg.image_size, cfg.channels, cfg.crop) == (48, 1, "utkface"):  # keys of folders
        del settings["image_size"], settings["channels"], settings["crop"]  # before these
    h.update(json.dumps(settings, sort_keys=True).encode())
    files = photo_files(path)[0] if path.is_dir() else [path]
    for p in files:
        h.update(
            str(p.relative_to(path) if path.is_dir() else "").encode("utf-8", "surrogateescape")
        )
        try:
            with open(p, "rb") as f:
                for chunk in iter(lambda f=f: f.read(1 << 22), b""):
                    h.update(chunk)
        except OSError as e:  # a broken link or unreadable photo: its reason is part of the key
            h.update(f"unreadable: {e.strerror}".encode())
    return h.hexdigest()[:20]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def data_key(path: str | Path) -> str | None:
    """The content key of the prepared data ``path`` stands for (its input's bytes and the
    settings: the same on every machine that prepared the same CSV the same way): a
    prepared folder's recorded key, or for a CSV or photo folder the key under which
    :func:`load_faces` prepares it; None when there is nothing to read."""
    path = Path(path)
    if path.is_dir() and (path / "faces.npz").exists():
        try:
            key = json.loads((path / "manifest.json").read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            return None
        return key if isinstance(key, str) and key else None
    return _key(path, PrepareConfig()) if path.exists() else None


def _verified_manifest(out: Path) -> dict | None:
    """The manifest of a complete prepared folder whose files match their hashes, or None."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or "faces.npz" not in files:
            return None
        if any(file_sha256(out / name) != digest for name, digest in files.items()):
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def split_rows(ethnicity: np.ndarray, gender: np.ndarray, cfg: PrepareConfig) -> np.ndarray:
    """Stratified (ethnicity x gender), seeded split codes: 0 train, 1 val, 2 test."""
    from sklearn.model_selection import train_test_split  # slow import: only when splitting

    n = len(ethnicity)
    idx = np.arange(n)
    strata = ethnicity.astype(np.int64) * 2 + gender
    holdout = cfg.val_fraction + cfg.test_fraction
    n_hold = math.ceil(holdout * n)  # as scikit-learn rounds
    if n - n_hold < 1 or n_hold < 2:
        raise DataError(
            f"{n} face(s) left after validation and de-duplication: too few to split into "
            f"train, val and test ({cfg.val_fraction:g} / {cfg.test_fraction:g} held out); "
            "pass more distinct faces"
        )
    counts = np.bincount(strata)
    strat = strata if counts[counts > 0].min() >= 4 else None  # tiny sets: plain shuffle

    def split(stratify: bool):
        s = strat if stratify else None
        train, rest = train_test_split(idx, test_size=holdout, random_state=cfg.seed, stratify=s)
        s_rest = strata[rest] if s is not None else None
        val, test = train_test_split(
            rest, test_size=cfg.test_fraction / holdout, random_state=cfg.seed + 1, stratify=s_rest
        )
        return val, test

    try:
        val, test = split(strat is not None)
    except ValueError as e:
        if strat is None:
            raise DataError(f"cannot split {n} faces: {e}") from None
        log.warning("stratified split impossible (%s); plain shuffle instead", e)
        try:
            val, test = split(False)
        except ValueError as e2:
            raise DataError(f"cannot split {n} faces: {e2}") from None
    split = np.zeros(n, np.int8)
    split[val], split[test] = 1, 2
    return split


def prepare(data: str | Path, out: str | Path, cfg: PrepareConfig | None = None) -> dict:
    """Prepare ``data`` (CSV or photo folder) into ``out``; returns the dedup report.

    Reuses ``out`` when it already holds this input prepared with these settings.
    """
    cfg = cfg or PrepareConfig()
    data, out = Path(data), Path(out)
    if not data.exists():
        raise DataError(f"{data}: no such file or folder")
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file, not a folder; choose a folder to write into")
    if out.resolve() == data.resolve() or (
        data.is_dir() and data.resolve() in out.resolve().parents
    ):
        raise DataError(f"--out {out}: inside the input folder {data}; choose a folder outside it")
    key = _key(data, cfg)
    manifest = out / "manifest.json"
    clean_stale_temps(out)
    done = _verified_manifest(out)
    if done is not None and done.get("key") == key:
        try:
            report = json.loads((out / "dedup_report.json").read_text())
            log.info("prepared data up to date in %s (cache hit)", out)
            return report
        except (json.JSONDecodeError, OSError):
            pass  # unreadable: prepare again
    from .dedup import find_duplicates  # scipy: only when preparing

    t0 = time.perf_counter()
    raw = read_faces(data, cfg.on_bad_row, cfg.spec)
    labels = {"age": raw.age, "gender": raw.gender, "ethnicity": raw.ethnicity}
    dup = find_duplicates(raw.images, labels, cfg.near_threshold)
    keep = dup.keep
    conflicted = np.isin(dup.rep, dup.conflict_groups)
    if cfg.on_conflict == "drop":
        keep = keep[~np.isin(keep, dup.conflict_groups)]
    split = split_rows(raw.ethnicity[keep], raw.gender[keep], cfg)
    faces = FaceSet.of(
        (raw.images if raw.faces is None else raw.faces)[keep],
        raw.age[keep],
        raw.gender[keep],
        raw.ethnicity[keep],
        split,
        raw.names[keep],
    )
    report = _report(raw, dup, conflicted, keep, split, cfg)
    out.mkdir(parents=True, exist_ok=True)
    # the old manifest goes first: from here until the new one, the folder is incomplete
    write_json_atomic(manifest, {"format": FORMAT, "state": "incomplete"})
    write_with(out / "faces.npz", lambda p: _savez(p, faces.to_arrays()))
    write_text_atomic(out / "removed.csv", _removed_csv(raw, dup, keep, conflicted))
    write_json_atomic(out / "dedup_report.json", report)
    _figures(out, raw, dup, faces)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    files = {n: file_sha256(out / n) for n in ("faces.npz", "removed.csv", "dedup_report.json")}
    write_json_atomic(
        manifest,
        {
            "format": FORMAT,
            "state": "complete",
            "key": key,
            "source": str(data.resolve()),
            "config": cfgmod.to_dict(cfg),
            "files": files,
        },
    )
    log.info("prepared %d faces into %s in %.1f s", len(faces), out, report["seconds"])
    return report


def _savez(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _report(raw: RawFaces, dup, conflicted, keep, split, cfg) -> dict:
    removed = dup.kind != ""
    dropped_conflict = int(np.sum(~removed & ~np.isin(np.arange(len(raw.images)), keep)))
    return {
        "rows_read": int(raw.rows_read),
        "rows_invalid": int(sum(raw.invalid.values())),
        "invalid_reasons": dict(raw.invalid),
        "rows_valid": int(len(raw.images)),
        "exact_removed": int(np.sum(dup.kind == "exact")),
        "near_removed": int(np.sum(dup.kind == "near")),
        "duplicate_groups": int(np.sum(np.bincount(dup.rep) > 1)),
        "conflicting_groups": int(len(dup.conflict_groups)),
        "conflicting_fields": dup.conflict_fields,
        "rows_in_conflicting_groups": int(conflicted.sum()),
        "conflict_rows_dropped": dropped_conflict,
        "rows_kept": int(len(keep)),
        "split_sizes": {s: int(np.sum(split == i)) for i, s in enumerate(SPLITS)},
        "settings": cfgmod.to_dict(cfg),
    }


def _removed_csv(raw: RawFaces, dup, keep, conflicted) -> str:
    """One line per row not kept: where it was, why, and which row was kept instead."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["line", "img_name", "reason", "kept_line", "similarity"])
    for line, name, reason in raw.skipped:  # invalid rows, never read into the arrays
        w.writerow([line or "", name, reason, "", ""])
    kept = np.zeros(len(raw.images), bool)
    kept[keep] = True
    for i in np.flatnonzero(~kept):
        reason = dup.kind[i] or "conflicting labels"
        if dup.kind[i] and conflicted[i]:
            reason += " (conflicting labels)"
        r = dup.rep[i]
        w.writerow(
            [
                raw.lines[i],
                raw.names[i],
                reason,
                raw.lines[r] if r != i else "",
                f"{dup.similarity[i]:.4f}",
            ]
        )
    return buf.getvalue()


def _figures(out: Path, raw: RawFaces, dup, faces: FaceSet) -> None:
    # matplotlib: loaded only when figures are drawn
    from .plots.data import duplicate_pairs, label_distribution

    label_distribution(faces, out / "label_distribution.png")
    removed = np.flatnonzero(dup.kind != "")
    duplicate_pairs(raw, dup, removed, out / "duplicate_pairs.png")


def load_prepared(folder: str | Path) -> FaceSet:
    """Read ``faces.npz`` from a prepared folder.

    A folder whose ``manifest.json`` marks it incomplete (a killed ``prepare``) or whose
    ``faces.npz`` does not match the manifest's hash is refused; a folder without a
    manifest (written by hand) is read as it is.
    """
    path = Path(folder) / "faces.npz"
    if not path.exists():
        raise DataError(f"{folder}: not a prepared folder (no faces.npz); run `faceattrs prepare`")
    manifest = Path(folder) / "manifest.json"
    if manifest.exists():
        try:
            info = json.loads(manifest.read_text())
        except (OSError, ValueError):
            info = {"state": "unreadable"}
        digest = info.get("files", {}).get("faces.npz") if isinstance(info, dict) else None
        if info.get("state", "complete") != "complete" or (digest and file_sha256(path) != digest):
            raise DataError(
                f"{folder}: incomplete or inconsistent prepared folder (its preparation was "
                "interrupted, or a file changed since); run `faceattrs prepare` again"
            )
    try:
        with np.load(path, allow_pickle=False) as z:
            return FaceSet.from_arrays({k: z[k] for k in z.files})
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise DataError(
            f"{path}: unreadable prepared data ({e}); run `faceattrs prepare` again"
        ) from None


def cache_dir() -> Path:
    """Where CSVs given directly to later stages are prepared ($FACEATTRS_CACHE)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "faceattrs"
    return Path(os.environ.get("FACEATTRS_CACHE", default)) / "prepared"


def prepared_folder(path: str | Path, cfg: PrepareConfig | None = None) -> Path:
    """A prepared folder for ``path``: itself if already prepared, else a cache folder."""
    path = Path(path)
    if path.is_dir() and (path / "faces.npz").exists():
        return path
    cfg = cfg or PrepareConfig()
    out = cache_dir() / f"{path.name}-{_key(path, cfg)}" if path.exists() else path
    prepare(path, out, cfg)
    return out


def load_faces(path: str | Path, cfg: PrepareConfig | None = None) -> FaceSet:
    """A prepared folder, or a CSV / photo folder prepared on the fly (cached)."""
    return load_prepared(prepared_folder(path, cfg))


def read_csv_unsplit(
    path: str | Path, on_bad_row: str = "error", spec: InputSpec | None = None
) -> FaceSet:
    """Every valid row of an external file (or photo of a folder, in ``spec``'s format),
    not de-duplicated nor split (split = -1)."""
    raw = read_faces(path, on_bad_row, spec or PrepareConfig().spec)
    return FaceSet.of(
        raw.images if raw.faces is None else raw.faces,
        raw.age,
        raw.gender,
        raw.ethnicity,
        np.full(len(raw.images), -1, np.int8),
        raw.names,
    )
