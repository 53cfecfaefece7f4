"""Training data: file formats, normalisation to one record type, prompt templates, tokenization.

Supported files: JSONL, JSON (a list of objects), Parquet, and Hugging Face `datasets`
(a `datasets.Dataset`, a directory written by `save_to_disk`, or a Hub name loaded with
`datasets.load_dataset`). Supported record formats, detected from the keys:

- chat:    {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
           the last turn must be the assistant's; it is the answer.
- prompt_completion: {"prompt": str | messages, "completion": str | [assistant message]}
- alpaca:  {"instruction": ..., "input": optional, "output": ...}
- gsm8k:   {"question": ..., "answer": ...}; `<<48/2=24>>` calculator annotations are stripped
           unless `keep_calculator_annotations=True`.
- metamathqa: {"query": ..., "response": ...} (meta-math/MetaMathQA, the paper's math data);
           its other fields (type, original_question) are ignored.
- ultrafeedback: {"prompt": str, "chosen": [user message, ..., assistant message]}
           (HuggingFaceH4/ultrafeedback_binarized, the paper's chat data). DFT uses the chosen answer
           only: `rejected` and the scores are ignored, as DFT needs no preference pairs.

Every record becomes an `Example` with a stable `id`: the record's own "id" field when it has
one, else a digest of its prompt and answer (so the id survives reordering of the file).

Truncation policy (`encode`): the prompt is never cut. An example whose prompt alone leaves no
room for one answer token within `max_length` is dropped; otherwise the answer (+EOS) is cut
from the right to fit. Both counts are reported by `encode_examples`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

FORMATS = ("auto", "chat", "prompt_completion", "alpaca", "gsm8k", "metamathqa", "ultrafeedback")
TEMPLATES = ("chat", "alpaca", "plain")
MAX_LINE_BYTES = 16 * 1024 * 1024  # one JSONL record over 16 MiB is almost surely a broken file
CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")

# The Alpaca prompt (Taori et al. 2023), which the DFT paper used for math with base models.
ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


class DataError(ValueError):
    """Bad input data; the message names the file, the line (or row) and the field."""


@dataclass
class DataConfig:
    data_path: str = field(
        default="",
        metadata={"help": "Training data: .jsonl/.json/.parquet file, a saved `datasets` directory, or a Hub dataset name."},
    )
    data_format: Literal["auto", "chat", "prompt_completion", "alpaca", "gsm8k", "metamathqa", "ultrafeedback"] = field(
        default="auto", metadata={"help": "Record format; auto detects it from the keys of each record."}
    )
    data_split: str = field(default="train", metadata={"help": "Split to read from a Hub dataset or DatasetDict."})
    template: Literal["chat", "alpaca", "plain"] = field(
        default="chat",
        metadata={"help": "chat = the tokenizer's chat template; alpaca / plain = text templates for base models."},
    )
    max_length: int = field(default=512, metadata={"help": "Max tokens of prompt + answer (see truncation policy)."})
    max_examples: int | None = field(default=None, metadata={"help": "Use only the first N examples (None = all)."})
    keep_calculator_annotations: bool = field(
        default=False, metadata={"help": "Keep GSM8K <<a*b=c>> calculator annotations in answers."}
    )

    def __post_init__(self):
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1 or None, got {self.max_examples}")


@dataclass
class Example:
    """One training pair (x, y). `prompt` holds the chat turns before the answer."""

    id: str
    prompt: list[dict[str, str]]
    answer: str


# ---------------------------------------------------------------------------------------------
# Reading files: (location, record) pairs, where location is "file:line" for error messages.


def _read_jsonl(path: Path) -> Iterable[tuple[str, Any]]:
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{where}: line is {len(raw) / 2**20:.1f} MiB, over the {MAX_LINE_BYTES >> 20} MiB limit")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not text.strip():
                continue
            try:  # without the line break: a line cut short is then reported at its real end, not "column 1"
                yield where, json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None


def _read_json(path: Path) -> Iterable[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a JSON data file must hold a list of records, got {type(data).__name__}")
    for index, record in enumerate(data):
        yield f"{path}[{index}]", record


def _read_parquet(path: Path) -> Iterable[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for broken files
        raise DataError(f"{path}: cannot read Parquet file ({err})") from None
    try:
        records = table.to_pylist()
    except UnicodeDecodeError as err:  # a string column holding bytes that are not UTF-8
        row, column = _bad_utf8_cell(table)
        raise DataError(f"{path} row {row}: field {column!r} is not valid UTF-8 ({err.reason})") from None
    for index, record in enumerate(records):
        yield f"{path} row {index}", record


def _bad_utf8_cell(table) -> tuple[int, str]:
    """(row, column) of the first cell that does not decode: only called once decoding failed."""
    return next((row, column) for row in range(table.num_rows) for column in table.column_names
                if _fails_to_decode(lambda: table.column(column).slice(row, 1).to_pylist()))


def _fails_to_decode(convert) -> bool:
    try:
        convert()
    except UnicodeDecodeError:
        return True
    return False


def _read_dataset(dataset, name: str) -> Iterable[tuple[str, Any]]:
    try:
        records = list(dataset)
    except UnicodeDecodeError as err:  # rows are decoded in batches: find the cell
        row, column = next((row, column) for row in range(len(dataset)) for column in dataset.column_names
                           if _fails_to_decode(lambda: dataset.select_columns([column])[row]))
        raise DataError(f"{name} row {row}: field {column!r} is not valid UTF-8 ({err.reason})") from None
    for index, record in enumerate(records):
        yield f"{name} row {index}", record


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst", ".bz2", ".xz")
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")


def is_hub_dataset_name(value: str) -> bool:
    """Whether a data_path that is not on disk names a Hub dataset: `owner/name`, without a data-file
    extension and not starting with ./, ../, / or ~ (all of which mean a local path)."""
    return (bool(HUB_NAME.fullmatch(value)) and not value.startswith((".", "~"))
            and not value.lower().endswith(DATA_SUFFIXES))


def _load_hub_dataset(datasets, name: str, split: str, path: Path):
    """`datasets.load_dataset(name)`; a failure (offline, no such dataset) is one DataError line."""
    from huggingface_hub import constants

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types: connection, not found, gated, offline
        offline = " (offline: HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{name}: no such local file or directory ({os.path.abspath(path)}), and the Hub dataset could not be loaded"
            f"{offline}: {reason}. A Hub dataset needs the network or the local datasets cache."
        ) from None


def read_records(source, split: str = "train") -> list[tuple[str, Any]]:
    """All raw records of a data source as (location, record) pairs."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a runtime dependency
        datasets = None
    if datasets is not None and isinstance(source, datasets.Dataset):
        return list(_read_dataset(source, "dataset"))
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
        if suffix not in readers:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
        return list(readers[suffix](path))
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # truncated or foreign Arrow files raise several pyarrow/datasets types
            raise DataError(f"{path}: cannot read the saved dataset ({type(err).__name__}: {err})") from None
    elif not is_hub_dataset_name(str(source)):
        raise DataError(f"data file not found: {source} (looked for {os.path.abspath(path)})")
    else:
        loaded = _load_hub_dataset(datasets, str(source), split, path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{source}: no split {split!r}; splits are {sorted(loaded)}")
        loaded = loaded[split]
    return list(_read_dataset(loaded, str(source)))


# ---------------------------------------------------------------------------------------------
# Normalising records.


def detect_format(record: dict) -> str:
    keys = set(record)
    if "messages" in keys:
        return "chat"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"question", "answer"} <= keys:
        return "gsm8k"
    if {"query", "response"} <= keys:
        return "metamathqa"
    # UltraFeedback binarized also holds `messages` (= chosen), so "chat" above reads it the same way.
    if {"prompt", "chosen"} <= keys:
        return "ultrafeedback"
    return ""


