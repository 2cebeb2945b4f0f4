"""Random-access row sources for user data: files (local or ``gs://``), globs, lists and Hugging Face datasets.

:func:`load_source` turns what the user passes as ``data`` into a :class:`Source`: a grain-compatible
random-access sequence of plain dict rows, with an optional column mapping applied to every row. Every
source can say where a row came from (:meth:`Source.describe`), so an error about a bad row names its
file and line. Sources read lazily and are picklable, so in a multi-host job (or in grain worker
processes) each reader parses only the rows it is asked for.

Example:
    >>> source = load_source("data/train-*.jsonl", columns={"question": "prompt", "answer": "completion"})
    >>> len(source), source[0], source.describe(0)
    (1000, {'prompt': '...', 'completion': '...'}, 'data/train-000.jsonl:1')
"""

from __future__ import annotations

import bisect
import csv
import io
import itertools
import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

import numpy as np
from etils import epath

FORMATS = ("jsonl", "json", "parquet", "csv", "tsv", "text")
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
}
_HF_DISK_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
_GLOB_CHARS = re.compile(r"[*?[]")
_CHUNK_BYTES = 1 << 20
_PARQUET_CACHE_BYTES = 256 << 20
_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[[9, 10, 13, 32]] = True  # JSON whitespace: tab, LF, CR, space


class RowError(ValueError):
    """A row that cannot be used, with where it came from.

    Args:
        location: where the row is, as given by :meth:`Source.describe` (``"data/train.jsonl:17"``).
        message: what is wrong, as a sentence.
        field: the offending field, if one is to blame.

    Example:
        >>> raise RowError("data/train.jsonl:17", "expected a string, got int.", field="prompt")
        RowError: data/train.jsonl:17: field 'prompt': expected a string, got int.
    """

    def __init__(self, location: str, message: str, field: str | None = None) -> None:
        self.location, self.message, self.field = location, message, field
        super().__init__(f"{location}: " + (f"field {field!r}: " if field is not None else "") + message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle as cls(*args); grain worker processes send them back to the parent.
        return (type(self), (self.location, self.message, self.field))


class Source:
    """A random-access sequence of rows (dicts of JSON-like values), as grain's ``RandomAccessDataSource``.

    Subclasses implement ``__len__``, ``_row`` (the raw row at a valid index) and ``_where`` (its location);
    this base class checks indices and applies the column mapping.

    Example:
        >>> source = load_source([{"prompt": "2+2=", "completion": "4"}])
        >>> source[0], source.describe(0)
        ({'prompt': '2+2=', 'completion': '4'}, 'rows[0]')
    """

    name: str = "rows"
    _columns: dict[str, str] = {}  # noqa: RUF012 (replaced, never mutated, per instance)

    def __len__(self) -> int:
        raise NotImplementedError

    def _row(self, index: int) -> dict[str, Any]:
        """The unmapped row at a valid, non-negative index."""
        raise NotImplementedError

    def _where(self, index: int) -> str:
        """The location of a valid, non-negative index."""
        raise NotImplementedError

    def _column_names(self) -> list[str]:
        """Column names, for checking the column mapping; by default the keys of the first row."""
        return list(self._row(0))

    def _index(self, index: int) -> int:
        """A valid, non-negative index, or IndexError."""
        size, index = len(self), int(index)
        if not -size <= index < size:
            raise IndexError(f"Row {index} is out of range for {self.name} ({size} rows).")
        return index % size

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._index(index)
        row = self._row(index)
        if not self._columns:
            return row
        mapped = {key: value for key, value in row.items() if key not in self._columns}
        for old, new in self._columns.items():
            if old not in row:
                raise RowError(
                    self._where(index), f"missing (columns= maps it to {new!r}); the row has {sorted(row)}.", old
                )
            mapped[new] = row[old]
        return mapped

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))

    def describe(self, index: int) -> str:
        """Where row ``index`` comes from, for error messages: ``"data/train.jsonl:17"``, ``"rows[3]"``."""
        return self._where(self._index(index))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, rows={len(self)})"


class _ListSource(Source):
    """Rows from a Python list of dicts."""

    def __init__(self, rows: Sequence[Any]) -> None:
        self._rows = list(rows)

    def __len__(self) -> int:
        return len(self._rows)

    def _row(self, index: int) -> dict[str, Any]:
        return _as_object(self._rows[index], self._where(index))

    def _where(self, index: int) -> str:
        return f"{self.name}[{index}]"


