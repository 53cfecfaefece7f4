"""Evaluation: GSM8K-style exact-match accuracy and the discrimination report, base vs adapter.

    dftlite eval --adapter_path runs/demo/run/adapter --data_path dev.jsonl --pool_dir runs/dev_pool
    dftlite eval --adapter_path runs/demo/run/adapter --data_path dev.jsonl --json --json_path runs/demo/run/eval.json

Two measurements, each for the base model P_g0 and for the trained adapter, side by side. The
base is `sampler_view(model)` of the one loaded adapter model (no second copy of the weights).

(a) Accuracy: batched greedy decoding (left padding, KV cache, no sampling or penalties) of the
    training prompt, then exact match of the extracted number against the gold answer's.
    Answer extraction (`extract_answer`): the first number after the first `####` (GSM8K's answer
    marker), else the last number in the text. Commas between digit groups and `$` are dropped,
    a trailing `.` is not part of a number, and numbers are compared as decimals ("72.0" == "72").
(b) Discrimination (needs a negative pool sampled on the evaluation data with `dftlite sample`):
    under the training prompt x (no adversarial system message), the per-token log-likelihood
    log P(y|x)/|y| of each gold answer y (+EOS) and of each pool negative y'. The win rate is
    the share of prompts whose gold answer scores higher than every one of its negatives; this
    is what DFT (Guo et al. 2025, arXiv 2502.18679) trains for. Negatives identical to the gold
    answer are left out (they would tie).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch

from dftlite.config import to_dict
from dftlite.data import DataConfig, DataError, Example, encode_answer, encode_prompt, load_data, render_prompt
from dftlite.engine_vllm import ENGINES, resolve_engine
from dftlite.models import (ModelConfig, load_base_model, load_model, load_tokenizer, plain_generation_config,
                            resolve_model_path, sampler_view, stop_token_ids)
from dftlite.outputs import make_dir, write_text_atomic
from dftlite.progress import Progress, StepStreamer

logger = logging.getLogger(__name__)

# A number: optional sign and $, digits with optional thousands commas ("1,234"), optional decimals.
# Not preceded by a digit or '.', so "5-3" reads as 5 and 3, not 5 and -3.
NUMBER = re.compile(r"(?<![\d.])-?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
ANSWER_MARKER = "####"


@dataclass
class EvalConfig:
    adapter_path: str | None = field(
        default=None, metadata={"help": "PEFT adapter directory to evaluate (e.g. runs/demo/run/adapter). None = base model only."}
    )
    pool_dir: str | None = field(
        default=None,
        metadata={"help": "Negative pool sampled on the evaluation data (dftlite sample --data_path <eval data>). "
                  "None = skip the discrimination report."},
    )
    eval_batch_size: int = field(
        default=16, metadata={"help": "Sequences per generate/scoring call (1-64 typical; lower it if out of memory)."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Greedy answer length cap (paper: 256 for math)."})
    json_path: str | None = field(default=None, metadata={"help": "Also write the results as JSON to this file."})
    json: bool = field(default=False, metadata={"help": "Print the results as JSON on stdout instead of tables."})
    compare_base: bool = field(
        default=True, metadata={"help": "Also evaluate the base model (the adapter switched off) next to the adapter."}
    )
    engine: str = field(
        default="auto", metadata={"help": "Engine of the greedy answers: hf (transformers' generate), vllm, or auto "
                                  "(vllm when installed). The teacher-forced scores (win rate) are always hf's."}
    )

    def __post_init__(self):
        # YAML or the command line may give "" for "not set"
        self.adapter_path = self.adapter_path or None
        self.pool_dir = self.pool_dir or None
        self.json_path = self.json_path or None
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


# ---------------------------------------------------------------------------------------------
# (a) Accuracy.


def _canonical_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5'; equal strings <=> equal numbers."""
    try:
        value = Decimal(text.replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None
    if value == 0:
        value = Decimal(0)  # "-0" and "0.00" are 0
    return format(value.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style solution as a canonical decimal string, or None.

    The first number after the first '####', else the last number in the text.
    '#### 1,234' -> '1234'; 'The answer is $5.50.' -> '5.5'; 'no idea' -> None.
    """
    if ANSWER_MARKER in text:
        after = NUMBER.search(text.split(ANSWER_MARKER, 1)[1])
        if after:
            return _canonical_number(after.group())
    numbers = NUMBER.findall(text)
    return _canonical_number(numbers[-1]) if numbers else None


@contextlib.contextmanager
def _eval_mode(model):
    """Dropout off for the duration; the previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 16,
                    template: str = "chat") -> list[str]:
    """Greedy completions of rendered prompts (as `render_prompt` gives them), in input order.

    Batches are left-padded (the new tokens line up at the right) and decoded with the KV cache;
    prompts are sorted by length, longest first, so padding is small and an out-of-memory error
    comes in the first batch. Each completion ends before its first EOS; special tokens are dropped.
    """
    encoded = [encode_prompt(tokenizer, text, template) for text in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    eos_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(prompts)
    # Progress in tokens, so it moves at every decoding step, not once per batch (minutes on a CPU). The total is
    # the budget, prompts × max_new_tokens; a batch whose rows all stop early adds its unused budget at its end.
    with (_eval_mode(model), torch.no_grad(), plain_generation_config(model, max_new_tokens, eos_ids, pad_id) as config,
          Progress("generating", total=len(prompts) * max_new_tokens, unit="tokens") as progress):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            input_ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in rows], device=device)  # (B, T)
            attention_mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in rows], device=device)
            streamer = StepStreamer(progress)
            sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                       streamer=streamer)
            for row, tokens in zip(rows, sequences[:, width:].tolist()):  # (B, new tokens); pads follow each EOS
                ends = [t for t, token in enumerate(tokens) if token in eos_ids]
                outputs[row] = tokenizer.decode(tokens[: ends[0]] if ends else tokens, skip_special_tokens=True)
            progress.advance(len(rows) * (max_new_tokens - streamer.steps))
    return outputs


