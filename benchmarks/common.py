"""Shared parts of the benchmarks; not run on its own.

- the machine and commit every figure is reported with (every benchmark);
- the benchmark model: the embedded SmolLM2-135M-Instruct, or its first `layers` decoder
  layers with the real embeddings, vocabulary (49152) and tokenizer, saved once under the
  work directory (2 shared CPU cores are too slow for the full 30 layers: ~70-120 s per step);
- the GSM8K prompts and a negative pool sampled from the benchmark model itself;
- peak memory (`reset_peak`, then `peak`): on CUDA `torch.cuda.max_memory_allocated`, on CPU the
  kernel's resident-set high-water mark (VmHWM), reset through /proc/self/clear_refs (tracemalloc
  does not see PyTorch's CPU allocations); `logprob_memory.py` measures one forward + backward so;
- `StepMeter`, a Trainer callback that times each optimizer step (forward, backward, clip,
  optimizer, scheduler) and records its peak memory (`step_cost.py`, `vs_trl_dpo.py`).
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python benchmarks/x.py` from a checkout without installing

import dftlite  # noqa: E402, F401  before transformers: it quiets bitsandbytes' Hub-kernel lookup at import
import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

GSM8K = REPO / "dftlite" / "resources" / "gsm8k" / "train.jsonl"
MIB = 2**20
_process_peak = 0  # bytes: the highest VmHWM seen before a reset_peak


def machine() -> dict:
    info = {"nproc": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    with open("/proc/cpuinfo") as cpuinfo:
        info["cpu"] = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    info["load_average_1m"] = round(os.getloadavg()[0], 2)  # other jobs on the same cores
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def commit() -> str:
    """`git rev-parse --short HEAD`, with "+uncommitted" when the code that made a figure (dftlite/ or
    benchmarks/) has uncommitted changes; edits elsewhere (docs, results) do not change a figure."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+uncommitted" if git("status", "--porcelain", "dftlite", "benchmarks") else "")


def on_cuda() -> bool:
    return torch.cuda.is_available()


def set_threads(threads: int):
    """0 = PyTorch's default. On shared cores 1 thread is steadier (threads wait on each other)."""
    if threads > 0:
        torch.set_num_threads(threads)


# ---- model, data, pool --------------------------------------------------------------------


