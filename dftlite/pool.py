"""The negative pool on disk: reading, checking, repairing and appending to it.

`dftlite.sampling` fills a pool; `train` (`dftlite.draws`) and `eval` read it. This module is
the pool's file format and the rules that keep it whole; it samples nothing.

    from dftlite.pool import load_pool, negatives_for
    meta, records_by_id = load_pool("runs/demo/pool-train")
    negatives = negatives_for(records_by_id[example.id], meta)

Pool directory:
    meta.json    format_version, model fingerprint, template, sampler prompt and sampling settings.
    pool.jsonl   one record per (id, k), k < num_negatives: text, token_ids (with the EOS if
                 generated), num_tokens, finish_reason ("eos" | "length"), sampler_prompt (x̄ as
                 text), logp_sampler = Σ_t log P_g0(y'_t | x̄, y'_<t) at temperature 1 from the raw
                 logits, logp_train_prompt (the same under the training prompt x, or null), gold_duplicate.

Nothing lost, nothing mixed: one `dftlite sample` at a time holds the pool's lock (a second one
stops at once and names the first; `read_pool`, for train and eval, refuses a pool still being
written). Each batch is appended whole, then fsynced, so a crash leaves at most a partial last line
(no trailing newline), which `load_pool` ignores and `open_pool` cuts before appending; a write that
fails (a full disk) is cut back to the last whole batch. A corrupt or duplicated complete line is a
PoolCorruptError naming the line; `repair_pool` (`--repair_pool true`) keeps the records before it,
moves the rest to pool.jsonl.bad-<time> and lets the run resample them. Rerunning resumes: finished
(id, k) pairs are skipped. A pool with no complete record yet takes the new run's settings. A
different model (name or weight files), tokenizer, template, sampler prompt or sampling settings
raise PoolMismatchError. num_negatives may grow on resume (new k), never shrink.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dftlite.config import ConfigError
from dftlite.data import DataError
from dftlite.models import model_fingerprint
from dftlite.outputs import (append_lines, check_not_being_written, complete_lines, cut_partial_line, move_tail_aside,
                             write_text_atomic)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE, POOL_FILE = "meta.json", "pool.jsonl"
SHARDS_DIR = "shards"  # pool_dir/shards/<i>-of-<n>: pools of `dftlite sample --num_shards n --shard_index i`
# Settings that change what is sampled: a pool made with other values is not this pool.
SAMPLING_KEYS = ("template", "sampler_system_prompt", "temperature", "top_k", "top_p", "max_new_tokens", "seed", "score_train_prompt")


class PoolMismatchError(ConfigError):  # a ValueError; the CLI prints ConfigErrors without a traceback
    """An existing pool was made with another model, tokenizer, template, prompt or sampling settings."""


class PoolCorruptError(DataError):  # a ValueError; the CLI prints DataErrors without a traceback
    """A pool file that does not parse, or a record written twice. The message names the file, the line,
    and the repair (`dftlite sample --repair_pool true`)."""


# ---------------------------------------------------------------------------------------------
# Reading and checking a pool (sample, train and eval).


def _repair_hint(pool_dir: Path, line_no: int) -> str:
    kept = f"keeps the {line_no - 1} records before it" if line_no > 1 else "keeps no record"
    return (f"To repair, run `dftlite sample` with the settings the pool was made with and --repair_pool true: it {kept}, "
            f"moves line {line_no} and the rest to {pool_dir / POOL_FILE}.bad-<time> (nothing is deleted), and resamples them")


def _scan(path: Path) -> tuple[list[dict], tuple[int, int, str] | None]:
    """The records of a pool file's complete lines up to the first bad one, and (line number, byte offset,
    problem) of that line: one that does not parse as a record, or repeats an (id, k); None when all are good."""
    records, seen, offset = [], set(), 0
    for line_no, line in enumerate(complete_lines(path), start=1):
        try:
            record = json.loads(line)
            key = (record["id"], record["k"])
            hash(key)
        except json.JSONDecodeError as err:
            return records, (line_no, offset, f"corrupt pool record: {err.msg} (column {err.colno})")
        except (UnicodeDecodeError, KeyError, TypeError) as err:
            return records, (line_no, offset, f"corrupt pool record ({type(err).__name__}: {err})")
        if key in seen:
            return records, (line_no, offset, f"duplicate record for id {key[0]!r}, k={key[1]} (written twice)")
        seen.add(key)
        records.append(record)
        offset += len(line) + 1
    return records, None


def _read_meta(pool_dir: Path) -> dict:
    meta_path = pool_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no negative pool in {pool_dir} ({META_FILE} missing); run `dftlite sample` first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        meta = err
    if not isinstance(meta, dict):
        raise PoolCorruptError(f"{meta_path}: not a pool's settings ({meta}); they cannot be recovered. Move {pool_dir} "
                               "aside and sample a new pool")
    return meta


def load_pool(pool_dir: str | Path) -> tuple[dict, dict[str, list[dict]]]:
    """Read a pool: (meta, {id: records sorted by k}).

    The only thing dropped is a last line without a trailing newline (a write cut short by a
    crash). A malformed complete line or a duplicate (id, k) is a PoolCorruptError that names the
    line and the repair, never skipped.
    """
    pool_dir = Path(pool_dir)
    meta, path = _read_meta(pool_dir), pool_dir / POOL_FILE
    records, bad = _scan(path)
    if bad is not None:
        line_no, _, problem = bad
        raise PoolCorruptError(f"{path}:{line_no}: {problem}. {_repair_hint(pool_dir, line_no)}")
    records_by_id: dict[str, list[dict]] = {}
    for record in records:
        records_by_id.setdefault(record["id"], []).append(record)
    for group in records_by_id.values():
        group.sort(key=lambda r: r["k"])
    return meta, records_by_id


def repair_pool(pool_dir: str | Path) -> Path | None:
    """Keep the well-formed records before the first bad line of pool.jsonl; move that line and all after it
    to pool.jsonl.bad-<time> (nothing is deleted). Returns that file, or None when nothing was wrong."""
    path = Path(pool_dir) / POOL_FILE
    cut_partial_line(path)
    _, bad = _scan(path)
    if bad is None:
        return None
    line_no, offset, problem = bad
    aside = move_tail_aside(path, offset)
    logger.warning("repaired %s: kept the %d records before line %d (%s); moved line %d and the rest (%d bytes) to %s",
                   path, line_no - 1, line_no, problem, line_no, aside.stat().st_size, aside)
    return aside


def read_pool(pool_dir: str | Path, what: str = "pool_dir") -> tuple[dict, dict[str, list[dict]]]:
    """`load_pool` for a reader (train, eval): refused while a `dftlite sample` still writes the pool."""
    check_not_being_written(pool_dir, what)
    return load_pool(pool_dir)


def _differences(meta: dict, expected: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key, value in expected.items():
        if isinstance(value, dict) and isinstance(meta.get(key), dict):
            diffs += _differences(meta[key], value, f"{prefix}{key}.")
        elif meta.get(key, "<missing>") != value:
            diffs.append(f"{prefix}{key} (pool: {meta.get(key, '<missing>')!r}, now: {value!r})")
    return diffs


def check_pool_compatible(meta: dict, model, tokenizer, template: str | None = None, sample_config=None):
    """Raise PoolMismatchError unless the pool was sampled from this model + tokenizer
    (and, when given, this template and the sampling settings of `sample_config`, a SampleConfig)."""
    expected = {"format_version": FORMAT_VERSION, "fingerprint": model_fingerprint(model, tokenizer)}
    if template is not None:
        expected["template"] = template
    if sample_config is not None:
        expected.update({k: v for k, v in pool_settings(sample_config).items() if k != "template"})
    _raise_on_differences(meta, expected)


def _raise_on_differences(meta: dict, expected: dict):
    diffs = _differences(meta, expected)
    if diffs:
        raise PoolMismatchError(
            "the negative pool was made with other settings: " + "; ".join(diffs)
            + ". Use a new pool_dir, or the pool's settings."
        )


def negatives_for(records: list[dict], meta: dict | None = None) -> list[dict]:
    """The records usable as negatives: gold duplicates are left out unless meta['keep_gold_duplicates']."""
    keep = bool(meta and meta.get("keep_gold_duplicates"))
    return [r for r in records if keep or not r["gold_duplicate"]]


def pool_settings(config, template: str | None = None) -> dict:
    """The settings of a SampleConfig that change what is sampled (SAMPLING_KEYS)."""
    settings = {k: getattr(config, k) for k in SAMPLING_KEYS if k != "template"}
    return settings if template is None else {"template": template, **settings}


# ---------------------------------------------------------------------------------------------
# Writing (the pool's lock is held: dftlite.sampling.sample_pool).


def write_meta(pool_dir: Path, meta: dict):
    write_text_atomic(pool_dir / META_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def append_records(path: Path, records: list[dict]):
    """Append whole lines, then fsync: a kill leaves at most a partial last line. A failed write (a full
    disk, a quota) is undone, so the file holds only complete batches, and the error says so."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    append_lines(path, payload, f"{len(records)} records (the pool keeps its complete records, and rerunning "
                                "`dftlite sample` resumes from them)")


