"""DFTConfig's warmup rule and the schedule check (dft_config.py)."""

from __future__ import annotations

import pytest

from dftlite.dft_config import MIN_STEPS_FOR_WARMUP, DFTConfig, schedule_problem


def _config(tmp_path, **overrides) -> DFTConfig:
    return DFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **overrides)


@pytest.mark.parametrize("steps, expected", [(1, 0), (8, 0), (19, 0), (20, 2), (21, 3), (100, 10)])
def test_fractional_warmup_only_from_twenty_steps(tmp_path, steps, expected):
    assert MIN_STEPS_FOR_WARMUP == 20
    # warmup_steps 0.1 (the default): ceil(0.1 × steps) from 20 steps on, none below
    assert _config(tmp_path).get_warmup_steps(steps) == expected


def test_whole_warmup_steps_are_kept_as_given(tmp_path):
    assert _config(tmp_path, warmup_steps=3).get_warmup_steps(2) == 3
    assert _config(tmp_path, warmup_steps=3).get_warmup_steps(200) == 3
    assert _config(tmp_path, warmup_steps=0).get_warmup_steps(200) == 0


@pytest.mark.parametrize("steps", [1, 2, 8, 20, 100])
def test_default_schedule_has_no_problem(tmp_path, steps):
    assert schedule_problem(_config(tmp_path), steps) is None


def test_schedule_without_a_real_update_is_reported(tmp_path):
    # one step, one warmup step: that step runs at 0 × peak
    problem = schedule_problem(_config(tmp_path, warmup_steps=1), 1)
    assert problem is not None and "all have learning rate 0" in problem and "warmup_steps" in problem
    problem = schedule_problem(_config(tmp_path, learning_rate=0.0), 50)
    assert problem is not None and "all have learning rate 0" in problem


def test_warmup_covering_the_run_is_reported(tmp_path):
    # 5 warmup steps in a run of 3: rates 0, 0.2, 0.4 × peak; never the peak
    problem = schedule_problem(_config(tmp_path, warmup_steps=5), 3)
    assert problem is not None and "covers all 3" in problem
    assert schedule_problem(_config(tmp_path, warmup_steps=5), 6) is None
