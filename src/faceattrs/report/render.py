"""The run report's HTML for each kind of file (figures, JSON, JSON lines, CSV, links) and
each section, and its stylesheet."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path

from .discover import KINDS
from .documents import SPECIAL, explain_html, fairness_html, metrics_html, run_html
from .markup import figure, html_table, link, scalars, shown


def _json_html(path: Path, run_dir: Path, section: str) -> str:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"<p>{link(path, run_dir)}: unreadable ({html.escape(str(e))})</p>"
    body = ""
    if isinstance(data, dict):
        if section == "Fairness" or (section == "Evaluation" and path.name == "metrics.json"):
            body = fairness_html(data) if section == "Fairness" else metrics_html(data)
        elif path.name in SPECIAL:
            body = SPECIAL[path.name](data)
        elif section == "Run":
            body = run_html(path, data)
        elif section == "Grad-CAM" and isinstance(data.get("faces"), list):
            body = explain_html(data)
        else:
            body = html_table(scalars(data)[:60], ["key", "value"])
    if section == "Fairness":  # the file itself is shown, raw, under Evaluation
        return f"<h4>{link(path, run_dir)}</h4>{body}"
    raw = html.escape(json.dumps(data, indent=1)[:20000])
    return f"<h4>{link(path, run_dir)}</h4>{body}<details><summary>raw JSON</summary><pre>{raw}</pre></details>"


def _jsonl_html(path: Path, run_dir: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keys = list(
        dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, int | float | str))
    )
    table = html_table([[r.get(k) for k in keys] for r in rows[-100:]], keys)
    return f"<h4>{link(path, run_dir)}</h4><p>{len(rows)} rows</p><div class=scroll>{table}</div>"


def _csv_html(path: Path, run_dir: Path, limit: int = 100) -> str:
    with open(path, newline="") as f:
        rows = [r for _, r in zip(range(limit + 1), csv.reader(f), strict=False)]
    if not rows:
        return f"<p>{link(path, run_dir)} (empty)</p>"
    note = f"first {limit} rows" if len(rows) > limit else f"{len(rows) - 1} rows"
    return f"<h4>{link(path, run_dir)}</h4><p>{note}</p><div class=scroll>{html_table(rows[1:], rows[0])}</div>"


def render_file(path: Path, run_dir: Path, section: str) -> str:
    kind = KINDS[path.suffix.lower()]
    if kind == "image":
        return figure(path, run_dir)
    if kind == "json":
        return _json_html(path, run_dir, section)
    if kind == "jsonl":
        return _jsonl_html(path, run_dir)
    if kind == "csv":
        return _csv_html(path, run_dir)
    return f"<p>{link(path, run_dir)}</p>"


def render_section(name: str, files: list[Path], run_dir: Path) -> str:
    """One block per folder: its tables and links first, then its figures in a wrapping grid."""
    folders: dict[Path, list[Path]] = {}
    for p in files:
        folders.setdefault(p.parent, []).append(p)
    blocks = []
    for folder, group in folders.items():
        rel = shown(folder, run_dir)
        head = f"<h3>{html.escape(rel)}/</h3>" if len(folders) > 1 or rel != "." else ""
        text = [render_file(p, run_dir, name) for p in group if KINDS[p.suffix.lower()] != "image"]
        figs = [render_file(p, run_dir, name) for p in group if KINDS[p.suffix.lower()] == "image"]
        blocks.append(f"{head}{''.join(text)}<div class=figs>{''.join(figs)}</div>")
    anchor = name.lower().replace(" ", "-")
    return f'<section id="{anchor}"><h2>{name}</h2>{"".join(blocks)}</section>'


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}
th{background:#f3f3f3}figure{margin:.5em;display:inline-block;vertical-align:top;max-width:100%}
img{max-width:100%;border:1px solid #ddd}figcaption{font-size:12px}pre{font-size:11px;max-height:400px;overflow:auto}
.scroll{max-height:420px;overflow:auto}nav a{margin-right:1em}section{border-top:2px solid #eee;margin-top:1.5em}"""
