"""The demo's end screen: what its numbers mean, with binomial intervals (demo.py)."""

from __future__ import annotations

import pytest

from dftlite.demo import explain_summary, wilson_interval


@pytest.mark.parametrize("successes, trials, expected", [
    (0, 20, (0.0, 0.1611)),     # upper = z²/(n + z²) = 3.8416/23.8416
    (10, 20, (0.2993, 0.7007)),  # worked by hand: 0.5 ∓ 1.96·sqrt(0.0125 + 0.0024)/1.1921
    (20, 20, (0.8389, 1.0)),    # the mirror of 0/20
])
def test_wilson_interval_known_values(successes, trials, expected):
    low, high = wilson_interval(successes, trials)
    assert low == pytest.approx(expected[0], abs=1e-4) and high == pytest.approx(expected[1], abs=1e-4)


def test_summary_explains_each_number_and_its_noise():
    results = {
        "base": {"accuracy": 0.05, "correct": 1, "total": 20, "win_rate": 0.0, "gold_logp_per_token": -1.612,
                 "negative_logp_per_token": -0.740, "num_prompts": 20},
        "adapter": {"accuracy": 0.0, "correct": 0, "total": 20, "win_rate": 0.05, "gold_logp_per_token": -1.461,
                    "negative_logp_per_token": -0.787, "num_prompts": 20},
    }
    text = "\n".join(explain_summary(results, num_train=16))
    assert "out-scores every one of the base model's negatives, per token" in text
    assert "After: 5% (95% interval 1%-24%)" in text  # Wilson 1/20: 0.0089-0.2361
    assert "moved +0.151, the negatives' -0.047" in text and "other way" not in text
    assert "1/20 before, 0/20 after (95% intervals 1%-24% and 0%-16%)" in text
    assert "accuracy is noise" in text and "trains on 16 problems" in text


def test_summary_says_when_the_numbers_moved_the_wrong_way():
    row = {"correct": 0, "total": 20, "win_rate": 0.0, "negative_logp_per_token": -0.7, "num_prompts": 20}
    results = {"base": {**row, "gold_logp_per_token": -1.5}, "adapter": {**row, "gold_logp_per_token": -1.6}}
    text = "\n".join(explain_summary(results, num_train=16))
    assert "moved -0.100" in text and "moved the other way" in text and "not evidence against the method" in text
