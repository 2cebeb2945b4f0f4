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
import itertools
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from kithara.data.files import FORMATS, file_source
from kithara.data.source import RowError, Source, _as_object

__all__ = ["FORMATS", "RowError", "Source", "load_source"]

_HF_DISK_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
_GLOB_CHARS = re.compile(r"[*?[]")


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
        set_columns(source, columns)
    return source


def set_columns(source: Source, columns: Mapping[str, str]) -> None:
    """Renames fields of every row of ``source`` (source name to kithara name), checked."""
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
    parts = [file_source(path, format, text_mode) for path in files]
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
