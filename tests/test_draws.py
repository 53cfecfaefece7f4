"""dftlite.draws on its own. The draw schedule and the pool checks of a real training run (a split's
negatives, B per epoch, the errors when they run out) are tested through the trainer in
tests/test_trainer.py."""

from __future__ import annotations

from dftlite.draws import Group, micro_batches


def test_micro_batches_keep_groups_whole():
    groups = [Group(str(i), [1] * 5, [[2] * length] * 3, []) for i, length in enumerate([10, 2, 30, 4])]
    batches = micro_batches(groups, token_budget=60)
    assert sorted(g for batch in batches for g in batch) == [0, 1, 2, 3]
    for batch in batches:  # within budget, except a group that alone exceeds it
        assert len(batch) == 1 or 3 * len(batch) * max(groups[g].longest for g in batch) <= 60
    assert micro_batches(groups, token_budget=0) == [[0, 1, 2, 3]]
