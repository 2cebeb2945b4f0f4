"""Row sources: every format, Hugging Face datasets, globs, column mapping, error locations and pickling."""

from __future__ import annotations

import concurrent.futures
import csv
import json
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import datasets
import fsspec
import grain
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from hypothesis import given, settings
from hypothesis import strategies as st

from kithara.data import files
from kithara.data.sources import RowError, Source, load_source

ROWS = [
    {"prompt": "2+2=", "completion": "4"},
    {"prompt": "Capital of France?", "completion": "Paris"},
    {"prompt": "Say hi", "completion": "hi\nthere"},
]
CHATS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]},
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]], row_group_size: int | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def rows_of(source: Source) -> list[dict[str, Any]]:
    return [source[i] for i in range(len(source))]


# Formats


@pytest.mark.parametrize("rows", [ROWS, CHATS], ids=["prompt_completion", "messages"])
@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson", ".json", ".json_object", ".parquet"])
def test_formats_round_trip(tmp_path: Path, rows: list[dict[str, Any]], suffix: str) -> None:
    if suffix in (".jsonl", ".ndjson"):
        path = write_jsonl(tmp_path / f"data{suffix}", rows)
    elif suffix == ".json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows))
    elif suffix == ".json_object":
        path = tmp_path / "data.json"
        path.write_text(json.dumps({"version": 2, "data": rows}))
    else:
        path = write_parquet(tmp_path / "data.parquet", rows)
    source = load_source(path)
    assert len(source) == len(rows)
    assert rows_of(source) == rows
    assert list(source) == rows
    assert source[-1] == rows[-1]


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
def test_parquet_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_bytes: int) -> None:
    monkeypatch.setattr(files, "_PARQUET_CACHE_BYTES", cache_bytes)
    rows = [{"i": i, "messages": [{"role": "user", "content": str(i)}]} for i in range(10)]
    source = load_source(str(write_parquet(tmp_path / "data.parquet", rows, row_group_size=3)))
    assert len(source) == 10
    assert [source[i] for i in (9, 0, 4, 3, 8, 0)] == [rows[i] for i in (9, 0, 4, 3, 8, 0)]
    assert len(source._cache) == (1 if cache_bytes == 0 else 4)  # type: ignore[attr-defined]
    assert source.describe(4) == f"{tmp_path / 'data.parquet'} row 4"


def test_csv_and_tsv(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "completion"])
        writer.writeheader()
        writer.writerows(ROWS)  # the last completion holds a quoted newline
        f.write("\n")
        writer.writerow({"prompt": "n", "completion": "7"})
    source = load_source(path)
    assert rows_of(source) == [*ROWS, {"prompt": "n", "completion": "7"}]
    assert [source.describe(i) for i in range(4)] == [f"{path}:{line}" for line in (2, 3, 4, 7)]

    tsv = tmp_path / "data.tsv"
    tsv.write_text("a\tb\n1\t2\n")
    assert rows_of(load_source(tsv)) == [{"a": "1", "b": "2"}]


def test_csv_wrong_field_count(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("prompt,completion\na,b\nc\n")
    source = load_source(path)
    with pytest.raises(RowError, match=r"bad\.csv:3: has 1 fields but the header has 2"):
        source[1]


def test_text_line_and_file_modes(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("first line\n\n  \nsecond line\r\nlast")
    lines = load_source(path)
    assert rows_of(lines) == [{"text": "first line"}, {"text": "second line"}, {"text": "last"}]
    assert [lines.describe(i) for i in range(3)] == [f"{path}:1", f"{path}:4", f"{path}:5"]

    (tmp_path / "other.md").write_text("# Title\nbody\n")
    whole = load_source(str(tmp_path / "*.*"), format="text", text_mode="file")
    assert rows_of(whole) == [{"text": "first line\n\n  \nsecond line\r\nlast"}, {"text": "# Title\nbody\n"}]
    assert whole.describe(0) == str(path)


def test_format_overrides_suffix(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.log", ROWS)
    assert rows_of(load_source(path, format="jsonl")) == ROWS
    assert rows_of(load_source(path, format="text"))[0] == {"text": json.dumps(ROWS[0])}


# Hugging Face datasets, lists, globs


def test_hf_dataset_and_dataset_dict(tmp_path: Path) -> None:
    dataset = datasets.Dataset.from_list(CHATS).with_format("numpy")  # the source ignores the format
    assert rows_of(load_source(dataset)) == CHATS
    assert load_source(dataset).describe(1) == "Dataset row 1"

    splits = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS), test=datasets.Dataset.from_list(CHATS))
    assert rows_of(load_source(splits, split="test")) == CHATS
    with pytest.raises(ValueError, match=r"needs split=.*\['test', 'train'\]"):
        load_source(splits)
    with pytest.raises(ValueError, match=r"has no split 'valid'.*\['test', 'train'\]"):
        load_source(splits, split="valid")
    with pytest.raises(ValueError, match="only applies to a DatasetDict"):
        load_source(dataset, split="train")


def test_hf_saved_to_disk(tmp_path: Path) -> None:
    datasets.Dataset.from_list(CHATS).save_to_disk(str(tmp_path / "one"))
    source = load_source(tmp_path / "one")
    assert rows_of(source) == CHATS
    assert source.describe(0) == f"{tmp_path / 'one'} row 0"

    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS)).save_to_disk(str(tmp_path / "dict"))
    assert rows_of(load_source(str(tmp_path / "dict"), split="train")) == ROWS
    with pytest.raises(ValueError, match=r"needs split=.*\['train'\]"):
        load_source(tmp_path / "dict")
    assert rows_of(pickle.loads(pickle.dumps(source))) == CHATS


