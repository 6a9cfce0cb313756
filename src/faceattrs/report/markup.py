"""The HTML building blocks of the run report: links relative to the run folder, embedded
figures, tables."""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from urllib.parse import quote


def href(path: Path, run_dir: Path) -> str:
    return quote(Path(os.path.relpath(path, run_dir)).as_posix())


def shown(path: Path, run_dir: Path) -> str:
    """The name a reader sees: relative inside the run folder, absolute outside it."""
    rel = os.path.relpath(path, run_dir)
    return str(path.resolve()) if rel.startswith("..") else rel


def link(path: Path, run_dir: Path) -> str:
    return f'<a href="{href(path, run_dir)}">{html.escape(shown(path, run_dir))}</a>'


def figure(path: Path, run_dir: Path) -> str:
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><a href="{href(path, run_dir)}"><img alt="{html.escape(path.name)}" '
        f'src="data:{mime};base64,{data}"></a><figcaption>{link(path, run_dir)}</figcaption></figure>'
    )


def html_table(rows: list[list], header: list[str] | None = None) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            v = f"{v:.4g}"
        return html.escape("" if v is None else str(v))

    head = "<tr>" + "".join(f"<th>{cell(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def lookup(d: dict, dotted: str):
    for key in dotted.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def scalars(d: dict, prefix: str = "", depth: int = 2) -> list[list]:
    """Flatten the numbers and short strings of a JSON object (``a.b`` keys) into rows."""
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth > 1:
            rows += scalars(v, key + ".", depth - 1)
        elif isinstance(v, bool | int | float) or (isinstance(v, str) and len(v) < 120):
            rows.append([key, v])
    return rows