def _text(record: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in record or record[key] is None:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _messages(value: Any, where: str, key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of messages")
    messages = []
    for turn, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: {key}[{turn}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: {key}[{turn}].role must be system, user or assistant, got {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key}[{turn}].content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def normalize_record(record: Any, where: str, data_format: str = "auto", keep_calculator_annotations: bool = False) -> Example:
    """One raw record -> Example, or a DataError naming `where` and the field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    fmt = detect_format(record) if data_format == "auto" else data_format
    if fmt == "chat":
        messages = _messages(record.get("messages"), where, "messages")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: field 'messages': the last turn must be the assistant's, got {messages[-1]['role']!r}")
        prompt, answer = messages[:-1], messages[-1]["content"]
        if not any(m["role"] == "user" for m in prompt):
            raise DataError(f"{where}: field 'messages': no user turn before the answer")
    elif fmt == "prompt_completion":
        raw_prompt, raw_completion = record.get("prompt"), record.get("completion")
        if isinstance(raw_prompt, list):
            prompt = _messages(raw_prompt, where, "prompt")
        else:
            prompt = [{"role": "user", "content": _text(record, "prompt", where)}]
        if isinstance(raw_completion, list):
            completion = _messages(raw_completion, where, "completion")
            if len(completion) != 1 or completion[0]["role"] != "assistant":
                raise DataError(f"{where}: field 'completion' must be one assistant message")
            answer = completion[0]["content"]
        else:
            answer = _text(record, "completion", where, allow_empty=True)
    elif fmt == "alpaca":
        instruction = _text(record, "instruction", where)
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        prompt = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction}]
        answer = _text(record, "output", where, allow_empty=True)
    elif fmt == "gsm8k":
        prompt = [{"role": "user", "content": _text(record, "question", where)}]
        answer = _text(record, "answer", where, allow_empty=True)
        if not keep_calculator_annotations:
            answer = CALCULATOR_ANNOTATION.sub("", answer)
    elif fmt == "metamathqa":
        prompt = [{"role": "user", "content": _text(record, "query", where)}]
        answer = _text(record, "response", where, allow_empty=True)
    elif fmt == "ultrafeedback":
        prompt, answer = _chosen_pair(record, where)
    else:
        raise DataError(
            f"{where}: unknown record format with keys {sorted(record)}; expected one of "
            "messages | prompt+completion | instruction+output | question+answer | query+response | prompt+chosen"
        )
    if not answer.strip():
        raise DataError(f"{where}: empty answer")
    if "id" in record and record["id"] is not None:
        if not isinstance(record["id"], (str, int)):
            raise DataError(f"{where}: field 'id' must be a string or integer, got {type(record['id']).__name__}")
        example_id = str(record["id"])
    else:
        payload = json.dumps([prompt, answer], ensure_ascii=False, sort_keys=True)
        example_id = hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]
    return Example(id=example_id, prompt=prompt, answer=answer)


def _chosen_pair(record: dict, where: str) -> tuple[list[dict[str, str]], str]:
    """UltraFeedback binarized: the chosen conversation's turns before its last (the assistant's) are
    the prompt, the last is the answer. A chosen list holding only the answer takes `prompt` as the user turn."""
    chosen = _messages(record.get("chosen"), where, "chosen")
    if chosen[-1]["role"] != "assistant":
        raise DataError(f"{where}: field 'chosen': the last turn must be the assistant's, got {chosen[-1]['role']!r}")
    prompt = chosen[:-1]
    if not any(m["role"] == "user" for m in prompt):
        prompt = prompt + [{"role": "user", "content": _text(record, "prompt", where)}]
    return prompt, chosen[-1]["content"]


def load_examples(
    source,
    data_format: str = "auto",
    split: str = "train",
    max_examples: int | None = None,
    keep_calculator_annotations: bool = False,
) -> list[Example]:
    """Read and normalise a data source. Raises DataError on any bad record; skips nothing."""
    if data_format not in FORMATS:
        raise DataError(f"unknown data_format {data_format!r}; choose one of {FORMATS}")
    examples: list[Example] = []
    seen: dict[str, str] = {}
    for where, record in read_records(source, split):
        example = normalize_record(record, where, data_format, keep_calculator_annotations)
        if example.id in seen:
            raise DataError(f"{where}: duplicate id {example.id!r} (first seen at {seen[example.id]})")
        seen[example.id] = where
        examples.append(example)
        if max_examples is not None and len(examples) >= max_examples:
            break
    if not examples:
        raise DataError(f"{source}: no examples")
    return examples


def load_data(config: DataConfig) -> list[Example]:
    if not config.data_path:
        raise DataError("no training data: set data_path (a .jsonl/.json/.parquet file or a dataset)")
    return load_examples(
        config.data_path, config.data_format, config.data_split, config.max_examples, config.keep_calculator_annotations
    )


# ---------------------------------------------------------------------------------------------
# Prompt rendering and tokenization.


def render_prompt(tokenizer, prompt: list[dict[str, str]], template: str = "chat", system_prompt: str | None = None) -> str:
    """Render the prompt turns (plus an optional system message) as the text before the answer.

    `system_prompt` replaces any system turn of the example; the sampler uses it for x̄
    ("You are an unhelpful assistant.").
    """
    turns = [m for m in prompt if m["role"] != "system"] if system_prompt is not None else list(prompt)
    if system_prompt is not None:
        turns = [{"role": "system", "content": system_prompt}] + turns
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "template 'chat' needs a tokenizer with a chat template, and this one has none; "
                "use template: alpaca or plain for base models"
            )
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    system = "\n\n".join(m["content"] for m in turns if m["role"] == "system")
    dialogue = [m for m in turns if m["role"] != "system"]
    if template == "alpaca":
        # Earlier turns (rare for math data) go into the instruction, in order.
        instruction = "\n\n".join(m["content"] for m in dialogue)
        preamble = f"{system}\n\n" if system else f"{ALPACA_PREAMBLE}\n\n"
        return f"{preamble}### Instruction:\n{instruction}\n\n### Response:\n"
    lines = [system] if system else []
    lines += [f"{m['role'].capitalize()}: {m['content']}" for m in dialogue]
    return "\n\n".join(lines) + "\n\nAssistant: "


def encode_prompt(tokenizer, text: str, template: str) -> list[int]:
    """Token ids of a rendered prompt. Chat templates carry their own special tokens as text;
    for text templates a BOS is added when the tokenizer adds one by default."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if template != "chat" and tokenizer.bos_token_id is not None:
        probe = tokenizer("a")["input_ids"]
        if probe and probe[0] == tokenizer.bos_token_id:
            ids = [tokenizer.bos_token_id] + ids
    return ids


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Answer token ids + EOS: the model learns to stop."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    answer_ids: list[int]
    truncated: bool


def fit_to_length(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> EncodedPair | None:
    """Apply the truncation policy: None (drop) if the prompt leaves no room, else cut the answer."""
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    return EncodedPair(prompt_ids, answer_ids[:room], truncated=len(answer_ids) > room)


@dataclass
class EncodeReport:
    kept: int = 0
    truncated: int = 0
    dropped_ids: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{self.kept} examples kept, {self.truncated} answers truncated, {len(self.dropped_ids)} dropped (prompt too long)"


def encode_examples(tokenizer, examples: list[Example], template: str, max_length: int) -> tuple[dict[str, EncodedPair], EncodeReport]:
    """Tokenize training pairs under the truncation policy; returns {id: EncodedPair} and a report."""
    encoded: dict[str, EncodedPair] = {}
    report = EncodeReport()
    for example in examples:
        prompt_ids = encode_prompt(tokenizer, render_prompt(tokenizer, example.prompt, template), template)
        pair = fit_to_length(prompt_ids, encode_answer(tokenizer, example.answer), max_length)
        if pair is None:
            report.dropped_ids.append(example.id)
            continue
        report.kept += 1
        report.truncated += pair.truncated
        encoded[example.id] = pair
    return encoded, report


def build_sequence(prompt_ids: list[int], answer_ids: list[int]) -> tuple[list[int], list[int]]:
    """Concatenate prompt and answer; the completion mask marks the answer tokens (the loss positions)."""
    return prompt_ids + answer_ids, [0] * len(prompt_ids) + [1] * len(answer_ids)
