"""The held-out summary the trainer writes to WORKDIR/eval.json (and the demo to runs/demo/eval.json)."""

from __future__ import annotations

import pytest

from llava_jax.eval.heldout import heldout_summary


def _row(category: str, num_objects: int | None = None, choices: int = 2) -> dict:
    row = {"text": "q", "answer": "a", "choices": ["a", "b", "c", "d"][:choices], "category": category}
    if num_objects is not None:
        row["num_objects"] = num_objects
    return row


def test_summary_breaks_accuracy_down_by_category_and_object_count():
    rows = [_row("color", 1, 4), _row("color", 2, 4), _row("side", 2), _row("side", 3), _row("count", 3, 3)]
    correct = [True, False, True, False, True]
    blind = [False, False, True, False, False]
    s = heldout_summary(rows, correct, blind)
    assert s["n"] == 5
    assert s["accuracy"] == pytest.approx(3 / 5) and s["blind_accuracy"] == pytest.approx(1 / 5)
    assert s["chance"] == pytest.approx((1 / 4 + 1 / 4 + 1 / 2 + 1 / 2 + 1 / 3) / 5)
    assert s["by_category"] == {"color": 0.5, "count": 1.0, "side": 0.5}
    assert s["by_num_objects"] == {"1": 1.0, "2": 0.5, "3": 0.5}


def test_summary_without_object_counts_and_mismatched_grades():
    rows = [_row("color"), _row("shape")]
    s = heldout_summary(rows, [True, True], [False, True])
    assert "by_num_objects" not in s and s["by_category"] == {"color": 1.0, "shape": 1.0}
    with pytest.raises(ValueError, match="2 rows but 1 / 2 grades"):
        heldout_summary(rows, [True], [False, True])


def test_summary_without_a_blind_pass_has_no_blind_accuracy():
    rows = [_row("color", 1, 4), _row("side", 2)]
    s = heldout_summary(rows, [True, False], None)
    assert s["accuracy"] == pytest.approx(0.5) and "blind_accuracy" not in s
    with pytest.raises(ValueError):
        heldout_summary(rows, [True], None)
