"""Tunix's side of the ``peers`` suite: its PeftTrainer (SFT, full and LoRA) and its DPOTrainer
on the same Hugging Face weights and token rows as kithara's side (bench/peers.py).

Runs in Tunix's own virtual environment (``bench/.venv-tunix``, made by ``make bench``: Tunix
pins ``safetensors<0.8``, kithara ships 0.8), never in kithara's; it imports no kithara code,
only the suite's numpy data helpers:

    bench/.venv-tunix/bin/python -m bench.peers_tunix '[{"objective": "sft", ...}]'

Everything is Tunix's public API as its own examples use it: ``llama3.params
.create_model_from_safe_tensors`` loads the weights, ``qwix.LoraProvider`` +
``qwix.apply_lora_to_model`` add the adapters, ``PeftTrainer`` with its default loss (next-token
cross-entropy over ``input_mask``) trains SFT, ``DPOTrainer`` with a frozen reference model
trains DPO (sigmoid loss, beta 0.1). Step times come from a ``TrainingHooks`` subclass: Tunix
calls ``on_train_step_end`` once the previous step's loss is on the host.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _model_config(weights: str) -> Any:
    from tunix.models.llama3 import model as llama

    with open(os.path.join(weights, "config.json")) as f:
        hf = json.load(f)
    heads = hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 500_000)}
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"{weights}: Tunix's Llama 3 applies plain RoPE; this checkpoint asks for {rope}")
    return llama.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(rope["rope_theta"]),
        norm_eps=hf["rms_norm_eps"],
        weight_tying=bool(hf.get("tie_word_embeddings", False)),
    )


def _load(weights: str, mesh: Any) -> Any:
    import jax
    import jax.numpy as jnp
    from tunix.models.llama3 import params

    with jax.set_mesh(mesh):
        return params.create_model_from_safe_tensors(weights, _model_config(weights), mesh, dtype=jnp.float32)


def _lora(model: Any, rank: int, alpha: float) -> Any:
    import qwix

    provider = qwix.LoraProvider(module_path=".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                                 rank=rank, alpha=alpha)  # fmt: skip
    return qwix.apply_lora_to_model(model, provider, **model.get_model_input())


def _count(model: Any, kind: Any) -> int:
    import jax
    from flax import nnx

    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, kind))))


def _hooks() -> Any:
    from tunix.sft import hooks

    class StepTimes(hooks.TrainingHooks):
        """Host time at the start and at each step's end, and each step's loss."""

        def __init__(self) -> None:
            self.marks: list[float] = []
            self.losses: list[float] = []

        def on_train_start(self, train_ctx: Any) -> None:
            self.marks.append(time.perf_counter())

        def on_train_step_end(self, train_ctx: Any, train_step: int, train_loss: Any) -> None:
            self.marks.append(time.perf_counter())
            self.losses.append(float(train_loss))

        def on_train_end(self, train_ctx: Any) -> None:
            pass

        def on_train_step_start(self, train_ctx: Any) -> None:
            pass

        def on_eval_step_start(self, train_ctx: Any) -> None:
            pass

        def on_eval_step_end(self, train_ctx: Any, eval_loss: Any) -> None:
            pass

    return StepTimes()


def train_once(spec: dict[str, Any]) -> dict[str, Any]:
    import importlib.metadata

    import jax
    import numpy as np
    import optax
    from flax import nnx
    from tunix.rl import common
    from tunix.sft import peft_trainer
    from tunix.sft.dpo import dpo_trainer

    from bench.common import LEARNING_RATE, timing
    from bench.peers import LORA_ALPHA, LORA_RANK, dpo_rows, program_stats, sft_rows

    objective, steps, seq, batch = spec["objective"], spec["steps"], spec["seq"], spec["batch"]
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=auto)
    model = _load(spec["weights"], mesh)
    params = _count(model, nnx.Param)
    lora = objective == "sft_lora"
    if lora:
        model = _lora(model, LORA_RANK, LORA_ALPHA)
    trainable = _count(model, nnx.LoRAParam) if lora else params
    tx = optax.adamw(LEARNING_RATE, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    timer = _hooks()
    common_args = dict(eval_every_n_steps=10**9, max_steps=steps, pbar_description=None)
    if objective == "dpo":
        ref = _load(spec["weights"], mesh)
        config = dpo_trainer.DPOTrainingConfig(**common_args, algorithm="dpo", beta=0.1, label_smoothing=0.0)
        trainer: Any = dpo_trainer.DPOTrainer(model, ref, tx, config)
        data = [
            dpo_trainer.TrainingInput(**{k: np.stack([r[k] for r in chunk]) for k in chunk[0]})
            for chunk in _chunks(dpo_rows(spec, tunix=True), batch)
        ]
        tokens = 2 * batch * seq
    else:
        trainer = peft_trainer.PeftTrainer(model, tx, peft_trainer.TrainingConfig(**common_args))

        def model_input(x: Any) -> dict[str, Any]:  # what Tunix's SFT examples pass its default loss
            return dict(input_tokens=x.input_tokens, input_mask=x.input_mask,
                        positions=common.build_positions_from_mask(x.input_mask),
                        attention_mask=common.make_causal_attn_mask(x.input_mask))  # fmt: skip

        trainer = trainer.with_gen_model_input_fn(model_input)
        chunks = _chunks(sft_rows(spec), batch)
        data = [
            peft_trainer.TrainingInput(
                input_tokens=np.stack([r["token_ids"] for r in chunk]),
                input_mask=np.stack([r["padding_mask"] for r in chunk]),
            )
            for chunk in chunks
        ]
        tokens = batch * seq
    trainer.with_training_hooks(timer)
    with jax.set_mesh(mesh):
        trainer.train(data)
        programs = _programs(trainer, data[0], objective)
    result = {
        "framework": f"tunix {importlib.metadata.version('google-tunix')} / jax {jax.__version__}",
        "params": params,
        "trainable_params": trainable,
        "losses": timer.losses,
        "loss_is_finite": bool(np.isfinite(timer.losses[-1])),
        **timing(timer.marks, tokens),
        "program": program_stats(programs),
    }
    if objective == "dpo":
        history = trainer.metrics_logger.get_metric_history("", "log_probs/chosen", "train")
        result["logps_chosen"] = [float(x) for x in history]
    return result


def _programs(trainer: Any, first: Any, objective: str) -> list[Any]:
    """Tunix's compiled programs of one step: its train step (jitted as ``PeftTrainer`` jits
    it) and, for DPO, the reference model's log-probabilities, which Tunix computes in a
    program of its own while preparing the batch."""
    from flax import nnx
    from tunix.sft import sharding_utils
    from tunix.sft.dpo import dpo_trainer

    example = sharding_utils.shard_input(trainer._prepare_inputs(first), trainer.config.data_sharding_axis)
    step = nnx.jit(trainer.create_train_step_fn(), donate_argnames=("optimizer",))
    programs = [step.lower(trainer.model, trainer.optimizer, example).compile()]
    if objective == "dpo":
        e = example
        ref = dpo_trainer.compute_logps.lower(trainer.ref_model, e.input_ids, e.positions, e.attention_mask,
                                              e.logits_to_keep, e.completion_mask)  # fmt: skip
        programs.append(ref.compile())
    return programs


def _chunks(rows: list[Any], size: int) -> list[list[Any]]:
    return [rows[i : i + size] for i in range(0, len(rows) - size + 1, size)]


def main() -> None:
    specs = json.loads(sys.argv[1])
    import flax  # noqa: F401
    import jax  # noqa: F401
    import tunix.sft.peft_trainer  # noqa: F401

    from bench.common import finish_child, rss_now_mib

    after_import = rss_now_mib()
    finish_child([train_once(spec) for spec in specs], after_import)


if __name__ == "__main__":
    main()
