"""``faceattrs predict``: files, folders and globs in; records, annotated copies and Grad-CAM
overlays out. The analysis itself is :class:`faceattrs.predict.FaceAnalyzer`.

    faceattrs predict ../shared/data/photos --model runs/cpu --out results.jsonl \\
        --annotate annotated/ --explain cams/

Records are JSON lines (``.jsonl``, or stdout) or CSV (``.csv``, probabilities flattened
to one column each), written to a temporary file and renamed at the end. A file name that
is not valid UTF-8 is written with ``\\udcXX`` escapes for its odd bytes (as JSON does).
Annotated copies and overlays never overwrite an input photo, and two inputs never share
an output name (``face.jpg`` + ``face.png`` -> ``face.jpg.jpg`` + ``face.png.jpg``).
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from .exceptions import FaceattrsError
from .inputs import links_not_searched
from .io import atomic_path, clean_stale_temps, write_with
from .predict import FaceAnalyzer, photo_processes, photo_worker_count
from .settings import InferenceSettings

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
FAILURES_SHOWN = 20  # failed files listed one per line on stderr; the rest counted


def expand_inputs(
    args: Iterable[str | os.PathLike], empty: list[str] | None = None
) -> list[tuple[str, str]]:
    """Files, folders (recursively, image extensions only) and globs -> ``(path, name)``.

    ``name`` is the path relative to the folder it was found in (or the file name), used
    for annotated copies and overlays. A path that does not exist and matches no file is
    kept, so that it becomes an error record.

    Broken or looping symbolic links with an image extension are kept (they become error
    records); symbolic links to folders are not followed (a link may loop), with a warning.
    A file reached twice (named and inside a named folder, say) is kept once, where first
    reached. Folders without images: their one-line message (:func:`no_images`) is
    appended to ``empty`` when given, else warned of.
    """
    out: list[tuple[str, str]] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found, linked = _walk_images(path)
            if found and linked:
                log.warning("%s: %s", path, links_not_searched(path, linked))
            if not found and empty is not None:
                empty.append(no_images(path, linked))
            elif not found:
                log.warning(no_images(path, linked))
            out += [(str(p), str(p.relative_to(path))) for p in found]
        elif path.exists() or not glob.has_magic(str(arg)):
            out.append((str(path), path.name))
        else:
            matches = sorted(m for m in glob.glob(str(arg), recursive=True) if Path(m).is_file())
            out += [(m, Path(m).name) for m in matches] or [(str(arg), path.name)]
    seen, unique = set(), []
    for p, name in out:
        key = os.path.realpath(p) if os.path.exists(p) else p
        if key not in seen:
            seen.add(key)
            unique.append((p, name))
    if len(unique) < len(out):
        log.info("%d file(s) named twice: each is read once", len(out) - len(unique))
    return unique


def no_images(folder, linked: list[Path] = ()) -> str:
    """One line: ``folder`` holds no image file (and which linked folders were not searched)."""
    note = f" ({links_not_searched(Path(folder), linked)})" if linked else ""
    return f"{folder}: no image files ({' '.join(IMAGE_EXTENSIONS)}) in it{note}"


def _walk_images(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files under ``folder`` (broken links included) and the symlinked folders."""
    files, linked = [], []
    for root, dirs, names in os.walk(folder):
        linked += [Path(root, d) for d in dirs if os.path.islink(os.path.join(root, d))]
        for n in names:
            p = Path(root, n)
            if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_symlink() or p.is_file()):
                files.append(p)
    return sorted(files), sorted(linked)


def output_stems(files: list[tuple[str, str]]) -> dict[str, Path]:
    """A distinct relative output stem per input path (annotated copies, overlays).

    The stem is the name without its extension (``a/face.jpg`` -> ``a/face``); when two
    inputs would share it, each keeps its extension (``a/face.jpg``, ``a/face.png``), and
    names still shared (the same name under two input folders) get ``-2``, ``-3`` ...

    >>> sorted(map(str, output_stems([("x/f.jpg", "f.jpg"), ("x/f.png", "f.png"),
    ...                                  ("y/f.png", "f.png"), ("g.jpg", "g.jpg")]).values()))
    ['f.jpg', 'f.png', 'f.png-2', 'g']
    """
    plain = [Path(rel).with_suffix("") for _, rel in files]
    counts: dict[str, int] = {}
    for stem in plain:
        counts[str(stem).lower()] = counts.get(str(stem).lower(), 0) + 1
    stems: dict[str, Path] = {}
    taken: set[str] = set()
    for (path, rel), stem in zip(files, plain, strict=True):
        if counts[str(stem).lower()] > 1:
            stem = Path(rel)
        candidate, k = stem, 1
        while str(candidate).lower() in taken:  # case-insensitive file systems too
            k += 1
            candidate = stem.with_name(f"{stem.name}-{k}")
        taken.add(str(candidate).lower())
        stems[path] = candidate
    return stems


