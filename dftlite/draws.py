"""What a training step trains on: a split's pool negatives, their draw schedule, the micro-batches.

Discriminative Fine-Tuning (DFT/DFT2; Guo et al., ICML 2025, arXiv 2502.18679) pairs every
training answer y_i with B negatives y' ~ P_g0(.|x̄_i) per step. The paper samples m = E·B
negatives per prompt offline and gives each of the E epochs a disjoint set of B, without
replacement. Here:

    permutation_i = randperm(m_i), seeded by (seed, example id)      # fixed for the run
    draw v of example i = permutation_i[v·B : (v+1)·B]              # v = draws_taken[i]

`draws_taken[i]` counts how often example i was drawn; it is training state and goes into
every checkpoint, so a resumed run continues with the same negatives. With
`allow_negative_reuse` the schedule wraps around: position (v·B + j) mod m_i, so after m_i/B
draws the negatives repeat in the same order (and when m_i < B one draw repeats a negative).

    split, summary = load_split(examples, tokenizer, data_config, model, pool_dir)
    draws = NegativeDraws(split.ids, [len(n) for n in split.negatives], per_draw=2, seed=42)
    positions = draws.positions(i)        # indices into split.negatives[i] for this step
    draws.advance([i, ...])               # after the step, on every process

A step's sequences form one `Group` per prompt (the positive, then its B negatives), all after
the training prompt x_i; `micro_batches` packs whole groups under a token budget.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from dftlite.config import ConfigError
from dftlite.data import DataConfig, DataError, EncodedPair, Example, encode_examples
from dftlite.pool import check_pool_compatible, negatives_for, read_pool


@dataclass
class Split:
    """One data split, ready to train or evaluate on. Lists are indexed by example index."""

    ids: list[str]
    pairs: list[EncodedPair]  # training prompt x (template, no sampler system prompt) + answer y (+EOS)
    negatives: list[list[dict]]  # usable pool records (gold duplicates left out), sorted by k; [] without a pool

    def __len__(self):
        return len(self.ids)


def _listing(ids: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def load_split(
    examples: list[Example],
    tokenizer,
    data_config: DataConfig,
    model,
    pool_dir: str | None,
    reference: str | None = None,
    model_name: str = "",
    what: str = "training",
) -> tuple[Split, str]:
    """Encode examples and attach their pool negatives. Returns (split, encoding summary).

    pool_dir=None: no negatives (SFT). `reference="train_prompt"` (DFT) requires every
    negative to carry logp_train_prompt. Raises FileNotFoundError (no pool, with the command
    that makes one), PoolMismatchError (pool from another model/tokenizer/template) or
    DataError (ids missing from the pool, missing logp_train_prompt).
    """
    encoded, report = encode_examples(tokenizer, examples, data_config.template, data_config.max_length)
    ids = [e.id for e in examples if e.id in encoded]
    if not ids:
        raise DataError(f"no {what} example fits max_length={data_config.max_length}: {report.summary()}")
    pairs = [encoded[i] for i in ids]
    if pool_dir is None:
        return Split(ids, pairs, [[] for _ in ids]), report.summary()

    if not pool_dir or not (Path(pool_dir) / "meta.json").is_file():
        data_args = f"--data_path {data_config.data_path} --data_format {data_config.data_format}"
        data_args += f" --template {data_config.template}"
        if data_config.max_examples is not None:
            data_args += f" --max_examples {data_config.max_examples}"
        raise FileNotFoundError(
            f"no negative pool for the {what} data in {pool_dir or '(pool_dir not set)'}; make one with\n"
            f"  dftlite sample --model_name_or_path {model_name} {data_args} --pool_dir {pool_dir or '<pool_dir>'}\n"
            "(the same model, data and template as this run; add --num_negatives for B × epochs)"
        )
    meta, records_by_id = read_pool(pool_dir)
    check_pool_compatible(meta, model, tokenizer, data_config.template)
    missing = [i for i in ids if i not in records_by_id]
    if missing:
        raise DataError(
            f"the pool in {pool_dir} has no negatives for {len(missing)} {what} example id(s): {_listing(missing)}. "
            "Run `dftlite sample` on this data with this pool_dir to add them (it resumes)."
        )
    negatives = [negatives_for(records_by_id[i], meta) for i in ids]
    if reference == "train_prompt":
        lacking = [i for i, records in zip(ids, negatives) if any(r.get("logp_train_prompt") is None for r in records)]
        if lacking:
            raise DataError(
                f"reference: train_prompt needs log P_g0(y'|x) in the pool, but {pool_dir} has no logp_train_prompt "
                f"for id(s) {_listing(lacking)}. Sample the pool with `score_train_prompt: true`, "
                "or use reference: sampler_prompt."
            )
    return Split(ids, pairs, negatives), report.summary()


def _permutation_seed(seed: int, example_id: str) -> int:
    digest = hashlib.sha256(f"draws\0{seed}\0{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class NegativeDraws:
    """The per-example draw schedule over a split's pool negatives (see the module docstring).

    Args:
        ids: (n,) example ids; the permutation of example i is seeded by (seed, ids[i]).
        counts: (n,) m_i, the number of usable negatives of each example.
        per_draw: B, negatives per example per step.
        seed: the run's seed.
        allow_reuse: wrap around instead of failing when draws run out.
    Attributes:
        draws_taken: (n,) int64, draws already consumed per example (checkpointed state).
    """

    def __init__(self, ids: list[str], counts: list[int], per_draw: int, seed: int, allow_reuse: bool = False):
        if len(ids) != len(counts):
            raise ValueError(f"{len(ids)} ids but {len(counts)} counts")
        self.ids, self.counts = list(ids), list(counts)
        self.per_draw, self.seed, self.allow_reuse = per_draw, seed, allow_reuse
        self.draws_taken = torch.zeros(len(ids), dtype=torch.int64)
        self._permutations: dict[int, list[int]] = {}

    def __len__(self):
        return len(self.ids)

    def check_capacity(self, draws_needed: int, what: str = "training"):
        """Raise DataError listing the examples with fewer than B·draws_needed negatives."""
        empty = [i for i, m in zip(self.ids, self.counts) if m == 0]
        if empty:
            raise DataError(f"{len(empty)} {what} example(s) have no usable negatives in the pool: {_listing(empty)}")
        need = self.per_draw * draws_needed
        short = [f"{i} ({m})" for i, m in zip(self.ids, self.counts) if m < need]
        if short and not self.allow_reuse:
            raise DataError(
                f"{len(short)} {what} example(s) have fewer than {need} = {self.per_draw} negatives/step × "
                f"{draws_needed} epoch(s) negatives in the pool (id (m)): {_listing(short)}. Sample more "
                "(dftlite sample --num_negatives ...; it extends the pool), train fewer epochs, lower "
                "num_negatives_per_step, or set allow_negative_reuse: true."
            )

    def permutation(self, index: int) -> list[int]:
        if index not in self._permutations:
            generator = torch.Generator().manual_seed(_permutation_seed(self.seed, self.ids[index]))
            self._permutations[index] = torch.randperm(self.counts[index], generator=generator).tolist()
        return self._permutations[index]

    def positions(self, index: int, draw: int | None = None) -> list[int]:
        """Indices into the example's negatives for its `draw`-th draw (default: the next one)."""
        draw = int(self.draws_taken[index]) if draw is None else draw
        m, permutation = self.counts[index], self.permutation(index)
        start = draw * self.per_draw
        if start + self.per_draw > m and not self.allow_reuse:
            raise DataError(
                f"example {self.ids[index]!r} has used all its {m} negatives ({draw} draws of {self.per_draw}); "
                "set allow_negative_reuse: true or sample more"
            )
        return [permutation[(start + j) % m] for j in range(self.per_draw)]

    def advance(self, indices):
        """Count one draw for each (distinct) example index."""
        index = torch.as_tensor(indices, dtype=torch.int64).cpu()
        self.draws_taken[index] += 1

    def state_dict(self) -> dict:
        return {"draws_taken": self.draws_taken.clone()}

    def load_state_dict(self, state: dict):
        draws_taken = torch.as_tensor(state["draws_taken"]).to(device="cpu", dtype=torch.int64)
        if draws_taken.shape != self.draws_taken.shape:
            raise ValueError(f"draw state holds {draws_taken.numel()} examples; this split has {len(self)}")
        self.draws_taken = draws_taken.clone()


