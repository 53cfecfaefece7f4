"""Evaluation: answer extraction, accuracy, batched greedy decoding, the discrimination report
against a hand computation, and base vs adapter side by side (base = a separately loaded base)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_jsonl

from dftlite import evaluate as evaluate_module
from dftlite.data import DataConfig, Example, load_data
from dftlite.evaluate import EvalConfig, accuracy, discrimination, evaluate, extract_answer, greedy_generate
from dftlite.models import ModelConfig, load_base_model, load_model
from dftlite.pool import load_pool
from dftlite.sampling import SampleConfig, sample_pool

NUM_POOL_EXAMPLES = 3


def make_adapter(model_config: ModelConfig, path, seed: int = 1):
    """A non-trivial LoRA adapter without training: random lora_B (PEFT initialises it to 0)."""
    model, _ = load_model(model_config)
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_config(tiny_model_dir):
    return ModelConfig(model_name_or_path=str(tiny_model_dir), precision="fp32", lora_r=4)


@pytest.fixture(scope="module")
def adapter_dir(model_config, tmp_path_factory):
    return make_adapter(model_config, tmp_path_factory.mktemp("run") / "adapter")


@pytest.fixture(scope="module")
def data_config(gsm8k_rows, tmp_path_factory):
    """Four eval examples; the pool (below) covers the first three, so one is skipped."""
    rows = [{"id": f"q{i}", **row} for i, row in enumerate(gsm8k_rows[: NUM_POOL_EXAMPLES + 1])]
    path = write_jsonl(tmp_path_factory.mktemp("data") / "dev.jsonl", rows)
    return DataConfig(data_path=str(path))


@pytest.fixture(scope="module")
def pool_dir(model_config, data_config, tmp_path_factory):
    pool_dir = tmp_path_factory.mktemp("pool")
    pool_data = DataConfig(data_path=data_config.data_path, max_examples=NUM_POOL_EXAMPLES)
    sample_pool(model_config, pool_data, SampleConfig(pool_dir=str(pool_dir), num_negatives=2, max_new_tokens=5))
    return pool_dir


@pytest.fixture(scope="module")
def adapter_model(model_config, adapter_dir):
    model, tokenizer = load_model(model_config, adapter_path=str(adapter_dir), trainable=False)
    return model, tokenizer


@pytest.mark.parametrize("text, expected", [
    ("#### 1,234", "1234"),
    ("The answer is $5.50.", "5.5"),
    ("I do not know.", None),
    ("", None),
    ("So she has 72.0 clips", "72"),
    ("She makes 9 * 2 = $18 every day.\n#### $70,000.", "70000"),  # the marker wins over the last number
    ("#### 18\nQuestion: what is 3 + 4?", "18"),                   # babble after the marker is ignored
    ("16 - 3 - 4 = 9", "9"),
    ("The temperature fell to -3 degrees", "-3"),
    ("#### no number after the marker, 7 before", "7"),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_compares_numerically():
    assert extract_answer("72.0") == extract_answer("#### 72") == extract_answer("$72")
    assert extract_answer("0.50") == extract_answer("0.5") != extract_answer("5")


def test_accuracy_with_fake_generation(monkeypatch, adapter_model):
    _, tokenizer = adapter_model
    examples = [
        Example("a", [{"role": "user", "content": "q a"}], "48/2 = 24\n#### 72"),
        Example("b", [{"role": "user", "content": "q b"}], "#### 10"),
        Example("c", [{"role": "user", "content": "q c"}], "#### 1,234"),
        Example("d", [{"role": "user", "content": "q d"}], "#### 5"),
        Example("e", [{"role": "user", "content": "write a poem"}], "Roses are red."),  # no numeric gold: skipped
    ]
    canned = {"q a": "It is 72", "q b": "The answer is $10.00.", "q c": "#### 1235", "q d": "I cannot say."}
    seen = {}

    def fake_generate(model, tokenizer_, prompts, max_new_tokens, batch_size, template="chat"):
        seen.update(prompts=prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, template=template)
        return [next(v for k, v in canned.items() if k in p) for p in prompts]

    monkeypatch.setattr(evaluate_module, "greedy_generate", fake_generate)
    result = accuracy(None, tokenizer, examples, "chat", max_new_tokens=7, batch_size=3)
    assert (result["accuracy"], result["correct"], result["total"], result["no_answer"], result["skipped"]) == (0.5, 2, 4, 1, 1)
    assert [p["correct"] for p in result["predictions"]] == [True, True, False, False]
    assert [p["predicted"] for p in result["predictions"]] == ["72", "10", "1235", None]
    # the training prompt (chat template, generation prompt, no system message), as rendered text
    assert seen["prompts"][0] == "<|im_start|>user\nq a<|im_end|>\n<|im_start|>assistant\n"
    assert (seen["max_new_tokens"], seen["batch_size"], seen["template"]) == (7, 3, "chat")


def _reference_greedy(model, tokenizer, prompt_ids, max_new_tokens):
    """One unpadded prompt, plain generate, explicit greedy settings."""
    with torch.no_grad():
        output = model.generate(
            input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False, max_new_tokens=max_new_tokens, repetition_penalty=1.0, pad_token_id=tokenizer.pad_token_id,
        )
    tokens = output[0, len(prompt_ids):].tolist()
    if tokenizer.eos_token_id in tokens:
        tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def test_greedy_generate_batched_equals_unbatched(adapter_model):
    model, tokenizer = adapter_model
    questions = ["Natalia sold 48 clips.", "How many?", "Weng earns $12 an hour for babysitting. How much did she earn?"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in questions]
    base = model.get_base_model()
    base.generation_config.repetition_penalty = 1.7  # a Hub default that must not leak into greedy eval
    try:
        outputs = greedy_generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)
        assert base.generation_config.repetition_penalty == 1.7, "the model's generation config is restored"
        expected = [_reference_greedy(model, tokenizer, tokenizer(p, add_special_tokens=False)["input_ids"], 8) for p in prompts]
    finally:
        base.generation_config.repetition_penalty = None
    assert outputs == expected
    assert any(outputs), "the random model should produce some text"


def _hand_scores(model, tokenizer, examples, records_by_id):
    """Per-token log-likelihoods with full logits and log_softmax, one unpadded sequence at a time."""
    scores = {}
    for example in examples:
        negatives = [r["token_ids"] for r in records_by_id.get(example.id, []) if not r["gold_duplicate"]]
        if not negatives:
            continue
        text = tokenizer.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        gold_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        per_token = []
        for completion in [gold_ids] + negatives:
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + completion])).logits[0].double()  # (T, V)
            logps = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)  # rows predicting the completion
            per_token.append(logps.gather(1, torch.tensor(completion)[:, None]).mean().item())
        scores[example.id] = {"gold": per_token[0], "negatives": per_token[1:]}
    return scores


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_discrimination_matches_hand_computation(which, adapter_model, model_config, data_config, pool_dir):
    if which == "adapter":
        model, tokenizer = adapter_model
        model.eval()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_config.model_name_or_path, dtype=torch.float32).eval()
        tokenizer = adapter_model[1]
    examples = load_data(data_config)
    _, records_by_id = load_pool(pool_dir)

    result = discrimination(model, tokenizer, examples, records_by_id, "chat", batch_size=3)  # ragged, padded batches
    hand = _hand_scores(model, tokenizer, examples, records_by_id)

    assert set(result["scores"]) == set(hand) and len(hand) == NUM_POOL_EXAMPLES
    assert result["skipped"] == 1  # the fifth example has no pool records
    for example_id, expected in hand.items():
        got = result["scores"][example_id]
        assert got["gold"] == pytest.approx(expected["gold"], abs=1e-4)
        assert got["negatives"] == pytest.approx(expected["negatives"], abs=1e-4)
    wins = [s["gold"] > max(s["negatives"]) for s in hand.values()]
    negatives = [n for s in hand.values() for n in s["negatives"]]
    assert result["win_rate"] == sum(wins) / len(wins)
    assert result["gold_logp_per_token"] == pytest.approx(sum(s["gold"] for s in hand.values()) / len(hand), abs=1e-4)
    assert result["negative_logp_per_token"] == pytest.approx(sum(negatives) / len(negatives), abs=1e-4)
    assert result["num_negatives"] == len(negatives) == 2 * NUM_POOL_EXAMPLES


def test_base_and_adapter_side_by_side(model_config, adapter_dir, data_config, pool_dir, tmp_path, capsys):
    settings = dict(pool_dir=str(pool_dir), max_new_tokens=5, eval_batch_size=2)
    both = evaluate(model_config, data_config, EvalConfig(adapter_path=str(adapter_dir), json_path=str(tmp_path / "eval.json"), **settings))
    assert "change" in capsys.readouterr().out  # the rich table, base next to adapter

    # the base column must be exactly what a separately loaded base model (no adapter at all) gives
    base_model, tokenizer = load_base_model(model_config)
    alone = evaluate(model_config, data_config, EvalConfig(**settings), model=base_model, tokenizer=tokenizer)
    assert "adapter" not in alone
    assert both["base"] == alone["base"]
    assert both["num_examples"] == NUM_POOL_EXAMPLES + 1 and both["base"]["num_prompts"] == NUM_POOL_EXAMPLES
    # and the adapter really is another model
    assert both["adapter"]["scores"] != both["base"]["scores"]
    assert both["adapter"]["gold_logp_per_token"] != both["base"]["gold_logp_per_token"]
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(json.dumps(both))


def test_cli_eval_json(model_config, adapter_dir, data_config, pool_dir, capsys):
    from dftlite.cli import main

    argv = ["eval", "--model_name_or_path", model_config.model_name_or_path, "--precision", "fp32",
            "--data_path", data_config.data_path, "--adapter_path", str(adapter_dir), "--pool_dir", str(pool_dir),
            "--max_new_tokens", "3", "--compare_base", "false", "--json"]
    assert main(argv) == 0
    results = json.loads(capsys.readouterr().out)  # progress bars go to stderr, stdout is pure JSON
    assert "base" not in results
    assert set(results["adapter"]) >= {"accuracy", "win_rate", "gold_logp_per_token", "negative_logp_per_token"}
    assert results["config"]["max_new_tokens"] == 3


def test_eval_config_validation():
    with pytest.raises(ValueError, match="eval_batch_size"):
        EvalConfig(eval_batch_size=0)
    assert EvalConfig(adapter_path="", pool_dir="").adapter_path is None


def test_greedy_generate_progress_moves_at_every_decoding_step(adapter_model, monkeypatch):
    # It used to move once per batch of 16 prompts: minutes at 0/N on a CPU.
    advances = []

    class Recorder:
        def __init__(self, description, total, unit="items", **kwargs):
            self.total = total

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def advance(self, amount=1):
            advances.append(amount)

    monkeypatch.setattr(evaluate_module, "Progress", Recorder)
    model, tokenizer = adapter_model
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ["Natalia sold 48 clips.", "How many?", "Weng earns $12 an hour."]]
    greedy_generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=2)
    # batches of 2 and 1 rows: per decoding step one token per row, then each batch's unused budget
    steps_of_first_batch = next(i for i, a in enumerate(advances) if a != 2)
    assert steps_of_first_batch >= 1 and len(advances) > 2
    assert sum(advances) == 3 * 6  # the whole budget, prompts × max_new_tokens, is reached exactly
