"""The run report: one self-contained ``report.html`` per run folder, readable offline.

It discovers whatever the stages wrote into the run folder and its subfolders (and the
prepared data folder named in ``config.json``), groups the files into sections (data,
training history, evaluation, calibration, fairness, Grad-CAM, error clusters, age), embeds
every figure as a base64 data URI, turns the known JSON files into tables and links every
file by its relative path.

Command: ``faceattrs report --run runs/paper`` -> ``runs/paper/report.html``.

By concept: ``discover`` (which files, in which section), ``markup`` (links, embedded
figures, tables), ``documents`` (the known JSON files as tables, the headline summary),
``render`` (each kind of file, each section, the stylesheet); here, :func:`build_report`.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

from ..exceptions import FaceattrsError
from ..io import write_text_atomic
from .discover import SECTIONS, discover
from .documents import summary_html
from .render import CSS, render_section

log = logging.getLogger(__name__)


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
    summary = summary_html(found["Evaluation"], run_dir)
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
