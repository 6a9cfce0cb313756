"""tools/model_card_tables.py on the shipped models' committed test evaluations: the
default model (docs/MODEL_CARD.md) and the 48x48 model (--model utk48, its own card)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script

DOCS = Path(__file__).parents[1] / "docs"
# (test evaluation, the model's card, the page with every table of it)
CARDS = [
    (DOCS / "results" / "default" / "metrics.json", "MODEL_CARD.md", "default.md"),
    (DOCS / "results" / "utk48" / "metrics.json", "MODEL_CARD_utk48.md", "utk48.md"),
]
CARDS = [c for c in CARDS if c[0].exists()]
each_card = pytest.mark.parametrize("METRICS, CARD, FULL", CARDS, ids=lambda v: str(v))


@each_card
def test_tables_show_the_age_standardised_gap_and_every_cell(capsys, METRICS, CARD, FULL):  # noqa: N803
    tables = load_script("model_card_tables")
    assert tables.main([str(METRICS)]) == 0
    out = capsys.readouterr().out
    m = json.loads(METRICS.read_text())
    std = m["fairness"]["gender_accuracy"]["by_ethnicity_age_standardised"]
    # the standardised value is the strata-weighted mean of the group's cells
    for name, g in std["groups"].items():
        cells = g["by_stratum"]
        want = sum(std["strata"][k] * c["value"] for k, c in cells.items())
        assert g["value"] == pytest.approx(want, abs=2e-4), name
        row = f"| {name} | " + " | ".join(f"{c['value']:.3f} ({c['n']})" for c in cells.values())
        assert row + f" | {g['value']:.3f} |" in out
    assert f"largest gap {std['max_gap']:.3f}" in out
    # the cross table holds every test face once
    cross = m["fairness_by_ethnicity_and_age"]["gender_accuracy"]
    assert sum(map(sum, cross["n"])) == m["n"]
    assert "| Other | " in out and "n/a (0)" in out  # no "Other" face aged 60+ in this split


@each_card
def test_the_docs_hold_the_tables_as_the_tool_prints_them(capsys, METRICS, CARD, FULL):  # noqa: N803
    """docs/MODEL_CARD.md's target table and docs/results/utk48.md's every table are the
    tool's output on the committed metrics, so neither can drift from metrics.json."""
    tables = load_script("model_card_tables")
    assert tables.main([str(METRICS)]) == 0
    blocks = capsys.readouterr().out.strip().split("\n\n")
    docs = METRICS.parents[2]
    card = (docs / CARD).read_text()
    full = (docs / "results" / FULL).read_text()
    assert "\n\n".join(blocks[:2]) in card  # the split line, the targets with their intervals
    missing = [b.split("\n")[0] for b in blocks if b not in full]
    assert not missing


@each_card
def test_the_cards_table_per_group_is_metrics_json(METRICS, CARD, FULL):  # noqa: N803
    """The card's one table per group (gender accuracy, ethnicity recall, age MAE) is
    composed by hand from metrics.json: every row must match it."""
    m = json.loads(METRICS.read_text())
    card = (METRICS.parents[2] / CARD).read_text()
    fair, age = m["fairness"], m["age"]
    for by, mae, prefix in (
        ("by_ethnicity", age["mae_per_ethnicity"], ""),
        ("by_gender", age["mae_per_gender"], ""),
        ("by_age_group", None, "age "),
    ):
        for name, g in fair["gender_accuracy"][by]["groups"].items():
            e = fair["ethnicity_recall"][by]["groups"][name]["value"]
            a = "-" if mae is None else f"{mae['groups'][name]['value']:.2f}"
            assert f"| {prefix}{name} | {g['n']} | {g['value']:.3f} | {e:.3f} | {a} |" in card
