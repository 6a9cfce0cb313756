"""The run report: one self-contained ``report.html`` per run folder, readable offline.

It discovers whatever the stages wrote into the run folder and its subfolders (and the
prepared data folder named in ``config.json``), groups the files into sections (data,
training history, evaluation, calibration, fairness, Grad-CAM, error clusters, age), embeds
every figure as a base64 data URI, turns the known JSON files into tables and links every
file by its relative path.

Command: ``faceattrs report --run runs/paper`` -> ``runs/paper/report.html``.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import os
from pathlib import Path
from urllib.parse import quote

from .exceptions import FaceattrsError
from .io import write_text_atomic

log = logging.getLogger(__name__)

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
# The reference's test-split figures, shown next to ours (REFERENCE.md, multitask results).
REFERENCE = {
    "gender.accuracy": 0.917,
    "gender.macro_f1": 0.917,
    "gender.auc": 0.97,
    "ethnicity.accuracy": 0.79,
    "ethnicity.macro_f1": 0.723,
}


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
    from .prepare import cache_dir

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


def _href(path: Path, run_dir: Path) -> str:
    return quote(Path(os.path.relpath(path, run_dir)).as_posix())


def _shown(path: Path, run_dir: Path) -> str:
    """The name a reader sees: relative inside the run folder, absolute outside it."""
    rel = os.path.relpath(path, run_dir)
    return str(path.resolve()) if rel.startswith("..") else rel


def _link(path: Path, run_dir: Path) -> str:
    return f'<a href="{_href(path, run_dir)}">{html.escape(_shown(path, run_dir))}</a>'


def _image(path: Path, run_dir: Path) -> str:
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><a href="{_href(path, run_dir)}"><img alt="{html.escape(path.name)}" '
        f'src="data:{mime};base64,{data}"></a><figcaption>{_link(path, run_dir)}</figcaption></figure>'
    )


def _table(rows: list[list], header: list[str] | None = None) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            v = f"{v:.4g}"
        return html.escape("" if v is None else str(v))

    head = "<tr>" + "".join(f"<th>{cell(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _get(d: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _scalars(d: dict, prefix: str = "", depth: int = 2) -> list[list]:
    """Flatten the numbers and short strings of a JSON object (``a.b`` keys) into rows."""
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth > 1:
            rows += _scalars(v, key + ".", depth - 1)
        elif isinstance(v, bool | int | float) or (isinstance(v, str) and len(v) < 120):
            rows.append([key, v])
    return rows


def _metrics_html(m: dict) -> str:
    """Headline table of an evaluation ``metrics.json`` against the reference, and per class."""
    keys = [
        "gender.accuracy",
        "gender.macro_f1",
        "gender.auc",
        "gender.ece",
        "gender.ece_calibrated",
        "ethnicity.accuracy",
        "ethnicity.macro_f1",
        "ethnicity.ece",
        "ethnicity.ece_calibrated",
    ]
    ci = m.get("ci95") or {}

    def interval(k):
        return "" if ci.get(k) is None else f"{ci[k][0]:.4f} - {ci[k][1]:.4f}"

    rows = [[k, _get(m, k), interval(k), REFERENCE.get(k)] for k in keys if _get(m, k) is not None]
    out = f"<p>split <b>{html.escape(str(m.get('split')))}</b>, n = {m.get('n')}</p>"
    out += _table(rows, ["metric", "this run", "95 % interval (bootstrap)", "reference"])
    for head in ("gender", "ethnicity"):
        per = _get(m, f"{head}.per_class") or {}
        rows = [[c, v["precision"], v["recall"], v["f1"], v["support"]] for c, v in per.items()]
        out += f"<h5>{head}: per class</h5>" + _table(
            rows, ["class", "precision", "recall", "F1", "support"]
        )
    return out


def _fairness_html(m: dict) -> str:
    out = ""
    for metric, groupings in (m.get("fairness") or {}).items():
        rows = []
        for grouping, res in groupings.items():
            vals = ", ".join(
                f"{g} {'n/a' if v['value'] is None else format(v['value'], '.3f')} (n={v['n']})"
                for g, v in res["groups"].items()
            )
            rows.append(
                [
                    grouping.removeprefix("by_"),
                    vals,
                    res["max_gap"],
                    " vs ".join(res["gap_between"] or []),
                ]
            )
        out += f"<h5>{html.escape(metric)}</h5>" + _table(
            rows, ["by", "groups", "largest gap", "between"]
        )
    return out


def _calibration_html(c: dict) -> str:
    rows = []
    for head, t in c.get("temperatures", {}).items():
        for split, s in c.get("heads", {}).get(head, {}).items():
            rows.append(
                [
                    head,
                    t,
                    split,
                    s["n"],
                    s["ece_before"],
                    s["ece_after"],
                    s["nll_before"],
                    s["nll_after"],
                ]
            )
    header = ["head", "T", "split", "n", "ECE before", "ECE after", "NLL before", "NLL after"]
    return f"<p>fitted on: {html.escape(str(c.get('fitted_on')))}</p>" + _table(rows, header)


def _clusters_html(c: dict) -> str:
    def mix(d):
        return ", ".join(f"{k} {v}" for k, v in d.items())

    rows = [
        [
            cl["cluster"],
            cl["size"],
            mix(cl["true"]),
            mix(cl["predicted"]),
            cl["brightness"]["mean"],
            cl["contrast"]["mean"],
            cl["asymmetry"]["mean"],
            cl["description"],
        ]
        for cl in c["clusters"]
    ]
    ref = c["reference"]
    rows.append(
        [
            "all faces",
            c["n"],
            "",
            "",
            ref["brightness"]["mean"],
            ref["contrast"]["mean"],
            ref["asymmetry"]["mean"],
            f"reference over the whole {c['split']} split",
        ]
    )
    head = [
        "cluster",
        "size",
        "true",
        "predicted",
        "brightness",
        "contrast",
        "asymmetry",
        "description",
    ]
    return (
        f"<p>{c['n_errors']} misclassified of {c['n']} ({c['error_rate']:.1%}), k = {c['k']}</p>"
        + _table(rows, head)
    )


def _run_html(path: Path, data: dict) -> str:
    """Checkpoint JSON: its own facts (the training settings are in config.json, folded)."""
    rows = _scalars(data)
    if path.name == "config.json":
        return f"<details><summary>{len(rows)} settings</summary>{_table(rows, ['key', 'value'])}</details>"
    return _table([r for r in rows if not r[0].startswith("config.")], ["key", "value"])


def _explain_html(e: dict) -> str:
    """Faces explained (photo or misclassified): where, true labels when known, predictions."""

    def pred(face, head):
        return f"{face[head]['label']} ({face[head]['probability']:.2f})"

    rows = [
        [face.get("index", i), face.get("box", ""), (face.get("true") or {}).get("gender", ""),
         pred(face, "gender"), (face.get("true") or {}).get("ethnicity", ""), pred(face, "ethnicity")]
        for i, face in enumerate(e["faces"])
    ]  # fmt: skip
    head = [
        "face / row",
        "box",
        "true gender",
        "predicted gender",
        "true ethnicity",
        "predicted ethnicity",
    ]
    note = ""
    if "n_misclassified" in e:
        note = f"<p>{e['n_shown']} of {e['n_misclassified']} misclassified {e['split']} faces of {', '.join(e['classes'])}</p>"
    return note + _table(rows, head)


SPECIAL = {
    "metrics.json": _metrics_html,
    "calibration.json": _calibration_html,
    "clusters.json": _clusters_html,
}


def _json_html(path: Path, run_dir: Path, section: str) -> str:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"<p>{_link(path, run_dir)}: unreadable ({html.escape(str(e))})</p>"
    body = ""
    if isinstance(data, dict):
        if section == "Fairness" or (section == "Evaluation" and path.name == "metrics.json"):
            body = _fairness_html(data) if section == "Fairness" else _metrics_html(data)
        elif path.name in SPECIAL:
            body = SPECIAL[path.name](data)
        elif section == "Run":
            body = _run_html(path, data)
        elif section == "Grad-CAM" and isinstance(data.get("faces"), list):
            body = _explain_html(data)
        else:
            body = _table(_scalars(data)[:60], ["key", "value"])
    if section == "Fairness":  # the file itself is shown, raw, under Evaluation
        return f"<h4>{_link(path, run_dir)}</h4>{body}"
    raw = html.escape(json.dumps(data, indent=1)[:20000])
    return f"<h4>{_link(path, run_dir)}</h4>{body}<details><summary>raw JSON</summary><pre>{raw}</pre></details>"


def _jsonl_html(path: Path, run_dir: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = list(
        dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, int | float | str))
    )
    table = _table([[r.get(k) for k in keys] for r in rows[-100:]], keys)
    return f"<h4>{_link(path, run_dir)}</h4><p>{len(rows)} rows</p><div class=scroll>{table}</div>"


def _csv_html(path: Path, run_dir: Path, limit: int = 100) -> str:
    with open(path, newline="") as f:
        rows = [r for _, r in zip(range(limit + 1), csv.reader(f), strict=False)]
    if not rows:
        return f"<p>{_link(path, run_dir)} (empty)</p>"
    note = f"first {limit} rows" if len(rows) > limit else f"{len(rows) - 1} rows"
    return f"<h4>{_link(path, run_dir)}</h4><p>{note}</p><div class=scroll>{_table(rows[1:], rows[0])}</div>"


def render_file(path: Path, run_dir: Path, section: str) -> str:
    kind = KINDS[path.suffix.lower()]
    if kind == "image":
        return _image(path, run_dir)
    if kind == "json":
        return _json_html(path, run_dir, section)
    if kind == "jsonl":
        return _jsonl_html(path, run_dir)
    if kind == "csv":
        return _csv_html(path, run_dir)
    return f"<p>{_link(path, run_dir)}</p>"


def render_section(name: str, files: list[Path], run_dir: Path) -> str:
    """One block per folder: its tables and links first, then its figures in a wrapping grid."""
    folders: dict[Path, list[Path]] = {}
    for p in files:
        folders.setdefault(p.parent, []).append(p)
    blocks = []
    for folder, group in folders.items():
        rel = _shown(folder, run_dir)
        head = f"<h3>{html.escape(rel)}/</h3>" if len(folders) > 1 or rel != "." else ""
        text = [render_file(p, run_dir, name) for p in group if KINDS[p.suffix.lower()] != "image"]
        figs = [render_file(p, run_dir, name) for p in group if KINDS[p.suffix.lower()] == "image"]
        blocks.append(f"{head}{''.join(text)}<div class=figs>{''.join(figs)}</div>")
    anchor = name.lower().replace(" ", "-")
    return f'<section id="{anchor}"><h2>{name}</h2>{"".join(blocks)}</section>'


def _summary(eval_files: list[Path], run_dir: Path) -> str:
    """Headline numbers of the test-split evaluation next to the reference's."""
    for path in eval_files:
        if path.name != "metrics.json":
            continue
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if m.get("split") == "test":
            rows = [[k, _get(m, k), v] for k, v in REFERENCE.items()]
            return f"<p>Test split (n = {m.get('n')}), from {_link(path, run_dir)}:</p>" + _table(
                rows, ["metric", "this run", "reference"]
            )
    return (
        "<p>No test-split evaluation in this run folder yet (<code>faceattrs evaluate</code>).</p>"
    )


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}
th{background:#f3f3f3}figure{margin:.5em;display:inline-block;vertical-align:top;max-width:100%}
img{max-width:100%;border:1px solid #ddd}figcaption{font-size:12px}pre{font-size:11px;max-height:400px;overflow:auto}
.scroll{max-height:420px;overflow:auto}nav a{margin-right:1em}section{border-top:2px solid #eee;margin-top:1.5em}"""


def build_report(run_dir: str | Path) -> Path:
    """Write ``RUN/report.html`` from every file found in the run folder; return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is a file, not a run folder" if run_dir.exists() else "run folder not found"
        raise FaceattrsError(f"{run_dir}: {what}" if run_dir.exists() else f"{what}: {run_dir}")
    found = discover(run_dir)
    # fairness lives inside eval*/metrics.json: show its table in the Fairness section too
    found["Fairness"] += [p for p in found["Evaluation"] if p.name == "metrics.json"]
    present = [s for s in SECTIONS if found[s]]
    summary = _summary(found["Evaluation"], run_dir)
    nav = "".join(f'<a href="#{s.lower().replace(" ", "-")}">{s}</a>' for s in present)
    body = "".join(render_section(s, found[s], run_dir) for s in present)
    title = f"faceattrs report: {html.escape(run_dir.resolve().name)}"
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{CSS}</style>"
        f"</head><body><h1>{title}</h1><nav>{nav}</nav>{summary}{body}</body></html>"
    )
    out = run_dir / "report.html"
    write_text_atomic(out, page)
    n = sum(len(v) for v in found.values())
    log.info("report of %d files in %d sections -> %s", n, len(present), out)
    return out
