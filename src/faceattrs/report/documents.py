"""The known JSON documents of a run folder as tables: evaluation metrics (beside the
reference's figures), fairness gaps, calibration, error clusters, checkpoints, explained
faces; and the headline summary of the test-split evaluation."""

from __future__ import annotations

import html
import json
from pathlib import Path

from .markup import html_table, link, lookup, scalars

# The reference's test-split figures, shown next to ours (REFERENCE.md, multitask results).
REFERENCE = {
    "gender.accuracy": 0.917,
    "gender.macro_f1": 0.917,
    "gender.auc": 0.97,
    "ethnicity.accuracy": 0.79,
    "ethnicity.macro_f1": 0.723,
}


def metrics_html(m: dict) -> str:
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

    rows = [
        [k, lookup(m, k), interval(k), REFERENCE.get(k)] for k in keys if lookup(m, k) is not None
    ]
    out = f"<p>split <b>{html.escape(str(m.get('split')))}</b>, n = {m.get('n')}</p>"
    out += html_table(rows, ["metric", "this run", "95 % interval (bootstrap)", "reference"])
    for head in ("gender", "ethnicity"):
        per = lookup(m, f"{head}.per_class") or {}
        rows = [[c, v["precision"], v["recall"], v["f1"], v["support"]] for c, v in per.items()]
        out += f"<h5>{head}: per class</h5>" + html_table(
            rows, ["class", "precision", "recall", "F1", "support"]
        )
    return out


def fairness_html(m: dict) -> str:
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
        out += f"<h5>{html.escape(metric)}</h5>" + html_table(
            rows, ["by", "groups", "largest gap", "between"]
        )
    return out


def calibration_html(c: dict) -> str:
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
    return f"<p>fitted on: {html.escape(str(c.get('fitted_on')))}</p>" + html_table(rows, header)


def clusters_html(c: dict) -> str:
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
        + html_table(rows, head)
    )


def run_html(path: Path, data: dict) -> str:
    """Checkpoint JSON: its own facts (the training settings are in config.json, folded)."""
    rows = scalars(data)
    if path.name == "config.json":
        return f"<details><summary>{len(rows)} settings</summary>{html_table(rows, ['key', 'value'])}</details>"
    return html_table([r for r in rows if not r[0].startswith("config.")], ["key", "value"])


def explain_html(e: dict) -> str:
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
    return note + html_table(rows, head)


SPECIAL = {
    "metrics.json": metrics_html,
    "calibration.json": calibration_html,
    "clusters.json": clusters_html,
}


def summary_html(eval_files: list[Path], run_dir: Path) -> str:
    """Headline numbers of the test-split evaluation next to the reference's."""
    for path in eval_files:
        if path.name != "metrics.json":
            continue
        try:
            m = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if m.get("split") == "test":
            rows = [[k, lookup(m, k), v] for k, v in REFERENCE.items()]
            return (
                f"<p>Test split (n = {m.get('n')}), from {link(path, run_dir)}:</p>"
                + html_table(rows, ["metric", "this run", "reference"])
            )
    return (
        "<p>No test-split evaluation in this run folder yet (<code>faceattrs evaluate</code>).</p>"
    )