class _HFSource(Source):
    """Rows of a ``datasets.Dataset`` (memory-mapped Arrow; rows convert to Python values on access)."""

    def __init__(self, dataset: Any, name: str) -> None:
        self._dataset, self.name = dataset.with_format(None), name

    def __len__(self) -> int:
        return len(self._dataset)

    def _row(self, index: int) -> dict[str, Any]:
        return dict(self._dataset[index])

    def _where(self, index: int) -> str:
        return f"{self.name} row {index}"

    def _column_names(self) -> list[str]:
        return list(self._dataset.column_names)


class _ConcatSource(Source):
    """The rows of several sources (the files of a glob or list of paths), one after another."""

    def __init__(self, parts: list[Source], name: str) -> None:
        self._parts, self.name = parts, name
        self._starts = list(itertools.accumulate((len(part) for part in parts), initial=0))

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[Source, int]:
        """The part holding ``index`` and the index within it (bisect_right skips empty parts)."""
        part = bisect.bisect_right(self._starts, index) - 1
        return self._parts[part], index - self._starts[part]

    def _row(self, index: int) -> dict[str, Any]:
        part, index = self._locate(index)
        return part._row(index)

    def _where(self, index: int) -> str:
        part, index = self._locate(index)
        return part._where(index)

    def _column_names(self) -> list[str]:
        return self._locate(0)[0]._column_names()


class _FileSource(Source):
    """A source reading one file through epath, with one lazily opened handle per thread and process."""

    def __init__(self, path: epath.Path) -> None:
        self.path, self.name = path, os.fspath(path)

    def _state(self) -> threading.local:
        """Per-thread state of this process, reset after fork so processes never share a file offset."""
        if getattr(self, "_pid", None) != os.getpid():
            self._pid, self._local, self._lock = os.getpid(), threading.local(), threading.Lock()
            self._cache: OrderedDict[int, Any] = OrderedDict()  # shared by this process's threads
        return self._local

    def _file(self) -> IO[bytes]:
        """This thread's open handle on the file."""
        state = self._state()
        if not hasattr(state, "file"):
            state.file = self.path.open("rb")
        return state.file

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_pid", "_local", "_lock", "_cache")}


class _LineSource(_FileSource):
    """JSON lines or text lines, indexed by byte offset so a row read parses only its own line.

    The index (start, end and line number of every non-blank line) is built by scanning the bytes for
    newlines, without decoding or parsing anything.
    """

    def __init__(self, path: epath.Path, kind: str) -> None:
        super().__init__(path)
        self._kind = kind
        self._starts, self._ends, self._lines = _index_lines(path)

    def __len__(self) -> int:
        return len(self._starts)

    def _read(self, index: int) -> bytes:
        """The bytes of line ``index``, without its newline."""
        file = self._file()
        file.seek(int(self._starts[index]))
        return file.read(int(self._ends[index] - self._starts[index]))

    def _row(self, index: int) -> dict[str, Any]:
        data = self._read(index)
        if self._kind == "text":
            return {"text": _decode(data, self._where(index)).rstrip("\r")}
        try:
            value = json.loads(data)
        except json.JSONDecodeError as error:
            raise RowError(self._where(index), f"not valid JSON ({error.msg} at column {error.colno}).") from None
        except ValueError as error:  # bytes that are not UTF-8
            raise RowError(self._where(index), f"not valid JSON ({error}).") from None
        return _as_object(value, self._where(index))

    def _where(self, index: int) -> str:
        return f"{self.name}:{self._lines[index]}"

    def _column_names(self) -> list[str]:
        return ["text"] if self._kind == "text" else super()._column_names()


class _TextFileSource(_FileSource):
    """A whole text file as one row ``{"text": ...}``."""

    def __len__(self) -> int:
        return 1

    def _row(self, index: int) -> dict[str, Any]:
        return {"text": _decode(self.path.read_bytes(), self.name)}

    def _where(self, index: int) -> str:
        return self.name

    def _column_names(self) -> list[str]:
        return ["text"]


