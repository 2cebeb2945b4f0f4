"""The model a server serves: from a Hugging Face or keras-hub directory, or a kithara
training checkpoint's weights on the architecture of the model it was trained from."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax

from kithara.data.tokenizer import Tokenizer
from kithara.models.generation import default_stop_ids
from kithara.models.keras_hub_model import KerasHubModel
from kithara.serve.config import ServeConfig

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 2048


@dataclasses.dataclass
class ServedModel:
    """A loaded model with what the server needs around it.

    Attributes:
        model: the model, on its mesh.
        tokenizer: its tokenizer (with a chat template for ``/v1/chat/completions``).
        name: the id clients pass as ``model``.
        max_model_len: prompt plus completion tokens at most.
        stop_token_ids: a completion ends at the first of these (EOS and end-of-turn ids).
        source: where the weights came from, for the log.
    """

    model: KerasHubModel
    tokenizer: Tokenizer
    name: str
    max_model_len: int
    stop_token_ids: list[int]
    source: str


def is_training_checkpoint(path: str | os.PathLike) -> bool:
    """True for a kithara checkpoint step directory (``.../checkpoints/200``) or a directory of them."""
    where = Path(path)
    if where.name.isdigit() and (where / "state").is_dir():
        return True
    return where.is_dir() and any(p.name.isdigit() and (p / "state").is_dir() for p in where.iterdir())


def load_served_model(config: ServeConfig) -> ServedModel:
    """Loads ``config.model_dir`` (with ``config.base`` for a training checkpoint) and its tokenizer.

    Raises:
        FileNotFoundError: a directory is missing, or no tokenizer is found.
        ValueError: a training checkpoint without ``base``, or whose variables do not match it.
    """
    model_dir = Path(config.model_dir).expanduser()
    if not model_dir.exists():
        raise FileNotFoundError(f"Model directory {config.model_dir!r} does not exist.")
    checkpoint = is_training_checkpoint(model_dir)
    if checkpoint and config.base is None:
        raise ValueError(
            f"{config.model_dir!r} is a kithara training checkpoint: it holds the trained variables but not the "
            "architecture or tokenizer. Pass --base: the Hugging Face or keras-hub directory of the model it "
            "was trained from (the training config's model.preset), or the training YAML config itself."
        )
    if config.base is not None and not checkpoint:
        raise ValueError(
            f"--base is only for training checkpoints, and {config.model_dir!r} is not one (no step "
            "directory holding state/)."
        )
    base = Path(config.base).expanduser() if config.base else None
    if base is not None and base.suffix in (".yaml", ".yml"):
        given = [f"--{n} {getattr(config, n)}" for n in ("precision", "sharding") if getattr(config, n) is not None]
        if given:
            raise ValueError(
                f"{' and '.join(given)} with a YAML --base: the model is built as the run {base} built it (its "
                "model.precision and model.sharding); set them there, or leave the flags out."
            )
        model, tokenizer = _from_run_config(base, config.tokenizer)
        architecture = f"the model of {base}"
    else:
        architecture_dir = base or model_dir
        if not architecture_dir.exists():
            raise FileNotFoundError(f"--base directory {config.base!r} does not exist.")
        model = KerasHubModel.from_preset(
            str(architecture_dir), precision=config.precision or "float32", sharding=config.sharding
        )
        tokenizer = _load_tokenizer(config.tokenizer, [model_dir, architecture_dir])
        architecture = f"the architecture of {architecture_dir}"
    source = str(model_dir)
    if checkpoint:
        step = restore_checkpoint_weights(model, str(model_dir))
        source = f"checkpoint step {step} in {model_dir} on {architecture}"
    model.tokenizer = tokenizer
    max_len = config.max_model_len or int((model.hf_config or {}).get("max_position_embeddings", DEFAULT_MAX_MODEL_LEN))
    return ServedModel(
        model=model,
        tokenizer=tokenizer,
        name=config.model_name or model_dir.resolve().name,
        max_model_len=max_len,
        stop_token_ids=default_stop_ids(tokenizer, model.hf_generation_config),
        source=source,
    )


def _from_run_config(path: Path, tokenizer_dir: str | None) -> tuple[KerasHubModel, Tokenizer]:
    """The model a ``kithara train`` YAML builds (its family and sizes, or its ``model.preset``;
    its LoRA adapters, precision and sharding) and its tokenizer (``data.tokenizer``)."""
    from kithara.config import load_config
    from kithara.run import build_model, load_tokenizer

    run_config = load_config(path)
    if run_config.objective == "cycle":
        raise ValueError(f"{path} trains two directions (objective: cycle); serve one exported model instead.")
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else load_tokenizer(run_config)
    return build_model(run_config, tokenizer.vocab_size), tokenizer


def _load_tokenizer(explicit: str | None, candidates: list[Path]) -> Tokenizer:
    if explicit is not None:
        return Tokenizer.from_pretrained(explicit)
    for path in candidates:
        if (path / "metadata.json").exists() and (path / "tokenizer.json").exists():  # a keras-hub preset
            return Tokenizer.from_keras_hub(str(path))
        if any((path / name).exists() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            return Tokenizer.from_pretrained(path)
    raise FileNotFoundError(
        f"No tokenizer in {', '.join(map(str, dict.fromkeys(candidates)))}; pass --tokenizer DIR (a Hugging "
        "Face tokenizer directory)."
    )


def restore_checkpoint_weights(model: KerasHubModel, path: str) -> int:
    """Sets ``model``'s variables from a training checkpoint (a step directory, or the latest
    step of a directory of them), reading only the model's arrays (not the optimizer state),
    and checks them against the checksums saved with them. Returns the step.

    Raises:
        ValueError: the checkpoint's variables differ from the model's (names or shapes).
    """
    import orbax.checkpoint as ocp

    from kithara.callbacks.checkpointer import checksums
    from kithara.trainer.restore import checkpoint_location

    checkpointer, step = checkpoint_location(path)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No complete checkpoint in {path!r}.")
    state_dir = Path(checkpointer.save_dir) / str(step) / "state"
    saved = checkpointer.manager.item_metadata(step)["state"]
    saved_model = (saved.tree if hasattr(saved, "tree") else saved)["model"]
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), model.variables, model.variable_shardings
    )
    target = {"model": {"trainable": abstract.trainable, "non_trainable": abstract.non_trainable}}
    _check_same_variables(saved_model, target["model"], f"checkpoint of step {step} in {checkpointer.save_dir}")
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
        restored = reader.restore(
            state_dir, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
        )
    meta = json.loads((Path(checkpointer.save_dir) / str(step) / "data" / "metadata").read_text())
    expected = meta.get("checksums", {})
    found = checksums(restored)
    bad = sorted(name for name, sums in found.items() if name in expected and expected[name] != sums)
    if bad:
        raise ValueError(
            f"Checkpoint of step {step} in {checkpointer.save_dir} is corrupt: {', '.join(bad[:5])} differ from "
            "what was saved. Serve an earlier step."
        )
    variables = model.variables
    variables.trainable.update(restored["model"]["trainable"])
    variables.non_trainable.update(restored["model"]["non_trainable"])
    model.variables = variables
    return int(step)


def _check_same_variables(saved: Any, wanted: dict[str, dict[str, Any]], where: str) -> None:
    """Same groups, names and shapes, or a ``ValueError`` naming the first differences."""
    for group in ("trainable", "non_trainable"):
        have, need = dict(saved.get(group) or {}), wanted[group]
        missing, extra = sorted(set(need) - set(have)), sorted(set(have) - set(need))
        if missing or extra:
            lora = any("lora" in name for name in extra)
            raise ValueError(
                f"The {where} does not match --base: {group} variables missing {missing[:4]}, unexpected "
                f"{extra[:4]}."
                + (
                    " It was trained with LoRA adapters: pass the run's YAML config as --base (it adds the "
                    "adapters), or serve the merged model that save_in_hf_format exports."
                    if lora
                    else " Pass the --base the run was trained from."
                )
            )
        shapes = [n for n in need if tuple(have[n].shape) != tuple(need[n].shape)]
        if shapes:
            n = shapes[0]
            raise ValueError(
                f"The {where} does not match --base: {n} has shape {tuple(have[n].shape)} there and "
                f"{tuple(need[n].shape)} in the base model. Pass the --base the run was trained from."
            )
