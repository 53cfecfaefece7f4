"""The negative pool: exact log P_g0, seeded and batch-independent sampling, crash-safe resume.

Most tests use the tiny random Llama of conftest with a bias on the EOS logit, so completions
end at different lengths (some by EOS, some at max_new_tokens) and the padded batch is ragged.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from dftlite import sampling
from dftlite.data import DataConfig, DataError, encode_prompt
from dftlite.models import ModelConfig, load_model
from dftlite.pool import PoolMismatchError, check_pool_compatible, load_pool, negatives_for
from dftlite.sampling import SampleConfig, SeededSampler, sample_pool

SETTINGS = dict(num_negatives=4, max_new_tokens=12, temperature=0.7, top_k=50)
EOS_BIAS = 1.0  # P(EOS) ≈ 8% per step on the near-uniform tiny model: a mix of "eos" and "length"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model_config, model, tokenizer): fp32 tiny Llama whose lm_head has a bias favouring EOS."""
    model_config = ModelConfig(model_name_or_path=str(tiny_model_dir), precision="fp32", lora_r=0)
    model, tokenizer = load_model(model_config)
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = EOS_BIAS
    model.set_output_embeddings(head)
    return model_config, model, tokenizer


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, gsm8k_rows):
    rows = [{"id": f"q{i}", **row} for i, row in enumerate(gsm8k_rows[:6])]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


def run(tiny, data_path, pool_dir, data_kwargs=None, **kwargs):
    model_config, model, tokenizer = tiny
    data_config = DataConfig(data_path=str(data_path), **(data_kwargs or {}))
    sample_config = SampleConfig(pool_dir=str(pool_dir), **{**SETTINGS, **kwargs})
    return sample_pool(model_config, data_config, sample_config, model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def reference_pool(tiny, data_file, tmp_path_factory):
    """An uninterrupted run, automatic batch size (all 24 completions in one padded batch)."""
    pool_dir = tmp_path_factory.mktemp("reference")
    stats = run(tiny, data_file, pool_dir, score_train_prompt=True)
    return pool_dir, stats


def teacher_forced_logp(model, prompt_ids, completion_ids) -> torch.Tensor:
    """Per-token log P(completion | prompt) with plain transformers, one unpadded sequence."""
    input_ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids).logits[0].float()  # (T, V)
    logps = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)  # rows predicting the completion
    return logps.gather(1, torch.tensor(completion_ids)[:, None]).squeeze(1)  # (len(completion),)


def pool_tokens(pool_dir) -> dict:
    _, records_by_id = load_pool(pool_dir)
    return {(r["id"], r["k"]): r["token_ids"] for rs in records_by_id.values() for r in rs}


def test_logp_sampler_matches_teacher_forcing(tiny, reference_pool):
    _, model, tokenizer = tiny
    meta, records_by_id = load_pool(reference_pool[0])
    lengths = {len(encode_prompt(tokenizer, rs[0]["sampler_prompt"], "chat")) for rs in records_by_id.values()}
    assert len(lengths) > 1, "prompts of different lengths must share the padded batch"
    records = [r for rs in records_by_id.values() for r in rs]
    assert {r["finish_reason"] for r in records} == {"eos", "length"}
    for record in records:
        assert record["sampler_prompt"].startswith("<|im_start|>system\nYou are an unhelpful assistant.<|im_end|>")
        prompt_ids = encode_prompt(tokenizer, record["sampler_prompt"], "chat")
        expected = teacher_forced_logp(model, prompt_ids, record["token_ids"])
        assert record["logp_sampler"] == pytest.approx(expected.sum().item(), abs=1e-4 * record["num_tokens"])
        # under the training prompt (no system message): a different number, scored in one batch
        train_prompt = record["sampler_prompt"].replace("<|im_start|>system\nYou are an unhelpful assistant.<|im_end|>\n", "")
        expected_train = teacher_forced_logp(model, encode_prompt(tokenizer, train_prompt, "chat"), record["token_ids"])
        assert record["logp_train_prompt"] == pytest.approx(expected_train.sum().item(), abs=1e-4 * record["num_tokens"])


