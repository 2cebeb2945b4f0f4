"""The row-source contract: random access to plain dict rows that can say where each came from."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from typing import Any


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


class Source(abc.ABC):
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

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def _row(self, index: int) -> dict[str, Any]:
        """The unmapped row at a valid, non-negative index."""

    @abc.abstractmethod
    def _where(self, index: int) -> str:
        """The location of a valid, non-negative index."""

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


def _as_object(value: Any, where: str) -> dict[str, Any]:
    """``value`` as a row dict, or a RowError if it is not a JSON object."""
    if not isinstance(value, Mapping):
        raise RowError(where, f"expected an object (a dict of fields), got {type(value).__name__}.")
    return dict(value)
