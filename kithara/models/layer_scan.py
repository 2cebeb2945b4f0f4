"""Layer scan (``ScaleConfig(scan_layers=True)``): identical decoder blocks as one ``jax.lax.scan``.

keras-hub backbones call their decoder blocks one after the other with nothing in between, so
when the seam (``decoder_seam``) hands over the first block of a run of structurally identical
blocks, ``run`` computes the whole run here and the later blocks of the same pass return their
input unchanged. Variables stay per layer (checkpoints, LoRA, Hugging Face export and sharding
see no difference): inside the trace each per-layer weight is stacked into a
``[groups, ...]`` array, and the scan body calls the first group's blocks under a nested
``keras.StatelessScope`` that maps their variables to the current slice. The price is one
stacked copy of the decoder weights (and of their gradients) per step.

Families that alternate block kinds (Gemma 2: sliding/global; Gemma 3: five local, one global
with another RoPE) scan over groups of ``period`` consecutive blocks, the body running the
group's blocks in order; a leftover tail runs unscanned. Blocks are identical when they have
the same class, the same plain attributes (those of ``get_config()`` and more) in the block and
each sublayer but for names, and the same variables (paths relative to the block, shapes,
dtypes, trainability). Keras state the blocks write (dropout seed states in training) leaves
the scan as per-group outputs and is assigned back to each layer's own variable.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import keras
from keras.src.backend.common.stateless_scope import get_stateless_scope

logger = logging.getLogger(__name__)

_LOGGED: set[str] = set()


@dataclasses.dataclass(frozen=True)
class Plan:
    """Blocks ``layers[start : start + period * groups]`` run as ``groups`` scan steps of ``period`` blocks."""

    start: int
    period: int
    groups: int


def run(run: Any, block: Any, hidden: jax.Array) -> Any:
    """The output of ``block`` on ``hidden`` within the traced pass ``run`` (a ``DecoderRun``).

    The first block of a scannable run computes all of that run's blocks; blocks already
    computed this way return ``hidden`` (the scan's output) unchanged.
    """
    state = vars(run)
    if id(block.layer) in run.done:
        if hidden is not state.get(_OUTPUT):
            raise RuntimeError(
                f"{block.layer.name} was computed inside a layer scan, but the backbone changed the hidden "
                "states after the scanned blocks: this keras-hub backbone does not call its decoder blocks "
                "back to back. Set ScaleConfig(scan_layers=False)."
            )
        return hidden
    index = next((i for i, layer in enumerate(run.layers) if layer is block.layer), None)
    plan = None if index is None else find_plan(run.layers, index)
    if plan is None:
        if index == 0:
            _log_once(f"{type(block.layer).__name__} x{len(run.layers)}: no identical decoder blocks; not scanned")
        return run.run_one(lambda h: block.run(h), hidden)
    layers = run.layers[plan.start : plan.start + plan.period * plan.groups]
    out = scan_blocks(run, block, layers, plan.period, hidden)
    run.done.update(id(layer) for layer in layers)
    state[_OUTPUT] = out
    return out


_OUTPUT = "_layer_scan_output"  # the last scan's output, kept on the DecoderRun


def find_plan(layers: Sequence[Any], start: int) -> Plan | None:
    """The scan that covers the most blocks from ``layers[start]`` on: groups of ``period``
    consecutive blocks, block ``i`` identical to block ``i + period`` inside it, at least two
    groups (the smaller period on a tie); ``None`` if there is none."""
    signatures: dict[int, Any] = {}

    def same(i: int, j: int) -> bool:
        for k in (i, j):
            if k not in signatures:
                signatures[k] = block_signature(layers[k])
        return signatures[i] is not None and signatures[i] == signatures[j]

    best = None
    for period in range(1, (len(layers) - start) // 2 + 1):
        end = start + period  # blocks [start, end) repeat so far
        while end + period <= len(layers) and all(same(i - period, i) for i in range(end, end + period)):
            end += period
        groups = (end - start) // period
        if groups >= 2 and (best is None or groups * period > best.groups * best.period):
            best = Plan(start, period, groups)
    return best


def block_signature(layer: Any) -> tuple[Any, ...] | None:
    """What must match for two blocks to share one scan body (``None``: never scanned): the class
    and plain attributes (ints, floats, strings, ...) of the block and of each of its sublayers,
    but for names and paths (keras-hub's ``get_config`` misses some, and fails on Llama's blocks),
    and the variables by relative path, shape, dtype and trainability."""
    variables = relative_variables(layer)
    if variables is None:
        return None
    sublayers = tuple(
        (type(sub), sub.dtype_policy.name, tuple(sorted((k, v) for k, v in vars(sub).items() if _plain(k, v))))
        for sub in layer._flatten_layers(include_self=True)
    )
    shapes = tuple((path, tuple(v.shape), str(v.dtype), bool(v.trainable)) for path, v in variables.items())
    return (sublayers, shapes)


_PLAIN = (bool, int, float, str, type(None))
_NAMES = frozenset({"name", "_name", "path", "_path", "_parent_path"})


def _plain(key: str, value: Any) -> bool:
    if key in _NAMES:
        return False
    if isinstance(value, tuple | list):
        return all(isinstance(v, _PLAIN) for v in value)
    return isinstance(value, _PLAIN)


def relative_variables(layer: Any) -> dict[str, Any] | None:
    """The block's variables (trainable, non-trainable, LoRA factors, seed states) by path relative
    to the block, in the block's order; ``None`` if a path is not under the block's."""
    prefix = layer.path + "/"
    variables = {}
    for variable in layer.variables:
        if not variable.path.startswith(prefix):
            return None
        # keras numbers seed generators model-wide (seed_generator_7): the same one in every block.
        variables[_SEED_GENERATOR.sub("seed_generator", variable.path[len(prefix) :])] = variable
    return variables if len(variables) == len(layer.variables) else None


_SEED_GENERATOR = re.compile(r"(?<![^/])seed_generator_\d+(?=/)")


def scan_blocks(run: Any, block: Any, layers: Sequence[Any], period: int, hidden: jax.Array) -> jax.Array:
    """``layers`` (``len(layers) // period`` groups of ``period`` blocks) applied in order to
    ``hidden`` as one ``jax.lax.scan`` over the groups, each group through ``run.run_one`` (remat
    and activation sharding) inside a ``keras.StatelessScope`` mapping the first group's variables
    to the current slice of the stacked ones."""
    groups = len(layers) // period
    outer = get_stateless_scope()
    by_layer = [relative_variables(layer) or {} for layer in layers]
    template = by_layer[:period]  # the first group's variables: the scan body computes with these
    stacked = [
        {path: jnp.stack([_value(by_layer[g * period + j][path], outer) for g in range(groups)]) for path in paths}
        for j, paths in enumerate(template)
    ]

    slot = {id(template[j][path]): (j, path) for j in range(period) for path in template[j]}

    def blocks(h: jax.Array) -> jax.Array:
        for layer in layers[:period]:
            h = block.run(h, layer)
        return h

    def body(h: jax.Array, weights: list[dict[str, jax.Array]]) -> tuple[jax.Array, dict[tuple[int, str], Any]]:
        mapping = [(template[j][path], value) for j in range(period) for path, value in weights[j].items()]
        scope = keras.StatelessScope(state_mapping=mapping)
        if outer is not None:
            # Variables outside the blocks (none in keras-hub's decoders) keep the pass's values.
            scope.state_mapping = {**outer.state_mapping, **scope.state_mapping}
        given = dict(scope.state_mapping)
        with scope:
            h = run.run_one(blocks, h)
        return h, _writes(scope, given, slot)

    out, writes = jax.lax.scan(body, hidden, stacked)
    if writes and outer is None:
        raise ValueError("ScaleConfig(scan_layers=True): decoder blocks wrote keras state outside a stateless pass.")
    # Keras state the blocks wrote (dropout seed states in training), one value per group: back
    # into each layer's own variable in the pass's scope, as the unrolled blocks would have.
    for (j, path), values_G in writes.items():
        for g in range(groups):
            by_layer[g * period + j][path].assign(values_G[g])
    return out


def _value(variable: Any, scope: Any) -> Any:
    """The variable's value in this pass (the outer stateless scope's), not autocast."""
    value = scope.get_current_value(variable) if scope is not None else None
    return variable.value if value is None else value


def _writes(scope: Any, given: dict[int, Any], slot: dict[int, tuple[int, str]]) -> dict[tuple[int, str], Any]:
    """The block variables the scan body assigned, as ``{(position in group, path): new value}``;
    raises if it assigned a variable outside the blocks (that value could not leave the scan)."""
    written = [key for key, value in scope.state_mapping.items() if given.get(key) is not value]
    if any(key not in slot for key in written):
        raise ValueError(
            "ScaleConfig(scan_layers=True) cannot scan decoder blocks that write keras variables outside "
            "themselves; set scan_layers=False."
        )
    return {slot[key]: scope.state_mapping[key] for key in written}


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.debug(message)