def test_schema_and_statistics(tiny, reference_pool):
    _, _, tokenizer = tiny
    pool_dir, stats = reference_pool
    meta, records_by_id = load_pool(pool_dir)
    assert meta["format_version"] == 1 and meta["template"] == "chat" and meta["temperature"] == 0.7
    assert meta["sampler_system_prompt"] == "You are an unhelpful assistant." and meta["num_negatives"] == 4
    assert meta["fingerprint"]["eos_token_id"] == tokenizer.eos_token_id
    assert (Path(pool_dir) / "dftlite_config.yaml").is_file()
    assert sorted(records_by_id) == [f"q{i}" for i in range(6)]
    records = [r for rs in records_by_id.values() for r in rs]
    for example_id, rs in records_by_id.items():
        assert [r["k"] for r in rs] == [0, 1, 2, 3]
    keys = {"id", "k", "text", "token_ids", "num_tokens", "finish_reason", "sampler_prompt", "logp_sampler",
            "logp_train_prompt", "gold_duplicate"}
    for r in records:
        assert set(r) == keys
        assert r["num_tokens"] == len(r["token_ids"]) and 1 <= r["num_tokens"] <= 12
        ends_with_eos = r["token_ids"][-1] == tokenizer.eos_token_id
        assert r["finish_reason"] == ("eos" if ends_with_eos else "length")
        assert tokenizer.eos_token_id not in r["token_ids"][:-1]
        if r["finish_reason"] == "length":
            assert r["num_tokens"] == 12
        assert r["text"] == tokenizer.decode(r["token_ids"][:-1] if ends_with_eos else r["token_ids"])
        assert r["logp_sampler"] < 0 and r["gold_duplicate"] is False
    assert stats.num_prompts == 6 and stats.num_records == 24 and stats.new_records == 24
    assert stats.new_tokens == sum(r["num_tokens"] for r in records)
    assert stats.mean_tokens == pytest.approx(stats.new_tokens / 24)
    assert stats.share_length == pytest.approx(sum(r["finish_reason"] == "length" for r in records) / 24)
    assert stats.share_gold_duplicate == 0.0


def test_gold_duplicate_flag(tiny, reference_pool, gsm8k_rows, tmp_path):
    # Make the gold answer of q2 equal to one of its sampled texts: same id and prompt, same seed,
    # so the same completion is sampled again and must be flagged.
    _, records_by_id = load_pool(reference_pool[0])
    target = next(r for r in records_by_id["q2"] if r["text"].strip())
    rows = [{"id": f"q{i}", **row} for i, row in enumerate(gsm8k_rows[:6])]
    rows[2]["answer"] = "  " + target["text"] + "\n"
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    stats = run(tiny, data, tmp_path / "pool", score_train_prompt=True)
    meta, new = load_pool(tmp_path / "pool")
    flagged = [(r["id"], r["k"]) for rs in new.values() for r in rs if r["gold_duplicate"]]
    assert (target["id"], target["k"]) in flagged
    assert stats.share_gold_duplicate == pytest.approx(len(flagged) / 24)
    assert target["k"] not in [r["k"] for r in negatives_for(new["q2"], meta)]
    assert len(negatives_for(new["q2"], {**meta, "keep_gold_duplicates": True})) == 4
    # keep_gold_duplicates is not a sampling setting: changing it on resume only updates meta
    run(tiny, data, tmp_path / "pool", score_train_prompt=True, keep_gold_duplicates=True)
    assert load_pool(tmp_path / "pool")[0]["keep_gold_duplicates"] is True


def test_batch_size_independence(tiny, data_file, reference_pool, tmp_path):
    # Each (id, k) has its own generator, so batch composition and padding do not change the draw
    # (except on a near-tie within fp32 rounding, which this fixed case does not hit).
    reference = {key: ids for key, ids in pool_tokens(reference_pool[0]).items() if key[0] in ("q0", "q1", "q2")}
    for batch_size in (1, 5):  # 5: batches that mix prompts of different lengths
        pool_dir = tmp_path / f"b{batch_size}"
        run(tiny, data_file, pool_dir, data_kwargs={"max_examples": 3}, batch_size=batch_size, score_train_prompt=True)
        assert pool_tokens(pool_dir) == reference


