"""ScalarHeadModel: a keras-hub backbone with a scalar linear head (value and reward models)."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from typing import Any, cast

import jax
import keras
import keras_hub
import numpy as np
from jax.sharding import Mesh

from kithara import sharding as sharding_lib
from kithara.models.building import backbone_from_config, copy_layer_settings, host_device, transformer_flops
from kithara.models.families import Architecture, layer_layout
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.keras_variables import KerasVariables
from kithara.models.lora import LoraConfig, enable_lora
from kithara.models.model import ModelVariables
from kithara.models.scalar_head_hf import HuggingFaceClassifier
from kithara.models.scale_config import ScaleConfig
from kithara.models.score_head import HEAD_NAME, INPUTS, TASKS, ScoreHead, check_inputs, last_token_scores

__all__ = ["HEAD_NAME", "TASKS", "ScalarHeadModel", "ScoreHead", "last_token_scores"]

logger = logging.getLogger(__name__)


class ScalarHeadModel(HuggingFaceClassifier, KerasVariables):
    """A keras-hub backbone (no LM head) plus a linear head: ``num_labels`` scores per position.

    ``apply`` returns ``scores_BxLxN`` (float32, ``N = num_labels``) for every position;
    ``score`` picks each row's scores at its last non-padding token: ``[B]`` when
    ``num_labels == 1`` (a reward or value), ``[B, num_labels]`` otherwise (class logits).
    Used as PPO's value model, as a reward model, and as a sequence or token classifier
    (``task``; ``from_preset`` loads and ``save_pretrained`` writes Hugging Face's
    ``*ForSequenceClassification`` / ``*ForTokenClassification``). The head is a
    ``[hidden, num_labels]`` kernel named ``score/kernel`` with no bias (as
    Hugging Face's llama/qwen/gemma ``score`` layer), initialised ``normal(0, std)`` with
    ``std = 1 / sqrt(hidden + 1)`` by default (TRL's value/reward head init; pass
    ``head_init_std=0.02`` for Hugging Face's ``initializer_range``, ``0`` for a zero head).

    The head is always trainable. With ``lora`` the backbone is frozen except the adapters
    (the head is not a LoRA target: adapters go on the backbone's projections only). The
    backbone's untied LM-head matrix (``token_embedding/reverse_embeddings``: llama3 and
    mistral by default) plays no part in the scores; it is kept frozen, so it gets no optimizer
    state and is not decayed. Variables are placed on the mesh with the sharding strategy
    exactly as ``KerasHubModel`` places them.

    Args:
        backbone: a keras-hub ``Backbone`` (taken over: LoRA, if any, is added to it).
        sharding: a strategy name (``"dp"``, ``"fsdp"``, ``"fsdp_tp"``) or a ``ShardingStrategy``.
        lora: adapters to add to the backbone.
        head_init_std: standard deviation of the head's initial weights (default
            ``1 / sqrt(hidden_dim + 1)``).
        family: the family name (defaults to the backbone class name).
        seed: seed of the head's initialisation.
        num_labels: scores per position (the head's output width); 1 for a reward or value model.
        task: ``"sequence_classification"`` (default: one score per sequence, read at its last
            token) or ``"token_classification"`` (a label per token, e.g. a process reward
            model); only the exported Hugging Face architecture depends on it.
        head_bias: give the head a ``[num_labels]`` bias (token classification only: Hugging
            Face's token classifiers have one by default, its sequence classifiers never).

    Example:
        >>> value = ScalarHeadModel.from_causal_lm(policy)          # PPO: start from the policy
        >>> scores, _ = value.apply(value.variables, batch, training=False)  # [B, L, 1]
        >>> rewards = value.score(value.variables, batch)                    # [B]
    """

    def __init__(
        self,
        backbone: keras_hub.models.Backbone,
        *,
        sharding: str | sharding_lib.ShardingStrategy | None = None,
        lora: LoraConfig | None = None,
        head_init_std: float | None = None,
        family: str | None = None,
        seed: int = 0,
        num_labels: int = 1,
        task: str = "sequence_classification",
        head_bias: bool = False,
    ) -> None:
        self._setup(
            backbone,
            sharding=sharding,
            lora=lora,
            head_init_std=head_init_std,
            family=family,
            seed=seed,
            num_labels=num_labels,
            task=task,
            head_bias=head_bias,
            initial=None,
        )

    def _setup(
        self,
        backbone: keras_hub.models.Backbone,
        *,
        sharding: str | sharding_lib.ShardingStrategy | None,
        lora: LoraConfig | None,
        head_init_std: float | None,
        family: str | None,
        seed: int,
        num_labels: int,
        task: str,
        head_bias: bool = False,
        initial: Mapping[str, jax.Array] | None,
        head: Mapping[str, Any] | None = None,
        hf_config: Mapping[str, Any] | None = None,
    ) -> None:
        """Builds the model; ``initial`` holds backbone values (already on their shardings) and
        ``head`` the head's (``kernel``, ``bias``) to set before placement, so copying or
        loading a model does not place its weights twice."""
        if isinstance(backbone, keras_hub.models.CausalLM):
            raise TypeError(
                f"ScalarHeadModel takes a keras-hub Backbone, got the task model {type(backbone).__name__}: pass "
                "its .backbone, or use ScalarHeadModel.from_causal_lm(KerasHubModel) to copy it."
            )
        if not isinstance(backbone, keras_hub.models.Backbone):
            raise TypeError(f"backbone must be a keras_hub.models.Backbone, got {type(backbone).__name__}.")
        if lora is not None and not isinstance(lora, LoraConfig):
            raise TypeError(f"lora must be a kithara.LoraConfig or None, got {type(lora).__name__}.")
        hidden_dim = int(backbone.hidden_dim)
        std = 1.0 / math.sqrt(hidden_dim + 1) if head_init_std is None else float(head_init_std)
        if not math.isfinite(std) or std < 0:
            raise ValueError(f"head_init_std must be a finite number >= 0, got {head_init_std!r}.")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be an integer >= 1 (1 for a reward or value model), got {num_labels!r}.")
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
        if head_bias and task != "token_classification":
            raise ValueError(
                "head_bias=True needs task='token_classification': Hugging Face's sequence classifiers "
                "(and reward models) have a score layer without bias."
            )
        self.backbone = backbone
        self.family = family or type(backbone).__name__
        self.lora = lora
        self.head_init_std = std
        self.num_labels = num_labels
        self.task = task
        # config.json of the Hugging Face checkpoint the backbone came from, reused on export.
        self.hf_config: dict[str, Any] | None = dict(hf_config) if hf_config is not None else None
        self.strategy = sharding_lib.as_strategy(sharding)
        self._mesh = self.strategy.make_mesh()
        self._lora_layers = 0
        if lora is not None:
            names = {layer.name for layer in backbone._flatten_layers(include_self=False)}
            self._lora_layers = enable_lora(backbone, lora, layer_layout(names))
        reverse = getattr(getattr(backbone, "token_embedding", None), "reverse_embeddings", None)
        if reverse is not None:
            reverse.trainable = False
        if initial is not None:
            for variable in backbone.variables:
                variable.assign(initial[variable.path])
        with host_device():
            self.head = ScoreHead(std, seed, num_labels, head_bias, name=HEAD_NAME, dtype=backbone.dtype_policy)
            inputs = {name: backbone.input[name] for name in INPUTS}
            self.keras_model = keras.Model(inputs=inputs, outputs=self.head(backbone(inputs)), name="scalar_head_model")
            for name, value in (head or {}).items():
                variable = getattr(self.head, name)
                variable.assign(np.asarray(value).astype(keras.backend.standardize_dtype(variable.dtype)))
        head_path = self.head.kernel.path
        if head_path != f"{HEAD_NAME}/kernel" or not self.head.kernel.trainable:
            raise ValueError(
                f"The head kernel was built as {head_path!r}; a backbone layer may be named {HEAD_NAME!r}."
            )
        self._index_variables(self.keras_model)
        self._scale = ScaleConfig()

    @classmethod
    def from_config(
        cls,
        family: str,
        *,
        vocab_size: int,
        num_layers: int,
        hidden_dim: int,
        num_heads: int,
        num_kv_heads: int,
        intermediate_dim: int,
        head_dim: int | None = None,
        precision: str = "float32",
        sharding: str | sharding_lib.ShardingStrategy | None = None,
        lora: LoraConfig | None = None,
        head_init_std: float | None = None,
        seed: int = 0,
        num_labels: int = 1,
        task: str = "sequence_classification",
        head_bias: bool = False,
        **backbone_kwargs: Any,
    ) -> ScalarHeadModel:
        """A randomly initialised backbone of ``family`` (the families of
        ``KerasHubModel.from_config``: ``llama3``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma``,
        ``gemma2``, ``gemma3``) with a fresh head.

        ``backbone_kwargs`` go to the keras-hub backbone; unknown names raise ``TypeError``.
        ``seed`` seeds keras' random generator (every process builds identical weights) and
        the head's initialiser.
        """
        arch = Architecture(vocab_size, num_layers, hidden_dim, num_heads, num_kv_heads, intermediate_dim, head_dim)
        backbone = backbone_from_config(
            family, arch, precision=precision, seed=seed, builder=cls.from_config, where=cls.__name__, **backbone_kwargs
        )
        return cls(
            backbone,
            sharding=sharding,
            lora=lora,
            head_init_std=head_init_std,
            family=family,
            seed=seed,
            num_labels=num_labels,
            task=task,
            head_bias=head_bias,
        )

    @classmethod
    def from_causal_lm(
        cls,
        model: KerasHubModel | ScalarHeadModel,
        *,
        head_init_std: float | None = None,
        seed: int = 0,
        num_labels: int = 1,
        task: str = "sequence_classification",
    ) -> ScalarHeadModel:
        """A new model whose backbone is a copy of ``model``'s, with a fresh ``[hidden, num_labels]`` head (PPO's usual
        value-model initialisation from the policy or reward checkpoint).

        The copy has the same architecture, precision, family, sharding strategy (so the
        same mesh) and LoRA config. Every backbone variable is copied as it is now, LoRA
        adapters included, so the copy's hidden states equal ``model``'s exactly. The copies
        are new device buffers: training (and donating) either model leaves the other alone.
        A ``ScalarHeadModel`` works too (its backbone is copied, its head is not).
        """
        if not isinstance(model, KerasHubModel | ScalarHeadModel):
            raise TypeError(
                f"from_causal_lm needs a kithara KerasHubModel (or ScalarHeadModel), got {type(model).__name__}."
            )
        source = model.variables
        values = {**source.trainable, **source.non_trainable}
        with host_device():
            backbone = type(model.backbone).from_config(model.backbone.get_config())
        copy_layer_settings(model.backbone, backbone)
        copy = cls.__new__(cls)
        copy._setup(
            backbone,
            sharding=model.strategy,
            lora=model.lora,
            head_init_std=head_init_std,
            family=model.family,
            seed=seed,
            num_labels=num_labels,
            task=task,
            initial=_Copies(values),
            hf_config=getattr(model, "hf_config", None),
        )
        copy.scale = model.scale  # the same remat, scan and attention options as the source
        return copy

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    @property
    def scale(self) -> ScaleConfig:
        """The memory and compile-time options of the backbone's training forward pass, as
        ``KerasHubModel.scale`` (its decoder blocks go through the same seam; docs/scale.md)."""
        return self._scale

    @scale.setter
    def scale(self, options: ScaleConfig) -> None:
        cast(Any, KerasHubModel.scale).fset(self, options)  # the same checks

    def _decoder_run(self, inputs: Mapping[str, Any]) -> contextlib.AbstractContextManager[Any]:
        return KerasHubModel._decoder_run(cast(Any, self), inputs)

    def apply(
        self, variables: ModelVariables, inputs: Mapping[str, Any], *, training: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Pure forward pass: ``(scores_BxLxN, new_non_trainable)``, ``N = num_labels``, scores in float32.

        ``inputs`` needs ``token_ids`` and ``padding_mask`` (``[batch, length]``); packed
        batches (``segment_ids``) are not supported.
        """
        model_inputs = check_inputs(inputs)
        trainable = [variables.trainable[p] for p in self._trainable_paths]
        non_trainable = [variables.non_trainable[p] for p in self._non_trainable_paths]
        with self._decoder_run(model_inputs):
            scores, new_non_trainable = self.keras_model.stateless_call(
                trainable, non_trainable, model_inputs, training=training
            )
        return scores, dict(zip(self._non_trainable_paths, new_non_trainable, strict=True))

    def hidden_states(
        self, variables: ModelVariables, inputs: Mapping[str, Any], *, training: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Pure forward pass of the backbone alone: ``(hidden_BxLxH, new_non_trainable)``, the
        final-norm hidden states the head reads (as ``KerasHubModel.hidden_states``)."""
        model_inputs = check_inputs(inputs)
        with (
            self._decoder_run(model_inputs),
            keras.StatelessScope(state_mapping=self.state_mapping(variables)) as scope,
        ):
            hidden_BxLxH = self.backbone(model_inputs, training=training)
            new_non_trainable = {p: scope.get_current_value(self._by_path[p]) for p in self._non_trainable_paths}
        return hidden_BxLxH, new_non_trainable

    def token_logps(self, *args: Any, **kwargs: Any) -> Any:
        """Not for this model: it has no LM head, and ``apply`` returns scores, not logits."""
        raise TypeError(
            "ScalarHeadModel scores sequences and has no LM head: token_logps needs a causal LM "
            "(KerasHubModel). Use apply (per-position scores) or score (per row)."
        )

    def token_stats(self, *args: Any, **kwargs: Any) -> Any:
        """Not for this model, as ``token_logps``."""
        return self.token_logps(*args, **kwargs)

    def score(self, variables: ModelVariables, inputs: Mapping[str, Any], *, training: bool = False) -> jax.Array:
        """Each row's scores at its last non-padding token (float32): ``scores_B`` when
        ``num_labels == 1``, ``scores_BxN`` otherwise.

        Pure and jittable. Works for right- and left-padded rows; a row with no token at all
        scores 0.
        """
        scores_BxLxN, _ = self.apply(variables, inputs, training=training)
        if self.num_labels == 1:
            return last_token_scores(scores_BxLxN[..., 0], inputs["padding_mask"])
        return last_token_scores(scores_BxLxN, inputs["padding_mask"])

    def flops_per_token(self, sequence_length: int, *, training: bool = True) -> float:
        """As ``KerasHubModel.flops_per_token`` with the ``[hidden, num_labels]`` head in place of the LM head."""
        # The head's kernel is one of the "/kernel" paths, and trains under LoRA.
        return transformer_flops(
            self.backbone,
            self._by_path,
            sequence_length,
            training=training,
            lora=self.lora is not None,
            trained_head_params=int(self.backbone.hidden_dim) * self.num_labels,
        )


class _Copies(Mapping[str, jax.Array]):
    """New device buffers of a model's variables, made when read (one at a time)."""

    def __init__(self, values: Mapping[str, jax.Array]) -> None:
        self._values = values

    def __getitem__(self, path: str) -> jax.Array:
        if path not in self._values:
            raise ValueError(f"The source model has no variable {path!r} to copy.")
        return self._values[path].copy()

    def __iter__(self) -> Any:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)
