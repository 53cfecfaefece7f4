"""`report_to: tensorboard` receives dftlite's own metrics beside the Trainer's loss: the positives' and
negatives' log-likelihood, log u, the weight statistics and tokens/s, read back from the event files."""

from __future__ import annotations

import math

import pytest
from test_trainer import _config, _data, _model_config, _step_logs, workspace  # noqa: F401  (a fixture)

from dftlite.trainer import build_trainer

DFT_METRICS = ("loss", "pos_logp_per_token", "neg_logp_per_token", "log_u_mean", "weight_max", "weight_mean",
               "weight_entropy", "tokens_per_second")


def test_tensorboard_event_files_hold_dftlite_metrics(workspace, tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # transformers 5: the event files go to $TENSORBOARD_LOGGING_DIR, else <output_dir>/runs/<date>
    config = _config(workspace, tmp_path / "run", max_steps=2, logging_steps=1, report_to="tensorboard")
    trainer = build_trainer(_model_config(workspace["model_dir"]), _data(workspace), config)
    trainer.train()
    logged = _step_logs(trainer.state.log_history)
    assert len(logged) == 2

    events = [p for p in (tmp_path / "run").rglob("events.out.tfevents.*")]
    assert len(events) == 1, f"expected one TensorBoard event file under {tmp_path / 'run'}, found {events}"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    for name in DFT_METRICS:
        assert f"train/{name}" in scalars, f"train/{name} missing; TensorBoard has {sorted(scalars)}"
        values = [event.value for event in accumulator.Scalars(f"train/{name}")]
        expected = [entry[name] for entry in logged]
        assert len(values) == 2 and all(math.isclose(v, e, rel_tol=1e-5, abs_tol=1e-6) for v, e in zip(values, expected))
