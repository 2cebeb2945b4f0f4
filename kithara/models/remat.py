"""Rematerialisation policies for decoder blocks (``ScaleConfig.remat``, docs/scale.md).

``checkpointed(fn, policy)`` puts one decoder block (or a scanned group of them) under
``jax.checkpoint`` with a named policy; the backward pass then recomputes what the policy does
not save. ``decoder_seam.DecoderRun.run_one`` is the one caller:

- ``none``: ``fn`` itself; every activation is kept.
- ``full``: nothing is saved but the block's inputs (the hidden states and the weights).
- ``dots``: matmul outputs are saved (``jax.checkpoint_policies.dots_saveable``).
- ``dots_no_batch``: matmul outputs without batch dimensions are saved
  (``dots_with_no_batch_dims_saveable``): the projections (query/key/value/output, MLP), which
  contract with a weight, but not attention's scores and weighted values, whose matmuls carry
  batch (and head) dimensions on both sides; those ``[batch, heads, length, length]`` products
  are recomputed.
- ``attention_out``: the output of each block's attention layer is saved (named
  ``ATTENTION_OUT`` by a wrapper around the keras-hub attention layers' ``call``).
- ``offload``: as ``full``, but each block's input is copied to host memory
  (``pinned_host``) in the forward pass and back in the backward pass. On XLA:CPU (jax 0.10.2)
  this runs, and device memory already is host memory; a backend whose devices have no
  ``pinned_host`` memory is refused.

Keras layer state written inside a block (a Dropout's seed generator, in training with
``dropout > 0``) is threaded out of the checkpointed function and written back into the
enclosing ``keras.StatelessScope``, so it never leaks a tracer and the recomputation draws the
same dropout masks.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.ad_checkpoint import checkpoint_name
from keras.src.backend.common.stateless_scope import get_stateless_scope
from keras_hub.src.models.gemma.gemma_attention import CachedGemmaAttention
from keras_hub.src.models.gemma3.gemma3_attention import CachedGemma3Attention
from keras_hub.src.models.llama.llama_attention import LlamaAttention
from keras_hub.src.models.mistral.mistral_attention import CachedMistralAttention
from keras_hub.src.models.qwen.qwen_attention import QwenAttention
from keras_hub.src.models.qwen3.qwen3_attention import Qwen3Attention

from kithara.models import decoder_seam
from kithara.models.scale_config import REMAT_POLICIES, ScaleConfig

ATTENTION_OUT = "kithara_attention_out"  # checkpoint name of each block's attention output
BLOCK_INPUT = "kithara_block_input"  # checkpoint name of each block's (offloaded) input

# The attention layers of the decoder blocks ``decoder_seam`` covers (Llama 3 uses Llama's).
ATTENTION_LAYERS: tuple[type, ...] = (
    LlamaAttention,
    CachedMistralAttention,
    QwenAttention,
    Qwen3Attention,
    CachedGemmaAttention,
    CachedGemma3Attention,
)

_NAMING: contextvars.ContextVar[bool] = contextvars.ContextVar("kithara_name_attention_out", default=False)
_ORIGINALS: dict[type, Callable[..., Any]] = {}
_LOCK = threading.Lock()


def jax_policy(policy: str) -> Callable[..., Any] | None:
    """The ``jax.checkpoint`` policy of a kithara remat policy name (``None``: save nothing)."""
    policies = jax.checkpoint_policies
    if policy == "full":
        return None
    if policy == "dots":
        return policies.dots_saveable
    if policy == "dots_no_batch":
        return policies.dots_with_no_batch_dims_saveable
    if policy == "attention_out":
        return policies.save_only_these_names(ATTENTION_OUT)
    if policy == "offload":
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=[BLOCK_INPUT],
            offload_src="device",
            offload_dst="pinned_host",
        )
    raise ValueError(f"Unknown remat policy {policy!r}; choose one of {REMAT_POLICIES}.")


def checkpointed(fn: Callable[[jax.Array], Any], policy: str) -> Callable[[jax.Array], Any]:
    """``fn`` under ``jax.checkpoint`` with the named policy (``"none"``: ``fn`` itself).

    Args:
        fn: one decoder block (or a group of them) as a function of its hidden states; other
            inputs (weights, masks) are closed over and count as the block's inputs.
        policy: one of ``REMAT_POLICIES``.
    """
    if policy == "none":
        return fn
    saving = jax_policy(policy)
    if policy == "attention_out":
        install()
    if policy == "offload":
        active = decoder_seam.current()
        check_offload_supported(None if active is None else active.mesh.devices.flat[0])
        inner = fn

        def fn(hidden: jax.Array) -> Any:
            return inner(checkpoint_name(hidden, BLOCK_INPUT))

    body = jax.checkpoint(_returning_state(fn), policy=saving)

    @functools.wraps(fn)
    def run(hidden: jax.Array) -> Any:
        with _naming(policy == "attention_out"):
            out, updates = body(hidden)
        _write_state(updates)
        return out

    return run


def _returning_state(fn: Callable[[jax.Array], Any]) -> Callable[[jax.Array], tuple[Any, dict[int, Any]]]:
    """``fn`` that also returns the keras variables it assigned (``{id(variable): value}``),
    taking them back out of the stateless scope so no inner tracer stays there."""

    def stateful(hidden: jax.Array) -> tuple[Any, dict[int, Any]]:
        scope = get_stateless_scope()
        if scope is None:
            return fn(hidden), {}
        before, losses = dict(scope.state_mapping), len(scope.losses)
        out = fn(hidden)
        if len(scope.losses) != losses:
            del scope.losses[losses:]
            raise NotImplementedError(
                "A decoder block added a keras loss (add_loss) under rematerialisation; its value cannot "
                "leave jax.checkpoint. Set ScaleConfig(remat='none') for this model."
            )
        updates = {key: value for key, value in scope.state_mapping.items() if before.get(key) is not value}
        scope.state_mapping.clear()
        scope.state_mapping.update(before)
        return out, updates

    return stateful


def _write_state(updates: dict[int, Any]) -> None:
    """Writes the state a checkpointed block assigned back into the enclosing stateless scope."""
    if updates:
        scope = get_stateless_scope()
        scope.state_mapping.update(updates)


def check_offload_supported(device: Any = None) -> None:
    """Raises unless ``device`` (default: the default backend's first) has ``pinned_host``
    memory to offload to."""
    device = jax.devices()[0] if device is None else device
    kinds = {memory.kind for memory in device.addressable_memories()}
    if "pinned_host" not in kinds:
        raise ValueError(
            f"ScaleConfig(remat='offload') needs 'pinned_host' memory, which {device.platform} devices do not "
            f"have (memory kinds: {sorted(kinds)}); use remat='full' instead."
        )


@contextlib.contextmanager
def _naming(active: bool) -> Iterator[None]:
    token = _NAMING.set(active)
    try:
        yield
    finally:
        _NAMING.reset(token)


def install() -> None:
    """Wraps the attention layers' ``call`` so that, while an ``attention_out`` block is traced,
    the attention output carries the ``ATTENTION_OUT`` checkpoint name; idempotent, thread-safe.
    Cached decoding (a tuple output) and every other trace are left as they are."""
    with _LOCK:
        if _ORIGINALS:
            return
        for cls in ATTENTION_LAYERS:
            _ORIGINALS[cls] = cls.__dict__["call"]
            setattr(cls, "call", _named_call(cls.__dict__["call"]))  # noqa: B010 (cls is a variable)


def _named_call(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        if _NAMING.get() and not isinstance(out, tuple):
            return checkpoint_name(out, ATTENTION_OUT)
        return out

    return call


def enable_gradient_checkpointing(model: Any) -> None:
    """TRL's ``gradient_checkpointing=True``: ``model.scale`` gets ``remat="full"`` when its policy
    is ``"none"`` (a named policy already set is kept); for a model made of models (PPO's policy and
    value model, a cycle pair's two sides) each of them. Raises for a model without ``scale``."""
    for part in _scaled_parts(model):
        options = part.scale
        if options.remat == "none":
            part.scale = dataclasses.replace(options, remat="full")


def _scaled_parts(model: Any) -> list[Any]:
    """``model`` if it has a ``ScaleConfig``, else those of its ``submodels()``; raises naming the
    first model without either."""
    if isinstance(getattr(model, "scale", None), ScaleConfig):
        return [model]
    subs = model.submodels() if hasattr(model, "submodels") else []
    if not subs:
        raise ValueError(
            f"gradient_checkpointing=True: {type(model).__name__} has no decoder-block remat (no "
            "ScaleConfig `scale`); it is available for KerasHubModel and ScalarHeadModel (and models made of "
            "them). Set gradient_checkpointing=False."
        )
    return [part for sub in subs for part in _scaled_parts(sub)]