def test_resume_after_kill(tiny, data_file, reference_pool, tmp_path, monkeypatch):
    pool_dir = tmp_path / "pool"
    run(tiny, data_file, pool_dir, data_kwargs={"max_examples": 2}, score_train_prompt=True)  # a subset first
    assert len(pool_tokens(pool_dir)) == 8

    real_append, calls = sampling.append_records, []

    def crash_after_first_batch(path, records):
        if calls:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        real_append(path, records)

    monkeypatch.setattr(sampling, "append_records", crash_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, data_file, pool_dir, batch_size=3, score_train_prompt=True)
    monkeypatch.undo()
    assert len(pool_tokens(pool_dir)) == 11
    with open(pool_dir / "pool.jsonl", "a") as handle:  # kill -9 in the middle of a write
        handle.write('{"id": "q5", "k": 0, "text": "half a rec')
    assert len(pool_tokens(pool_dir)) == 11  # load_pool ignores the partial last line

    stats = run(tiny, data_file, pool_dir, score_train_prompt=True)
    assert stats.new_records == 13 and stats.num_records == 24
    lines = (pool_dir / "pool.jsonl").read_text().splitlines()
    keys = [(json.loads(line)["id"], json.loads(line)["k"]) for line in lines]
    assert len(keys) == len(set(keys)) == 24
    assert pool_tokens(pool_dir) == pool_tokens(reference_pool[0])


def test_num_negatives_can_grow_not_shrink(tiny, data_file, reference_pool, tmp_path):
    pool_dir = tmp_path / "pool"
    run(tiny, data_file, pool_dir, num_negatives=2, score_train_prompt=True)
    stats = run(tiny, data_file, pool_dir, num_negatives=4, score_train_prompt=True)
    assert stats.new_records == 12 and load_pool(pool_dir)[0]["num_negatives"] == 4
    assert pool_tokens(pool_dir) == pool_tokens(reference_pool[0])
    with pytest.raises(PoolMismatchError, match="grow, not shrink"):
        run(tiny, data_file, pool_dir, num_negatives=3, score_train_prompt=True)


def test_mismatched_pool(tiny, data_file, reference_pool, gsm8k_rows, tmp_path):
    model_config, model, tokenizer = tiny
    pool_dir = reference_pool[0]
    before = (pool_dir / "pool.jsonl").read_bytes()
    with pytest.raises(PoolMismatchError, match=r"temperature \(pool: 0.7, now: 1.0\)"):
        run(tiny, data_file, pool_dir, temperature=1.0, score_train_prompt=True)
    with pytest.raises(PoolMismatchError, match="sampler_system_prompt"):
        run(tiny, data_file, pool_dir, sampler_system_prompt="", score_train_prompt=True)
    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_tokens(["<extra>"])
    sample_config = SampleConfig(pool_dir=str(pool_dir), **SETTINGS, score_train_prompt=True)
    with pytest.raises(PoolMismatchError, match="fingerprint.tokenizer_digest"):
        sample_pool(model_config, DataConfig(data_path=str(data_file)), sample_config, model=model, tokenizer=other_tokenizer)
    meta, _ = load_pool(pool_dir)
    check_pool_compatible(meta, model, tokenizer, "chat")
    with pytest.raises(PoolMismatchError, match="template"):
        check_pool_compatible(meta, model, tokenizer, "alpaca")
    # ids that are not in the dataset: the pool was made from other data
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "new", **gsm8k_rows[10]}])
    with pytest.raises(PoolMismatchError, match="not in the dataset"):
        run(tiny, other, pool_dir, score_train_prompt=True)
    assert (pool_dir / "pool.jsonl").read_bytes() == before  # nothing was written


def test_bad_inputs(tiny, data_file, gsm8k_rows, tmp_path):
    model_config, model, tokenizer = tiny
    with pytest.raises(ValueError, match="num_negatives"):
        SampleConfig(pool_dir="x", num_negatives=0)
    with pytest.raises(ValueError, match="pool_dir"):
        SampleConfig()
    with pytest.raises(ValueError, match="temperature"):
        SampleConfig(pool_dir="x", temperature=0.0)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no examples"):
        run(tiny, tmp_path / "empty.jsonl", tmp_path / "p0")
    long_rows = [{"id": "short", **gsm8k_rows[0]}, {"id": "long", "question": "How many? " * 300, "answer": "#### 1"}]
    with pytest.raises(ValueError, match=r"id 'long'.*context window of 512"):
        run(tiny, write_jsonl(tmp_path / "long.jsonl", long_rows), tmp_path / "p1")
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    sample_config = SampleConfig(pool_dir=str(tmp_path / "p2"), **SETTINGS)
    with pytest.raises(ValueError, match=r"sampler prompt.*needs a tokenizer with a chat template"):
        sample_pool(model_config, DataConfig(data_path=str(data_file)), sample_config, model=model, tokenizer=no_template)