class _JsonSource(_FileSource):
    """A JSON document holding a list of objects (or an object with one list, like ``{"data": [...]}``).

    A JSON document can only be parsed whole, so the file is read at load time.
    """

    def __init__(self, path: epath.Path) -> None:
        super().__init__(path)
        try:
            data = json.loads(path.read_bytes())
        except ValueError as error:
            lines = "Extra data" in str(error)
            hint = " If it holds one object per line, name it .jsonl or pass format='jsonl'." if lines else ""
            raise ValueError(f"{self.name}: not valid JSON ({error}).{hint}") from None
        self._key = None
        if isinstance(data, dict):
            lists = [key for key, value in data.items() if isinstance(value, list)]
            if len(lists) != 1:
                raise ValueError(
                    f"{self.name}: a JSON object must hold exactly one list of rows (like {{'data': [...]}}); "
                    f"its list-valued keys are {lists}. Store the rows as a top-level list or as JSON lines."
                )
            self._key, data = lists[0], data[lists[0]]
        if not isinstance(data, list):
            raise ValueError(f"{self.name}: expected a JSON list of objects, got {type(data).__name__}.")
        self._rows = data

    def __len__(self) -> int:
        return len(self._rows)

    def _row(self, index: int) -> dict[str, Any]:
        return _as_object(self._rows[index], self._where(index))

    def _where(self, index: int) -> str:
        return f"{self.name}[{index}]" if self._key is None else f"{self.name}: {self._key}[{index}]"


class _CsvSource(_FileSource):
    """CSV or TSV with a header row; values are strings.

    Quoted fields may hold newlines, so rows cannot be found by byte offset: the file is parsed at
    load time with the csv module, keeping each record's starting line for error messages.
    """

    def __init__(self, path: epath.Path, delimiter: str) -> None:
        super().__init__(path)
        reader = csv.reader(
            io.StringIO(_decode(path.read_bytes(), self.name, "utf-8-sig"), newline=""), delimiter=delimiter
        )
        self._header = next(reader, [])
        self._records: list[tuple[int, list[str]]] = []
        line = reader.line_num
        for record in reader:
            if record:  # blank lines
                self._records.append((line + 1, record))
            line = reader.line_num

    def __len__(self) -> int:
        return len(self._records)

    def _row(self, index: int) -> dict[str, Any]:
        record = self._records[index][1]
        if len(record) != len(self._header):
            raise RowError(self._where(index), f"has {len(record)} fields but the header has {len(self._header)}.")
        return dict(zip(self._header, record, strict=True))

    def _where(self, index: int) -> str:
        return f"{self.name}:{self._records[index][0]}"

    def _column_names(self) -> list[str]:
        return self._header


