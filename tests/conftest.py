"""Shared fixtures: a tiny random Llama with a real byte-level BPE tokenizer, built offline.

The tokenizer is trained in the fixture on GSM8K-like text (a few hundred merges, seconds),
and carries a ChatML chat template like SmolLM2's, so chat rendering is exercised for real.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

# Never reach for the network in tests; the embedded model ships inside a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

REPO = Path(__file__).resolve().parent.parent
SAMPLE_TEXT = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? #### 72",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "You are an unhelpful assistant. You are a helpful assistant. The answer is 10.",
    "Betty is saving money for a new wallet which costs $100. 0 1 2 3 4 5 6 7 8 9 + - * / = ?",
]


def make_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SAMPLE_TEXT * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    return fast


def make_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return path


TINY_HUB_ID = "dftlite-test/tiny-llama"
TINY_REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """torch on one thread for the whole run. The matrices are tiny: with other jobs on 2 cores, OpenMP
    threads mostly wait on each other. And the fault suite compares its in-process runs with its
    subprocesses (OMP_NUM_THREADS=1) bit for bit, so its package fixtures must already run on one thread:
    a session fixture is set up before them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local HF directory: 2-layer Llama, hidden 64, with a real BPE tokenizer and chat template.

    It sits where huggingface_hub's cache would put the repo `dftlite-test/tiny-llama`
    (<cache>/models--dftlite-test--tiny-llama/snapshots/<revision>), so an export names its base
    by that id, as it would a downloaded model, and HF_HUB_CACHE=<cache> resolves the id offline."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / ("models--" + TINY_HUB_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(TINY_REVISION)
    return make_tiny_model_dir(repo / "snapshots" / TINY_REVISION)


@pytest.fixture(scope="session")
def gsm8k_rows() -> list[dict]:
    """A few real GSM8K problems (bundled with the package data)."""
    path = REPO / "dftlite" / "resources" / "gsm8k" / "train.jsonl"
    with open(path) as handle:
        return [json.loads(line) for _, line in zip(range(32), handle)]


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def rng():
    return random.Random(0)
