"""One prepared GPU check: environment, the GPU tests, step cost, sampling throughput, the T4 goal, prefix sharing.

    python benchmarks/gpu_check.py --out OUT            # on a CUDA machine: all stages, at most 470 s of caps
    python benchmarks/gpu_check.py --tiny --out OUT     # CPU smoke run of every code path (< 1 min; in make test)
    python benchmarks/gpu_check.py --out OUT --stages environment,t4_goal_llama_8b

Writes OUT/gpu_check.json (every stage's status, seconds and figures) and OUT/gpu_check.md (the
same as tables), plus OUT/<stage>.log (each stage's output) and OUT/gpu_tests.xml (pytest's report).
On a CUDA machine, a run without --tiny also writes its gpu_check.json to --record (default
docs/gpu_check.json in this repository), the committed place for the raw file behind
docs/benchmarks.md's GPU figures; where the check runs in a copy of the tree (a lent machine), copy
OUT/gpu_check.json there instead. --record '' writes no copy; a run of some --stages overwrites it too.
Exit status 0 when no stage failed ("skipped" is not a failure). The command that carries the
wheels a bare GPU machine lacks is in docs/benchmarks.md ("GPU check").

Stages; each runs in its own process under a time cap (a crash, OOM or hang costs that stage only;
the script goes on with the next), and each writes what it has measured so far as it goes:

1. environment: GPU, memory, versions of torch, CUDA, bitsandbytes, transformers, peft, trl.
2. gpu_tests: `pytest -m gpu tests/test_gpu.py` (autocast scoring vs float64, the 4-bit sampler
   view after training, chunked vs naive peak memory).
3. step_cost_*: DFT2 QLoRA against SFT (benchmarks/step_cost.py: one trainer, objectives alternating
   step by step) and against TRL's DPOTrainer (benchmarks/vs_trl_dpo.py), on the same sequences;
   a SmolLM2-135M-shaped and a Llama-3.2-1B-shaped model. Tokens/s and peak memory per side.
4. sampling: `sample_pool` (what `dftlite sample` runs) against a per-completion generate loop
   (benchmarks/sampling_throughput.py), SmolLM2-135M shape, bf16.
5. t4_goal_llama_8b: one DFT2 QLoRA optimizer step of a Llama-3-8B-shaped model (NF4, fp16 compute
   as on a T4, S = 1 prompt with B = 2 negatives, three 1024-token sequences, gradient checkpointing)
   with the process capped at 15 GiB by torch.cuda.set_per_process_memory_fraction: peak memory,
   tokens/s and MFU. One untimed warm-up step (AdamW's state, kernel choice), then T4_TIMED_STEPS
   timed steps, of which the median is reported.
6. fsdp_qlora_2gpu: tests/test_multiprocess.py's FSDP launch on 2 GPUs (NCCL, bf16 compute): 2 processes
   of a 4-bit tiny Llama train, checkpoint and resume like 1. Skipped with fewer than 2 GPUs.
7. prefix_sharing_llama_8b: benchmarks/prefix_sharing_cost.py's step (DFT2, each prompt computed once for its
   1+B answers against every answer with its own copy) on the Llama-3-8B shape, NF4 with bf16 autocast,
   gradient checkpointing, random token ids of two shapes: the CPU recipe's GSM8K groups (S 4, B 2, prompt
   95, gold 130, negatives 119 tokens) and a long prompt (S 2, B 2, prompt 1024, answers 128): step seconds,
   peak memory and tokens computed per side, one warm-up round and PREFIX_ROUNDS measured, sides alternating.

Models are random-initialised at the real shapes (`common.SHAPES`) with a synthetic tokenizer of the
right vocabulary size (`common.synthetic_tokenizer`): speed and memory do not depend on the weights,
and a GPU machine without network cannot download any. They are written once under --work_dir
(default /tmp/dftlite-gpu-check; the 8B model takes 16 GB there), never under --out.

--tiny: every shape becomes `common.TINY_SHAPE`, steps and lengths shrink, stages run in this process
(no per-stage interpreter start-up), and stages that need CUDA report "skipped: no CUDA" on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ElementTree
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402  (puts the repository on sys.path too)

import torch  # noqa: E402

# (name, what it measures, time cap in seconds on a GPU machine); the caps add up to 500 s (the first H200 run,
# under caps of 20/50/60/100/50/170 s, took 18, 44, >60, 69, >50 and 55 s), which leaves 40 s of the command's
# 540 s limit (docs/benchmarks.md, "The command") for installing the wheels and starting the interpreter.
# fsdp_qlora_2gpu skips at once with fewer than 2 GPUs, so its 150 s count only on a 2-GPU machine.
# vllm_sampling needs vLLM on the machine (no wheel of it fits the 64 MiB that travels); without it, it is skipped.
STAGES = (
    ("environment", "Environment", 20),
    ("gpu_tests", "GPU tests (pytest -m gpu)", 50),
    ("step_cost_smollm2_135m", "Step cost, SmolLM2-135M shape: DFT2 vs SFT vs TRL DPO", 100),
    ("step_cost_llama_1b", "Step cost, Llama-3.2-1B shape: DFT2 vs SFT vs TRL DPO", 80),
    ("sampling", "Sampling throughput: sample_pool vs a generate loop", 70),
    ("vllm_sampling", "Sampling engines: HF generate vs vLLM, one pool", 80),
    ("t4_goal_llama_8b", "T4 goal: DFT2 QLoRA step of a Llama-3-8B shape in 15 GiB", 100),
    ("fsdp_qlora_2gpu", "FSDP-QLoRA on 2 GPUs: 2 processes train, checkpoint and resume like 1", 150),
    ("prefix_sharing_llama_8b", "Prefix-shared scoring: a DFT2 QLoRA step of a Llama-3-8B shape, shared vs unshared", 90),
)
# fsdp_qlora_2gpu (150 s) and prefix_sharing_llama_8b (90 s) bring the caps to 740 s, over one 540 s command: on a
# lent machine run them in a command of their own (--stages fsdp_qlora_2gpu,prefix_sharing_llama_8b; the latter
# reuses t4_goal's 8B model when it is there).
T4_MEMORY_BYTES = 15 * 2**30  # a T4 shows 15360 MiB to PyTorch
PREFIX_ROUNDS = 3  # prefix_sharing_llama_8b: measured rounds (one step per shape and side each)
T4_TIMED_STEPS = 5  # after one warm-up step; about 0.8 s each on an H200, so a real median costs seconds
RECORD = common.REPO / "docs" / "gpu_check.json"  # the committed copy of a full run's gpu_check.json
# dense fp16/bf16 tensor-core peak (FLOP/s) for MFU; name fragments as torch.cuda.get_device_name gives them
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
              "T4": 65e12, "V100": 125e12}


class Skip(Exception):
    """The stage does not apply here (e.g. needs CUDA); its message is the reason."""


class Progress:
    """A stage's result so far, rewritten to OUT/<stage>.json after every update, so a stage that
    runs out of time still reports what it measured."""

    def __init__(self, path: Path):
        self.path, self.result = path, {}

    def update(self, **figures):
        self.result.update(common.rounded(figures))
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.result, indent=1, default=str))
        partial.replace(self.path)


# ---- the stages ------------------------------------------------------------------------------


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def stage_environment(args, progress: Progress):
    from dftlite.models import native_bf16

    progress.update(python=sys.version.split()[0], commit=common.commit(), machine=common.machine(),
                    cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda,
                    versions={name: package_version(name) for name in (
                        "torch", "bitsandbytes", "transformers", "peft", "trl", "accelerate", "datasets",
                        "pyarrow", "tokenizers", "safetensors", "pytest")})
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        progress.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_mib=props.total_memory / common.MIB,
                        compute_capability=f"{props.major}.{props.minor}", native_bf16=native_bf16(),
                        torch_says_bf16_supported=torch.cuda.is_bf16_supported())
    try:  # importable is not enough: bitsandbytes loads its CUDA library at import
        import bitsandbytes  # noqa: F401

        progress.update(bitsandbytes_import="ok")
    except Exception as err:  # any import-time failure is a finding, not a crash of this stage
        progress.update(bitsandbytes_import=f"{type(err).__name__}: {err}")


def stage_gpu_tests(args, progress: Progress):
    if not torch.cuda.is_available():
        raise Skip("no CUDA")
    report = Path(args.out) / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
               f"--junitxml={report}", "tests/test_gpu.py"]
    done = subprocess.run(command, cwd=common.REPO, capture_output=True, text=True)
    print(done.stdout[-6000:], done.stderr[-3000:], sep="\n")
    tests = {}
    if report.is_file():
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            tests[case.get("name")] = {"outcome": outcome, "seconds": float(case.get("time", 0))}
    progress.update(exit_status=done.returncode, tests=tests, summary=(done.stdout.strip().splitlines() or [""])[-1])
    if done.returncode != 0:
        raise RuntimeError(f"pytest exit {done.returncode}: {progress.result['summary']}")


def step_cost_stage(shape: str):
    def stage(args, progress: Progress):
        import step_cost

        work = Path(args.work_dir)
        model = common.shaped_model(shape, work, tiny=args.tiny)
        progress.update(model=Path(model).name, device="cuda" if common.on_cuda() else "cpu")
        shared = dict(layers=0, model=model, precision="4bit", num_prompts=2, max_length=128 if args.tiny else 512,
                      max_new_tokens=16 if args.tiny else 128, threads=0, work_dir=str(work))
        # DFT2 vs SFT (and DFT): one trainer, objectives switched step by step, S=2 prompts x B=2 negatives
        result = step_cost.run(argparse.Namespace(**shared, negatives=2, rounds=1 if args.tiny else 4,
                                                  warmup_rounds=0 if args.tiny else 1))
        tokens = result["step"]["tokens"]
        progress.update(vs_sft={
            "sequences_per_step": result["step"]["sequences"], "tokens_per_step": tokens,
            "tokens_per_s": {side: tokens / seconds for side, seconds in result["median"]["seconds"].items()},
            "peak_mib": result["median"]["peak_mib"], "ratios": {k: v for k, v in result["ratios"].items()
                                                                 if k.endswith(("_seconds", "peak_mib"))}})
        # DFT2 vs TRL DPO: S=2 pairs, B=1, the same 2S token sequences on both sides
        try:
            import datasets  # noqa: F401
            import trl  # noqa: F401
        except Exception as err:
            progress.update(vs_trl_dpo=f"skipped: TRL's DPOTrainer needs datasets (with pyarrow and pandas): "
                                       f"{type(err).__name__}: {err}")
            return
        import vs_trl_dpo

        compared = vs_trl_dpo.compare(
            argparse.Namespace(**shared, sides="dft2,trl_dpo", rounds=1 if args.tiny else 2, steps=1 if args.tiny else 3,
                               warmup_steps=0 if args.tiny else 1, malloc_mmap_threshold=0, child=None),
            run_side=vs_trl_dpo.side_in_process)
        tokens = compared["step"]["tokens"]
        progress.update(vs_trl_dpo={
            "trl": compared["trl"], "tokens_per_step": tokens,
            "tokens_per_s": {side: tokens / figures["median_seconds"] for side, figures in compared["sides"].items()},
            "peak_mib": {side: figures["median_peak_mib"] for side, figures in compared["sides"].items()},
            "ratios": {k: v for k, v in compared["ratios"].items() if k.endswith(("_seconds", "_peak_mib"))}})
    return stage


def stage_sampling(args, progress: Progress):
    import sampling_throughput

    from dftlite.models import ModelConfig, load_model

    model_dir = common.shaped_model("smollm2-135m", Path(args.work_dir), tiny=args.tiny)
    model_config = ModelConfig(model_name_or_path=model_dir, precision="bf16" if common.on_cuda() else "fp32", lora_r=0)
    model, tokenizer = load_model(model_config)
    progress.update(model=Path(model_dir).name, precision=model_config.precision)
    progress.update(**sampling_throughput.measure(model, tokenizer, model_config, prompts=2 if args.tiny else 4,
                                                  num_negatives=2 if args.tiny else 4,
                                                  max_new_tokens=8 if args.tiny else 64, work_dir=args.work_dir))


def stage_vllm_sampling(args, progress: Progress):
    """benchmarks/engine_throughput.py on the 135M shape: both engines draw the same pool."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise Skip("no vllm")
    import engine_throughput

    model_dir = common.shaped_model("smollm2-135m", Path(args.work_dir), tiny=args.tiny)
    progress.update(model=Path(model_dir).name)
    progress.update(**engine_throughput.compare(model_dir, "bf16" if common.on_cuda() else "fp32",
                                                prompts=4 if args.tiny else 256, num_negatives=2,
                                                max_new_tokens=8 if args.tiny else 128))


