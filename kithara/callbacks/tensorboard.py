"""TensorBoard scalars through tensorboardX (no TensorFlow needed)."""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from typing import Any

import jax

from kithara.callbacks.base import Callback, StepInfo

_UPLOAD_EVERY_S = 30.0  # a gs:// event file is uploaded whole: at most this often, and at the end


class TensorBoardLogger(Callback):
    """Writes train metrics every ``every`` steps and every evaluation to ``log_dir``
    (a local directory or a ``gs://`` path), under ``train/`` and ``eval/`` tags.
    Only process 0 writes.

    A ``gs://`` event file is written through ``etils.epath`` (the ``gcs`` extra: gcsfs), as
    checkpoints and data are; GCS objects cannot be appended to, so the file is uploaded
    whole, at most every 30 seconds while training and once at the end.

    Example:
        >>> trainer = Trainer(..., callbacks=[TensorBoardLogger("runs/exp1", every=10)])
    """

    def __init__(self, log_dir: str, every: int = 1) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}.")
        if str(log_dir).startswith("gs://"):
            _check_gcs_client(str(log_dir))
        self.log_dir = log_dir
        self.every = every
        self._writer: Any = None  # a tensorboardX SummaryWriter, opened on the first write

    def on_train_begin(self, info: StepInfo) -> None:
        self._open()

    def on_step_end(self, info: StepInfo) -> None:
        if info.step % self.every == 0 or info.step == info.total_steps:
            self._write("train", info.step, info.metrics)

    def on_eval_end(self, info: StepInfo) -> None:
        self._write("eval", info.step, info.metrics)

    def on_train_end(self, info: StepInfo) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _open(self) -> None:
        if self._writer is None and jax.process_index() == 0:
            # Imported here: tensorboardX imports torch when it is installed (about 2 s).
            from tensorboardX import SummaryWriter, record_writer

            # tensorboardX's own gs:// writer needs google-cloud-storage, and uploads every
            # file once more when the interpreter exits (its atexit hook keeps them alive).
            record_writer.register_writer_factory("gs", _GcsEventFiles())
            self._writer = SummaryWriter(self.log_dir)

    def _write(self, prefix: str, step: int, metrics: Mapping[str, float]) -> None:
        self._open()
        if self._writer is None:
            return
        for name, value in metrics.items():
            self._writer.add_scalar(f"{prefix}/{name}", value, step)
        self._writer.flush()


class _GcsEventFile:
    """A ``gs://`` event file for tensorboardX: kept in memory, uploaded whole through epath."""

    def __init__(self, path: str) -> None:
        from etils import epath

        self._path = epath.Path(path)
        self._buffer = io.BytesIO()
        self._uploaded_bytes = 0
        self._uploaded_at = float("-inf")

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        if time.monotonic() - self._uploaded_at >= _UPLOAD_EVERY_S:
            self._upload()

    def close(self) -> None:
        self._upload()

    def _upload(self) -> None:
        if self._buffer.tell() != self._uploaded_bytes:
            self._path.write_bytes(self._buffer.getvalue())
            self._uploaded_bytes = self._buffer.tell()
        self._uploaded_at = time.monotonic()


class _GcsEventFiles:
    """tensorboardX's writer factory interface, for ``gs://``."""

    def open(self, path: str) -> _GcsEventFile:
        return _GcsEventFile(path)

    def directory_check(self, path: str) -> None:
        pass  # GCS has no directories to create


def _check_gcs_client(log_dir: str) -> None:
    """Without the gcs extra, epath fails on the first write, deep in training, with a
    message that names fsspec's protocol but not the extra: fail here, before training."""
    try:
        import gcsfs  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"TensorBoard directory {log_dir!r} is on Google Cloud Storage, which needs the gcs extra: "
            'pip install "kithara[gcs]" (gcsfs, which etils.epath uses for gs:// paths).'
        ) from error