# ---------------------------------------------------------------------------------------------
# The sequences of a step.


def epochs_planned(num_examples: int, args) -> int:
    """Epochs the Trainer will start for these TrainingArguments: each takes one draw per example."""
    batches = num_examples / (args.per_device_train_batch_size * args.world_size)
    batches = math.floor(batches) if args.dataloader_drop_last else math.ceil(batches)
    updates_per_epoch = max(math.ceil(batches / args.gradient_accumulation_steps), 1)
    if args.max_steps > 0:
        return math.ceil(args.max_steps / updates_per_epoch)
    return math.ceil(args.num_train_epochs)


def check_whole_batches(num_examples: int, args):
    """Several processes: refuse a last batch that accelerate would even out with repeats.

    accelerate (even_batches) fills the short last batch of an epoch with examples from that
    epoch's first batch; they would be trained, drawn and written into u a second time."""
    global_batch = args.per_device_train_batch_size * args.world_size
    if args.world_size > 1 and not args.dataloader_drop_last and num_examples % global_batch:
        raise ConfigError(
            f"{num_examples} training examples do not fill whole global batches of {global_batch} prompts "
            f"({args.per_device_train_batch_size} per device × {args.world_size} processes), and accelerate would "
            "fill each epoch's last batch with examples already trained in that epoch. Set dataloader_drop_last: "
            f"true (each epoch then leaves out {num_examples % global_batch} examples, different ones each time), "
            "or a per_device_train_batch_size that divides the data evenly."
        )