def stage_t4_goal(args, progress: Progress):
    """One DFT2 QLoRA step of an 8B Llama under a 15 GiB cap: the computation of DFTTrainer's step
    (fp16 autocast around chunked scoring, dft2_loss, backward, clip, AdamW with a grad scaler, as
    Trainer's fp16 mode does) on fixed sequences, without the Trainer's bookkeeping or a pool."""
    if not torch.cuda.is_available():
        raise Skip("no CUDA")
    from dftlite.logprobs import sequence_logprobs
    from dftlite.losses import dft2_loss
    from dftlite.models import ModelConfig, load_model

    started = time.perf_counter()
    model_dir = common.shaped_model("llama-3-8b", Path(args.work_dir), tiny=args.tiny)  # tiny: make test on a GPU machine
    progress.update(model=Path(model_dir).name, build_seconds=time.perf_counter() - started)
    gc.collect()
    torch.cuda.empty_cache()
    progress.update(allocated_before_load_mib=torch.cuda.memory_allocated() / common.MIB)  # ~0: the cap is all the step's
    total = torch.cuda.get_device_properties(0).total_memory
    # the cap covers PyTorch's allocator; the CUDA context (~0.5 GiB) comes on top, on a T4 too
    torch.cuda.set_per_process_memory_fraction(min(1.0, T4_MEMORY_BYTES / total))
    torch.cuda.reset_peak_memory_stats()
    progress.update(cap_mib=T4_MEMORY_BYTES / common.MIB, gpu_memory_mib=total / common.MIB)

    started = time.perf_counter()
    config = ModelConfig(model_name_or_path=model_dir, precision="4bit", compute_dtype="fp16", lora_r=16, lora_alpha=32)
    model, _ = load_model(config, gradient_checkpointing=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    base = model.get_base_model()
    # matmul parameters of the base (input embedding excluded: a lookup, no FLOPs)
    matmul_params = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for n, p in base.named_parameters()
                        if "embed_tokens" not in n)  # NF4 packs 2 weights per uint8
    progress.update(load_seconds=time.perf_counter() - started, loaded_mib=torch.cuda.memory_allocated() / common.MIB,
                    lora_params=sum(p.numel() for p in params), base_matmul_params=matmul_params)

    num_prompts, negatives, length, prompt_length = 1, 2, 64 if args.tiny else 1024, 16 if args.tiny else 128  # S, B, T, prompt
    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (num_prompts * (1 + negatives), length), generator=generator).cuda()  # (N, T)
    input_ids[1:, :prompt_length] = input_ids[0, :prompt_length]  # one prompt, three completions
    attention_mask = torch.ones_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, prompt_length:] = 1
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            logps, counts = sequence_logprobs(model, input_ids, attention_mask, completion_mask)  # (N,), (N,)
        scores = (logps / counts).view(num_prompts, 1 + negatives)  # (S, 1+B) per-token mean log-probs
        # log u = 0: the u table's default init "one"
        loss, _, _ = dft2_loss(scores[:, 0], scores[:, 1:], torch.zeros(num_prompts, dtype=torch.float64))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return loss.item()

    seconds = []  # seconds[0]: the warm-up step, which allocates AdamW's state and picks kernels: not timed
    timed_steps = 2 if args.tiny else T4_TIMED_STEPS
    try:
        for number in range(1 + timed_steps):
            started = time.perf_counter()
            loss = step()
            seconds.append(time.perf_counter() - started)
            progress.update(fits_15gib=True, step_seconds=seconds, loss=loss,
                            peak_allocated_mib=torch.cuda.max_memory_allocated() / common.MIB,
                            peak_reserved_mib=torch.cuda.max_memory_reserved() / common.MIB)
    except torch.cuda.OutOfMemoryError as err:
        progress.update(fits_15gib=False, out_of_memory=str(err).splitlines()[0],
                        peak_allocated_mib=torch.cuda.max_memory_allocated() / common.MIB)
        return
    timed = common.median(seconds[1:])  # a real median: of timed_steps steps after the warm-up
    tokens = input_ids.numel()
    # 4·N·D: forward (2N per token) + activation gradients (2N); the frozen NF4 base gets no weight
    # gradients, and checkpointing's recomputed forward and attention's T² terms are not counted
    flops = 4 * matmul_params * tokens
    peak_flops = next((value for name, value in PEAK_FLOPS.items() if name in torch.cuda.get_device_name()), None)
    progress.update(sequences=tuple(input_ids.shape), tokens_per_step=tokens, warmup_step_seconds=seconds[0],
                    timed_steps=len(seconds) - 1, median_step_seconds=timed,
                    tokens_per_s=tokens / timed, model_tflops_per_s=flops / timed / 1e12,
                    mfu=flops / timed / peak_flops if peak_flops else None, peak_flops_assumed=peak_flops)


