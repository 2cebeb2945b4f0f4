"""``PolicyAndValue``: a causal policy and its value function as one ``Model``, so both live
in one train state (one optimizer, one checkpoint). PPO trains it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from kithara import sharding as sharding_lib
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.logprobs import chunked_token_logps
from kithara.models.model import Model, ModelVariables, join_variables, part_of, prefixed
from kithara.models.scalar_head import ScalarHeadModel

HEAD_PATH = "score/kernel"  # the value head's kernel (as ScalarHeadModel's), under "value/"


class PolicyAndValue(Model):
    """A causal policy and its value function as one ``Model`` for the Trainer's state.

    Variables are the policy's under ``"policy/"`` and the value function's under
    ``"value/"``: a separate ``ScalarHeadModel``'s variables, or, with ``value_model=None``,
    one trainable float32 ``[hidden, 1]`` kernel ``"value/score/kernel"`` applied to the
    policy's final hidden states (the backbone is shared). ``forward`` gives log-probs,
    entropies and values from one call.

    Args:
        policy: the causal LM.
        value_model: a ``ScalarHeadModel`` on the policy's mesh, or None for a value head.
        head_init_std: std of the value head's normal initialisation; only without
            ``value_model``. Default 0: a zero head, so values start at 0 (the first
            advantages are the discounted scores, not noise) and the value loss leaves the
            shared backbone alone until the head has learnt something.
        seed: seed of that initialisation.

    Example:
        >>> both = PolicyAndValue(policy, ScalarHeadModel.from_causal_lm(policy))
        >>> logps, entropy, values, _ = both.forward(both.variables, batch, batch["labels"], training=False)
    """

    def __init__(
        self,
        policy: KerasHubModel,
        value_model: ScalarHeadModel | None = None,
        *,
        head_init_std: float | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(policy, KerasHubModel):
            raise TypeError(f"The policy must be a causal KerasHubModel, got {type(policy).__name__}.")
        if value_model is not None:
            if not isinstance(value_model, ScalarHeadModel):
                raise TypeError(
                    f"value_model must be a kithara.ScalarHeadModel (e.g. ScalarHeadModel.from_causal_lm(policy)) "
                    f"or None (a value head on the policy), got {type(value_model).__name__}."
                )
            if value_model.mesh != policy.mesh:
                raise ValueError("The value model must live on the policy's device mesh (same devices and axes).")
        self.policy = policy
        self.value_model = value_model
        self.head: jax.Array | None = None
        if value_model is None:
            hidden = int(policy.backbone.hidden_dim)
            std = 0.0 if head_init_std is None else float(head_init_std)
            if not math.isfinite(std) or std < 0:
                raise ValueError(f"head_init_std must be a finite number >= 0, got {head_init_std}.")
            init = (np.random.default_rng(seed).standard_normal((hidden, 1)) * std).astype(np.float32)
            self.head = jax.make_array_from_callback(init.shape, self.head_sharding, lambda index: init[index])

    def submodels(self) -> list[Model]:
        return [self.policy] if self.value_model is None else [self.policy, self.value_model]

    @property
    def head_sharding(self) -> NamedSharding:
        return sharding_lib.replicated(self.policy.mesh)

    @property
    def backbone(self) -> Any:
        """The policy's keras-hub backbone (what precision checks read)."""
        return self.policy.backbone

    @property
    def mesh(self) -> Mesh:
        return self.policy.mesh

    def _value_variables(self) -> ModelVariables:
        if self.value_model is not None:
            return self.value_model.variables
        return ModelVariables({HEAD_PATH: self.head}, {})

    @property
    def variables(self) -> ModelVariables:
        return join_variables({"policy": self.policy.variables, "value": self._value_variables()})

    @variables.setter
    def variables(self, values: ModelVariables) -> None:
        self.policy.variables = self.side_variables(values, "policy")
        value = self.side_variables(values, "value")
        if self.value_model is not None:
            self.value_model.variables = value
        else:
            self.head = value.trainable[HEAD_PATH]

    @property
    def variable_shardings(self) -> ModelVariables:
        value = (
            self.value_model.variable_shardings
            if self.value_model is not None
            else ModelVariables({HEAD_PATH: self.head_sharding}, {})
        )
        return join_variables({"policy": self.policy.variable_shardings, "value": value})

    def side_variables(self, variables: ModelVariables, side: str) -> ModelVariables:
        """``side``'s (``"policy"`` or ``"value"``) variables, under their own paths, no copies."""
        return part_of(variables, side)

    def forward(
        self,
        variables: ModelVariables,
        inputs: Mapping[str, jax.Array],
        labels_BxL: jax.Array,
        *,
        training: bool,
        chunk_size: int | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, dict[str, jax.Array]]:
        """Pure: ``(logps_BxL, entropy_BxL, values_BxL, new_non_trainable)``; ``values_BxL``
        (float32) at position ``i`` is the value of the state predicting ``labels_BxL[:, i]``
        (aligned like the log-probs, TRL's convention). The backbone runs once with a value
        head, once per model with a value model."""
        policy_vars = self.side_variables(variables, "policy")
        hidden, policy_nt = self.policy.hidden_states(policy_vars, inputs, training=training)
        logps, entropy = chunked_token_logps(
            hidden, lambda h: self.policy.lm_head(policy_vars, h), labels_BxL, chunk_size
        )
        value_vars = self.side_variables(variables, "value")
        if self.value_model is None:
            kernel = value_vars.trainable[HEAD_PATH].astype(jnp.float32)
            values = (hidden.astype(jnp.float32) @ kernel)[..., 0]
            value_nt: dict[str, jax.Array] = {}
        else:
            scores, value_nt = self.value_model.apply(value_vars, inputs, training=training)
            values = scores[..., 0].astype(jnp.float32)
        return logps, entropy, values, {**prefixed(policy_nt, "policy"), **prefixed(value_nt, "value")}

    def apply(
        self, variables: ModelVariables, inputs: Mapping[str, jax.Array], *, training: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The policy's logits (the value side's non-trainable variables unchanged)."""
        logits, policy_nt = self.policy.apply(self.side_variables(variables, "policy"), inputs, training=training)
        value_nt = {k: v for k, v in variables.non_trainable.items() if k.startswith("value/")}
        return logits, {**prefixed(policy_nt, "policy"), **value_nt}

    def token_logps(
        self,
        variables: ModelVariables,
        inputs: Mapping[str, jax.Array],
        labels_BxL: jax.Array,
        *,
        training: bool,
        chunk_size: int | None = None,
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """The policy's ``token_logps`` on its share of ``variables`` (the value side's
        non-trainable variables unchanged; the value function does not run)."""
        logps, entropy, policy_nt = self.policy.token_logps(
            self.side_variables(variables, "policy"), inputs, labels_BxL, training=training, chunk_size=chunk_size
        )
        value_nt = {k: v for k, v in variables.non_trainable.items() if k.startswith("value/")}
        return logps, entropy, {**prefixed(policy_nt, "policy"), **value_nt}

    def flops_per_token(self, sequence_length: int, *, training: bool = True) -> float:
        flops = self.policy.flops_per_token(sequence_length, training=training)
        if self.value_model is not None:
            flops += self.value_model.flops_per_token(sequence_length, training=training)
        return flops