def check_same_sampling(old_meta: dict, meta: dict, template, config, pool_dir: Path):
    """Raise PoolMismatchError unless the pool in pool_dir (`old_meta`) was sampled as this run (`meta`,
    `config`, a SampleConfig) samples: the same model, template, sampling settings and engine."""
    _raise_on_differences(old_meta, {"format_version": FORMAT_VERSION, "fingerprint": meta["fingerprint"],
                                     **pool_settings(config, template)})
    # one engine per pool: the engines' draws for the same seed differ (pools from before engines were hf's)
    if old_meta.get("engine", "hf") != meta["engine"]:
        raise PoolMismatchError(
            f"the pool in {pool_dir} was sampled with engine {old_meta.get('engine', 'hf')!r}, this run uses "
            f"{meta['engine']!r}; resume it with --engine {old_meta.get('engine', 'hf')} or use a new pool_dir"
        )


def open_pool(pool_dir: Path, meta: dict, template, config, prompts) -> dict[str, list[dict]]:
    """Create the pool, or check an existing one against this run (`meta`, the run's meta.json with its
    model fingerprint and engine; `config`, a SampleConfig; `prompts`, each with .id and .sampler_prompt)
    and return its records.

    A pool without a single complete record (a first run killed before it wrote one) has nothing to
    protect: this run's settings take it over."""
    if not (pool_dir / META_FILE).is_file():
        if (pool_dir / POOL_FILE).is_file() and (pool_dir / POOL_FILE).stat().st_size:
            raise PoolMismatchError(f"{pool_dir / POOL_FILE} exists without {META_FILE}; refusing to mix into it")
        write_meta(pool_dir, meta)
        return {}
    if not complete_lines(pool_dir / POOL_FILE):
        cut_partial_line(pool_dir / POOL_FILE)
        write_meta(pool_dir, meta)
        return {}
    old_meta = _read_meta(pool_dir)
    check_same_sampling(old_meta, meta, template, config, pool_dir)
    if old_meta.get("num_negatives", 0) > config.num_negatives:
        raise PoolMismatchError(
            f"the pool in {pool_dir} has num_negatives={old_meta['num_negatives']}; it can grow, not shrink "
            f"(now {config.num_negatives}). Use num_negatives >= {old_meta['num_negatives']} or a new pool_dir."
        )
    removed = cut_partial_line(pool_dir / POOL_FILE)
    if removed:
        logger.warning("removed a partial last line (%d bytes) of %s left by an interrupted run", removed, pool_dir / POOL_FILE)
    if config.repair_pool:
        repair_pool(pool_dir)
    _, records_by_id = load_pool(pool_dir)
    by_id = {p.id: p for p in prompts}
    unknown = sorted(set(records_by_id) - set(by_id))
    if unknown:
        raise PoolMismatchError(
            f"the pool in {pool_dir} holds {len(unknown)} id(s) not in the dataset, e.g. {unknown[:3]}; "
            "it was made from other data. Use a new pool_dir."
        )
    for example_id, records in records_by_id.items():
        if records[0]["sampler_prompt"] != by_id[example_id].sampler_prompt:
            raise PoolMismatchError(f"id {example_id!r}: the pool's sampler prompt differs from this dataset's; use a new pool_dir")
    write_meta(pool_dir, meta)  # num_negatives may have grown; keep_gold_duplicates may have changed
    return records_by_id