def _numeric(examples: list[Example]) -> list[tuple[Example, str]]:
    """(example, gold number) of the examples whose gold answer holds a number: the ones accuracy scores."""
    golds = [(example, extract_answer(example.answer)) for example in examples]
    return [(example, gold) for example, gold in golds if gold is not None]


def accuracy(model, tokenizer, examples: list[Example], template: str = "chat", max_new_tokens: int = 256,
             batch_size: int = 16, outputs: list[str] | None = None) -> dict:
    """Exact-match accuracy of greedy answers on the examples whose gold answer holds a number.

    Returns {"accuracy", "correct", "total", "no_answer" (predictions without a number),
    "skipped" (examples without a numeric gold answer), "predictions": [per example]}.
    accuracy is None when no example has a numeric gold answer (e.g. chat data). `outputs`: the greedy
    answers of those examples, in order, decoded elsewhere (`vllm_greedy_answers`); None = decode them here.
    """
    scored = _numeric(examples)
    prompts = [render_prompt(tokenizer, example.prompt, template) for example, _ in scored]
    if outputs is None:
        outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, template) if prompts else []
    predictions = []
    for (example, gold), output in zip(scored, outputs):
        predicted = extract_answer(output)
        predictions.append(
            {"id": example.id, "output": output, "predicted": predicted, "gold": gold, "correct": predicted == gold}
        )
    correct = sum(p["correct"] for p in predictions)
    return {
        "accuracy": correct / len(predictions) if predictions else None,
        "correct": correct,
        "total": len(predictions),
        "no_answer": sum(p["predicted"] is None for p in predictions),
        "skipped": len(examples) - len(scored),
        "predictions": predictions,
    }


# ---------------------------------------------------------------------------------------------
# (b) Discrimination.


def _score(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> list[float]:
    """Per-token log P(completion | prompt) / |completion| of each (prompt ids, completion ids), in order."""
    from dftlite.logprobs import naive_sequence_logprobs, sequence_logprobs

    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))  # less padding
    scores = [0.0] * len(pairs)
    with _eval_mode(model), torch.no_grad(), Progress("scoring", total=len(pairs), unit="sequences") as progress:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(sum(map(len, pairs[i])) for i in rows)
            input_ids, attention_mask, completion_mask = [], [], []
            for i in rows:  # right padding: row = prompt, completion, pads
                prompt, completion = pairs[i]
                pads = width - len(prompt) - len(completion)
                input_ids.append(prompt + completion + [pad_id] * pads)
                attention_mask.append([1] * (len(prompt) + len(completion)) + [0] * pads)
                completion_mask.append([0] * len(prompt) + [1] * len(completion) + [0] * pads)
            batch = [torch.tensor(x, device=device) for x in (input_ids, attention_mask, completion_mask)]  # 3 × (B, T)
            try:
                logp_sums, token_counts = sequence_logprobs(model, *batch)  # (B,), (B,)
            except NotImplementedError:  # logit soft-capping / scaling: the chunked path refuses
                logp_sums, token_counts = naive_sequence_logprobs(model, *batch)
            for i, value in zip(rows, (logp_sums.double() / token_counts).cpu().tolist()):
                scores[i] = value
            progress.advance(len(rows))
    return scores


