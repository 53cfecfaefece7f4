"""benchmarks/gpu_check.py --tiny end to end, so the prepared GPU check cannot rot between GPU runs.

Run: .venv/bin/python -m pytest -q tests/test_gpu_check.py   (~30-60 s on 2 busy CPU cores)
Every stage runs on tiny random models; on a CPU the CUDA-only stages must say "skipped: no CUDA".
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STAGES = ["environment", "gpu_tests", "step_cost_smollm2_135m", "step_cost_llama_1b", "sampling", "vllm_sampling",
          "t4_goal_llama_8b", "fsdp_qlora_2gpu", "prefix_sharing_llama_8b"]
NEEDS_CUDA = {"gpu_tests", "t4_goal_llama_8b"}  # prefix_sharing_llama_8b: --tiny runs it on the CPU


def run_check(tmp_path, *extra):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--work_dir", str(tmp_path / "work"),
                           *extra], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_tiny_gpu_check_runs_every_stage(tmp_path):
    summary, markdown = run_check(tmp_path)
    stages = {stage["name"]: stage for stage in summary["stages"]}
    assert list(stages) == STAGES
    for name, stage in stages.items():
        expected = "skipped: no CUDA" if name in NEEDS_CUDA and not torch.cuda.is_available() else "ok"
        if name == "vllm_sampling" and importlib.util.find_spec("vllm") is None:  # make test's venv has no vLLM
            expected = "skipped: no vllm"
        if name == "fsdp_qlora_2gpu" and torch.cuda.device_count() < 2:
            expected = f"skipped: needs 2 GPUs, found {torch.cuda.device_count()}"
        assert stage["status"] == expected, (name, stage["status"])
        assert f"| {name} | {stage['status']} |" in markdown

    environment = stages["environment"]["result"]
    assert environment["versions"]["torch"] == torch.__version__
    for name in ("step_cost_smollm2_135m", "step_cost_llama_1b"):
        result = stages[name]["result"]
        # S=2 prompts x (1 answer + B=2 negatives): 6 sequences per step, whose tokens the rates are of
        assert result["vs_sft"]["sequences_per_step"] == 6
        assert set(result["vs_sft"]["tokens_per_s"]) == {"sft", "dft2", "dft"}
        assert all(rate > 0 for rate in result["vs_sft"]["tokens_per_s"].values())
        assert result["vs_sft"]["ratios"]["dft2_over_sft_seconds"] > 0
        trl = result["vs_trl_dpo"]
        if isinstance(trl, str):  # a machine without datasets/pyarrow says why
            assert trl.startswith("skipped: TRL's DPOTrainer needs datasets")
        else:
            assert set(trl["tokens_per_s"]) == {"dft2", "trl_dpo"} and trl["ratios"]["dft2_over_trl_dpo_seconds"] > 0
    sampling = stages["sampling"]["result"]
    # random tiny model: EOS is rare, so both sides produce about prompts x negatives x max_new_tokens tokens
    assert 0 < sampling["batched_tokens"] <= 2 * 2 * 8 and 0 < sampling["unbatched_tokens"] <= 2 * 2 * 8
    assert "## T4 goal" in markdown
    sharing = stages["prefix_sharing_llama_8b"]["result"]
    for shape in ("gsm8k", "long_prompt"):  # the packed rows hold fewer tokens than the unshared rows
        median = sharing[shape]["median"]
        assert median["shared"]["tokens_real"] < median["unshared"]["tokens_real"]
        assert sharing[shape]["shared_over_unshared_seconds"] > 0


def test_isolated_stage_reports_its_verdict(tmp_path):
    # the mode used on a GPU: the stage in its own process, its verdict and figures read back
    committed = REPO / "docs" / "gpu_check.json"
    before = committed.read_bytes() if committed.is_file() else None
    record = tmp_path / "record" / "gpu_check.json"
    summary, _ = run_check(tmp_path, "--isolate", "yes", "--stages", "environment", "--record", str(record))
    (stage,) = summary["stages"]
    assert stage["name"] == "environment" and stage["status"] == "ok"
    assert stage["result"]["versions"]["transformers"]
    # --record gets the same raw JSON as OUT; a tiny run never touches the committed docs/gpu_check.json
    assert json.loads(record.read_text()) == summary
    assert (committed.read_bytes() if committed.is_file() else None) == before