def test_list_of_dicts() -> None:
    source = load_source(ROWS)
    assert rows_of(source) == ROWS
    assert source.describe(2) == "rows[2]"
    with pytest.raises(RowError, match=r"rows\[1\]: expected an object"):
        load_source([{"a": 1}, "oops"])[1]


def test_glob_and_list_of_paths(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    (tmp_path / "notes.txt").write_text("not data")
    source = load_source(str(tmp_path / "*.jsonl"))
    assert rows_of(source) == ROWS
    assert [source.describe(i) for i in range(3)] == [f"{tmp_path / 'a.jsonl'}:1"] + [
        f"{tmp_path / 'b.jsonl'}:{line}" for line in (1, 2)
    ]
    mixed = load_source([tmp_path / "b.jsonl", str(tmp_path / "a.*")])
    assert rows_of(mixed) == ROWS[1:] + ROWS[:1]


def test_works_as_grain_source(tmp_path: Path) -> None:
    source = load_source(write_jsonl(tmp_path / "data.jsonl", ROWS))
    assert list(grain.MapDataset.source(source)) == ROWS


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_concurrent_reads_from_threads(tmp_path: Path, suffix: str) -> None:
    rows = [{"i": i, "text": "x" * (i % 17)} for i in range(300)]
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    else:
        write_parquet(path, rows, row_group_size=32)
    source = load_source(path)
    order = [(7 * i) % 300 for i in range(300)] * 4
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(source.__getitem__, order)) == [rows[i] for i in order]


# Column mapping


def test_column_mapping(tmp_path: Path) -> None:
    rows = [{"question": "q1", "answer": "a1", "id": 1}, {"question": "q2", "answer": "a2", "id": 2}]
    expected = [{"id": 1, "prompt": "q1", "completion": "a1"}, {"id": 2, "prompt": "q2", "completion": "a2"}]
    columns = {"question": "prompt", "answer": "completion"}
    parquet = write_parquet(tmp_path / "data.parquet", rows)
    for data in (rows, write_jsonl(tmp_path / "data.jsonl", rows), parquet, datasets.Dataset.from_list(rows)):
        assert rows_of(load_source(data, columns=columns)) == expected
    with pytest.raises(ValueError, match=r"maps \['query'\].*data\.parquet.*\['question', 'answer', 'id'\]"):
        load_source(parquet, columns={"query": "prompt"})


def test_column_missing_in_a_later_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": "q"}, {"other": "x"}])
    source = load_source(path, columns={"question": "prompt"})
    with pytest.raises(RowError, match=r"data\.jsonl:2: field 'question': missing") as info:
        source[1]
    assert info.value.field == "question"
    assert info.value.location == f"{path}:2"


# Errors


