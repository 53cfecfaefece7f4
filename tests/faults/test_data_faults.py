"""Malformed data in every supported format: a DataError that names the file, the line or row and the
field, raised before anything is loaded or written; nothing is skipped silently.

Formats: JSONL, JSON, Parquet, a `datasets` directory (save_to_disk). A huge single line applies to
JSONL, the only line-oriented format.
"""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pytest

from dftlite.cli import main
from dftlite.data import MAX_LINE_BYTES, DataError, load_examples
from faults.common import MODEL_SETTINGS, flags

GOOD = {"question": "What is 2 + 2?", "answer": "#### 4"}
FORMATS = ["jsonl", "json", "parquet", "datasets"]


def write(fmt: str, directory, rows_or_table):
    """Write records (a list of dicts, or an Arrow table) in `fmt`; return the path to load."""
    import datasets

    table = rows_or_table if isinstance(rows_or_table, pa.Table) else pa.Table.from_pylist(rows_or_table)
    if fmt == "jsonl":
        path = directory / "data.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))
    elif fmt == "json":
        path = directory / "data.json"
        path.write_text(json.dumps(table.to_pylist(), indent=1))
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        path = directory / "data.parquet"
        pq.write_table(table, path)
    else:
        path = directory / "data"
        datasets.Dataset(table).save_to_disk(str(path))
    return path


def where(fmt: str, path, index: int) -> str:
    """How errors locate record `index` (0-based) of each format."""
    return {"jsonl": f"{path}:{index + 1}:", "json": f"{path}[{index}]:", "parquet": f"{path} row {index}:",
            "datasets": f"{path} row {index}:"}[fmt]


def raises(path, message: str):
    with pytest.raises(DataError, match=message) as error:
        load_examples(path)
    return error.value


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_file(fmt, tmp_path):
    path = write(fmt, tmp_path, [{"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"} for i in range(40)])
    target = next(path.glob("*.arrow")) if fmt == "datasets" else path
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])  # a copy or a download cut short
    expected = {"jsonl": r":21: malformed JSON", "json": r":\d+: malformed JSON",
                "parquet": r": cannot read Parquet file", "datasets": r": cannot read the saved dataset"}[fmt]
    raises(path, re.escape(str(path)) + expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_types(fmt, tmp_path):
    path = write(fmt, tmp_path, [{"question": "What is 2 + 2?", "answer": 4}, {"question": "And 3 + 3?", "answer": 6}])
    raises(path, re.escape(f"{where(fmt, path, 0)} field 'answer' must be a string, got int"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("answer", ["", "  \n"])
def test_empty_answer(fmt, answer, tmp_path):
    path = write(fmt, tmp_path, [GOOD, {"question": "What is 3 + 3?", "answer": answer}])
    raises(path, re.escape(f"{where(fmt, path, 1)} empty answer"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_utf8_bytes(fmt, tmp_path):
    if fmt in ("jsonl", "json"):
        path = write(fmt, tmp_path, [GOOD, {"question": "Caf\u00e9?", "answer": "#### 1"}])
        path.write_bytes(path.read_bytes().replace(b"Caf\\u00e9", b"Caf\xe9"))  # Latin-1, not UTF-8
        located = f"{path}:2:" if fmt == "jsonl" else f"{path}:"
    else:  # a string column holding bytes that are not UTF-8 (a writer that did not validate)
        good, bad = b"#### 4", b"#### caf\xe9"
        offsets = pa.array([0, len(good), len(good) + len(bad)], type=pa.int32()).buffers()[1]
        answers = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(good + bad)])
        path = write(fmt, tmp_path, pa.table({"question": ["What is 2 + 2?", "Caf?"], "answer": answers}))
        located = where(fmt, path, 1)
    raises(path, re.escape(located) + r".*not valid UTF-8")


def test_huge_single_line(tmp_path):
    path = tmp_path / "data.jsonl"
    huge = json.dumps({"question": "q" * (MAX_LINE_BYTES + 1), "answer": "#### 1"})
    path.write_text(json.dumps(GOOD) + "\n" + huge)  # no trailing newline either
    raises(path, re.escape(f"{path}:2: line is 16.0 MiB, over the 16 MiB limit"))


def test_cli_reports_bad_data_in_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD)[:20])  # truncated last record
    pool_dir = tmp_path / "pool"
    args = flags({"model_name_or_path": tiny_model_dir, **MODEL_SETTINGS, "data_path": path, "pool_dir": pool_dir})
    assert main(["sample", *args]) == 1
    err = capsys.readouterr().err
    assert f"dftlite sample: error: {path}:2: malformed JSON" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
