"""File sources (JSONL, JSON, Parquet, CSV/TSV, text) read through ``etils.epath``, so local and
``gs://`` paths work alike; line-based files are indexed by byte offset and parse a row on access."""

from __future__ import annotations

import bisect
import csv
import io
import itertools
import json
import os
import threading
from collections import OrderedDict
from typing import IO, Any

import numpy as np
from etils import epath

from kithara.data.source import RowError, Source, _as_object

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
_CHUNK_BYTES = 1 << 20
_PARQUET_CACHE_BYTES = 256 << 20
_WHITESPACE = np.zeros(256, bool)
_WHITESPACE[[9, 10, 13, 32]] = True  # JSON whitespace: tab, LF, CR, space


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
        return {"text": _decode(self.path.read_bytes(), self.name, whole_file=True)}

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
            hint = (
                " One object per line? Name it .jsonl or pass format='jsonl' (datasets: file_format=)." if lines else ""
            )
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
            io.StringIO(_decode(path.read_bytes(), self.name, "utf-8-sig", whole_file=True), newline=""),
            delimiter=delimiter,
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


def file_source(path: epath.Path, format: str | None, text_mode: str) -> Source:
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


def _decode(data: bytes, where: str, encoding: str = "utf-8", *, whole_file: bool = False) -> str:
    """``data`` decoded, or a RowError naming where the bytes came from: for a whole file,
    the line and column (in bytes) of the first bad byte; for one line, its column."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        if whole_file:
            line = data.count(b"\n", 0, error.start) + 1
            where = f"{where}:{line}"
        bad = data[error.start : error.end]
        raise RowError(
            where,
            f"not UTF-8 text (byte 0x{bad[0]:02x} at column {error.start - line_start + 1}: {error.reason}); "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8).",
        ) from None
