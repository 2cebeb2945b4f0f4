"""Set-up checks the Trainer runs before it builds anything: settings that JAX would accept
silently (replicating what should be split) or that fail only at the first step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kithara import sharding as sharding_lib

if TYPE_CHECKING:  # the run config imports check_heads without loading models or data
    from kithara.data.dataloader import Dataloader
    from kithara.models.model import Model


def check_heads(counts: Mapping[str, int], tensor_parallel: int, *, setting: str, fix: str) -> None:
    """Refuses a ``tensor_parallel`` that does not divide every head count in ``counts``
    (``{how the message names it: heads}``): that head axis would be replicated on every device, without a word.
    ``fix`` may hold ``{fits}``, the largest tensor parallelism that divides them all."""
    bad = {name: n for name, n in counts.items() if n % tensor_parallel}
    if tensor_parallel <= 1 or not bad:
        return
    fits = next(t for t in range(tensor_parallel, 0, -1) if all(n % t == 0 for n in counts.values()))
    heads = " and ".join(bad)
    raise ValueError(
        f"{setting}={tensor_parallel} does not divide {heads}: tensor parallelism splits the attention heads, "
        f"so these would be replicated on every device instead. {fix.format(fits=fits)}"
    )


def check_model_heads(model: Model) -> None:
    """``check_heads`` for a built model: its mesh's ``tensor`` axis against its backbone's
    query and key/value heads (models without those attributes are not checked)."""
    tensor_parallel = int(model.mesh.shape.get("tensor", 1))
    backbone = getattr(model, "backbone", None)
    counts = {
        label: n
        for label, attribute in (("query heads", "num_query_heads"), ("key/value heads", "num_key_value_heads"))
        if isinstance(n := getattr(backbone, attribute, None), int)
    }
    check_heads(
        {f"its {n} {label}": n for label, n in counts.items()},  # "its 2 key/value heads"
        tensor_parallel,
        setting="The model's tensor_parallel",
        fix="Build the model with ShardingStrategy('fsdp_tp', tensor_parallel={fits}) (model.tensor_parallel "
        "in a run config), the largest value that divides every head count.",
    )


def check_batches_split(model: Model, loaders: Mapping[str, Dataloader | None]) -> None:
    """Refuses a loader whose global batch does not split over the mesh's data-parallel shards
    (JAX's IndivisibleError at the first step otherwise)."""
    shards = sharding_lib.batch_shards(model.mesh)
    for name, loader in loaders.items():
        if loader is None or loader.global_batch_size % shards == 0:
            continue
        devices = loader.global_batch_size // loader.per_device_batch_size
        mesh = ", ".join(f"{axis}={size}" for axis, size in model.mesh.shape.items())
        raise ValueError(
            f"The {name}'s global batch of {loader.global_batch_size} rows (per_device_batch_size="
            f"{loader.per_device_batch_size} x num_devices={devices}) does not split over the mesh's "
            f"{shards} data-parallel shards (data x fsdp of the mesh {mesh}). Build the Dataloader with "
            f"num_devices={shards * int(model.mesh.shape.get('tensor', 1))} (the default: every device), or a "
            f"per_device_batch_size that makes the global batch a multiple of {shards}."
        )


def model_vocabulary_size(model: Model) -> int | None:
    """The rows of the model's embedding table (keras-hub backbones), or None if unknown."""
    size = getattr(getattr(model, "backbone", None), "vocabulary_size", None)
    return size if isinstance(size, int) else None


def check_vocabulary(model: Model, tokenizer: Any) -> None:
    """Refuses a tokenizer with more ids than the model's vocabulary: an id past the
    embedding table reads out of bounds (NaN) and training diverges at step 1."""
    model_size = model_vocabulary_size(model)
    tokenizer_size = getattr(tokenizer, "vocab_size", None)
    if model_size is None or not isinstance(tokenizer_size, int) or tokenizer_size <= model_size:
        return
    raise ValueError(
        f"The tokenizer has {tokenizer_size} ids but the model has a vocabulary of {model_size}: ids from "
        f"{model_size} on have no embedding and training would turn to NaN at the first step. Build the model "
        f"with vocab_size >= {tokenizer_size} (model.vocab_size in a run config; null takes the tokenizer's), or "
        "use the tokenizer the model was trained with."
    )


def check_packing(model: Model, loaders: Mapping[str, Dataloader | None]) -> None:
    """Refuses packed loaders for a model whose attention cannot keep packed examples apart."""
    for name, loader in loaders.items():
        if loader is not None and loader.packing and not model.supports_packing:
            raise ValueError(
                f"The {name} packs several examples per row, but {type(model).__name__} cannot keep their "
                "attention apart (supports_packing is False); training would leak attention across "
                "examples. Build the loader with packing=False."
            )


def check_setup(model: Model, tokenizer: Any, loaders: Mapping[str, Dataloader | None]) -> None:
    """Every set-up check the base Trainer runs on the model, its tokenizer and its loaders
    (``{"train_dataloader": ..., "eval_dataloader": ...}``)."""
    check_packing(model, loaders)
    check_model_heads(model)
    check_batches_split(model, loaders)
    check_vocabulary(model, tokenizer)