@dataclass
class Group:
    """One prompt's sequences: the positive first, then its negatives."""

    example_id: str
    prompt_ids: list[int]
    completions: list[list[int]]  # (1+B) completion ids: y_i, y'_i1, ..., y'_iB
    neg_ref_logps: list[float]  # (B,) DFT's log P_g0(y'_ij | reference prompt)

    @property
    def longest(self) -> int:
        return len(self.prompt_ids) + max(len(c) for c in self.completions)

    @property
    def packed_length(self) -> int:
        """The prompt once and every answer: its row in `prefix_sharing.pack_groups`."""
        return len(self.prompt_ids) + sum(len(c) for c in self.completions)


def micro_batches(groups: list[Group], token_budget: int, packed: bool = False) -> list[list[int]]:
    """Positions of whole groups per micro-batch, so each group's loss is computed where its scores are.

    The padded size (rows × longest row) stays within token_budget; a single group over the
    budget gets a micro-batch of its own. token_budget = 0: one micro-batch. packed: a group is
    one row, its prompt and all its answers (`prefix_sharing.pack_groups`).
    """
    if token_budget == 0:
        return [list(range(len(groups)))]
    width_of = (lambda g: g.packed_length) if packed else (lambda g: g.longest)
    order = sorted(range(len(groups)), key=lambda g: width_of(groups[g]))  # similar lengths together: less padding
    batches, current, rows, width = [], [], 0, 0
    for g in order:
        g_rows, g_width = (1 if packed else len(groups[g].completions)), width_of(groups[g])
        if current and (rows + g_rows) * max(width, g_width) > token_budget:
            batches.append(current)
            current, rows, width = [], 0, 0
        current.append(g)
        rows, width = rows + g_rows, max(width, g_width)
    batches.append(current)
    return batches


def pad_groups(groups: list[Group], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (N, T) input_ids, attention_mask, completion_mask; rows in group order, positive first."""
    rows = [(g.prompt_ids, c) for g in groups for c in g.completions]
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, (prompt, completion) in enumerate(rows):
        end = len(prompt) + len(completion)
        input_ids[n, :end] = torch.tensor(prompt + completion)
        attention_mask[n, :end] = 1
        completion_mask[n, len(prompt):end] = 1
    return input_ids.to(device), attention_mask.to(device), completion_mask.to(device)


class IndexDataset(torch.utils.data.Dataset):
    """The Trainer's dataset: items are {key: example index}; `DFTTrainer` builds the sequences itself."""

    def __init__(self, size: int, key: str):
        self.size, self.key = size, key

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return {self.key: index}


def collate_indices(items: list[dict]) -> dict:
    key = next(iter(items[0]))
    return {key: torch.tensor([item[key] for item in items], dtype=torch.long)}