def stage_fsdp_qlora_2gpu(args, progress: Progress):
    """tests/test_multiprocess.py's FSDP launch (configs/accelerate/fsdp_qlora.yaml, 4-bit tiny Llama) on 2 GPUs."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        raise Skip(f"needs 2 GPUs, found {count}")
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_multiprocess.py",
               "-k", "fsdp_qlora and not yaml"]
    done = subprocess.run(command, cwd=common.REPO, capture_output=True, text=True,
                          env={**os.environ, "DFTLITE_MULTIPROCESS_ON_CUDA": "1"})
    print(done.stdout[-6000:], done.stderr[-3000:], sep="\n")
    progress.update(gpus=count, exit_status=done.returncode, summary=(done.stdout.strip().splitlines() or [""])[-1])
    if done.returncode != 0:
        raise RuntimeError(f"pytest exit {done.returncode}: {progress.result['summary']}")


def stage_prefix_sharing(args, progress: Progress):
    """Shared vs unshared prompt scoring, one DFT2 QLoRA step each, on an 8B Llama (no memory cap).
    --tiny without CUDA: the tiny shape in fp32 on the CPU, so make test runs this code too."""
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise Skip("no CUDA")
    import prefix_sharing_cost

    from dftlite.draws import Group
    from dftlite.models import ModelConfig, load_model

    model_dir = common.shaped_model("llama-3-8b", Path(args.work_dir), tiny=args.tiny)
    config = ModelConfig(model_name_or_path=model_dir, precision="4bit" if cuda else "fp32", compute_dtype="bf16",
                         lora_r=16, lora_alpha=32)
    model, _ = load_model(config, gradient_checkpointing=True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab, scale = model.get_base_model().config.vocab_size, (8 if args.tiny else 1)
    generator = torch.Generator().manual_seed(0)

    def ids(length):
        return torch.randint(3, vocab, (max(1, length // scale),), generator=generator).tolist()

    # (S, prompt, gold, negative lengths, B)
    shapes = {"gsm8k": (4, 95, 130, 119, 2), "long_prompt": (2, 1024, 128, 128, 2)}
    groups = {name: [Group(str(i), ids(prompt), [ids(gold)] + [ids(negative) for _ in range(negatives)], [])
                     for i in range(prompts)] for name, (prompts, prompt, gold, negative, negatives) in shapes.items()}
    runs = [(name, side) for name in shapes for side in ("shared", "unshared")]
    figures = {name: {side: [] for side in ("shared", "unshared")} for name in shapes}
    rounds = 1 if args.tiny else PREFIX_ROUNDS
    for number in range(1 + rounds):  # round 0: warm-up (AdamW's state, kernel choice)
        for name, side in runs[number % len(runs):] + runs[:number % len(runs)]:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                step = prefix_sharing_cost.step(model, optimizer, groups[name], side == "shared", 0, 0,
                                                "cuda" if cuda else "cpu")
            if number:
                figures[name][side].append(step)
        result = {}
        for name in shapes:
            sides = figures[name]
            if not sides["shared"]:
                continue
            result[name] = {"shape": dict(zip(("S", "prompt", "gold", "negative", "B"), shapes[name])),
                            "median": {side: {f: common.median([r[f] for r in sides[side]]) for f in sides[side][0]}
                                       for side in sides},
                            "shared_over_unshared_seconds": common.median(
                                [a["seconds"] / b["seconds"] for a, b in zip(sides["shared"], sides["unshared"])])}
        progress.update(rounds_done=number, **result)


RUNNERS = {"environment": stage_environment, "gpu_tests": stage_gpu_tests,
           "step_cost_smollm2_135m": step_cost_stage("smollm2-135m"), "step_cost_llama_1b": step_cost_stage("llama-3.2-1b"),
           "sampling": stage_sampling, "vllm_sampling": stage_vllm_sampling, "t4_goal_llama_8b": stage_t4_goal,
           "fsdp_qlora_2gpu": stage_fsdp_qlora_2gpu, "prefix_sharing_llama_8b": stage_prefix_sharing}


# ---- running stages --------------------------------------------------------------------------


def run_stage(name: str, args) -> tuple[str, dict]:
    """Run one stage in this process; return (status, result). Status: ok, skipped: ..., failed: ..."""
    progress = Progress(Path(args.out) / f"{name}.json")
    try:
        RUNNERS[name](args, progress)
        return "ok", progress.result
    except Skip as reason:
        return f"skipped: {reason}", progress.result
    except BaseException as err:  # SystemExit from a benchmark's own checks counts as a failure too
        if isinstance(err, KeyboardInterrupt):
            raise
        traceback.print_exc()
        line = (str(err).strip().splitlines() or [""])[0][:300]
        return f"failed: {type(err).__name__}: {line}", progress.result


def run_stage_in_subprocess(name: str, cap: int, args) -> tuple[str, dict]:
    """The stage in its own process (own CUDA context, own memory cap), killed after `cap` seconds."""
    out = Path(args.out)
    command = [sys.executable, __file__, "--stage", name, "--out", str(out), "--work_dir", args.work_dir]
    command += ["--tiny"] if args.tiny else []
    with open(out / f"{name}.log", "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            child.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # its own session: pytest's or a side's children go too
            child.wait()
    verdict = out / f"{name}.status.json"
    partial = out / f"{name}.json"
    result = json.loads(partial.read_text()) if partial.is_file() else {}
    if child.returncode == -signal.SIGKILL:
        return f"failed: time cap of {cap} s reached", result
    if not verdict.is_file():
        tail = (out / f"{name}.log").read_text().strip().splitlines()[-1:] or [""]
        return f"failed: exit {child.returncode}: {tail[0][:300]}", result
    return json.loads(verdict.read_text())["status"], result


def markdown(summary: dict) -> str:
    lines = [f"# gpu_check ({'tiny, ' if summary['tiny'] else ''}commit {summary['commit']})", "",
             f"Device: {summary['device']}. Total {summary['seconds']:.0f} s.", "",
             "| stage | status | seconds |", "|---|---|---|"]
    for stage in summary["stages"]:
        lines.append(f"| {stage['name']} | {stage['status']} | {stage['seconds']:.1f} |")
    for stage in summary["stages"]:
        lines += ["", f"## {stage['title']}", ""]
        lines += [f"- **{key}**: `{json.dumps(value, default=str)}`" for key, value in stage["result"].items()] or ["(no figures)"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md and the stage logs")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and few steps: a CPU smoke run in < 1 min")
    parser.add_argument("--stages", default=",".join(name for name, _, _ in STAGES), help="comma-separated subset")
    parser.add_argument("--work_dir", default="/tmp/dftlite-gpu-check",
                        help="where the random-initialised models and pools are written (16 GB for the 8B model)")
    parser.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                        help="each stage in its own process under its time cap (auto: yes, except with --tiny)")
    parser.add_argument("--record", default=None,
                        help="also write gpu_check.json here, the committed copy beside docs/benchmarks.md's figures "
                             "(default: docs/gpu_check.json on a CUDA machine without --tiny, else none; '' = none)")
    parser.add_argument("--stage", choices=list(RUNNERS), help="(internal) run one stage in this process")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, anywhere
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.stage:  # a child: run the stage, record its verdict
        status, _ = run_stage(args.stage, args)
        (out / f"{args.stage}.status.json").write_text(json.dumps({"status": status}))
        return

    chosen = args.stages.split(",")
    unknown = sorted(set(chosen) - set(RUNNERS))
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {list(RUNNERS)}")
    isolate = args.isolate == "yes" or (args.isolate == "auto" and not args.tiny)
    default_record = RECORD if torch.cuda.is_available() and not args.tiny else None
    record = Path(args.record) if args.record else (default_record if args.record is None else None)
    summary = {"tiny": args.tiny, "commit": common.commit(), "command": " ".join(sys.argv),
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "stages": [], "seconds": 0.0}
    begun = time.perf_counter()
    for name, title, cap in STAGES:
        if name not in chosen:
            continue
        print(f"[gpu_check] {name} (cap {cap} s) ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        if isolate:
            status, result = run_stage_in_subprocess(name, cap, args)
        else:
            with open(out / f"{name}.log", "w") as log, contextlib.redirect_stdout(log):
                status, result = run_stage(name, args)
        seconds = time.perf_counter() - started
        print(f"[gpu_check] {name}: {status} ({seconds:.1f} s)", file=sys.stderr, flush=True)
        summary["stages"].append({"name": name, "title": title, "status": status, "seconds": seconds,
                                  "cap_seconds": cap, "result": result})
        summary["seconds"] = time.perf_counter() - begun
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))  # after every stage
        if record:
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps(summary, indent=1, default=str))
        (out / "gpu_check.md").write_text(markdown(summary))
    print(markdown(summary))
    sys.exit(1 if any(stage["status"].startswith("failed") for stage in summary["stages"]) else 0)


if __name__ == "__main__":
    main()