def check_outputs(
    files: list[tuple[str, str]], stems: dict[str, Path], annotate_dir, explain_dir, out=None
):
    """FaceattrsError before any work when an output could overwrite an input photo or --out."""
    inputs = set()
    for path, _ in files:
        try:
            inputs.add(Path(path).resolve())
        except (OSError, RuntimeError):  # a looping link
            continue
    # overlays are STEM_face<i>.png: the stems an input of that form would be overwritten by
    overlay_stems = set()
    for p in inputs:
        m = re.fullmatch(r"(.+)_face\d+\.png", p.name)
        if m:
            overlay_stems.add(p.with_name(m[1]))
    for option, folder in (("--annotate", annotate_dir), ("--explain", explain_dir)):
        if not folder:
            continue
        folder = Path(folder)
        if out is not None and folder.resolve() == Path(out).resolve():
            raise FaceattrsError(f"{option} {folder}: the same path as --out; choose a folder")
        if folder.exists() and not folder.is_dir():
            raise FaceattrsError(f"{option} {folder}: is a file, not a folder")
        for path, stem in stems.items():
            out = folder / (str(stem) + ".jpg") if option == "--annotate" else folder / stem
            target = out.resolve()
            if target in (overlay_stems if option == "--explain" else inputs):
                raise FaceattrsError(
                    f"{option} {folder}: the output for {path} would overwrite an input "
                    "photo; choose a folder outside the inputs"
                )


# ---------------------------------------------------------------- records to files


def record_columns(models) -> list[str]:
    """CSV columns: one per scalar of a record (probabilities flattened)."""
    cols = ["file", "image", "face", "x", "y", "w", "h", "score", "detection"]
    for h in models.class_names:
        cols += [h] + [f"{h}_p_{n}" for n in models.class_names[h]]
    if models.bin_labels:
        cols += ["age", "age_low", "age_high", "age_bin"]  # low-high: the 90 % interval
        cols += [f"age_p_{b}" for b in models.bin_labels]
    return cols + ["error"]


def flat_record(rec: dict) -> dict:
    row = {k: rec.get(k) for k in ("file", "image", "face", "score", "detection", "error")}
    row.update(zip("xywh", rec.get("box", ()), strict=False))
    for h in _heads(rec):
        row[h] = rec[h]["label"]
        row.update({f"{h}_p_{n}": p for n, p in rec[h]["probabilities"].items()})
    if rec.get("age"):
        row["age"], row["age_bin"] = rec["age"]["value"], rec["age"]["bin"]
        row["age_low"], row["age_high"] = rec["age"].get("interval") or (None, None)
        row.update({f"age_p_{b}": p for b, p in rec["age"]["bin_probabilities"].items()})
    return row


def check_out_file(path, suffixes=(".jsonl", ".json", ".csv"), kinds=".jsonl or .csv") -> None:
    """FaceattrsError before any work for an ``--out`` that cannot be written: a name
    without one of ``suffixes`` (``kinds`` names them), a folder, a file as its folder.
    The Ray path (faceattrs.distributed) passes its own suffixes."""
    if path is None:
        return
    path = Path(path)
    if path.suffix.lower() == ".parquet" and ".parquet" not in suffixes:
        raise FaceattrsError(f"--out {path}: Parquet is written with --engine ray; or use .jsonl")
    if path.suffix.lower() not in suffixes:
        raise FaceattrsError(f"--out {path}: use a {kinds} file name")
    if path.is_dir():
        raise FaceattrsError(f"--out {path}: is a folder; name a {kinds} file")
    if path.parent.exists() and not path.parent.is_dir():
        raise FaceattrsError(f"--out {path}: {path.parent} is not a folder")


