"""Sampling the negative pool: completions y' ~ P_g0(.|x̄) from the frozen base model, offline.

Discriminative Fine-Tuning (Guo et al. 2025, arXiv 2502.18679, §4.2 and App. B.5) contrasts
each training answer y_i with m negatives y' drawn from the base model under an adversarial
prompt x̄_i: the training prompt with the system message "You are an unhelpful assistant.".
Two engines draw them (`--engine`):
- hf: `sampler_view(model)`, the same loaded (possibly 4-bit) model as training, adapters off,
  decoding with transformers' `generate`;
- vllm: vLLM over the same base weights at the precision's compute dtype (`dftlite.engine_vllm`),
  for pools at scale; `auto` (the default) takes vllm when it is installed.

    dftlite sample --config configs/smollm2-135m_gsm8k_dft2_cpu.yaml

The pool's files, how they stay whole, resume and get repaired: `dftlite.pool`. `sample_pool`
holds the pool's lock for the run.

Sampling is seeded per (seed, id, k), so a completion does not depend on the batch it ran in, with
one caveat: padded, batched matmuls differ from unbatched ones in the last bits of the logits, so
when the uniform draw lands within rounding error of a boundary of the inverse CDF, the token can
flip (≈1e-7 per token in fp32; more likely in bf16/fp16/4-bit). From that token on the completion
differs, but it is still an exact sample of P_g0 and its logp_sampler is still exact.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

from dftlite.config import save_resolved_config
from dftlite.data import DataConfig, DataError, encode_prompt, load_data, render_prompt
from dftlite.engine_vllm import ENGINES, resolve_engine
from dftlite.models import (ModelConfig, config_fingerprint, load_model, model_fingerprint, plain_generation_config,
                            sampler_view, stop_token_ids)
from dftlite.outputs import make_dir, output_lock
from dftlite.pool import (FORMAT_VERSION, POOL_FILE, SHARDS_DIR, PoolMismatchError, append_records, check_same_sampling,
                          open_pool, pool_settings, read_pool, write_meta)

# batch_size=0: rows per generate call such that rows * (longest prompt + max_new_tokens) stays
# within this many tokens of KV cache (SmolLM2-135M fp32: ~46 KB/token, so ~0.4 GB on CPU).
AUTO_TOKEN_BUDGET = {"cpu": 8192, "cuda": 65536}
MAX_AUTO_ROWS = 256
# engine vllm, batch_size=0: completions per vLLM call (each call's records are written before the next
# starts, so this is also what a kill can lose); vLLM batches within a call by itself
VLLM_CHUNK = {"cpu": 64, "cuda": 2048}


@dataclass
class SampleConfig:
    pool_dir: str = field(default="", metadata={"help": "Output directory of the negative pool (meta.json, pool.jsonl). Required."})
    sampler_system_prompt: str | None = field(
        default="You are an unhelpful assistant.",
        metadata={"help": "System message of the sampler prompt x̄ (paper App. B.5). None or '' = sample from the training prompt as is."},
    )
    num_negatives: int = field(
        default=4, metadata={"help": "m = E×B completions per prompt (paper: B=2 per step; 2-8 typical). May grow on resume."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (> 0; paper: 0.7)."})
    top_k: int = field(default=50, metadata={"help": "Keep the k most likely tokens (0 = off; paper: 50)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1] (1.0 = off; paper: 1.0)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Completion length cap (paper: 256 math, 320 chat)."})
    batch_size: int = field(
        default=0, metadata={"help": "Completions per generate call; 0 = automatic from a KV-cache token budget."}
    )
    seed: int = field(default=42, metadata={"help": "Base seed; completion (id, k) uses its own stream derived from (seed, id, k)."})
    score_train_prompt: bool = field(
        default=False, metadata={"help": "Also store logp_train_prompt = log P_g0(y'|x) under the training prompt (one extra forward)."}
    )
    keep_gold_duplicates: bool = field(
        default=False, metadata={"help": "Train on negatives identical to the gold answer (stripped) anyway. "
                                 "dftlite eval always leaves them out (they would tie with the gold answer)."}
    )
    engine: str = field(
        default="auto", metadata={"help": "Decoding engine: hf (transformers' generate on the training base), vllm "
                                  "(pip install 'dftlite[vllm]'), or auto (vllm when installed). A pool keeps its engine."}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "engine vllm: GPUs per model replica (vLLM's tensor_parallel_size)."})
    data_parallel_size: int = field(default=1, metadata={"help": "engine vllm: model replicas (vLLM's data_parallel_size)."})
    num_shards: int = field(
        default=1, metadata={"help": "Split the prompts over this many processes (GPUs, machines): each samples its "
                             "shard into pool_dir/shards/<shard_index>-of-<num_shards>; a run without shards then gathers "
                             "them into pool_dir. Records are seeded per (seed, id, k): the same as one process's."}
    )
    shard_index: int = field(default=0, metadata={"help": "This process's shard, 0 .. num_shards-1: every num_shards-th prompt, from prompt shard_index on."})
    repair_pool: bool = field(
        default=False, metadata={"help": "A pool.jsonl with a corrupt or duplicated line: keep the records before it, "
                                 "move that line and the rest to pool.jsonl.bad-<time> (nothing is deleted), resample."}
    )

    def __post_init__(self):
        if not self.pool_dir:
            raise ValueError("pool_dir is required: the directory the negative pool is written to")
        if self.sampler_system_prompt == "":
            self.sampler_system_prompt = None
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {self.num_negatives}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 0:
            raise ValueError(f"batch_size must be >= 0 (0 = automatic), got {self.batch_size}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must lie in 0 .. num_shards - 1 = {self.num_shards - 1}, got {self.shard_index}")
        if self.tensor_parallel_size < 1 or self.data_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size and data_parallel_size must be >= 1, got "
                             f"{self.tensor_parallel_size} and {self.data_parallel_size}")


@dataclass
class PoolStats:
    """Statistics of the whole pool after a run (new_* count only this run's completions)."""

    num_prompts: int
    num_records: int
    new_records: int
    new_tokens: int
    seconds: float
    tokens_per_second: float
    mean_tokens: float
    share_length: float  # hit max_new_tokens
    share_gold_duplicate: float


# ---------------------------------------------------------------------------------------------
# Seeded sampling inside generate.


def completion_seed(seed: int, example_id: str, k: int) -> int:
    """A 63-bit seed for completion (id, k): independent of batching, order and device."""
    digest = hashlib.sha256(f"{seed}\0{example_id}\0{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SeededSampler:
    """A LogitsProcessor that samples each row from its own generator and forces that token.

    generate runs with do_sample=False and no other processor, so `scores` here are the raw
    logits; we apply temperature / top-k / top-p ourselves, take the row's next u ~ U[0,1) from its
    CPU generator, take the inverse CDF, and return logits that are -inf except the chosen token,
    which greedy decoding then takes. log P_g0 at temperature 1 is kept per step: no extra forward.

    Each row's uniforms for all `max_steps` are drawn up front and moved to the device once: the
    same numbers as one draw per step (a CPU generator's stream does not depend on how it is cut),
    without a Python loop over the rows and a host-to-device copy at every decoding step.
    """

    def __init__(self, seeds: list[int], temperature: float, top_k: int, top_p: float, max_steps: int, device=None):
        uniforms = [torch.rand(max_steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
        self.uniforms = torch.stack(uniforms).to(device)  # (B, max_steps)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.step_logps: list[torch.Tensor] = []  # per step: (B,) log P_g0(chosen token)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        raw = scores.float()  # (B, V) raw logits
        scores = raw / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[:, -1:]  # (B, 1)
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:  # as transformers' TopPLogitsWarper, keeping at least one token
            sorted_scores, order = torch.sort(scores, descending=False)
            remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - self.top_p
            remove[:, -1] = False
            scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        cdf = torch.softmax(scores.double(), dim=-1).cumsum(dim=-1)  # (B, V)
        uniform = self.uniforms[:, len(self.step_logps)]  # (B,) this step's draw of each row
        target = (uniform * cdf[:, -1]).unsqueeze(1)  # (B, 1)
        # first index whose cdf exceeds the target: never a token of probability 0
        chosen = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)  # (B, 1)
        self.step_logps.append(torch.log_softmax(raw, dim=-1).gather(1, chosen).squeeze(1))
        return torch.full_like(raw, float("-inf")).scatter_(1, chosen, 0.0)


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)  # (B, T)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return input_ids, attention_mask


def generate_batch(model, prompt_ids: list[list[int]], seeds: list[int], config: SampleConfig, eos_ids: list[int], pad_id: int,
                   streamer=None):
    """Sample one completion per row. Returns [(token_ids, finish_reason, logp_sampler)], row order.

    `streamer`: passed to `generate` (progress.StepStreamer moves the progress bar at every decoding step)."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    input_ids, attention_mask = _left_pad(prompt_ids, pad_id, device)
    sampler = SeededSampler(seeds, config.temperature, config.top_k, config.top_p, config.max_new_tokens, device)
    with plain_generation_config(model, config.max_new_tokens, eos_ids, pad_id) as generation_config, torch.no_grad():
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
            logits_processor=LogitsProcessorList([sampler]), streamer=streamer,
        )
    completions = sequences[:, input_ids.shape[1]:].tolist()  # (B, T), pads after each row's EOS
    step_logps = torch.stack(sampler.step_logps, dim=1).double().cpu()  # (B, steps)
    results = []
    for row, tokens in enumerate(completions):
        ends = [t for t, token in enumerate(tokens) if token in eos_ids]
        length = ends[0] + 1 if ends else len(tokens)
        results.append((tokens[:length], "eos" if ends else "length", float(step_logps[row, :length].sum())))
    return results


def score_completions(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> list[float]:
    """Σ_t log P(y'_t | prompt, y'_<t): one teacher-forced, right-padded forward."""
    from dftlite.logprobs import naive_sequence_logprobs, sequence_logprobs

    device = next(model.parameters()).device
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=device)  # (N, T)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    completion_mask = torch.tensor(
        [[0] * len(p) + [1] * len(c) + [0] * (width - len(p) - len(c)) for p, c in zip(prompt_ids, completion_ids)],
        device=device,
    )
    with torch.no_grad():
        try:
            logp_sums, _ = sequence_logprobs(model, input_ids, attention_mask, completion_mask)
        except NotImplementedError:  # logit soft-capping / scaling: the chunked path refuses
            logp_sums, _ = naive_sequence_logprobs(model, input_ids, attention_mask, completion_mask)
    return logp_sums.double().cpu().tolist()


# ---------------------------------------------------------------------------------------------
# The job.


@dataclass
class _Prompt:
    id: str
    answer: str
    sampler_prompt: str
    sampler_ids: list[int]
    train_ids: list[int] | None


def _prepare_prompts(model_config, tokenizer, examples, template: str, config: SampleConfig) -> list[_Prompt]:
    """`model_config`: the model's transformers config (its context window is checked here)."""
    context = getattr(model_config, "max_position_embeddings", None)
    prompts = []
    for example in examples:
        try:
            text = render_prompt(tokenizer, example.prompt, template, config.sampler_system_prompt)
        except Exception as err:
            raise DataError(
                f"cannot render the sampler prompt x̄ of id {example.id!r} with template {template!r} and "
                f"sampler_system_prompt={config.sampler_system_prompt!r}: {err}"
            ) from err
        sampler_ids = encode_prompt(tokenizer, text, template)
        train_ids = None
        if config.score_train_prompt:
            train_ids = encode_prompt(tokenizer, render_prompt(tokenizer, example.prompt, template), template)
        longest = max(len(sampler_ids), len(train_ids or []))
        if context is not None and longest + config.max_new_tokens > context:
            raise DataError(
                f"id {example.id!r}: prompt of {longest} tokens + max_new_tokens={config.max_new_tokens} exceeds "
                f"the model's context window of {context} tokens; shorten the prompt or lower max_new_tokens"
            )
        prompts.append(_Prompt(example.id, example.answer, text, sampler_ids, train_ids))
    return prompts


def _batches(todo: list[tuple[_Prompt, int]], config: SampleConfig, device_type: str):
    """Consecutive slices of `todo` (sorted by prompt length): fixed size, or within the token budget."""
    start = 0
    budget = AUTO_TOKEN_BUDGET.get(device_type, AUTO_TOKEN_BUDGET["cpu"])
    while start < len(todo):
        end = start + 1
        while end < len(todo):
            if config.batch_size:
                if end - start >= config.batch_size:
                    break
            elif end - start >= MAX_AUTO_ROWS or (end - start + 1) * (len(todo[end][0].sampler_ids) + config.max_new_tokens) > budget:
                break
            end += 1
        yield todo[start:end]
        start = end


def _statistics(records_by_id: dict[str, list[dict]]) -> dict:
    records = [r for rs in records_by_id.values() for r in rs]
    n = max(len(records), 1)
    return {
        "num_prompts": len(records_by_id),
        "num_records": len(records),
        "mean_tokens": sum(r["num_tokens"] for r in records) / n,
        "share_length": sum(r["finish_reason"] == "length" for r in records) / n,
        "share_gold_duplicate": sum(r["gold_duplicate"] for r in records) / n,
    }


def sample_pool(model_config: ModelConfig, data_config: DataConfig, sample_config: SampleConfig, model=None, tokenizer=None) -> PoolStats:
    """Sample (or resume) the negative pool of every training prompt into sample_config.pool_dir.

    pool_dir is locked for the run (`dftlite.outputs.output_lock`): a second run on it stops at once."""
    examples = load_data(data_config)  # raises DataError on an empty dataset
    if sample_config.num_shards > 1:  # this process's prompts, into the shard's own directory
        examples = examples[sample_config.shard_index :: sample_config.num_shards]
        sample_config = replace(sample_config, pool_dir=str(shard_dir(sample_config)))
    with output_lock(sample_config.pool_dir, "pool_dir"):  # before the model loads: a second run stops at once
        return _sample_pool(model_config, data_config, sample_config, examples, model, tokenizer)


def shard_dir(config: SampleConfig) -> Path:
    return Path(config.pool_dir) / SHARDS_DIR / f"{config.shard_index}-of-{config.num_shards}"


def _gather_shards(pool_dir: Path, meta: dict, template: str, config: SampleConfig, prompts: list[_Prompt],
                   records_by_id: dict[str, list[dict]]):
    """Append the records of pool_dir/shards/* that the pool lacks (each shard checked against this run's
    data, settings and engine, as a resumed pool is); the shards stay where they are."""
    have = {(r["id"], r["k"]) for rs in records_by_id.values() for r in rs}
    known = {p.id for p in prompts}
    for shard in sorted((pool_dir / SHARDS_DIR).iterdir()):
        shard_meta, shard_records = read_pool(shard, f"shard {shard}")
        check_same_sampling(shard_meta, meta, template, config, shard)
        unknown = sorted(set(shard_records) - known)
        if unknown:
            raise PoolMismatchError(f"shard {shard} holds {len(unknown)} id(s) not in this run's data, e.g. "
                                    f"{unknown[:3]}; it was sampled from other data")
        new = [r for rs in shard_records.values() for r in rs if (r["id"], r["k"]) not in have and r["k"] < config.num_negatives]
        if new:
            append_records(pool_dir / POOL_FILE, new)
        for record in new:
            records_by_id.setdefault(record["id"], []).append(record)
            have.add((record["id"], record["k"]))
        logger.info("gathered %d records from %s", len(new), shard)


def _hf_decoded(model, todo, config: SampleConfig, eos_ids: list[int], pad_id: int, progress):
    """Yield (batch, [(token_ids, finish_reason, logp_sampler)], [logp_train_prompt or None]) per generate call."""
    from dftlite.progress import StepStreamer

    for batch in _batches(todo, config, next(model.parameters()).device.type):
        seeds = [completion_seed(config.seed, p.id, k) for p, k in batch]
        streamer = StepStreamer(progress)  # the bar moves at every decoding step
        results = generate_batch(model, [p.sampler_ids for p, _ in batch], seeds, config, eos_ids, pad_id, streamer)
        train_logps = [None] * len(batch)
        if config.score_train_prompt:
            train_logps = score_completions(model, [p.train_ids for p, _ in batch], [r[0] for r in results], pad_id)
        yield batch, results, train_logps
        progress.advance(len(batch) * (config.max_new_tokens - streamer.steps))  # rows that stopped early


def _vllm_decoded(engine, todo, config: SampleConfig, eos_ids: list[int], progress):
    """As `_hf_decoded`, one vLLM call per chunk of `todo` (the bar moves once per chunk)."""
    chunk = config.batch_size or VLLM_CHUNK["cuda" if torch.cuda.is_available() else "cpu"]
    for start in range(0, len(todo), chunk):
        batch = todo[start : start + chunk]
        results = engine.sample([p.sampler_ids for p, _ in batch], [completion_seed(config.seed, p.id, k) for p, k in batch],
                                temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                                max_new_tokens=config.max_new_tokens, eos_ids=eos_ids)
        train_logps = [None] * len(batch)
        if config.score_train_prompt:
            train_logps = engine.score([p.train_ids for p, _ in batch], [r[0] for r in results])
        yield batch, results, train_logps
        progress.advance(len(batch) * config.max_new_tokens)


def _sample_pool(model_config: ModelConfig, data_config: DataConfig, sample_config: SampleConfig, examples, model,
                 tokenizer) -> PoolStats:
    from rich.console import Console
    from rich.table import Table

    from dftlite.progress import Progress

    config, template = sample_config, data_config.template
    console = Console(stderr=True)
    engine_name = "hf" if model is not None else resolve_engine(config.engine)  # a model in memory is hf's
    if engine_name == "vllm":
        from dftlite.engine_vllm import VLLMEngine, base_metadata, vllm_dtype

        path, tokenizer, hf_config, eos_ids = base_metadata(model_config)
        fingerprint = config_fingerprint(hf_config, tokenizer)
    else:
        if model is None or tokenizer is None:
            model, tokenizer = load_model(model_config)
        hf_config, fingerprint, eos_ids = model.config, model_fingerprint(model, tokenizer), stop_token_ids(model, tokenizer)
    console.print(f"sampling engine: {engine_name}" + (" (vLLM is not installed)" if config.engine == "auto" and
                                                         engine_name == "hf" and model is None else ""))
    prompts = _prepare_prompts(hf_config, tokenizer, examples, template, config)

    pool_dir = Path(config.pool_dir)
    make_dir(pool_dir, "pool directory")
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        **pool_settings(config, template),
        "num_negatives": config.num_negatives,
        "keep_gold_duplicates": config.keep_gold_duplicates,
        "engine": engine_name,
    }
    records_by_id = open_pool(pool_dir, meta, template, config, prompts)
    save_resolved_config(pool_dir, model_config, data_config, sample_config)
    if config.num_shards == 1 and (pool_dir / SHARDS_DIR).is_dir():
        _gather_shards(pool_dir, meta, template, config, prompts, records_by_id)

    done = {(r["id"], r["k"]) for rs in records_by_id.values() for r in rs}
    todo = [(p, k) for p in prompts for k in range(config.num_negatives) if (p.id, k) not in done]
    order = {p.id: i for i, p in enumerate(prompts)}
    todo.sort(key=lambda item: (len(item[0].sampler_ids), order[item[0].id], item[1]))  # less padding
    remaining = {p.id: sum(1 for k in range(config.num_negatives) if (p.id, k) not in done) for p in prompts}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    if engine_name == "vllm" and todo:
        longest = max(len(p.sampler_ids) for p in prompts) if not config.score_train_prompt else \
            max(max(len(p.sampler_ids), len(p.train_ids)) for p in prompts)
        engine = VLLMEngine(path, dtype=vllm_dtype(model_config), seed=config.seed,
                            # + 1: scoring under x feeds prompt + completion and asks for one token more
                            max_model_len=longest + config.max_new_tokens + 1, tensor_parallel_size=config.tensor_parallel_size,
                            data_parallel_size=config.data_parallel_size, trust_remote_code=model_config.trust_remote_code)
        meta["engine_dtype"] = engine.dtype
        write_meta(pool_dir, meta)

    new_tokens, started = 0, time.perf_counter()
    prompts_done = sum(1 for v in remaining.values() if v == 0)
    # Progress in tokens; the total is the budget, completions × max_new_tokens, and a batch that stops early
    # adds its unused budget at its end.
    # hf: the base is the model with its adapters off; vllm: the engine stops when the pool is done (or fails)
    view = sampler_view(model) if engine_name == "hf" else contextlib.closing(engine) if todo else contextlib.nullcontext()
    with view, Progress("sampling", total=len(todo) * config.max_new_tokens, unit="tokens", console=console) as progress:
        progress.status = f"{prompts_done}/{len(prompts)} prompts"
        decoded = (_vllm_decoded(engine, todo, config, eos_ids, progress) if engine_name == "vllm" and todo
                   else _hf_decoded(model, todo, config, eos_ids, pad_id, progress) if todo else ())
        for batch, results, train_logps in decoded:
            records = []
            for (prompt, k), (token_ids, finish_reason, logp), train_logp in zip(batch, results, train_logps):
                eos_trimmed = token_ids[:-1] if finish_reason == "eos" else token_ids
                text = tokenizer.decode(eos_trimmed, skip_special_tokens=False)
                records.append({
                    "id": prompt.id, "k": k, "text": text, "token_ids": token_ids, "num_tokens": len(token_ids),
                    "finish_reason": finish_reason, "sampler_prompt": prompt.sampler_prompt, "logp_sampler": logp,
                    "logp_train_prompt": train_logp, "gold_duplicate": text.strip() == prompt.answer.strip(),
                })
            append_records(pool_dir / POOL_FILE, records)
            for record in records:
                records_by_id.setdefault(record["id"], []).append(record)
                remaining[record["id"]] -= 1
                prompts_done += remaining[record["id"]] == 0
                new_tokens += record["num_tokens"]
            progress.status = f"{prompts_done}/{len(prompts)} prompts"
    seconds = time.perf_counter() - started

    for records in records_by_id.values():
        records.sort(key=lambda r: r["k"])
    stats = PoolStats(
        new_records=len(todo), new_tokens=new_tokens, seconds=seconds, tokens_per_second=new_tokens / max(seconds, 1e-9),
        **_statistics(records_by_id),
    )
    table = Table(title=f"negative pool {pool_dir}", show_header=False)
    for key, value in asdict(stats).items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    return stats