class _ParquetSource(_FileSource):
    """Parquet, read one row group at a time and kept as Arrow (not Python objects) in a per-process cache.

    Only the footer is read at load time. A row read loads its row group (up to ``_PARQUET_CACHE_BYTES``
    of recently used row groups stay cached), then converts that single row to Python values.
    """

    def __init__(self, path: epath.Path) -> None:
        super().__init__(path)
        parquet = self._parquet_file()
        self._names = list(parquet.schema_arrow.names)
        metadata = parquet.metadata
        counts = (metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
        self._starts = list(itertools.accumulate(counts, initial=0))

    def _parquet_file(self) -> Any:
        """This thread's ``pyarrow.parquet.ParquetFile``."""
        import pyarrow.parquet as pq

        state = self._state()
        if not hasattr(state, "parquet"):
            try:
                state.parquet = pq.ParquetFile(self._file())
            except Exception as error:  # pyarrow raises ArrowInvalid and others for a bad file
                raise ValueError(f"{self.name}: not a readable Parquet file ({error}).") from None
        return state.parquet

    def __len__(self) -> int:
        return self._starts[-1]

    def _row(self, index: int) -> dict[str, Any]:
        group = bisect.bisect_right(self._starts, index) - 1
        self._state()
        with self._lock:
            table = self._cache.get(group)
            if table is not None:
                self._cache.move_to_end(group)
        if table is None:  # read outside the lock; two threads may read the same group, harmlessly
            table = self._parquet_file().read_row_group(group)
            with self._lock:
                self._cache[group] = table
                while len(self._cache) > 1 and sum(t.nbytes for t in self._cache.values()) > _PARQUET_CACHE_BYTES:
                    self._cache.popitem(last=False)
        return table.slice(index - self._starts[group], 1).to_pylist()[0]

    def _where(self, index: int) -> str:
        return f"{self.name} row {index}"

    def _column_names(self) -> list[str]:
        return self._names


def load_source(
    data: Any,
    *,
    format: str | None = None,
    columns: Mapping[str, str] | None = None,
    split: str | None = None,
    text_mode: str = "line",
) -> Source:
    """A random-access source of rows for ``data``.

    Args:
        data: a path (local or ``gs://``), a glob pattern (rows of all matching files, in sorted order), a list
            of paths or patterns, a list of dicts, a ``datasets.Dataset`` or ``DatasetDict``, or a directory
            written by ``save_to_disk``.
        format: one of ``jsonl``, ``json``, ``parquet``, ``csv``, ``tsv``, ``text``; by default taken from
            each file's suffix (``.jsonl``/``.ndjson``, ``.json``, ``.parquet``, ``.csv``, ``.tsv``,
            ``.txt``/``.md``).
        columns: renames fields, source name to kithara name, in every row (``{"question": "prompt"}``).
        split: the split to use from a ``DatasetDict``.
        text_mode: for text files, ``"line"`` (a row ``{"text": line}`` per non-blank line) or ``"file"``
            (a row ``{"text": contents}`` per file).

    Example:
        >>> source = load_source("gs://bucket/train.parquet", columns={"question": "prompt"})
        >>> source[0]["prompt"], source.describe(0)
        ('What is 2+2?', 'gs://bucket/train.parquet row 0')
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"format={format!r} is not supported; use one of {', '.join(FORMATS)}.")
    if text_mode not in ("line", "file"):
        raise ValueError(f"text_mode={text_mode!r} is not supported; use 'line' or 'file'.")
    if type(data).__module__.split(".")[0] == "datasets":  # checked first: a DatasetDict is also a dict
        source = _hf_source(data, split, type(data).__name__)
    else:
        if isinstance(data, (str, os.PathLike)):
            data = [data]
        elif not isinstance(data, (list, tuple)):
            raise TypeError(
                "data must be a path, a glob pattern, a list of paths or of dicts, or a datasets.Dataset/DatasetDict;"
                f" got {type(data).__name__}."
            )
        if not data:
            raise ValueError("data is an empty list: give rows (dicts) or paths to data files.")
        if all(isinstance(item, (str, os.PathLike)) for item in data):
            source = _path_source([os.fspath(item) for item in data], format, split, text_mode)
        else:
            _no_split(split, "a list of rows")
            source = _ListSource(data)
    if len(source) == 0:
        raise ValueError(f"{source.name} holds no rows; check the path and that the data is not empty.")
    if columns:
        _set_columns(source, columns)
    return source


def _set_columns(source: Source, columns: Mapping[str, str]) -> None:
    """Sets the column mapping after checking that every mapped column exists."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise ValueError(f"columns= must map source column names to kithara names (strings), got {dict(columns)}.")
    names = source._column_names()
    missing = [name for name in columns if name not in names]
    if missing:
        raise ValueError(
            f"columns= maps {missing}, which {source.name} does not have; its columns are {names}. "
            "Fix the names on the left of the mapping."
        )
    source._columns = dict(columns)


def _hf_source(dataset: Any, split: str | None, name: str) -> Source:
    """A source for a ``datasets`` object, picking the split of a DatasetDict."""
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split is None or split not in dataset:
            problem = "needs split=" if split is None else f"has no split {split!r}"
            raise ValueError(f"{name} is a DatasetDict and {problem}; pass split= one of {sorted(dataset)}.")
        return _HFSource(dataset[split], f"{name}[{split!r}]")
    if isinstance(dataset, datasets.Dataset):
        _no_split(split, name)
        return _HFSource(dataset, name)
    raise TypeError(
        f"{type(dataset).__name__} is not supported: kithara needs random access, so pass a datasets.Dataset "
        "or DatasetDict (load without streaming=True)."
    )


def _no_split(split: str | None, name: str) -> None:
    """Rejects ``split=`` for data that has no splits."""
    if split is not None:
        raise ValueError(f"split={split!r} only applies to a DatasetDict; drop it for {name}.")


def _is_hf_dir(path: epath.Path) -> bool:
    """Whether ``path`` is a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / marker).exists() for marker in _HF_DISK_MARKERS)


def _path_source(items: list[str], format: str | None, split: str | None, text_mode: str) -> Source:
    """A source over files named by paths and glob patterns, or a dataset saved to disk."""
    files: list[epath.Path] = []
    for item in items:
        if _GLOB_CHARS.search(item):
            matches = _glob(item)
            if not matches:
                raise FileNotFoundError(f"No files match the pattern {item!r}.")
            files.extend(matches)
            continue
        path = epath.Path(item)
        if not path.exists():
            raise FileNotFoundError(f"Data path {item!r} does not exist.")
        if _is_hf_dir(path):
            if len(items) > 1:
                raise ValueError(f"{item} is a saved Hugging Face dataset; pass it alone, not in a list of paths.")
            import datasets

            return _hf_source(datasets.load_from_disk(item), split, item)
        if path.is_dir():
            raise ValueError(
                f"{item} is a directory but not one written by datasets' save_to_disk; "
                f"pass its files with a glob such as '{item.rstrip('/')}/*.jsonl'."
            )
        files.append(path)
    _no_split(split, ", ".join(items))
    parts = [_file_source(path, format, text_mode) for path in files]
    return parts[0] if len(parts) == 1 else _ConcatSource(parts, ", ".join(items))


def _glob(pattern: str) -> list[epath.Path]:
    """Files matching ``pattern`` in sorted order; globbing starts at the last directory without wildcards."""
    if "**" in pattern:  # epath refuses it: on GCS it could cost thousands of requests
        raise ValueError(f"Recursive '**' patterns are not supported ({pattern!r}); use one '*' per directory level.")
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
    base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
    matches = epath.Path(base).glob("/".join(parts[first:]))
    return sorted((path for path in matches if not path.is_dir()), key=os.fspath)


def _file_source(path: epath.Path, format: str | None, text_mode: str) -> Source:
    """The source for one file, in ``format`` or the format its suffix names."""
    format = format or _SUFFIX_FORMATS.get(path.suffix.lower())
    if format == "jsonl":
        return _LineSource(path, "jsonl")
    if format == "json":
        return _JsonSource(path)
    if format in ("csv", "tsv"):
        return _CsvSource(path, "\t" if format == "tsv" else ",")
    if format == "parquet":
        return _ParquetSource(path)
    if format == "text":
        return _LineSource(path, "text") if text_mode == "line" else _TextFileSource(path)
    raise ValueError(
        f"Cannot tell the format of {os.fspath(path)} from its suffix {path.suffix!r}; pass format= one of "
        f"{', '.join(FORMATS)} (suffixes {', '.join(_SUFFIX_FORMATS)})."
    )


def _index_lines(path: epath.Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte start, byte end (before the newline) and 1-based line number of every non-blank line."""
    starts, ends, lines = [], [], []
    offset = line_start = 0  # where the current chunk and the current, unfinished line begin
    line = 1
    filled = False  # whether the unfinished line has non-whitespace bytes so far
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK_BYTES):
            data = np.frombuffer(chunk, np.uint8)
            nonblank = np.concatenate([[0], np.cumsum(~_WHITESPACE[data], dtype=np.int64)])  # counts before i
            newlines = np.flatnonzero(data == 10)
            if len(newlines):
                segment_starts = np.concatenate([[0], newlines[:-1] + 1])
                keep = nonblank[newlines] > nonblank[segment_starts]
                keep[0] |= filled
                absolute_starts = np.concatenate([[line_start], offset + segment_starts[1:]])
                starts.append(absolute_starts[keep])
                ends.append(offset + newlines[keep])
                lines.append(line + np.flatnonzero(keep))
                line += len(newlines)
                line_start = offset + int(newlines[-1]) + 1
                filled = bool(nonblank[-1] > nonblank[newlines[-1] + 1])
            else:
                filled = filled or bool(nonblank[-1])
            offset += len(chunk)
    if filled:  # a last line without a newline
        starts.append(np.array([line_start]))
        ends.append(np.array([offset]))
        lines.append(np.array([line]))
    empty = np.zeros(0, np.int64)
    return (
        np.concatenate([empty, *starts]).astype(np.int64),
        np.concatenate([empty, *ends]).astype(np.int64),
        np.concatenate([empty, *lines]).astype(np.int64),
    )


def _as_object(value: Any, where: str) -> dict[str, Any]:
    """``value`` as a row dict, or a RowError if it is not a JSON object."""
    if not isinstance(value, Mapping):
        raise RowError(where, f"expected an object (a dict of fields), got {type(value).__name__}.")
    return dict(value)


def _decode(data: bytes, where: str, encoding: str = "utf-8") -> str:
    """``data`` decoded, or a RowError naming where the bytes came from."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise RowError(where, f"not UTF-8 text ({error}).") from None