@contextmanager
def record_writer(path: str | os.PathLike | None, models) -> Iterator[Callable[[dict], None]]:
    """Yield ``write(record)``: JSON lines to stdout (``path`` None) or to ``.jsonl``, or CSV."""
    kind = "jsonl"
    if path is not None:
        suffix = Path(path).suffix.lower()
        if suffix not in (".jsonl", ".json", ".csv"):
            raise FaceattrsError(f"--out {path}: use a .jsonl or .csv file name")
        kind = "csv" if suffix == ".csv" else "jsonl"

    def writer(fh):
        if kind == "jsonl":
            return lambda rec: fh.write(json.dumps(rec) + "\n")
        table = csv.DictWriter(fh, record_columns(models), extrasaction="ignore")
        table.writeheader()
        return lambda rec: table.writerow(flat_record(rec))

    if path is None:
        write = writer(sys.stdout)

        def to_stdout(rec: dict) -> None:
            try:
                write(rec)
            except OSError as e:  # a full disk or a closed pipe: say where it was going
                raise OSError(e.errno, e.strerror, "standard output") from None

        yield to_stdout
        try:
            sys.stdout.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror, "standard output") from None
        return
    clean_stale_temps(Path(path).parent, [Path(path).name])  # of a killed run
    # backslashreplace: a non-UTF-8 file name (surrogate escapes) is written as \udcXX
    with (
        atomic_path(path) as tmp,
        open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as fh,
    ):
        yield writer(fh)


def failure_lines(counts: dict, out=None) -> list[str]:
    """One line per failed file (``counts["failures"]``, as compilers list errors), then
    how many more failed, if any: what ``faceattrs predict`` prints on stderr."""
    lines = list(counts.get("failures", ()))  # --engine ray counts them only
    more = counts["failed"] - len(lines)
    if more > 0:
        where = out if out is not None else "the output"
        lines.append(f"... and {more} more failed file(s): see their error records in {where}")
    return lines


# ---------------------------------------------------------------- pictures


def _heads(rec: dict) -> list[str]:
    """The classification heads of a face record, in order (``gender``, ``ethnicity``, ...)."""
    return [
        k for k, v in rec.items() if isinstance(v, dict) and "probabilities" in v and k != "age"
    ]


def label_lines(rec: dict) -> list[str]:
    """``["0: Female 0.97", "White 0.81", "31 y"]`` for a face record (one line per head)."""
    lines = []
    for i, h in enumerate(_heads(rec)):
        label = rec[h]["label"]
        prefix = f"{rec['face']}: " if i == 0 else ""
        lines.append(f"{prefix}{label} {rec[h]['probabilities'][label]:.2f}")
    if rec.get("age"):
        lines.append(f"{rec['age']['value']:.0f} y")
    return lines


