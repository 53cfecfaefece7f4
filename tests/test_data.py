"""Data formats, normalisation, templates, tokenization and bad-input errors."""

from __future__ import annotations

import json

import pytest

from dftlite.data import (
    DataError,
    build_sequence,
    encode_answer,
    encode_examples,
    encode_prompt,
    load_examples,
    render_prompt,
)
from tests.conftest import write_jsonl


def test_all_formats_normalise(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [{"role": "user", "content": "3+3?"}], "completion": [{"role": "assistant", "content": "6"}]},
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"instruction": "Say yes", "output": "yes"},
        {"question": "5*6?", "answer": "5*6 = <<5*6=30>>30\n#### 30"},
    ]
    examples = load_examples(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert [e.answer for e in examples] == ["Hello", "4", "6", "3", "yes", "5*6 = 30\n#### 30"]
    assert examples[0].prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert examples[3].prompt == [{"role": "user", "content": "Add\n\n1 and 2"}]
    assert len({e.id for e in examples}) == len(rows)
    kept = load_examples(write_jsonl(tmp_path / "g.jsonl", rows[-1:]), keep_calculator_annotations=True)
    assert kept[0].answer == rows[-1]["answer"]


def test_ids_are_stable_and_explicit_ids_win(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    first = load_examples(write_jsonl(tmp_path / "a.jsonl", rows))
    shuffled = load_examples(write_jsonl(tmp_path / "b.jsonl", rows[::-1]))
    assert [e.id for e in first] == [e.id for e in shuffled][::-1]
    with_id = load_examples(write_jsonl(tmp_path / "c.jsonl", [{"id": 7, "prompt": "p", "completion": "c"}]))
    assert with_id[0].id == "7"


def test_json_and_parquet_and_datasets(tmp_path):
    import datasets

    rows = [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    expected = load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    for source in [tmp_path / "d.json", tmp_path / "d.parquet", tmp_path / "saved", datasets.Dataset.from_list(rows)]:
        assert load_examples(source) == expected


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": \n', r"bad.jsonl:2: malformed JSON"),
        ('{"question": "q", "answer": "   "}\n', r"bad.jsonl:1: empty answer"),
        ('{"question": "q"}\n', r"bad.jsonl:1: unknown record format"),
        ('{"question": 3, "answer": "a"}\n', r"bad.jsonl:1: field 'question' must be a string"),
        ('{"foo": 1}\n', r"unknown record format with keys \['foo'\]"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"bad.jsonl:1: .*last turn must be the assistant's"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}\n', r"messages\[0\].role must be"),
        ('{"id": "x", "prompt": "p", "completion": "c"}\n{"id": "x", "prompt": "q", "completion": "d"}\n',
         r"bad.jsonl:2: duplicate id 'x' \(first seen at .*bad.jsonl:1\)"),
        ('[1, 2]\n', r"bad.jsonl:1: a record must be a JSON object"),
        ("", r"no examples"),
    ],
)
def test_bad_input_errors_name_file_line_field(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_examples(path)


def test_bad_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_examples(tmp_path / "x.csv")
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "missing.jsonl")
    (tmp_path / "latin.jsonl").write_bytes(b'{"question": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:1: not valid UTF-8"):
        load_examples(tmp_path / "latin.jsonl")
    with pytest.raises(DataError, match="unknown data_format 'nope'"):
        load_examples(write_jsonl(tmp_path / "f.jsonl", [{"question": "q", "answer": "a"}]), data_format="nope")
    (tmp_path / "obj.json").write_text('{"question": "q"}')
    with pytest.raises(DataError, match="must hold a list"):
        load_examples(tmp_path / "obj.json")


def test_gsm8k_bundle_and_calculator_stripping(gsm8k_rows, tmp_path):
    examples = load_examples(write_jsonl(tmp_path / "g.jsonl", gsm8k_rows))
    assert len(examples) == 32
    assert all("<<" not in e.answer and "####" in e.answer for e in examples)
    assert examples[0].answer.startswith("Natalia sold 48/2 = 24 clips in May.")


def test_chat_rendering_and_masks(tiny_model_dir):
    from dftlite.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    text = render_prompt(tokenizer, prompt)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    # The sampler's adversarial system prompt replaces the example's own system turn.
    adversarial = render_prompt(tokenizer, prompt, system_prompt="You are an unhelpful assistant.")
    assert adversarial.startswith("<|im_start|>system\nYou are an unhelpful assistant.<|im_end|>\n<|im_start|>user")
    assert "Be brief" not in adversarial
    ids, mask = build_sequence(encode_prompt(tokenizer, text, "chat"), encode_answer(tokenizer, "4"))
    assert tokenizer.decode(ids) == text + "4<|im_end|>"
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "4<|im_end|>"


def test_alpaca_template(tiny_model_dir):
    from dftlite.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    text = render_prompt(tokenizer, [{"role": "user", "content": "Add 1 and 2"}], template="alpaca")
    assert text.startswith("Below is an instruction") and text.endswith("### Instruction:\nAdd 1 and 2\n\n### Response:\n")
    with_system = render_prompt(tokenizer, [{"role": "user", "content": "x"}], "alpaca", system_prompt="Be unhelpful.")
    assert with_system.startswith("Be unhelpful.\n\n### Instruction:")
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template|has none"):
        render_prompt(tokenizer, [{"role": "user", "content": "x"}], system_prompt="You are an unhelpful assistant.")


def test_truncation_policy(tiny_model_dir, tmp_path):
    from dftlite.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = [
        {"id": "short", "prompt": "2+2?", "completion": "4"},
        {"id": "long-answer", "prompt": "2+2?", "completion": "four " * 40},
        {"id": "long-prompt", "prompt": "two plus two " * 40, "completion": "4"},
    ]
    examples = load_examples(write_jsonl(tmp_path / "t.jsonl", rows))
    encoded, report = encode_examples(tokenizer, examples, "chat", max_length=40)
    assert report.kept == 2 and report.truncated == 1 and report.dropped_ids == ["long-prompt"]
    assert "1 answers truncated, 1 dropped" in report.summary()
    long = encoded["long-answer"]
    assert len(long.prompt_ids) + len(long.answer_ids) == 40 and long.answer_ids[-1] != tokenizer.eos_token_id
    assert encoded["short"].answer_ids[-1] == tokenizer.eos_token_id


# The paper's datasets, as their Hub files hold them (one record each, fields and nesting as published).
METAMATHQA_ROW = {"query": "What is 3 times 4?", "response": "3 times 4 is 12.\nThe answer is: 12",
                  "type": "GSM_Rephrased", "original_question": "Compute 3*4."}
ULTRAFEEDBACK_ROW = {
    "prompt": "Name a prime number.", "prompt_id": "abc123",
    "chosen": [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "7 is prime."}],
    "rejected": [{"role": "user", "content": "Name a prime number."}, {"role": "assistant", "content": "9."}],
    "score_chosen": 9.0, "score_rejected": 2.0,
}


def test_metamathqa_and_ultrafeedback_load_without_conversion(tmp_path):
    import datasets

    math = load_examples(write_jsonl(tmp_path / "metamathqa.jsonl", [METAMATHQA_ROW]))
    assert math[0].prompt == [{"role": "user", "content": "What is 3 times 4?"}]
    assert math[0].answer == "3 times 4 is 12.\nThe answer is: 12"
    # the Hub's parquet layout (nested message lists), read with auto detection
    datasets.Dataset.from_list([ULTRAFEEDBACK_ROW]).to_parquet(str(tmp_path / "uf.parquet"))
    chat = load_examples(tmp_path / "uf.parquet")
    assert chat[0].prompt == [{"role": "user", "content": "Name a prime number."}]
    assert chat[0].answer == "7 is prime."  # the chosen answer; `rejected` is never the positive
    # the published file also holds `messages` (= chosen): read as chat, it gives the same example and id
    as_chat = load_examples(write_jsonl(tmp_path / "m.jsonl", [{**ULTRAFEEDBACK_ROW, "messages": ULTRAFEEDBACK_ROW["chosen"]}]))
    assert as_chat == chat
    # a chosen list with the answer only: `prompt` is the user turn
    short = {**ULTRAFEEDBACK_ROW, "chosen": ULTRAFEEDBACK_ROW["chosen"][1:]}
    assert load_examples(write_jsonl(tmp_path / "s.jsonl", [short]), data_format="ultrafeedback") == chat


@pytest.mark.parametrize("row, field", [
    ({"query": "", "response": "12"}, "'query' is empty"),
    ({"query": "q", "response": 12}, "'response' must be a string"),
    ({"prompt": "p", "chosen": "7 is prime."}, "'chosen' must be a non-empty list"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "p"}]}, "field 'chosen': the last turn must be the assistant's"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "p"}, {"role": "bot", "content": "a"}]}, "chosen[1].role"),
])
def test_paper_formats_errors_name_file_line_field(tmp_path, row, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [METAMATHQA_ROW, row])
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert f"{path}:2" in str(err.value) and field in str(err.value)
