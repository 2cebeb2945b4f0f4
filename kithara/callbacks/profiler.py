"""Captures a jax.profiler trace of a window of steps."""

from __future__ import annotations

import logging

import jax

from kithara.callbacks.base import Callback, StepInfo

logger = logging.getLogger(__name__)


class Profiler(Callback):
    """Traces steps ``start_step .. start_step + num_steps - 1`` (1-based) with
    ``jax.profiler``; the trace lands in ``log_dir`` or, by default, the trainer's
    TensorBoard directory (``plugins/profile``), where TensorBoard's profile tab reads it.

    Args:
        start_step: first traced step; leave a few steps for compilation and warm-up.
        num_steps: how many steps to trace.
        log_dir: where to write; defaults to the trainer's ``tensorboard_dir``.

    Example:
        >>> Trainer(..., tensorboard_dir="runs/exp1", profiler=Profiler(start_step=5, num_steps=3))
    """

    def __init__(self, start_step: int = 5, num_steps: int = 3, log_dir: str | None = None) -> None:
        if start_step < 1 or num_steps < 1:
            raise ValueError(f"start_step and num_steps must be >= 1, got {start_step}, {num_steps}.")
        self.start_step = start_step
        self.num_steps = num_steps
        self.log_dir = log_dir
        self.active = False
        self.trace_dir: str | None = None

    @property
    def last_step(self) -> int:
        return self.start_step + self.num_steps - 1

    def on_train_begin(self, info: StepInfo) -> None:
        self.trace_dir = self.log_dir or info.log_dir
        if self.trace_dir is None:
            raise ValueError("Profiler needs a log_dir, or a TensorBoard directory on the Trainer.")
        if self.start_step <= info.start_step + 1:
            self._start()

    def needs_sync(self, step: int) -> bool:
        return step in (self.start_step - 1, self.last_step)

    def on_step_end(self, info: StepInfo) -> None:
        step = info.step
        if step == self.start_step - 1:
            self._start()
        elif step == self.last_step and self.active:
            jax.block_until_ready(info.state)
            jax.profiler.stop_trace()
            self.active = False
            logger.info("Profiler trace of steps %d-%d written to %s", self.start_step, step, self.trace_dir)

    def on_train_end(self, info: StepInfo) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False

    def _start(self) -> None:
        if not self.active and self.trace_dir is not None:
            jax.profiler.start_trace(self.trace_dir)
            self.active = True
