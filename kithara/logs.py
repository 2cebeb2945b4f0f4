"""kithara's logging policy: step logs visible by default, and the user's configuration wins.

Python prints INFO records only where someone set a level and a handler, and a plain
``logging.basicConfig(level=logging.INFO)`` after ``import kithara`` did nothing: importing
orbax (through absl) already gave the root logger a WARNING-level handler, so basicConfig
returned at once and kithara's step logs were dropped. At import, kithara therefore:

- sets the ``kithara`` logger to INFO, unless logging was configured before (a level on
  ``kithara``, or root handlers other than that implicit one);
- removes the implicit root handler its own import added, so a later ``basicConfig`` works;
- adds a fallback handler to ``kithara`` that writes to stderr only the records no other
  handler would write (a script that never configured logging), so nothing prints twice.

``set_verbosity`` changes the level afterwards. See docs/trainer.md, "Logging".
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

LOGGER_NAME = "kithara"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _FallbackHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` the records that no other handler writes."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))

    @property
    def stream(self) -> TextIO:  # the stream of the moment: pytest and users swap sys.stderr
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it
        pass

    def filter(self, record: logging.LogRecord) -> bool:
        return not _handled_elsewhere(record) and bool(super().filter(record))


def _handled_elsewhere(record: logging.LogRecord) -> bool:
    """Whether a handler other than the fallback, on the way from ``kithara`` to the root,
    writes ``record`` (handler levels only: ancestors' logger levels do not stop records)."""
    logger: logging.Logger | None = logging.getLogger(LOGGER_NAME)
    while logger is not None:
        if any(not isinstance(h, _FallbackHandler) and record.levelno >= h.level for h in logger.handlers):
            return True
        logger = logger.parent if logger.propagate else None
    return False


def _is_implicit_root_handler(handler: logging.Handler) -> bool:
    """The handler a bare ``logging.basicConfig()`` adds, as absl's first log call does."""
    formatter = handler.formatter
    return (
        type(handler) is logging.StreamHandler
        and handler.stream is sys.stderr
        and handler.level == logging.NOTSET
        and formatter is not None
        and formatter._fmt == logging.BASIC_FORMAT
    )


def _implicit_root() -> bool:
    """Whether the root logger is as a bare ``basicConfig()`` (or nothing) left it."""
    root = logging.getLogger()
    return root.level == logging.WARNING and all(_is_implicit_root_handler(h) for h in root.handlers)


# The root logger as the user left it: kithara/__init__ imports this module before anything else.
_ROOT_WAS_IMPLICIT, _ROOT_HAD_HANDLERS = _implicit_root(), bool(logging.getLogger().handlers)


def configure_on_import() -> None:
    """Applies the policy above; ``kithara/__init__`` calls it once, after its imports."""
    logger = logging.getLogger(LOGGER_NAME)
    if _ROOT_WAS_IMPLICIT and logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    root = logging.getLogger()
    if not _ROOT_HAD_HANDLERS and len(root.handlers) == 1 and _is_implicit_root_handler(root.handlers[0]):
        root.removeHandler(root.handlers[0])
    if not any(isinstance(h, _FallbackHandler) for h in logger.handlers):
        logger.addHandler(_FallbackHandler())


def set_verbosity(level: int | str) -> None:
    """Sets the level of kithara's logs (the ``kithara`` logger), e.g. ``logging.WARNING`` to
    hide the per-step lines, or ``"DEBUG"``.

    Example:
        >>> kithara.set_verbosity(logging.WARNING)
    """
    if isinstance(level, str):
        name = level.upper()
        if not isinstance(logging.getLevelName(name), int):
            raise ValueError(f"level={level!r} is not a logging level; use e.g. 'INFO', 'WARNING' or logging.INFO.")
        level = name
    logging.getLogger(LOGGER_NAME).setLevel(level)