def test_seeded_sampler_draws_from_the_tempered_truncated_distribution():
    # known answer: frequencies of 4000 independent rows vs softmax(logits / T) after top-k
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    rows = 4000
    sampler = SeededSampler(list(range(rows)), temperature=0.7, top_k=3, top_p=1.0, max_steps=1)
    out = sampler(None, logits.repeat(rows, 1))
    chosen = out.argmax(dim=1)
    assert torch.isinf(out).sum() == rows * 4  # all but the chosen token are -inf
    expected = torch.softmax(logits[:3] / 0.7, dim=0)
    observed = torch.bincount(chosen, minlength=5).float() / rows
    assert observed[3:].sum() == 0
    assert torch.allclose(observed[:3], expected, atol=0.03)
    assert torch.allclose(sampler.step_logps[0], torch.log_softmax(logits, 0)[chosen], atol=1e-6)
    # top_p keeps the smallest set with mass >= p: here only the first token
    nucleus = SeededSampler([0, 1, 2], temperature=1.0, top_k=0, top_p=0.5, max_steps=1)
    assert nucleus(None, logits.repeat(3, 1)).argmax(dim=1).tolist() == [0, 0, 0]


def test_seeded_sampler_takes_one_draw_per_step_from_each_rows_generator():
    # the uniforms drawn up front are the stream of one torch.rand(1) per step (how earlier versions drew
    # them), so a pool sampled by an earlier version resumes with the same completions
    seeds, steps = [3, 2**62 + 7, 11], 5
    sampler = SeededSampler(seeds, temperature=0.9, top_k=0, top_p=1.0, max_steps=steps)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    for step in range(steps):
        logits = torch.randn(len(seeds), 7, generator=torch.Generator().manual_seed(100 + step), dtype=torch.float64)
        chosen = sampler(None, logits.float()).argmax(dim=1)
        for row, generator in enumerate(generators):
            u = torch.rand(1, generator=generator, dtype=torch.float64).item()
            cdf = torch.softmax(logits[row].float().double() / 0.9, dim=0).cumsum(dim=0)
            assert chosen[row].item() == int(torch.searchsorted(cdf, u * cdf[-1], right=True))


