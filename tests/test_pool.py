"""dftlite.pool on its own: reading pool files. A pool sampled, resumed and checked against its model is
tested in tests/test_sampling.py; kills, full disks and repairs in tests/faults."""

from __future__ import annotations

import json

import pytest

from dftlite.pool import FORMAT_VERSION, META_FILE, POOL_FILE, load_pool


def pool_lines(example_id: str, count: int) -> list[str]:
    """`count` records of one example as pool.jsonl lines (the fields a sampled record has)."""
    return [json.dumps({"id": example_id, "k": k, "text": f"answer {k}", "token_ids": [5, 6, k], "num_tokens": 3,
                        "finish_reason": "length", "sampler_prompt": "x̄", "logp_sampler": -4.0 - k,
                        "logp_train_prompt": None, "gold_duplicate": False}) + "\n" for k in range(count)]


def test_corrupt_complete_line_is_an_error(tmp_path):
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    (pool_dir / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "num_negatives": 2}))
    lines = pool_lines("q0", 2)
    (pool_dir / POOL_FILE).write_text(lines[0] + "not json\n" + lines[1])
    with pytest.raises(ValueError, match=r"pool.jsonl:2: corrupt"):
        load_pool(pool_dir)
    (pool_dir / POOL_FILE).write_text(lines[0] + lines[0])
    with pytest.raises(ValueError, match="duplicate record"):
        load_pool(pool_dir)
