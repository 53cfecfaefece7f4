"""Two processes under `accelerate launch` train exactly like one process with the same global batch: DDP and FSDP.

    python -m pytest tests/test_multiprocess.py        # a few minutes on 2 CPU cores

The fixture launches this file as a script in 2 processes, once per shipped multi-process config (`LAUNCHES`):

    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 --mixed_precision no \
        tests/test_multiprocess.py WORKDIR ddp

(`--cpu --num_processes 2` would start a single process: accelerate runs several CPU processes only
through mpirun. The configs run torchrun, and `use_cpu: true` makes each process train on the CPU
with gloo.) In the DDP launch each process runs, in turn: (a) `dftlite train`, 4 steps of S = 2 prompts
per process, micro-batches of one prompt, a checkpoint at step 3 and an evaluation on 3 held-out prompts
(so accelerate pads the last evaluation batch); (b) a NaN that only process 1 sees; (c) a Ctrl-C that
only process 1 gets; (d) data that does not fill whole global batches. The FSDP launch (fsdp_qlora.yaml,
4-bit base) runs (a), (e): resume (a)'s step-3 checkpoint on the same 2 processes, and (f): one step, then
score under `sampler_view`, which must give the 4-bit base's scores. The tests compare
(a) with one process of S = 4, resume (a)'s step-3 checkpoint on one process, and check that (b)-(d) stop
both processes alike instead of hanging. The last test loads every shipped accelerate config.

FSDP on CPU: accelerate 1.16 turns FSDP off when the processes train on the CPU (with `use_cpu` its state
is MULTI_CPU, and FSDP is set only for GPU-like device types, `AcceleratorState.__init__`), so the FSDP
launch would silently run DDP. `_fsdp_on_cpu` below puts FSDP back for the launched test processes only:
torch's FSDP2 (`fully_shard`) itself runs on CPU with gloo. What it changes is accelerate's bookkeeping
(distributed type, device `cpu` rather than `cpu:0`), not dftlite or the sharding; each process records
its wrapper and how many 4-bit weights it holds a shard of, and the test checks them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, write_jsonl

TRAIN_PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]
EVAL_PAIRS = [(2, 3), (5, 1), (9, 9)]  # 3: the last evaluation batch of 2 processes × 2 is padded
STEP_KEYS = ("loss", "grad_norm", "learning_rate", "log_u_mean", "log_g_hat_mean", "pos_logp_per_token",
             "neg_logp_per_token", "weight_mean", "weight_entropy")  # not weight_max: a max per micro-batch
EVAL_KEYS = ("eval_loss", "eval_pos_logp_per_token", "eval_neg_logp_per_token", "eval_sft_part", "eval_neg_part")
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"
# input_ids, attention_mask, completion_mask (2, 6): two sequences whose last 3 tokens are scored
PROBE = (torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]), torch.ones(2, 6, dtype=torch.long),
         torch.tensor([[0, 0, 0, 1, 1, 1]] * 2))
# launch -> (accelerate config, the base's precision in both runs, the 2-process runs' token_budget)
# FSDP: token_budget 0, one forward per step (trainer.py refuses others: each forward is a collective)
LAUNCHES = {"ddp": ("ddp.yaml", "fp32", 1), "fsdp_qlora": ("fsdp_qlora.yaml", "4bit", 0)}
# benchmarks/gpu_check.py's fsdp_qlora_2gpu stage sets this to run the launches on 2 GPUs (NCCL), without the CPU shim
ON_CUDA = os.environ.get("DFTLITE_MULTIPROCESS_ON_CUDA") == "1"
LAUNCH_TIMEOUT_S = 300  # a hang shows up as a failure, not a stuck test run


def _rows(pairs):
    return [{"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}"} for a, b in pairs]


def train_argv(workdir: Path, output_dir: Path, **overrides) -> list[str]:
    """`dftlite train` arguments: fp32 on CPU, no dropout (its masks would differ between the two layouts)."""
    settings = dict(
        model_name_or_path=workdir / "model", precision="fp32", lora_r=8, lora_dropout=0.0,
        data_path=workdir / "train.jsonl", pool_dir=workdir / "pool", eval_data_path=workdir / "eval.jsonl",
        eval_pool_dir=workdir / "eval_pool", per_device_eval_batch_size=2, output_dir=output_dir, use_cpu=not ON_CUDA,
        learning_rate=1e-2, seed=0, u_init="first_batch", max_steps=4, save_strategy="steps", save_steps=3,
        disable_tqdm=True, report_to="none", ddp_timeout=120,
        # One warmup step (lr 0), as these runs had before short runs lost their warmup: Adam's first real update
        # then divides by a second moment of two gradients, not one, and the all-reduce's rounding in near-zero
        # gradient entries stays under 1e-6 in the adapter (measured 3e-5 without it, lr 1e-2).
        warmup_steps=1,
        # No SFT anchor: a token-level term is normalised over each process's gold tokens, so two processes
        # would average two per-process NLLs where one process takes the NLL of all (trainer.py, _loss).
        sft_weight=0.0,
    )
    settings.update(overrides)
    return [item for key, value in settings.items() for item in (f"--{key}", str(value))]


# ---- the launched side: runs in each process -------------------------------------------------


def _fsdp_on_cpu():
    """Let accelerate run FSDP in CPU processes (see the module docstring): after its state is set up as
    MULTI_CPU with an FSDP plugin, make it FSDP, on device `cpu` (FSDP checks that `device_id` equals the
    compute device, `cpu`; accelerate's MULTI_CPU device is `cpu:0`)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original_init = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.fsdp_plugin, self.device = plugin, torch.device("cpu")
            self.distributed_type = DistributedType.FSDP
            # AcceleratorState copies PartialState's shared state in at every construction
            PartialState._shared_state.update(distributed_type=DistributedType.FSDP, device=self.device)

    AcceleratorState.__init__ = init


def _sharding(model) -> dict:
    """What this process holds: the wrapper class, and the 4-bit base weights of which it holds a shard."""
    from torch.distributed.tensor import DTensor

    packed = [p for name, p in model.named_parameters() if type(p).__name__ == "Params4bit" or (
        isinstance(p, DTensor) and "base_layer" in name)]
    sharded = [p for p in packed if isinstance(p, DTensor) and p.to_local().numel() < p.numel()]
    return {"wrapper": type(model).__name__, "base_weights": len(packed), "sharded_base_weights": len(sharded),
            "storage_dtype": str(packed[0].dtype) if packed else None}


def drive(workdir: Path, launch: str):
    """(a)-(f) of the module docstring; writes what each process saw to WORKDIR/rank{N}.json."""
    from transformers import TrainerCallback

    from dftlite.cli import main
    from dftlite.config import ConfigError, parse_args
    from dftlite.data import DataConfig
    from dftlite.models import ModelConfig
    from dftlite.trainer import DFTConfig, NonFiniteLossError, build_trainer

    rank, seen = int(os.environ["RANK"]), {}
    _, precision, token_budget = LAUNCHES[launch]

    def trainer_for(output_dir, callbacks=(), **overrides):
        argv = train_argv(workdir, workdir / output_dir, precision=precision, **overrides)
        model_config, data_config, dft_config = parse_args([ModelConfig, DataConfig, DFTConfig], argv)
        return build_trainer(model_config, data_config, dft_config, callbacks=list(callbacks))

    class OnProcessOne(TrainerCallback):
        def __init__(self, step, action):
            self.step, self.action = step, action

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if rank == 1 and state.global_step == self.step:
                self.action(model)

    def poison(model):
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    class Sharding(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.setdefault("sharding", _sharding(model))

    # (a) the CLI, S = 2 per process; DDP: one prompt per micro-batch (so DDP's no_sync path runs)
    seen["train_exit"] = main(["train", *train_argv(workdir, workdir / "two", precision=precision,
                                                    per_device_train_batch_size=2, token_budget=token_budget)])
    if launch == "fsdp_qlora":
        # (e) resume (a)'s step-3 checkpoint on the same 2 processes, in a fresh output_dir
        resumed = workdir / "resumed_on_two"
        if rank == 0:
            shutil.copytree(workdir / "two" / "checkpoint-3", resumed / "checkpoint-3")
        torch.distributed.barrier()
        seen["resume_exit"] = main(["train", *train_argv(workdir, resumed, precision=precision, per_device_train_batch_size=2,
                                                         token_budget=0, resume_from_checkpoint=resumed / "checkpoint-3")])
        # what each process holds while training: one step, nothing saved
        trainer = trainer_for("sharding", [Sharding()], per_device_train_batch_size=2, token_budget=0, max_steps=1,
                              warmup_steps=0, save_strategy="no", eval_data_path="")  # lr 1e-2 at once: LoRA moves
        trainer.train()
        # the sampler view of the sharded, trained model: adapters off, it scores as the 4-bit base
        from dftlite.logprobs import scoring_as_forward
        from dftlite.models import sampler_view

        model, unwrapped = trainer.model_wrapped, trainer.accelerator.unwrap_model(trainer.model_wrapped)
        with torch.no_grad(), scoring_as_forward(unwrapped):
            with sampler_view(unwrapped):
                seen["sampler_logps"] = model(*PROBE)[0].tolist()
            seen["trained_logps"] = model(*PROBE)[0].tolist()
        (workdir / f"rank{rank}.json").write_text(json.dumps(seen))
        torch.distributed.destroy_process_group()
        return
    # (b) process 1's adapter turns NaN before step 3: both processes must raise, before saving step 3
    trainer = trainer_for("nan", [OnProcessOne(2, poison)], per_device_train_batch_size=2, save_steps=1)
    try:
        trainer.train()
    except NonFiniteLossError as err:
        seen["nan"] = str(err)
    # (c) Ctrl-C on process 1 only, as step 2 begins: both stop after step 2 and save checkpoint-2
    sigint = OnProcessOne(1, lambda model: os.kill(os.getpid(), signal.SIGINT))
    trainer = trainer_for("interrupted", [sigint], per_device_train_batch_size=2, save_strategy="no")
    trainer.train()
    seen["interrupted_at"] = trainer.interrupt.stopped_at
    # (d) 8 examples do not fill global batches of 2 × 3
    try:
        trainer_for("uneven", per_device_train_batch_size=3)
    except ConfigError as err:
        seen["uneven"] = str(err)
    (workdir / f"rank{rank}.json").write_text(json.dumps(seen))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[2].startswith("fsdp") and not ON_CUDA:
        _fsdp_on_cpu()
    drive(Path(sys.argv[1]), sys.argv[2])
    sys.exit(0)


# ---- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(LAUNCHES))
def runs(request, tiny_model_dir, tmp_path_factory):
    """Pools, the 2-process launch, and the 1-process run of the same global batch (S = 4); (workdir, launch)."""
    from dftlite.cli import main
    from dftlite.data import DataConfig
    from dftlite.models import ModelConfig, load_model
    from dftlite.sampling import SampleConfig, sample_pool

    launch = request.param
    config_name, precision, _ = LAUNCHES[launch]
    workdir = tmp_path_factory.mktemp(launch)
    shutil.copytree(tiny_model_dir, workdir / "model")
    write_jsonl(workdir / "train.jsonl", _rows(TRAIN_PAIRS))
    write_jsonl(workdir / "eval.jsonl", _rows(EVAL_PAIRS))
    model_config = ModelConfig(model_name_or_path=str(workdir / "model"), precision="fp32", lora_r=8)
    model, tokenizer = load_model(model_config)
    for data, pool, negatives in (("train", "pool", 8), ("eval", "eval_pool", 2)):
        sample = SampleConfig(pool_dir=str(workdir / pool), num_negatives=negatives, max_new_tokens=10)
        sample_pool(model_config, DataConfig(data_path=str(workdir / f"{data}.jsonl")), sample, model, tokenizer)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / config_name),
               "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               __file__, str(workdir), launch]
    launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = launcher.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        launcher.terminate()  # SIGTERM, which torchrun passes on to the processes it started (SIGKILL would orphan them)
        output, _ = launcher.communicate(timeout=60)
        pytest.fail(f"accelerate launch still running after {LAUNCH_TIMEOUT_S} s (a hang?):\n{output[-8000:]}")
    assert launcher.returncode == 0, f"accelerate launch failed ({launcher.returncode}):\n{output[-8000:]}"

    assert main(["train", *train_argv(workdir, workdir / "one", precision=precision, per_device_train_batch_size=4)]) == 0
    return workdir, launch


def _history(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(output_dir / "log_history.jsonl")]


def _steps(output_dir: Path) -> dict[int, dict]:
    return {entry["step"]: entry for entry in _history(output_dir) if "loss" in entry}


def _final_eval(output_dir: Path) -> dict:
    return [entry for entry in _history(output_dir) if "eval_loss" in entry][-1]


def _assert_same_run(run: Path, reference: Path, steps, launch: str):
    """Per-step metrics, the final evaluation, the u table and draw state, and the adapter agree."""
    got, want = _steps(run), _steps(reference)
    for step in steps:
        for key in STEP_KEYS:
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4, abs=1e-6), (step, key)
    got_eval, want_eval = _final_eval(run), _final_eval(reference)
    for key in EVAL_KEYS:
        assert got_eval[key] == pytest.approx(want_eval[key], rel=1e-4, abs=1e-6), key
    state = load_file(str(run / "dft_state.safetensors"))
    reference_state = load_file(str(reference / "dft_state.safetensors"))
    assert torch.equal(state["visits"], reference_state["visits"]) and state["visits"].sum() == 16  # 4 steps × 4 prompts
    assert torch.equal(state["draws_taken"], reference_state["draws_taken"])
    assert torch.allclose(state["log_u"], reference_state["log_u"], rtol=1e-6, atol=1e-5)
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    reference_adapter = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    assert adapter.keys() == reference_adapter.keys()
    # FSDP reduce-scatters the gradients in another order than DDP's all-reduce; Adam turns the rounding of
    # near-zero gradient entries into steps of up to lr (1e-2) × rounding: measured 6e-6 in the adapter with
    # each answer's own prompt copy, 1.8e-5 with the prompt shared (share_prompt, a packed row's other kernels)
    atol = 5e-5 if launch == "fsdp_qlora" else 1e-6
    worst = max((adapter[k] - reference_adapter[k]).abs().max().item() for k in adapter)
    assert all(torch.allclose(adapter[k], reference_adapter[k], rtol=1e-4, atol=atol) for k in adapter), worst


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    workdir, launch = runs
    _assert_same_run(workdir / "two", workdir / "one", range(1, 5), launch)
    checkpoint = workdir / "two" / "checkpoint-3"  # written by process 0, holding both processes' u and draws
    assert sorted(p.name for p in checkpoint.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    state = load_file(str(checkpoint / "dft_state.safetensors"))
    assert state["visits"].sum() == 12 and state["draws_taken"].sum() == 12  # 3 steps × 4 prompts
    assert sorted(state["visits"].tolist()) == [1, 1, 1, 1, 2, 2, 2, 2]  # mid epoch 2


def test_two_process_checkpoint_resumes_on_one_process(runs):
    from dftlite.cli import main

    workdir, launch = runs
    resumed = workdir / "resumed"
    shutil.copytree(workdir / "two" / "checkpoint-3", resumed / "checkpoint-3")
    argv = train_argv(workdir, resumed, precision=LAUNCHES[launch][1], per_device_train_batch_size=4,
                      resume_from_checkpoint=resumed / "checkpoint-3")
    assert main(["train", *argv]) == 0
    assert sorted(_steps(resumed)) == [1, 2, 3, 4]  # 1-3 from the 2-process run's trainer_state.json
    _assert_same_run(resumed, workdir / "one", range(1, 5), launch)


def _skip_unless(runs, launch: str):
    if runs[1] != launch:
        pytest.skip(f"run in the {launch} launch only")


def test_fsdp_shards_the_4bit_base_and_resumes_on_two_processes(runs):
    _skip_unless(runs, "fsdp_qlora")
    workdir, _ = runs
    seen = [json.loads((workdir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["train_exit"] for s in seen] == [0, 0] and [s["resume_exit"] for s in seen] == [0, 0]
    for sharding in (s["sharding"] for s in seen):
        assert sharding["wrapper"] == "FSDPPeftModelForCausalLM"  # FSDP2's fully_shard, not DDP
        # every linear layer's packed 4-bit weight (7 per layer × 2 layers), half of it on each process,
        # stored as float32 elements (the compute dtype on CPU), which FSDP shards; uint8 it would not
        assert sharding["base_weights"] == sharding["sharded_base_weights"] == 14
        # compute dtype "auto": float32 on CPU, bfloat16 on GPUs of compute capability >= 8
        assert sharding["storage_dtype"] == ("torch.bfloat16" if ON_CUDA else "torch.float32")
    # weights only as safetensors: the adapter once, no pickle of it (accelerate's pytorch_model_fsdp.bin);
    # the optimizer's moments and the scheduler are torch.save'd, as in every Trainer checkpoint
    files = sorted(p.name for p in (workdir / "two" / "checkpoint-3").iterdir())
    assert "adapter_model.safetensors" in files and not [f for f in files if f.endswith(".bin") and f != "optimizer.bin"]
    assert sorted(_steps(workdir / "resumed_on_two")) == [1, 2, 3, 4]
    _assert_same_run(workdir / "resumed_on_two", workdir / "one", range(1, 5), "fsdp_qlora")


def test_fsdp_sampler_view_is_the_4bit_base(runs):
    """Adapters off, the sharded model after a training step scores as the 4-bit base loaded in one process."""
    _skip_unless(runs, "fsdp_qlora")
    from dftlite.logprobs import sequence_logprobs
    from dftlite.models import ModelConfig, load_model

    workdir, _ = runs
    base, _ = load_model(ModelConfig(model_name_or_path=str(workdir / "model"), precision="4bit", lora_r=0))
    with torch.no_grad():
        want = sequence_logprobs(base.eval(), *PROBE)[0]
    for rank in (0, 1):
        seen = json.loads((workdir / f"rank{rank}.json").read_text())
        assert torch.allclose(torch.tensor(seen["sampler_logps"]), want, rtol=1e-5, atol=1e-5), (seen, want)
        assert not torch.allclose(torch.tensor(seen["trained_logps"]), want, rtol=1e-5, atol=1e-5)  # LoRA moved it


def test_a_nan_or_ctrl_c_on_one_process_stops_both(runs):
    _skip_unless(runs, "ddp")
    workdir, _ = runs
    seen = [json.loads((workdir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["train_exit"] for s in seen] == [0, 0]
    # NaN on process 1 in step 3: process 1 names it, process 0 sees the NaN gradients it received
    assert seen[1]["nan"].startswith("step 3: non-finite positive log-probs")
    assert seen[0]["nan"].startswith("step 3: non-finite gradients")
    assert sorted(p.name for p in (workdir / "nan").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    # Ctrl-C on process 1 only: both stop after the same step, and its checkpoint is complete
    assert [s["interrupted_at"] for s in seen] == [2, 2]
    checkpoint = workdir / "interrupted" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file()
    assert load_file(str(checkpoint / "dft_state.safetensors"))["visits"].sum() == 8  # 2 steps × 4 prompts


def test_data_that_does_not_fill_global_batches_is_refused(runs):
    _skip_unless(runs, "ddp")
    workdir, _ = runs
    for rank in (0, 1):
        message = json.loads((workdir / f"rank{rank}.json").read_text())["uneven"]
        assert "global batches of 6 prompts" in message and "dataloader_drop_last: true" in message


@pytest.mark.parametrize("path", sorted(ACCELERATE_CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_accelerate_configs_load(path):
    """accelerate reads each config; its nested keys are launch options; its first line is its command."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(str(path))  # unknown top-level keys are errors here
    options = {action.dest for action in launch_command_parser()._actions}
    nested = {**{k if k.startswith("fsdp_") else f"fsdp_{k}": v for k, v in (config.fsdp_config or {}).items()},
              **(config.deepspeed_config or {})}
    assert set(nested) <= options, sorted(set(nested) - options)
    assert config.mixed_precision == "bf16" and config.num_processes >= 2
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith(f"# accelerate launch --config_file configs/accelerate/{path.name} -m dftlite.cli train")
