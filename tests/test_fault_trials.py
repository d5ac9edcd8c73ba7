"""The fault trials (spar.tools.fault_trials): every trial kind survives a short seeded run."""

import json
import struct

import pytest
from helpers import run_script
from PIL import Image

from spar.tools.fault_trials import KINDS, draw_trials, format_table, write_png_bomb


def test_trials_are_drawn_from_the_counts_and_kinds():
    kinds = draw_trials(kills=5, per_kind=2, seed=0)
    assert kinds[:5] == [
        "kill during caching",
        "kill during training",
        "kill between checkpoint writes",
        "kill during caching",
        "kill during training",
    ]
    assert len(kinds) == 5 + 2 * (len(KINDS) - 3) and set(kinds) == set(KINDS)


def test_the_png_bomb_is_a_valid_png_of_the_declared_size(tmp_path):
    path = write_png_bomb(tmp_path / "bomb.png", width=3000, height=2000)
    assert path.stat().st_size < 100_000  # 6 MB of pixels in a few KB
    data = path.read_bytes()
    assert struct.unpack(">II", data[16:24]) == (3000, 2000)
    with Image.open(path) as image:
        assert image.size == (3000, 2000) and image.getextrema() == (0, 0)


def test_the_table_lists_every_row_and_the_total():
    table = format_table(
        {"rows": [{"kind": "kill during training", "trials": 2, "survived": 1, "lost": 1}]}
    )
    assert "| kill during training | 2 | 1 | 1 |" in table and "| **all** | 2 | 1 | 1 |" in table


@pytest.mark.slow
def test_every_fault_trial_survives(tmp_path):
    result = run_script(
        "fault_trials.py",
        "kills=3",
        "per_kind=1",
        "seed=1",
        "guarantees=false",  # tests/test_fault_trials_guarantees.py runs those
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=240,
    )
    results = json.loads((tmp_path / "run" / "fault_trials.json").read_text())
    assert [row["kind"] for row in results["rows"]] == list(KINDS)
    assert all(row["lost"] == 0 and row["survived"] == row["trials"] for row in results["rows"])
    assert len(results["trials"]) == 3 + len(KINDS) - 3
    assert results["guarantees"] == []
    assert "| **all** | 11 | 11 | 0 |" in result.stdout