def discrimination(model, tokenizer, examples: list[Example], records_by_id: dict[str, list[dict]], template: str = "chat",
                   batch_size: int = 16) -> dict:
    """Per-token log-likelihoods of gold answers vs pool negatives under the training prompt, and the win rate.

    Only examples with at least one usable negative count (`negatives_for`: gold duplicates left out).
    Returns {"win_rate", "gold_logp_per_token" (mean over prompts), "negative_logp_per_token" (mean over
    all negatives), "mean_margin" (mean over prompts of gold minus its best negative), "num_prompts",
    "num_negatives", "skipped" (examples without negatives), "scores": {id: {"gold", "negatives"}}}.
    """
    from dftlite.pool import negatives_for

    pairs: list[tuple[list[int], list[int]]] = []  # gold, then its negatives, for each kept example
    layout: list[tuple[str, int]] = []  # (id, number of negatives)
    for example in examples:
        negatives = [r["token_ids"] for r in negatives_for(records_by_id.get(example.id, [])) if r["token_ids"]]
        if not negatives:
            continue
        prompt_ids = encode_prompt(tokenizer, render_prompt(tokenizer, example.prompt, template), template)
        pairs += [(prompt_ids, encode_answer(tokenizer, example.answer))] + [(prompt_ids, n) for n in negatives]
        layout.append((example.id, len(negatives)))
    if not layout:
        raise DataError(
            f"the negative pool holds no negatives for any of the {len(examples)} evaluation examples; "
            "sample a pool on the evaluation data: dftlite sample --data_path <eval data> --pool_dir <dir>"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    flat = _score(model, pairs, pad_id, batch_size)
    scores, position = {}, 0
    for example_id, count in layout:
        scores[example_id] = {"gold": flat[position], "negatives": flat[position + 1 : position + 1 + count]}
        position += 1 + count
    golds = [s["gold"] for s in scores.values()]
    negatives = [n for s in scores.values() for n in s["negatives"]]
    margins = [s["gold"] - max(s["negatives"]) for s in scores.values()]
    return {
        "win_rate": sum(m > 0 for m in margins) / len(margins),
        "gold_logp_per_token": sum(golds) / len(golds),
        "negative_logp_per_token": sum(negatives) / len(negatives),
        "mean_margin": sum(margins) / len(margins),
        "num_prompts": len(layout),
        "num_negatives": len(negatives),
        "skipped": len(examples) - len(layout),
        "scores": scores,
    }


def vllm_greedy_answers(model_config: ModelConfig, tokenizer, examples: list[Example], template: str,
                        max_new_tokens: int, views: list[str], adapter_path: str | None) -> dict[str, list[str]]:
    """{view: greedy answers of the numeric examples} for the views "base" and "adapter", on vLLM (the
    adapter as a LoRA over the same engine). The engine is shut down before this returns, so the model
    that scores the pool afterwards has the memory to itself."""
    from dftlite.engine_vllm import VLLMEngine, base_metadata, vllm_dtype

    path, _, _, eos_ids = base_metadata(model_config)
    prompt_ids = [encode_prompt(tokenizer, render_prompt(tokenizer, example.prompt, template), template)
                  for example, _ in _numeric(examples)]
    if not prompt_ids:
        return {view: [] for view in views}
    lora_rank = None
    if adapter_path is not None:
        lora_rank = json.loads((Path(adapter_path) / "adapter_config.json").read_text())["r"]
    engine = VLLMEngine(path, dtype=vllm_dtype(model_config), max_model_len=max(map(len, prompt_ids)) + max_new_tokens,
                        enable_lora=adapter_path is not None, max_lora_rank=lora_rank or 1,
                        trust_remote_code=model_config.trust_remote_code)
    try:
        answers = {}
        for view in views:
            with Progress(f"generating ({view}, vllm)", total=len(prompt_ids), unit="answers") as progress:
                tokens = engine.greedy(prompt_ids, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                       lora_path=adapter_path if view == "adapter" else None)
                progress.advance(len(prompt_ids))
            answers[view] = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        return answers
    finally:
        engine.close()


# ---------------------------------------------------------------------------------------------
# The job.


def evaluate(model_config: ModelConfig, data_config: DataConfig, eval_config: EvalConfig, model=None, tokenizer=None) -> dict:
    """Accuracy and (with a pool) discrimination for the base and the adapter; prints and returns them.

    Returns {"base": {...}, "adapter": {...}, "num_examples": n, ...}; "base" is absent with
    compare_base=False, "adapter" when the model has no adapter. Each holds the keys of `accuracy`
    and, with a pool, those of `discrimination`.
    """
    examples = load_data(data_config)
    if eval_config.json_path is not None:  # fail now, not after the evaluation, when it cannot be written
        make_dir(Path(eval_config.json_path).parent, "directory of json_path")
    engine_name = "hf" if model is not None else resolve_engine(eval_config.engine)  # a model in memory is hf's
    answers = {}
    if engine_name == "vllm":  # first, and alone in memory
        view_names = (["base"] if eval_config.adapter_path is None or eval_config.compare_base else []) + \
            (["adapter"] if eval_config.adapter_path is not None else [])
        logger.info("greedy answers on vLLM")
        tokenizer = load_tokenizer(resolve_model_path(model_config.model_name_or_path, model_config.cache_dir),
                                   model_config.trust_remote_code)
        answers = vllm_greedy_answers(model_config, tokenizer, examples, data_config.template,
                                      eval_config.max_new_tokens, view_names, eval_config.adapter_path)
    # vLLM answered already: the HF model is needed only to score the pool
    if (model is None or tokenizer is None) and (engine_name == "hf" or eval_config.pool_dir is not None):
        if eval_config.adapter_path is not None:
            model, tokenizer = load_model(model_config, adapter_path=eval_config.adapter_path, trainable=False)
        else:
            model, tokenizer = load_base_model(model_config)
    records_by_id = None
    if eval_config.pool_dir is not None:
        from dftlite.pool import check_pool_compatible, read_pool

        meta, records_by_id = read_pool(eval_config.pool_dir)
        check_pool_compatible(meta, model, tokenizer, data_config.template)

    has_adapter = hasattr(model, "peft_config") if model is not None else eval_config.adapter_path is not None
    views = []  # (name, context that makes `model` that model)
    if not has_adapter or eval_config.compare_base:
        views.append(("base", sampler_view if model is not None else contextlib.nullcontext))
    if has_adapter:
        views.append(("adapter", _eval_mode if model is not None else contextlib.nullcontext))
    results = {
        "num_examples": len(examples),
        "data_path": data_config.data_path,
        "adapter_path": eval_config.adapter_path,
        "pool_dir": eval_config.pool_dir,
        "config": to_dict(model_config, data_config, eval_config),
    }
    template, batch_size = data_config.template, eval_config.eval_batch_size
    for name, view in views:
        logger.info("evaluating %s on %d examples", name, len(examples))
        with view(model):
            result = accuracy(model, tokenizer, examples, template, eval_config.max_new_tokens, batch_size, answers.get(name))
            if records_by_id is not None:
                result.update(discrimination(model, tokenizer, examples, records_by_id, template, batch_size))
        results[name] = result
    results["engine"] = engine_name

    if eval_config.json_path is not None:
        write_text_atomic(eval_config.json_path, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    if eval_config.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    else:
        print_report(results)
    return results


# (label, key, format) of the rows of the report; a row is shown when some view has its key.
REPORT_ROWS = [
    ("exact-match accuracy", "accuracy", "{:.1%}"),
    ("correct / total", None, None),
    ("no number in answer", "no_answer", "{}"),
    ("win rate (gold beats all negatives)", "win_rate", "{:.1%}"),
    ("gold log-lik / token", "gold_logp_per_token", "{:.3f}"),
    ("negative log-lik / token", "negative_logp_per_token", "{:.3f}"),
    ("mean margin (gold - best negative)", "mean_margin", "{:.3f}"),
    ("prompts / negatives scored", None, None),
]


def print_report(results: dict):
    """The results as a rich table: one column per view, and the change when both are there."""
    from rich.console import Console
    from rich.table import Table

    views = [v for v in ("base", "adapter") if v in results]
    table = Table(title=f"dftlite eval: {results['data_path']} ({results['num_examples']} examples)")
    table.add_column("metric")
    for view in views:
        table.add_column(view if view == "base" else f"adapter ({results['adapter_path'] or 'in memory'})", justify="right")
    both = len(views) == 2
    if both:
        table.add_column("change", justify="right")
    for label, key, fmt in REPORT_ROWS:
        if key is None:  # count rows
            if label.startswith("correct"):
                cells = [f"{results[v]['correct']} / {results[v]['total']}" for v in views]
            elif "num_prompts" in results[views[0]]:
                cells = [f"{results[v]['num_prompts']} / {results[v]['num_negatives']}" for v in views]
            else:
                continue
            table.add_row(label, *cells, *([""] if both else []))
            continue
        values = [results[v].get(key) for v in views]
        if all(value is None for value in values):
            continue
        cells = ["-" if value is None else fmt.format(value) for value in values]
        if both:
            change_fmt = "{:+.1%}" if "%" in fmt else "{:+d}" if fmt == "{}" else "{:+.3f}"
            change = "" if None in values else change_fmt.format(values[1] - values[0])
            cells.append(change)
        table.add_row(label, *cells)
    Console().print(table)
