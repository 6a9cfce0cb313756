"""Markdown tables for docs/MODEL_CARD.md from an evaluation's metrics.json.

    faceattrs evaluate --data ../shared/data/utkface48.csv.gz --split test --out local/eval_default
    python tools/model_card_tables.py local/eval_default/metrics.json

Prints the targets of the default model (issue 11) beside the reference's figures and the
measured value, then per-group tables (gender accuracy, ethnicity recall, age MAE by
ethnicity, gender and age group), gender accuracy by ethnicity age-standardised and by
ethnicity and age group, and the age interval's coverage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (name, key path, reference figure, target, higher is better)
TARGETS = [
    ("gender accuracy", ("gender", "accuracy"), "0.917", 0.925, True),
    ("gender ROC AUC", ("gender", "auc"), "> 0.97", 0.975, True),
    ("ethnicity accuracy", ("ethnicity", "accuracy"), "0.79", 0.80, True),
    ("ethnicity macro-F1", ("ethnicity", "macro_f1"), "0.723", 0.75, True),
    ("age MAE, honest routing (years)", ("age", "default_mae"), "3-4 (oracle bins)", 5.5, False),
    ("age CS@5", ("age", "cs5"), "-", 0.60, True),
    ("age 6-bin accuracy", ("age", "bin_accuracy"), "0.58", 0.60, True),
    (
        "largest gender-accuracy gap across ethnicities",
        ("fairness", "gender_accuracy", "by_ethnicity", "max_gap"),
        "-",
        0.05,
        False,
    ),
]


def get(m: dict, path):
    for k in path:
        m = m[k]
    return m


def interval(m: dict, path) -> list[float] | None:
    """The 95 % interval ``faceattrs evaluate`` wrote for the figure at ``path``."""
    if path[0] == "age":
        return (m.get("age") or {}).get("ci95", {}).get(path[1])
    return m.get("ci95", {}).get(".".join(path))


def group_table(title: str, block: dict, fmt: str = "{:.3f}") -> list[str]:
    rows = [
        f"**{title}** (largest gap {fmt.format(block['max_gap'])})",
        "",
        "| group | value | n |",
    ]
    rows.append("|---|---|---|")
    for name, g in block["groups"].items():
        rows.append(f"| {name} | {fmt.format(g['value'])} | {g['n']} |")
    return rows + [""]


def value(v, fmt: str = "{:.3f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def standardised_table(title: str, block: dict) -> list[str]:
    """A per-group block of ``metrics.standardised``: each group's value within each stratum
    and standardised to everyone's mix of strata."""
    strata = list(block["strata"])
    weights = ", ".join(f"{k} {w:.3f}" for k, w in block["strata"].items())
    rows = [
        f"**{title}** (weights, the strata's shares of all faces: {weights}; largest gap "
        f"{value(block['max_gap'])})",
        "",
        "| group | " + " | ".join(f"{k} (n)" for k in strata) + " | standardised |",
        "|---|" + "---|" * (len(strata) + 1),
    ]
    for name, g in block["groups"].items():
        cells = [f"{value(c['value'])} ({c['n']})" for c in g["by_stratum"].values()]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {value(g['value'])} |")
    return rows + [""]


def cross_table(title: str, t: dict) -> list[str]:
    rows = [f"**{title}** (value, n)", "", "| | " + " | ".join(t["cols"]) + " |",
            "|---|" + "---|" * len(t["cols"])]  # fmt: skip
    for name, vals, ns in zip(t["rows"], t["value"], t["n"], strict=True):
        rows.append(
            f"| {name} | "
            + " | ".join(f"{value(v)} ({n})" for v, n in zip(vals, ns, strict=True))
            + " |"
        )
    return rows + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("metrics", type=Path)
    m = json.loads(ap.parse_args(argv).metrics.read_text())
    out = [
        f"Split: {m['split']}, {m['n']} faces.",
        "",
        "| measure | reference | target | measured | 95 % interval | met |",
        "|---|---|---|---|---|---|",
    ]
    for name, path, ref, target, higher in TARGETS:
        try:
            v = get(m, path)
        except (KeyError, TypeError):
            out.append(f"| {name} | {ref} | {target} | n/a | - | - |")
            continue
        met = v >= target if higher else v <= target
        sign = ">=" if higher else "<="
        ci = interval(m, path)
        ci = "-" if ci is None else f"{ci[0]:.4g} - {ci[1]:.4g}"
        out.append(
            f"| {name} | {ref} | {sign} {target} | {v:.4g} | {ci} | {'yes' if met else 'no'} |"
        )
    if "ci95" in m:
        out += ["", "95 % intervals: percentile bootstrap over the split's faces "
                f"({m['ci95']['resamples']} resamples; a gap's is that of the difference between "
                "its two groups)."]  # fmt: skip
    out.append("")
    fair = m["fairness"]
    for what in ("by_ethnicity", "by_gender", "by_age_group"):
        out += group_table(
            f"gender accuracy {what.replace('_', ' ')}", fair["gender_accuracy"][what]
        )
        out += group_table(
            f"ethnicity recall {what.replace('_', ' ')}", fair["ethnicity_recall"][what]
        )
    std = fair["gender_accuracy"].get("by_ethnicity_age_standardised")
    if std:
        out += standardised_table("gender accuracy by ethnicity, age-standardised", std)
    cross = m.get("fairness_by_ethnicity_and_age")
    if cross:
        out += cross_table("gender accuracy by ethnicity and age group", cross["gender_accuracy"])
    age = m.get("age") or {}
    for key in ("mae_per_ethnicity", "mae_per_gender", "mae_per_age_group"):
        if key in age:
            out += group_table(f"age MAE {key[8:].replace('_', ' ')}", age[key], "{:.2f}")
    if age.get("mae_per_bin"):
        kinds = [
            k
            for k in ("hard", "soft", "oracle", "direct")
            if k in next(iter(age["mae_per_bin"].values()))
        ]
        names = {"hard": "hard routing", "soft": "soft routing", "oracle": "oracle bin",
                 "direct": "direct age head"}  # fmt: skip
        out += [f"**age MAE per true bin** ({' / '.join(names[k] for k in kinds)})", "",
                "| bin | n | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]  # fmt: skip
        for label, r in age["mae_per_bin"].items():
            out.append(f"| {label} | {r['n']} | " + " | ".join(f"{r[k]:.2f}" for k in kinds) + " |")
        out.append("")
    iv = age.get("interval")
    if iv:
        out += [
            f"**90 % age interval** (split-conformal on validation): coverage {iv['coverage']:.3f}, "
            f"mean width {iv['mean_width']:.1f} years",
            "",
            "| true bin | coverage | mean width | n |",
            "|---|---|---|---|",
        ]
        for label, r in iv["per_bin"].items():
            cov, width = value(r["coverage"]), value(r["mean_width"], "{:.1f}")
            out.append(f"| {label} | {cov} | {width} | {r['n']} |")
        out.append("")
    for head in ("gender", "ethnicity"):
        h = m[head]
        if "ece_calibrated" in h:
            out.append(
                f"- {head}: ECE {h['ece']:.4f} raw, {h['ece_calibrated']:.4f} after temperature "
                f"{h['temperature']:.3f} (fitted on validation)"
            )
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
