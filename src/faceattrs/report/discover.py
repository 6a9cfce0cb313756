"""Which files a run report shows, and in which section: everything the stages wrote into
the run folder and its subfolders, and the prepared data folder named in ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path

from ..prepare import cache_dir

SECTIONS = (
    "Run",
    "Data",
    "Training history",
    "Evaluation",
    "Calibration",
    "Fairness",
    "Grad-CAM",
    "Error clusters",
    "Age",
    "Other files",
)
KINDS = {
    ".png": "image",
    ".jpg": "image",
    ".jpeg": "image",
    ".json": "json",
    ".jsonl": "jsonl",
    ".csv": "csv",
    ".npz": "link",
    ".txt": "link",
    ".md": "link",
}
DATA_FILES = (
    "dedup_report.json",
    "manifest.json",
    "removed.csv",
    "label_distribution.png",
    "duplicate_pairs.png",
)


def section_of(rel: Path) -> str:
    """Which report section a file (path relative to the run folder) belongs to."""
    parts = [p.lower() for p in rel.parts]
    top, name = (parts[0] if len(parts) > 1 else ""), parts[-1]
    if "age" in parts[:-1] or name.startswith("age"):
        return "Age"
    if top.startswith("eval"):
        return "Fairness" if name.startswith("fairness") else "Evaluation"
    if top == "calibration" or name == "calibration.json":
        return "Calibration"
    if top.startswith("explain"):
        return "Grad-CAM"
    if top.startswith("errors"):
        return "Error clusters"
    if top in ("data", "prepared", "prepare") or name in DATA_FILES:
        return "Data"
    if top == "" and name in ("config.json", "best.json", "last.json"):
        return "Run"
    if top in ("", "train", "training", "history", "plots"):
        return "Training history"
    return "Other files"


def discover(run_dir: Path) -> dict[str, list[Path]]:
    """Report files per section, in a stable order (absolute paths)."""
    found: dict[str, list[Path]] = {s: [] for s in SECTIONS}
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if not path.is_file() or path.suffix.lower() not in KINDS or rel.name == "report.html":
            continue
        if any(p.startswith(".") for p in rel.parts):
            continue  # temporary files of atomic writes
        found[section_of(rel)].append(path)
    data_dir = _data_folder(run_dir)
    if data_dir is not None:
        found["Data"] += [
            p for p in sorted(data_dir.iterdir()) if p.suffix.lower() in KINDS and p.is_file()
        ]
    return found


def _data_folder(run_dir: Path) -> Path | None:
    """The prepared folder of the data recorded in ``config.json`` (``"data"``): that folder
    itself, or for a CSV its cache folder (``prepare.cache_dir``): the one of the recorded
    content key (``"data_key"``) when it is there, else the newest prepared from it."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        data, key = config.get("data"), config.get("data_key")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(data, str):
        return None
    path = Path(data) if Path(data).exists() else run_dir / data
    if path.is_dir() and (path / "faces.npz").exists():
        inside = path.resolve() == run_dir.resolve() or run_dir.resolve() in path.resolve().parents
        return None if inside else path  # files inside the run folder are found anyway
    return _cached_prepared(path, key) if path.is_file() else None


def _cached_prepared(source: Path, key: object = None) -> Path | None:
    exact = cache_dir() / f"{source.name}-{key}"
    if isinstance(key, str) and key and (exact / "faces.npz").exists():
        return exact  # the data the run was trained on, even if the CSV was prepared since
    hits = []
    for manifest in cache_dir().glob(f"{source.name}-*/manifest.json"):
        try:
            same = json.loads(manifest.read_text()).get("source") == str(source.resolve())
        except (OSError, json.JSONDecodeError):
            continue
        if same and (manifest.parent / "faces.npz").exists():
            hits.append(manifest.parent)
    return max(hits, key=lambda p: p.stat().st_mtime) if hits else None