def annotate(image: np.ndarray, records: list[dict]) -> np.ndarray:
    """A copy of ``image`` (RGB) with each face's box and its labels drawn above it (or
    inside it at the top of the photo), the text sized to the box."""
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image.copy()
    h, w = canvas.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    for rec in (r for r in records if "box" in r):
        x, y, bw, bh = rec["box"]
        thick = max(1, round(bw / 150))
        cv2.rectangle(canvas, (x, y), (x + bw - 1, y + bh - 1), (0, 255, 0), thick)
        lines = label_lines(rec)
        widest = max(cv2.getTextSize(t, font, 1.0, thick)[0][0] for t in lines)
        scale = float(np.clip(0.95 * bw / widest, 0.3, 2.0))
        (_, th), base = cv2.getTextSize("Ag", font, scale, thick)
        step = th + base + 2
        top = y - step * len(lines) if y - step * len(lines) >= 0 else y + 1
        for i, text in enumerate(lines):
            (tw, _), _ = cv2.getTextSize(text, font, scale, thick)
            ty = min(h - base - 1, top + step * i + th + 1)
            tx = min(max(0, x), max(0, w - tw))
            cv2.rectangle(canvas, (tx, ty - th - 1), (tx + tw, ty + base), (0, 0, 0), -1)
            cv2.putText(canvas, text, (tx, ty), font, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return canvas


def save_image(path: Path, rgb: np.ndarray) -> None:
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    write_with(path, lambda tmp: Image.fromarray(rgb).save(tmp, format=fmt, quality=92))


class Explainer:
    """Grad-CAM overlays, one PNG per face (:func:`faceattrs.explain.cam_panels`: the face,
    then each head's map of its predicted class over it)."""

    def __init__(self, models):
        from . import explain  # captum: the "explain" extra

        self.explain = explain
        model = getattr(models, "model", None)
        if model is None:  # the onnx backend: Grad-CAM needs the PyTorch model
            try:
                model, _ = models.bundle.torch_bundle().load_multitask()
            except FaceattrsError:
                raise FaceattrsError(
                    "--explain needs the PyTorch model: pass the run folder"
                ) from None
        self.model = model
        self.names = {h: list(v) for h, v in models.class_names.items()}

    def save(self, crops: np.ndarray, records: list[dict], out_stem: Path) -> list[Path]:
        """Write ``OUT_STEM_face<i>.png`` for each face; ``crops``: uint8 (N, 48, 48)."""
        paths = []
        for rec, picture in zip(records, self.overlays(crops, records), strict=True):
            path = out_stem.parent / f"{out_stem.name}_face{rec['face']}.png"
            paths.append(self.explain.save_picture(path, picture))
        return paths

    def overlays(self, crops: np.ndarray, records: list[dict]) -> list[np.ndarray]:
        """One RGB uint8 picture per face (:func:`faceattrs.explain.cam_panels`): the face,
        then the Grad-CAM map of each head."""
        probs = {
            h: np.array([list(r[h]["probabilities"].values()) for r in records]) for h in self.names
        }
        target = {h: [self.names[h].index(r[h]["label"]) for r in records] for h in self.names}
        cams = {
            h: self.explain.grad_cam(self.model, crops, h, target=np.array(target[h]))
            for h in self.names
        }
        labels = [f"face {r['face']}" for r in records]
        rows = self.explain.explanation_rows(
            crops, {"probs": probs, "cams": cams}, self.names, labels
        )
        return [self.explain.cam_panels(row) for row in rows]


# ---------------------------------------------------------------- the command


def predict_files(
    inputs: list[str],
    model=None,
    *,
    out=None,
    annotate_dir=None,
    explain_dir=None,
    detect: bool = True,
    settings: InferenceSettings | None = None,
    **options,
) -> dict:
    """Records of every face of ``inputs`` to ``out`` (stdout when None), annotated copies
    and Grad-CAM overlays on request. ``settings`` (or, without it, ``options``: its
    fields as keywords, e.g. ``batch_size``, ``backend``, ``photo``): how the models run
    (:class:`faceattrs.settings.InferenceSettings`). Photo workers "auto": processes for
    :data:`faceattrs.predict.PROCESSES_FROM` files or more on a CPU with two or more
    cores (they start in about half a second).

    Returns ``{"files", "faces", "failed"}`` counts and ``"failures"``: ``"FILE: reason"``
    of the first :data:`FAILURES_SHOWN` failed files.
    """
    empty: list[str] = []
    files = expand_inputs(inputs, empty)
    if not files:
        raise FaceattrsError(empty[0] if empty else "no input files")
    for message in empty:
        log.warning(message)
    check_out_file(out)
    stems = output_stems(files)
    check_outputs(files, stems, annotate_dir, explain_dir, out)
    if settings is None:
        settings = InferenceSettings(**{"backend": "torch", **options})
    if settings.photo_workers == "auto":  # decided here: the workers start as the models load
        many = photo_processes(len(files), photo_worker_count())
        settings = replace(settings, photo_workers="processes" if many else "threads")
    analyzer = FaceAnalyzer(model, settings)
    explainer = Explainer(analyzer.models) if explain_dir else None
    counts = {"files": len(files), "faces": 0, "failed": 0, "failures": []}
    keep = bool(annotate_dir or explain_dir)
    with record_writer(out, analyzer.models) as write:
        bar = tqdm(total=len(files), unit="file", disable=None if len(files) > 1 else True)
        for item in analyzer.run([p for p, _ in files], detect=detect, keep_images=keep):
            counts["failed"] += item.error is not None
            if item.error is not None and len(counts["failures"]) < FAILURES_SHOWN:
                reason = item.error.removeprefix(f"{item.file}: ")
                counts["failures"].append(f"{item.file}: {reason}")
            counts["faces"] += len(item.faces)
            stem = stems[item.file]
            if explainer and item.faces:
                crops = np.stack([f.crop for f in item.faces])
                explainer.save(crops, item.records, Path(explain_dir) / stem)
            if annotate_dir and item.faces:
                copy = annotate(item.image, item.records)
                save_image(Path(annotate_dir) / (str(stem) + ".jpg"), copy)
            for rec in item.records:
                write(rec)
            bar.update(1)
        bar.close()
    return counts
