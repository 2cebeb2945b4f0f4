"""ServeConfig: what ``kithara serve`` serves, where, and within which limits."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Settings of the OpenAI-compatible server (``kithara serve``; see docs/serve.md).

    Args:
        model_dir: a Hugging Face checkpoint directory (what ``save_in_hf_format`` writes), a
            keras-hub preset directory, or a kithara training checkpoint (a step directory such
            as ``out/checkpoints/200``, or the directory of steps: the latest) with ``base``.
        base: for a training checkpoint: the Hugging Face or keras-hub directory of the model it
            was trained from, or the ``kithara train`` YAML config of the run (its model section,
            LoRA, precision, sharding and ``data.tokenizer``); the checkpoint's weights replace
            the base's own.
        tokenizer: a Hugging Face tokenizer directory (default: ``model_dir``, else ``base``).
        model_name: the id clients pass as ``model`` (default: ``model_dir``'s directory name).
        host: interface to listen on.
        port: TCP port (0 picks a free one; the log says which).
        max_batch_size: rows (a request with ``n`` choices takes ``n``) in one generate call; also
            the largest ``n`` a request may ask for.
        max_model_len: prompt plus completion tokens at most (default: the model's
            ``max_position_embeddings``, else 2048); longer requests get a 400 error.
        default_max_tokens: completion tokens when a request sets no ``max_tokens`` (capped by what
            ``max_model_len`` leaves).
        batch_wait_ms: after the first request of a batch arrives, wait this long for others.
        stream_segment_tokens: a streamed completion is generated this many tokens at a time,
            each segment's text sent when it is done.
        precision: the model's compute precision (``"float32"``, ``"bfloat16"``, ...); None is
            ``"float32"``, or the run's with a YAML ``base`` (which then refuses another).
        sharding: a kithara sharding strategy name for the model's mesh (default: kithara's, or
            the run's with a YAML ``base``, which then refuses another).
        log_requests: log each request's prompt text and sampling settings at INFO.

    Example:
        >>> config = ServeConfig("runs/exp1/hf", model_name="exp1", port=8000)
    """

    model_dir: str
    base: str | None = None
    tokenizer: str | None = None
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 8
    max_model_len: int | None = None
    default_max_tokens: int = 256
    batch_wait_ms: float = 5.0
    stream_segment_tokens: int = 16
    precision: str | None = None
    sharding: str | None = None
    log_requests: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "default_max_tokens", "stream_segment_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ServeConfig.{name} must be a positive int, got {value!r}.")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ValueError(f"ServeConfig.max_model_len must be an int >= 2 or None, got {self.max_model_len!r}.")
        if not 0 <= self.port < 65536:
            raise ValueError(f"ServeConfig.port must be in [0, 65535], got {self.port}.")
        if self.batch_wait_ms < 0:
            raise ValueError(f"ServeConfig.batch_wait_ms must be >= 0, got {self.batch_wait_ms}.")
