"""``SyncRefModelCallback``: TR-DPO's reference update (Gorbatovski et al. 2024, arXiv
2404.09656): every ``ref_model_sync_steps`` steps the reference moves toward the policy,
on device and sharded, with no recompilation of the steps."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from kithara.callbacks.base import Callback, StepInfo
from kithara.models.adapters import is_lora_path
from kithara.models.model import Model, ModelVariables

if TYPE_CHECKING:
    from kithara.trainer.trainer import Trainer

logger = logging.getLogger(__name__)


def mix_reference(policy: dict[str, jax.Array], reference: ModelVariables, alpha: float) -> ModelVariables:
    """``reference`` with every entry ``p`` of ``policy`` replaced by
    ``alpha * policy[p] + (1 - alpha) * reference[p]`` (float32 math, in the reference's
    dtype); its other entries are returned as they are."""

    def mix(tree: dict[str, jax.Array]) -> dict[str, jax.Array]:
        out = {}
        for path, ref in tree.items():
            if path in policy:
                mixed = alpha * policy[path].astype(jnp.float32) + (1.0 - alpha) * ref.astype(jnp.float32)
                out[path] = mixed.astype(ref.dtype)
            else:
                out[path] = ref
        return out

    return ModelVariables(mix(reference.trainable), mix(reference.non_trainable))


class SyncRefModelCallback(Callback):
    """Every ``ref_model_sync_steps`` steps, ``ref <- alpha * policy + (1 - alpha) * ref``
    for each trainable variable of the policy (TR-DPO; TRL's ``SyncRefModelCallback``).

    Works for any trainer whose frozen variables (``trainer.frozen``) are the reference's
    ``ModelVariables`` with the policy's trainable variables among them: DPO's and KTO's
    ``ref_model`` or frozen copy, GRPO's / RLOO's / PPO's frozen copy (the policy's
    variables are taken with the trainer's ``policy_variables`` when it has one). The mix
    runs on the step of the sync, in one jitted function (the old reference donated) whose
    result has the reference's shardings, and is assigned to ``trainer.frozen``, so the
    steps do not recompile. DPO, KTO/BCO and the rollout trainers add this callback
    themselves when their config's ``sync_ref_model`` is set (TRL's field). The synced
    reference is not checkpointed (nor is TRL's): a resumed run syncs from the reference the
    trainer was built with.

    Refused: a trainer without frozen variables (a reference that is the model with its
    LoRA adapters off: TRL refuses PEFT here too; precomputed log-probs), and LoRA policies
    (mixing the two factors separately is not mixing the adapted weights).

    Args:
        trainer: the trainer whose reference to update.
        ref_model_mixup_alpha: TRL's ``DPOConfig.ref_model_mixup_alpha`` (alpha, in [0, 1]):
            the policy's share of the new reference.
        ref_model_sync_steps: TRL's ``DPOConfig.ref_model_sync_steps`` (tau): sync on every
            step that is a multiple of it.
        ref_model: the model whose variables the frozen ones are (DPO's ``ref_model``); it
            is given the synced weights after each sync, so it holds them like TRL's
            reference model does (its old arrays are donated to the mix).

    Example:
        >>> trainer = kithara.KTOTrainer(model, train_dataset=rows, processing_class=tokenizer)
        >>> trainer.add_callback(SyncRefModelCallback(trainer, ref_model_mixup_alpha=0.6, ref_model_sync_steps=64))
    """

    def __init__(
        self,
        trainer: Trainer,
        ref_model_mixup_alpha: float = 0.6,
        ref_model_sync_steps: int = 512,
        ref_model: Model | None = None,
    ) -> None:
        if not 0.0 <= ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha must be in [0, 1], got {ref_model_mixup_alpha!r}.")
        steps = ref_model_sync_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"ref_model_sync_steps must be an int >= 1, got {steps!r}.")
        self.trainer = trainer
        self.alpha, self.sync_steps = float(ref_model_mixup_alpha), steps
        self.ref_model = ref_model
        self.synced_steps: list[int] = []
        name = type(trainer).__name__
        reference = trainer.frozen
        if reference is None:
            raise ValueError(
                f"{name} passes no frozen reference to its steps (the reference is the model with its LoRA adapters "
                "off, or precomputed log-probs, or there is none), so there is no reference to synchronize; train "
                "without LoRA adapters (or pass a ref_model), and without precompute_ref_log_probs."
            )
        if not isinstance(reference, ModelVariables):
            raise ValueError(
                f"SyncRefModelCallback needs {name}'s frozen variables to be the reference model's ModelVariables; "
                f"they are a {type(reference).__name__}."
            )
        policy = self._policy(trainer.model.variables)
        lora = [p for p in policy if is_lora_path(p)]
        if lora:
            raise ValueError(
                f"{name} trains LoRA adapters ({lora[0]}, ...): mixing their two factors separately is not mixing "
                "the adapted weights, so the reference cannot be synchronized (TRL refuses sync_ref_model with PEFT "
                "too). Train without LoRA, or set sync_ref_model=False."
            )
        ref = {**reference.trainable, **reference.non_trainable}
        for path, value in policy.items():
            if path not in ref or tuple(ref[path].shape) != tuple(value.shape):
                found = f"shape {tuple(ref[path].shape)}" if path in ref else "no such variable"
                raise ValueError(
                    f"The reference does not match the policy: trainable variable {path} {tuple(value.shape)} has "
                    f"{found} in the reference. The reference must be a model of the policy's architecture."
                )
        self._mix: Any = jax.jit(
            lambda policy, reference: mix_reference(policy, reference, self.alpha),
            out_shardings=jax.tree.map(lambda x: x.sharding, reference),
            donate_argnums=1,
        )

    def _policy(self, variables: ModelVariables) -> dict[str, jax.Array]:
        """The policy's trainable variables among the trained ``variables``."""
        select = getattr(self.trainer, "policy_variables", None)
        return dict((select(variables) if callable(select) else variables).trainable)

    def needs_sync(self, step: int) -> bool:
        return step % self.sync_steps == 0

    def on_step_end(self, info: StepInfo) -> None:
        if info.step % self.sync_steps:
            return
        state = info.state
        if state is None:
            raise RuntimeError("SyncRefModelCallback.on_step_end: the trainer has no state.")
        reference = self._mix(self._policy(state.model), self.trainer.frozen)
        self.trainer.frozen = reference
        if self.ref_model is not None:
            self.ref_model.variables = reference
        self.synced_steps.append(info.step)
        logger.info("Synced the reference model at step %d (alpha=%g)", info.step, self.alpha)

    @property
    def compilations(self) -> int:
        """Programs the mix compiled (1 after the first sync)."""
        return int(self._mix._cache_size())