def test_malformed_jsonl_lines_fail_when_read(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"a": 1}\n\n{"a": oops}\n[1, 2]\n')
    source = load_source(path)
    assert len(source) == 3 and source[0] == {"a": 1}
    with pytest.raises(RowError, match=r"data\.jsonl:3: not valid JSON \(Expecting value"):
        source[1]
    with pytest.raises(RowError, match=r"data\.jsonl:4: expected an object .*got list"):
        source[2]


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl. does not exist"):
        load_source(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"No files match .*\*\.parquet"):
        load_source(str(tmp_path / "*.parquet"))
    with pytest.raises(ValueError, match=r"Recursive '\*\*' patterns are not supported"):
        load_source(str(tmp_path / "**" / "*.jsonl"))


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "data.xyz").write_text("{}")
    with pytest.raises(ValueError, match=r"data\.xyz.*suffix '\.xyz'.*format= one of jsonl, json, parquet"):
        load_source(tmp_path / "data.xyz")
    with pytest.raises(ValueError, match="format='yaml' is not supported"):
        load_source(tmp_path / "data.xyz", format="yaml")
    (tmp_path / "scalar.json").write_text("42")
    with pytest.raises(ValueError, match=r"scalar\.json: expected a JSON list of objects, got int"):
        load_source(tmp_path / "scalar.json")
    (tmp_path / "two.json").write_text('{"a": [], "b": []}')
    with pytest.raises(ValueError, match=r"two\.json: a JSON object must hold exactly one list"):
        load_source(tmp_path / "two.json")
    write_jsonl(tmp_path / "lines.json", ROWS)
    with pytest.raises(ValueError, match=r"lines\.json: not valid JSON .*format='jsonl'"):
        load_source(tmp_path / "lines.json")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"broken\.parquet: not a readable Parquet file"):
        load_source(tmp_path / "broken.parquet")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match="not one written by datasets' save_to_disk"):
        load_source(tmp_path / "dir")
    with pytest.raises(TypeError, match="got int"):
        load_source(3)


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("empty.csv", "a,b\n")])
def test_empty_sources(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{name} holds no rows")):
        load_source(tmp_path / name)
    with pytest.raises(ValueError, match="empty list"):
        load_source([])


def test_row_error_pickles() -> None:
    error = pickle.loads(pickle.dumps(RowError("a.jsonl:3", "expected a string, got int.", field="prompt")))
    assert str(error) == "a.jsonl:3: field 'prompt': expected a string, got int."
    assert (error.location, error.field) == ("a.jsonl:3", "prompt")


# Pickling, index and remote paths


def test_pickled_jsonl_source_reads(tmp_path: Path) -> None:
    source = load_source(write_jsonl(tmp_path / "data.jsonl", CHATS), columns={"messages": "chat"})
    assert source[0] == {"chat": CHATS[0]["messages"]}  # opens a handle, which must not be pickled
    copy = pickle.loads(pickle.dumps(source))
    assert rows_of(copy) == [{"chat": row["messages"]} for row in CHATS]
    assert copy.describe(1) == f"{tmp_path / 'data.jsonl'}:2"
    parquet = load_source(write_parquet(tmp_path / "data.parquet", CHATS))
    parquet[0]
    assert rows_of(pickle.loads(pickle.dumps(parquet))) == CHATS


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(st.sampled_from(["", " ", "\r", "\t", '{"x": 1}', '  {"y": [2]} ', "{}"]), max_size=12),
    final_newline=st.booleans(),
    chunk=st.integers(1, 9),
)
def test_line_index_matches_python(lines: list[str], final_newline: bool, chunk: int) -> None:
    text = "\n".join(lines) + ("\n" if final_newline else "")
    expected = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    with tempfile.TemporaryDirectory() as directory, pytest.MonkeyPatch.context() as patch:
        patch.setattr(files, "_CHUNK_BYTES", chunk)  # newlines and blank lines across chunk boundaries
        path = Path(directory) / "data.jsonl"
        path.write_bytes(text.encode())
        starts, ends, numbers = files._index_lines(epath.Path(path))
    data = text.encode()
    assert [(int(n), data[s:e].decode()) for s, e, n in zip(starts, ends, numbers, strict=True)] == expected


def test_gs_paths_go_through_epath(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # gs:// needs the network, so serve the gcs protocol from fsspec's in-memory filesystem instead.
    fs = fsspec.filesystem("memory")
    fs.pipe("gs://bucket/data/a.jsonl", "".join(json.dumps(row) + "\n" for row in ROWS).encode())
    monkeypatch.setattr(epath_backend.fsspec_backend, "_get_filesystem", lambda name: fs)
    source = load_source("gs://bucket/data/a.jsonl")
    assert rows_of(source) == ROWS
    assert source.describe(2) == "gs://bucket/data/a.jsonl:3"