def test_sampler_view_ignores_lora(tiny_model_dir, data_file, tmp_path):
    model_config = ModelConfig(model_name_or_path=str(tiny_model_dir), precision="fp32", lora_r=4)
    model, tokenizer = load_model(model_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a trained adapter: not part of P_g0
    model.train()
    data_config = DataConfig(data_path=str(data_file), max_examples=2)
    sample_pool(model_config, data_config, SampleConfig(pool_dir=str(tmp_path), num_negatives=1, max_new_tokens=6),
                model=model, tokenizer=tokenizer)
    assert model.training  # restored by sampler_view
    model.eval()
    base, _ = load_model(ModelConfig(model_name_or_path=str(tiny_model_dir), precision="fp32", lora_r=0))
    for rs in load_pool(tmp_path)[1].values():
        prompt_ids = encode_prompt(tokenizer, rs[0]["sampler_prompt"], "chat")
        base_logp = teacher_forced_logp(base, prompt_ids, rs[0]["token_ids"]).sum().item()
        adapted_logp = teacher_forced_logp(model, prompt_ids, rs[0]["token_ids"]).sum().item()
        assert rs[0]["logp_sampler"] == pytest.approx(base_logp, abs=1e-4 * rs[0]["num_tokens"])
        assert abs(adapted_logp - base_logp) > 1e-2


@pytest.mark.embedded
def test_embedded_model_logp_sampler(gsm8k_rows, tmp_path):
    """Acceptance: on SmolLM2-135M-Instruct, log P_g0(y'|x̄) recomputed with plain transformers matches."""
    model_config = ModelConfig(precision="fp32", lora_r=0)
    model, tokenizer = load_model(model_config)
    data = write_jsonl(tmp_path / "train.jsonl", gsm8k_rows[:2])
    stats = sample_pool(model_config, DataConfig(data_path=str(data)),
                        SampleConfig(pool_dir=str(tmp_path / "pool"), num_negatives=1, max_new_tokens=24),
                        model=model, tokenizer=tokenizer)
    assert stats.num_records == 2
    for rs in load_pool(tmp_path / "pool")[1].values():
        for record in rs:
            prompt_ids = encode_prompt(tokenizer, record["sampler_prompt"], "chat")
            per_token = teacher_forced_logp(model, prompt_ids, record["token_ids"])
            assert record["logp_sampler"] == pytest.approx(per_token.sum().item(), abs=1e-4 * record["num_tokens"])


def test_sampling_progress_moves_at_every_decoding_step(tiny, data_file, tmp_path, monkeypatch):
    # A batch of completions can take minutes on a CPU: the bar moves per decoding step, not per batch.
    import dftlite.progress

    advances = []

    class Recorder(dftlite.progress.Progress):
        def advance(self, amount=1):
            advances.append(amount)

    monkeypatch.setattr(dftlite.progress, "Progress", Recorder)
    stats = run(tiny, data_file, tmp_path / "pool", batch_size=8)  # 6 prompts × 4 negatives = 24 completions
    assert stats.new_records == 24
    assert sum(advances) == 24 * SETTINGS["max_new_tokens"]  # the whole budget, exactly
    assert advances.count(8) >= 2, "one advance of 8 rows per decoding step of a full batch"


@pytest.mark.parametrize("no_system", ["", None])
def test_no_sampler_system_prompt_samples_from_the_training_prompt(tiny, data_file, tmp_path, no_system):
    """sampler_system_prompt "" or None: x̄ is x itself, so log P_g0(y'|x̄) equals log P_g0(y'|x)
    exactly; the default adversarial message makes them differ."""
    plain = run(tiny, data_file, tmp_path / "plain", num_negatives=2, max_new_tokens=6, score_train_prompt=True,
                sampler_system_prompt=no_system)
    adversarial = run(tiny, data_file, tmp_path / "adversarial", num_negatives=2, max_new_tokens=6,
                      score_train_prompt=True)
    assert plain.num_records and adversarial.num_records
    for pool_dir, same in [(tmp_path / "plain", True), (tmp_path / "adversarial", False)]:
        meta, records = load_pool(pool_dir)
        pairs = [(r["logp_sampler"], r["logp_train_prompt"]) for rs in records.values() for r in rs if r["token_ids"]]
        assert pairs
        assert all(a == pytest.approx(b, abs=1e-5) for a, b in pairs) is same
        assert ("unhelpful" in json.dumps(meta)) is (not same)


def test_shards_gather_into_the_one_process_pool(tiny, data_file, reference_pool, tmp_path):
    """3 shards of the 6 prompts (as 3 GPUs or machines would run them), then one run without shards: the
    gathered pool holds the reference pool's records, each once; a shard with other settings is refused."""
    for index in range(3):
        stats = run(tiny, data_file, tmp_path, score_train_prompt=True, num_shards=3, shard_index=index)
        assert stats.num_prompts == 2  # prompts index, index + 3
    stats = run(tiny, data_file, tmp_path, score_train_prompt=True)
    assert stats.new_records == 0 and stats.num_records == 24  # all gathered, nothing left to sample
    assert pool_tokens(tmp_path) == pool_tokens(reference_pool[0])
    _, gathered = load_pool(tmp_path)
    _, reference = load_pool(reference_pool[0])
    for example_id, records in reference.items():  # log-probs: other batches, so equal up to fp32 rounding
        for mine, theirs in zip(gathered[example_id], records):
            assert mine["logp_sampler"] == pytest.approx(theirs["logp_sampler"], abs=1e-4)
            assert mine["logp_train_prompt"] == pytest.approx(theirs["logp_train_prompt"], abs=1e-4)
    run(tiny, data_file, tmp_path / "other", temperature=0.9, num_shards=2, shard_index=0)
    with pytest.raises(PoolMismatchError, match="temperature"):
        run(tiny, data_file, tmp_path / "other", temperature=0.7)
