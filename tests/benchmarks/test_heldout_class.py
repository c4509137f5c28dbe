"""The held-out-class experiment (benchmarks/heldout_class.py): its splits, its AUROC and a real --quick run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "heldout_class.py"

pytest.importorskip("sklearn", reason="scikit-learn (the dev extra) is not installed: the experiment needs its digits")

from benchmarks import heldout_class as hc  # noqa: E402  (after the skip: the module imports sklearn lazily)


def test_split_holds_the_digit_out_and_is_stratified_and_seeded() -> None:
    _, y, _ = hc.load_digits_data()
    pool, test = hc.split_seen(y, held_out=3, seed=0)
    assert not np.isin(3, y[pool]) and not np.isin(3, y[test])
    assert np.intersect1d(pool, test).size == 0
    assert pool.size + test.size == int((y != 3).sum())
    # Stratified: every seen digit keeps its share of the test set within one image.
    for digit in set(range(10)) - {3}:
        expected = hc.TEST_FRACTION * int((y == digit).sum())
        assert abs(int((y[test] == digit).sum()) - expected) <= 1
    again, _ = hc.split_seen(y, held_out=3, seed=0)
    other, _ = hc.split_seen(y, held_out=3, seed=1)
    assert np.array_equal(pool, again) and not np.array_equal(pool, other)


def test_auroc_counts_ties_as_half() -> None:
    # Pairs (positive, negative): (2,0) 1, (2,2) 0.5, (3,0) 1, (3,2) 1 -> 3.5 / 4.
    assert hc.auroc(np.array([2, 3]), np.array([0, 2])) == pytest.approx(0.875)
    assert hc.auroc(np.zeros(5), np.zeros(7)) == pytest.approx(0.5)


def test_quick_run_trains_without_the_digit_and_reports_every_rule() -> None:
    pytest.importorskip("tensorflow", reason="TensorFlow (the train extra) is not installed: cannot train the models")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["benchmark"] == "heldout_class"
    assert result["classes"] == list(hc.QUICK_CLASSES) and result["seeds"] == [0]
    rules = [hc.SHIPPED] + [hc.rule_name(q) for q in hc.PAIR_QUANTILES]
    assert list(result["rules"]) == rules
    for rule in rules:
        assert sorted(result["rules"][rule]["per_class"]) == [str(c) for c in hc.QUICK_CLASSES]
        assert 0.0 <= result["rules"][rule]["auroc_coact_min"] <= result["rules"][rule]["auroc_coact_max"] <= 1.0
    assert f"Rule {rules[0]!r}" in proc.stdout

    _, y, _ = hc.load_digits_data()
    trials = result["trials"]
    assert len(trials) == len(rules) * len(hc.QUICK_CLASSES)
    for t in trials:
        digit = t["held_out"]
        assert str(digit) not in t["train_labels"] and len(t["train_labels"]) == 9
        assert t["n_unseen"] == int((y == digit).sum())
        assert t["rows_pool"] + t["rows_test"] + t["n_unseen"] == y.size
        assert t["n_correct"] + t["n_incorrect"] == t["rows_test"]
        assert t["test_accuracy"] > 0.9, t
        for key in ("auroc_coact", "auroc_confidence", "above_p99_correct", "above_p99_unseen"):
            assert 0.0 <= t[key] <= 1.0, (key, t)
        for key in ("mean_correct", "mean_unseen", "reference_mean", "reference_p99", "rare_pairs"):
            assert t[key] >= 0, (key, t)
        assert t["mean_incorrect"] is None or t["mean_incorrect"] >= 0
        # The rarest pair cannot co-fire more often than the least active unit fires at all.
        assert 0.0 <= t["joint_frequency_min"] <= t["unit_frequency_min"] <= t["unit_frequency_max"] <= 1.0
        if t["rule"] == hc.SHIPPED:
            assert t["threshold"] == pytest.approx(0.01)
            if t["joint_frequency_min"] >= t["threshold"]:
                assert t["rare_pairs"] == 0 and t["mean_unseen"] == t["mean_correct"] == 0
        else:
            assert t["rare_pairs"] > 0 and 0.0 < t["threshold"] < 1.0
    # The rarity rule changes the mask, never the model: one trained model, one set of predictions.
    for digit in hc.QUICK_CLASSES:
        accuracies = {t["test_accuracy"] for t in trials if t["held_out"] == digit}
        assert len(accuracies) == 1