def benchmark_model(layers: int, work_dir: Path) -> str:
    """The model argument: the embedded alias (layers=0), or a truncated copy with the real vocab."""
    from dftlite.models import DEFAULT_MODEL

    if layers == 0:
        return DEFAULT_MODEL
    target = work_dir / f"smollm2-135m-instruct-{layers}layers"
    if not (target / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        from dftlite.models import load_tokenizer, resolve_model_path

        source = resolve_model_path(DEFAULT_MODEL)
        # from_pretrained with a smaller num_hidden_layers keeps layers 0..layers-1 and drops the rest
        model = AutoModelForCausalLM.from_pretrained(source, num_hidden_layers=layers, dtype=torch.float32)
        model.save_pretrained(target, safe_serialization=True)
        load_tokenizer(source).save_pretrained(target)
    return str(target)


# Random-initialised models of real shapes (gpu_check.py): speed and memory depend on the shape, not the
# weights, and a GPU machine without network cannot download any. Llama architecture throughout
# (SmolLM2 is a Llama); figures from each model's config.json.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
# --tiny: every shape becomes this (CPU, seconds), so the code paths run without their cost
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with exactly `vocab_size` ids and SmolLM2's ChatML template.

    Its merges are learnt from the bundled GSM8K problems (at most 4096 ids, about a second), so
    prompts tokenize to realistic lengths; the rest of the ids are filler entries "<fill_i>", which
    encoding never produces but which decode, as a randomly initialised model samples any id.
    Throughput and memory depend on the vocabulary's size, not its content."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    with open(GSM8K) as handle:
        texts = [text for line, _ in zip(handle, range(2000)) for text in json.loads(line).values()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=min(vocab_size, 4096), special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(bpe.to_str())
    vocab = spec["model"]["vocab"]
    for index in range(len(vocab), vocab_size):
        vocab[f"<fill_{index}>"] = index
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


def shaped_model(shape: str, work_dir: Path, tiny: bool = False) -> str:
    """A local HF directory (safetensors) holding a random-initialised model of SHAPES[shape]; made once.

    On CUDA the model is built on the GPU in bf16 (an 8B model: 16 GB, seconds to initialise; in fp32
    on a CPU it would take minutes), then written to `work_dir`, which dftlite's loader reads as it
    reads any checkpoint (4-bit: quantized while loading). tiny: TINY_SHAPE on the CPU in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    target = Path(work_dir) / (f"{shape}-tiny" if tiny else f"{shape}-random")
    if (target / "config.json").is_file():
        return str(target)
    dims = TINY_SHAPE if tiny else SHAPES[shape]
    tokenizer = synthetic_tokenizer(dims["vocab_size"])
    config = LlamaConfig(**dims, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    device, dtype = ("cuda", torch.bfloat16) if on_cuda() and not tiny else ("cpu", torch.float32)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in bf16 directly, not in fp32 then cast
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    partial = target.with_name(target.name + ".partial")  # a killed run leaves no half-written model behind
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    del model
    gc.collect()  # a model holds reference cycles: without this its 16 GB would outlive `del`
    if on_cuda():
        torch.cuda.empty_cache()
    partial.rename(target)
    return str(target)


def model_argument(args, work_dir: Path) -> str:
    """The benchmarks' model: --model (a local HF directory) if given, else the embedded model cut to --layers."""
    return getattr(args, "model", None) or benchmark_model(args.layers, work_dir)


def model_tag(args) -> str:
    """Short name of the benchmark model for work-directory names (pools of different models must not mix)."""
    model = getattr(args, "model", None)
    return Path(model).name if model else f"L{args.layers}"


def model_description(args) -> str:
    if getattr(args, "model", None):
        return f"{Path(args.model).name} (random init), LoRA r=16 all-linear"
    return f"SmolLM2-135M-Instruct, {args.layers or 30} decoder layers, vocab 49152, LoRA r=16 all-linear"


def keep_4bit_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; return the layers touched.

    bitsandbytes 0.50 on CPUs with AVX512-BF16: the first forward of a Linear4bit in eval mode
    without grad (dftlite's `sampler_view`: pool sampling, DPO's reference, evaluation) repacks
    its weight in place for the fused `gemv_4bit` kernel, and every later forward, training
    included, takes that kernel, which has no autograd formula: gradients through the frozen
    4-bit weights come out wrong (PyTorch warns "an autograd kernel was not registered").
    Needed wherever a model is trained after such a forward; harmless elsewhere."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def repacked_4bit(model) -> bool:
    """Whether any Linear4bit weight was repacked for CPU inference (then its gradients are wrong)."""
    return any(getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
               for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu"))


def gsm8k_data(num_prompts: int, max_length: int):
    """The first `num_prompts` GSM8K training problems, chat template (the shipped recipe's data)."""
    from dftlite.data import DataConfig

    return DataConfig(data_path=str(GSM8K), data_format="gsm8k", template="chat", max_length=max_length,
                      max_examples=num_prompts)


def ensure_pool(model_config, data_config, pool_dir: Path, num_negatives: int, max_new_tokens: int, model, tokenizer):
    """Sample (or reuse) the negatives of the benchmark prompts with the benchmark model itself."""
    from dftlite.pool import PoolMismatchError
    from dftlite.sampling import SampleConfig, sample_pool

    config = SampleConfig(pool_dir=str(pool_dir), num_negatives=num_negatives, max_new_tokens=max_new_tokens)
    try:
        sample_pool(model_config, data_config, config, model, tokenizer)
    except PoolMismatchError:  # made by another dftlite version or model: it is ours to remake (seconds)
        shutil.rmtree(pool_dir)
        sample_pool(model_config, data_config, config, model, tokenizer)
    return str(pool_dir)


def step_shape(split, per_draw: int) -> dict:
    """Sequences of one step over the whole split (the benchmarks train on one fixed batch), first negatives."""
    lengths = []
    for pair, negatives in zip(split.pairs, split.negatives):
        prompt = len(pair.prompt_ids)
        lengths.append(prompt + len(pair.answer_ids))
        lengths += [prompt + len(r["token_ids"]) for r in negatives[:per_draw]]
    return {"sequences": len(lengths), "tokens": sum(lengths), "longest": max(lengths),
            "padded_tokens": len(lengths) * max(lengths)}


# ---- measuring ----------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> int:
    """Free what can be freed, restart the peak counter; return the memory in use now (bytes)."""
    gc.collect()
    if on_cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    global _process_peak
    _process_peak = max(_process_peak, _hwm_bytes())  # the reset below would lose it (ru_maxrss too)
    try:  # hand freed heap back to the kernel, so the next peak is not hidden in reused pages
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := current RSS
    return _rss_bytes()


def peak() -> int:
    """Peak memory (bytes) since the last `reset_peak`."""
    if on_cuda():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _hwm_bytes()


def process_peak_rss_mib() -> float:
    """Peak resident set of this process over its whole life (imports, loading, training).

    Not ru_maxrss: resetting VmHWM through clear_refs resets the kernel's hiwater mark that
    getrusage reads as well, so `reset_peak` carries the maximum over in `_process_peak`."""
    return max(_process_peak, _hwm_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / MIB


class StepMeter(TrainerCallback):
    """Per optimizer step: wall seconds, CPU seconds of this process (all its threads; with other
    jobs on the cores, less disturbed than wall time), memory at its start and its peak (MiB).

    `before_step(step_number)`, if given, runs first in on_step_begin, outside the timed span
    (step_cost.py switches the trainer's objective there)."""

    def __init__(self, before_step=None):
        self.before_step, self.steps = before_step, []
        self._start = self._base = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.before_step is not None:
            self.before_step(state.global_step)
        self._base = reset_peak()
        self._cpu_start = time.process_time()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if on_cuda():
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - self._start, time.process_time() - self._cpu_start
        top = peak()
        self.steps.append({"step": state.global_step, "seconds": seconds, "cpu_seconds": cpu_seconds, "start_mib": self._base / MIB,
                           "peak_mib": top / MIB, "peak_extra_mib": (top - self._base) / MIB})


def add_round_arguments(parser, rounds: int):
    """The options of a side-by-side benchmark that alternates its sides in rounds: how many rounds are
    measured and dropped, torch threads, and where the model and pool are kept."""
    parser.add_argument("--rounds", type=int, default=rounds, help="measured rounds (one step per side each)")
    parser.add_argument("--warmup_rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--work_dir", default=str(REPO / "runs" / "benchmarks"))


def print_result(run, args):
    """`run(args)` with all it prints sent to stderr, so that stdout carries only its result, one JSON line."""
    import contextlib
    import json

    with contextlib.redirect_stdout(sys.stderr):
        result = run(args)
    print(json.dumps(rounded(result)), flush=True)


def median(values) -> float:
    return statistics.median(values)


def rounded(value, digits=3):
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return round(value, digits) if isinstance(value, float) else value
