"""tools/model_card_tables.py on the shipped model's committed test evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script

METRICS = Path(__file__).parents[1] / "docs" / "results" / "default" / "metrics.json"


def test_tables_show_the_age_standardised_gap_and_every_cell(capsys):
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
