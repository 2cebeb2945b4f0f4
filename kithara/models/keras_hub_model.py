"""KerasHubModel: a keras-hub causal LM placed on a device mesh."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import jax
import keras
import keras_hub
import numpy as np
from jax.sharding import Mesh
from rich.console import Console
from rich.table import Table

from kithara import sharding as sharding_lib
from kithara.models import attention, decoder_seam, hf, segments
from kithara.models import quantization as quantization_lib
from kithara.models.building import (
    UNSUPPORTED_LOAD_OPTIONS,
    backbone_from_config,
    host_device,
    keyword_only,
    match_layers_to_backbone,
    transformer_flops,
)
from kithara.models.families import Architecture, get_family, layer_layout
from kithara.models.generation import (
    GeneratesWithCache,
    Generator,
    as_key,
    cut_at_stop,
    read_prompts,
    split_at_stop,
)
from kithara.models.keras_variables import KerasVariables
from kithara.models.logprobs import LinearHead, chunked_token_logps, chunked_token_stats
from kithara.models.lora import LoraConfig, enable_lora
from kithara.models.model import ModelVariables
from kithara.models.precision import keras_policy
from kithara.models.quantization import QuantizationConfig
from kithara.models.sampling import check_sampling
from kithara.models.scale_config import ScaleConfig
from kithara.naming import check_names

logger = logging.getLogger(__name__)

_REMOTE_SCHEMES = ("hf://", "kaggle://", "gs://", "modelscope://")
# keras-hub's from_preset options kithara passes on (kithara sets dtype and preprocessor).
PRESET_OPTIONS = ("load_weights",)


class KerasHubModel(GeneratesWithCache, KerasVariables):
    """A keras-hub ``CausalLM`` whose variables live, sharded, on a device mesh.

    Build one with ``from_config`` (random weights) or ``from_preset`` (a keras-hub preset
    or a Hugging Face checkpoint directory). Wrapping an existing ``CausalLM`` works too;
    its precision is whatever it was built with.

    Args:
        causal_lm: the keras-hub task model.
        sharding: a strategy name (``"dp"``, ``"fsdp"``, ``"fsdp_tp"``) or a
            ``ShardingStrategy``.
        lora: adapters to add; when set only adapter weights are trainable.
        family: a name for summaries (defaults to the task class name).
        hf_config: the Hugging Face ``config.json`` the weights came from (set by
            ``from_preset``); ``save_in_hf_format`` writes it back.
        scale: memory and compile-time options of the training forward pass (remat, layer
            scan, attention kernel, activation sharding; see ``ScaleConfig`` and
            docs/scale.md). Settable later through ``model.scale``.
        quantization: store the decoder's projection kernels quantized and frozen (QLoRA):
            ``"nf4"``, ``"int8"``, a ``QuantizationConfig`` or a ``transformers.BitsAndBytesConfig``
            (see docs/models.md, "Quantized base"). Adapters from ``lora`` train on top.

    Example:
        >>> model = KerasHubModel.from_config(
        ...     "llama3", vocab_size=512, num_layers=2, hidden_dim=64, num_heads=4,
        ...     num_kv_heads=2, intermediate_dim=128, lora=LoraConfig(rank=4))
        >>> print(model.summary())
    """

    generator_class = Generator

    def __init__(
        self,
        causal_lm: keras_hub.models.CausalLM,
        *,
        sharding: str | sharding_lib.ShardingStrategy | None = None,
        lora: LoraConfig | None = None,
        family: str | None = None,
        hf_config: Mapping[str, Any] | None = None,
        scale: ScaleConfig | None = None,
        quantization: str | QuantizationConfig | Any = None,
    ) -> None:
        if not isinstance(causal_lm, keras_hub.models.CausalLM):
            raise TypeError(f"causal_lm must be a keras_hub.models.CausalLM, got {type(causal_lm).__name__}.")
        self.causal_lm = causal_lm
        self.backbone = causal_lm.backbone
        self.family = family or type(causal_lm).__name__
        self.lora = lora
        # config.json of the Hugging Face checkpoint it came from, reused on export.
        self.hf_config: dict[str, Any] | None = dict(hf_config) if hf_config is not None else None
        self.hf_generation_config: dict[str, Any] | None = None  # the source's generation_config.json
        self.strategy = sharding_lib.as_strategy(sharding)
        self._mesh = self.strategy.make_mesh()
        self._lora_layers = 0
        self.tokenizer: Any = None  # a kithara.Tokenizer; lets generate() take and return strings
        self.scale = scale if scale is not None else ScaleConfig()
        if quantization is not None:
            wanted = QuantizationConfig.coerce(quantization)
            done = quantization_lib.config_of(self.backbone)
            if done is not None and done != wanted:
                raise ValueError(f"The backbone is already quantized with {done}; it cannot also be {wanted}.")
            quantization_lib.quantize_backbone(self.backbone, wanted)
        self.quantization = quantization_lib.config_of(self.backbone)
        if lora is not None:
            names = {layer.name for layer in self.backbone._flatten_layers(include_self=False)}
            self._lora_layers = enable_lora(self.backbone, lora, layer_layout(names))
        self._index_variables(causal_lm)

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
        seed: int = 0,
        scale: ScaleConfig | None = None,
        quantization: str | QuantizationConfig | Any = None,
        **backbone_kwargs: Any,
    ) -> KerasHubModel:
        """A randomly initialised model of ``family`` (``llama3``, ``gemma``, ``gemma2``,
        ``gemma3``, ``qwen2``, ``qwen3``, ``mistral``).

        ``backbone_kwargs`` go to the keras-hub backbone unchanged (e.g.
        ``rope_max_wavelength``, ``tie_word_embeddings``, ``layer_norm_epsilon``); names the
        backbone's constructor does not take raise ``TypeError`` with the closest one (keras-hub
        would ignore them). ``seed`` seeds keras' random generator so every process builds
        identical weights. ``quantization`` (or TRL's ``load_in_4bit`` / ``load_in_8bit``) stores the
        decoder's projections quantized, as in ``from_preset``.
        """
        quantization = _quantization_argument(quantization, backbone_kwargs)
        arch = Architecture(vocab_size, num_layers, hidden_dim, num_heads, num_kv_heads, intermediate_dim, head_dim)
        backbone = backbone_from_config(
            family, arch, precision=precision, seed=seed, builder=cls.from_config, where=cls.__name__, **backbone_kwargs
        )
        with host_device():
            causal_lm = getattr(keras_hub.models, get_family(family).causal_lm_class)(
                backbone=backbone, preprocessor=None
            )
        return cls(causal_lm, sharding=sharding, lora=lora, family=family, scale=scale, quantization=quantization)

    @classmethod
    def from_preset(
        cls,
        handle: str,
        *,
        precision: str = "float32",
        sharding: str | sharding_lib.ShardingStrategy | None = None,
        lora: LoraConfig | None = None,
        load_preprocessor: bool = False,
        scale: ScaleConfig | None = None,
        quantization: str | QuantizationConfig | Any = None,
        **kwargs: Any,
    ) -> KerasHubModel:
        """Loads a keras-hub preset directory or a local Hugging Face checkpoint directory
        (``config.json`` + ``model.safetensors`` or sharded safetensors with their index).

        Hugging Face checkpoints of llama, mistral, qwen2, qwen3, gemma, gemma2 and gemma3
        (text) load exactly (kithara's own weight mapping, see docs/huggingface.md); settings
        keras-hub cannot express raise ``UnsupportedConfig`` naming the ``config.json`` field.
        ``hf://``, ``kaggle://`` and built-in preset names are passed to keras-hub as they
        are (they need network access). ``kwargs`` go to keras-hub's ``from_preset``:
        ``load_weights=False`` builds the architecture with random weights; other names raise
        ``TypeError`` with the closest known one (keras-hub would ignore them).

        ``quantization`` (``"nf4"``, ``"int8"``, a ``QuantizationConfig``) stores the decoder's
        projections quantized; from a Hugging Face directory each tensor is quantized as it is
        read, so host memory holds about one float tensor beyond the quantized model. TRL's and
        transformers' ``load_in_4bit=True`` / ``load_in_8bit=True`` / ``quantization_config=
        BitsAndBytesConfig(...)`` mean the same (NF4 with block 64 / int8 per channel).
        """
        quantization = _quantization_argument(quantization, kwargs)
        check_names(
            kwargs,
            [*keyword_only(cls.from_preset), *PRESET_OPTIONS],
            f"{cls.__name__}.from_preset",
            unsupported=UNSUPPORTED_LOAD_OPTIONS,
        )
        _check_local_preset(handle)
        if hf.is_hf_checkpoint(handle):
            if kwargs:
                raise ValueError(
                    f"{handle} is a Hugging Face checkpoint; extra from_preset arguments {sorted(kwargs)} only "
                    "apply to keras-hub presets."
                )
            with host_device():
                causal_lm, hf_config = hf.load_causal_lm(
                    handle,
                    dtype=keras_policy(precision),
                    load_preprocessor=load_preprocessor,
                    quantization=quantization,
                )
            model = cls(
                causal_lm,
                sharding=sharding,
                lora=lora,
                family=hf_config["model_type"],
                hf_config=hf_config,
                scale=scale,
                quantization=quantization,
            )
            # Sampling defaults and extra stop ids (Llama 3 Instruct's <|eot_id|>) live only
            # here; keep them so an export writes them back.
            generation = Path(handle) / "generation_config.json"
            if generation.is_file():
                model.hf_generation_config = json.loads(generation.read_text())
            return model
        if not load_preprocessor:
            kwargs["preprocessor"] = None
        with host_device():
            causal_lm = keras_hub.models.CausalLM.from_preset(handle, dtype=keras_policy(precision), **kwargs)
        match_layers_to_backbone(causal_lm.backbone)
        return cls(causal_lm, sharding=sharding, lora=lora, scale=scale, quantization=quantization)

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    def apply(
        self, variables: ModelVariables, inputs: Mapping[str, jax.Array], *, training: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        trainable = [variables.trainable[p] for p in self._trainable_paths]
        non_trainable = [variables.non_trainable[p] for p in self._non_trainable_paths]
        with self._packed(inputs), self._decoder_run(inputs):
            logits, new_non_trainable = self.causal_lm.stateless_call(
                trainable, non_trainable, _model_inputs(inputs), training=training
            )
        return logits, dict(zip(self._non_trainable_paths, new_non_trainable, strict=True))

    def _packed(self, inputs: Mapping[str, jax.Array]) -> contextlib.AbstractContextManager[Any]:
        """The segment-aware attention context for packed ``inputs`` (nothing otherwise);
        refuses packed inputs the backbone cannot keep apart."""
        if "segment_ids" not in inputs:
            return contextlib.nullcontext()
        if not self.supports_packing:
            raise ValueError(
                f"{type(self.backbone).__name__} does not support packed sequences: its attention cannot "
                "take segment ids, so packing would leak attention across examples. Set packing off."
            )
        if "positions" not in inputs:
            raise ValueError("Packed inputs carry segment_ids but no positions.")
        segments.install()
        return segments.packed_inputs(inputs["segment_ids"], inputs["positions"])

    @property
    def scale(self) -> ScaleConfig:
        """The memory and compile-time options of the training forward pass (docs/scale.md)."""
        return self._scale

    @scale.setter
    def scale(self, options: ScaleConfig) -> None:
        """Set before a trainer compiles its steps: compiled programs keep the options they were traced with."""
        if not isinstance(options, ScaleConfig):
            raise TypeError(f"scale must be a kithara.ScaleConfig, got {type(options).__name__}.")
        if options != ScaleConfig() and not decoder_seam.covers(self.backbone):
            raise ValueError(
                f"{type(self.backbone).__name__}'s decoder blocks are not among those ScaleConfig reaches "
                f"({', '.join(cls.__name__ for cls, _ in decoder_seam.DECODER_BLOCKS)}), so {options} would do "
                "nothing; build the model without scale=."
            )
        self._scale = options

    def _decoder_run(self, inputs: Mapping[str, jax.Array]) -> contextlib.AbstractContextManager[Any]:
        """The decoder-block seam with this model's ``scale`` options (see ``decoder_seam``)."""
        layers = list(getattr(self.backbone, "transformer_layers", []))
        if not decoder_seam.covers(self.backbone):
            return contextlib.nullcontext()
        attention.install()
        return decoder_seam.decoder_run(self._scale, self._mesh, layers, inputs)

    def hidden_states(
        self, variables: ModelVariables, inputs: Mapping[str, jax.Array], *, training: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Pure forward pass of the backbone alone: ``(hidden_BxLxH, new_non_trainable)``,
        the final-norm hidden states the LM head turns into ``apply``'s logits (a value head
        for PPO goes on these). Same ``inputs`` as ``apply``, packed ones included."""
        with (
            self._packed(inputs),
            self._decoder_run(inputs),
            keras.StatelessScope(state_mapping=self.state_mapping(variables)) as scope,
        ):
            hidden_BxLxH = self.backbone(_model_inputs(inputs), training=training)
            new_non_trainable = {p: scope.get_current_value(self._by_path[p]) for p in self._non_trainable_paths}
        return hidden_BxLxH, new_non_trainable

    def lm_head(self, variables: ModelVariables, hidden_BxLxH: jax.Array) -> jax.Array:
        """The LM head on hidden states: keras-hub's ``token_embedding(x, reverse=True)``
        (tied or untied output embeddings, and Gemma 2/3's final logit soft-capping when the
        backbone has one), in the model's compute dtype."""
        with keras.StatelessScope(state_mapping=self.state_mapping(variables)):
            return self.backbone.token_embedding(hidden_BxLxH, reverse=True)

    def token_logps(
        self,
        variables: ModelVariables,
        inputs: Mapping[str, jax.Array],
        labels_BxL: jax.Array,
        *,
        training: bool,
        chunk_size: int | None = None,
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """Float32 log-probability of each label and entropy of each position's distribution,
        without float32 ``[batch, length, vocab]`` logits: the backbone runs once, then the LM
        head and the log-softmax run ``chunk_size`` positions at a time, each chunk
        rematerialised in the backward pass (see ``kithara.models.logprobs``). Equal, within
        float32 rounding, to ``Model.token_logps`` over ``apply``'s logits.

        Args:
            chunk_size: positions per chunk; ``None`` picks one whose float32 logits take
                at most ``logprobs.CHUNK_BYTES`` for the whole batch.
        """
        hidden_BxLxH, new_non_trainable = self.hidden_states(variables, inputs, training=training)
        logps_BxL, entropy_BxL = chunked_token_logps(
            hidden_BxLxH, lambda h: self.lm_head(variables, h), labels_BxL, chunk_size
        )
        return logps_BxL, entropy_BxL, new_non_trainable

    def token_stats(
        self,
        variables: ModelVariables,
        inputs: Mapping[str, jax.Array],
        labels_BxL: jax.Array,
        *,
        training: bool,
        stats: Sequence[str] = ("logps",),
        chunk_size: int | None = None,
        vocab_chunk_size: int | None = None,
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """``Model.token_stats`` without float32 ``[batch, length, vocab]`` logits: the backbone
        runs once, then the LM head and the float32 log-softmax run ``chunk_size`` positions
        (``None``: as ``token_logps``) and, with ``vocab_chunk_size``, that many vocabulary
        entries at a time, rematerialised in the backward pass (``kithara.models.logprobs``)."""
        hidden_BxLxH, new_non_trainable = self.hidden_states(variables, inputs, training=training)
        head = (
            self.linear_head(variables) if vocab_chunk_size is not None else functools.partial(self.lm_head, variables)
        )
        out = chunked_token_stats(hidden_BxLxH, head, labels_BxL, chunk_size, stats, vocab_chunk_size=vocab_chunk_size)
        return out, new_non_trainable

    def linear_head(self, variables: ModelVariables) -> LinearHead:
        """``lm_head`` as a ``LinearHead`` (its kernel in the compute dtype, its soft-cap), which
        can be computed a slice of the vocabulary at a time."""
        embedding = self.backbone.token_embedding
        if not isinstance(embedding, keras.layers.ReversibleEmbedding) or embedding.quantization_mode is not None:
            raise ValueError(
                f"vocab_chunk_size needs an unquantized keras ReversibleEmbedding LM head; "
                f"{type(self.backbone).__name__} has {type(embedding).__name__} "
                f"(quantization {embedding.quantization_mode!r}). Leave vocab_chunk_size=None."
            )
        dtype = embedding.reverse_dtype or embedding.compute_dtype
        with keras.StatelessScope(state_mapping=self.state_mapping(variables)):
            if embedding.tie_weights:
                kernel_HxV = keras.ops.transpose(embedding.embeddings)
            else:
                kernel_HxV = keras.ops.convert_to_tensor(embedding.reverse_embeddings)
        return LinearHead(kernel_HxV.astype(dtype), embedding.logit_soft_cap, dtype)

    @property
    def supports_chunked_loss(self) -> bool:
        return True

    @property
    def supports_packing(self) -> bool:
        """True for the keras-hub backbones whose attention ``segments`` makes segment-aware."""
        return type(self.backbone) in segments.SEGMENT_AWARE_BACKBONES

    def flops_per_token(self, sequence_length: int, *, training: bool = True) -> float:
        b = self.backbone
        kernels = {path: layer.kernel for path, layer in quantization_lib.quantized_layers(b).items()}
        return transformer_flops(
            b,
            {**self._by_path, **kernels},
            sequence_length,
            training=training,
            lora=self.lora is not None,
            extra_head_params=b.vocabulary_size * b.hidden_dim,  # the LM head matmul (tied or not)
        )

    @property
    def num_params(self) -> int:
        """Total parameter count (trainable plus frozen); a quantized kernel counts its weights,
        not its stored codes and scales."""
        layers = quantization_lib.quantized_layers(self.backbone).values()
        storage = {v.path for v in quantization_lib.storage_variables(self.backbone)}
        plain = sum(math.prod(v.shape) for p, v in self._by_path.items() if p not in storage)
        return plain + sum(layer._layout.size for layer in layers)

    def save_in_hf_format(
        self,
        path: str | Path,
        *,
        max_shard_size: int | str = "5GB",
        dtype: str = "float32",
        tokenizer: Any = None,
    ) -> None:
        """Writes the model as a Hugging Face checkpoint directory that
        ``transformers.AutoModelForCausalLM.from_pretrained(path)`` loads.

        The directory gets safetensors shards of at most ``max_shard_size`` (bytes, or
        ``"5GB"``/``"500MB"``) with ``model.safetensors.index.json`` when there are several,
        ``config.json``, ``generation_config.json`` and, given a kithara ``Tokenizer``, its
        tokenizer files. LoRA adapters are merged into the weights (see
        ``save_peft_adapter`` for the adapter alone). Variables are gathered to host one at a
        time; in a multi-process run every process must call this, and process 0 writes.

        Args:
            path: a local directory (created if needed; earlier weight files in it are replaced), or a
                ``gs://`` URL (written locally first, then copied; needs the ``gcs`` extra).
            max_shard_size: the largest safetensors file to write.
            dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the written tensors.
            tokenizer: a kithara ``Tokenizer`` whose files go next to the weights.
        """
        hf.save_in_hf_format(self, path, max_shard_size=max_shard_size, dtype=dtype, tokenizer=tokenizer)

    def save_peft_adapter(self, path: str | Path) -> None:
        """Writes the LoRA adapters alone in the PEFT format (``adapter_model.safetensors`` +
        ``adapter_config.json``); ``peft.PeftModel.from_pretrained(base, path)`` applies them
        to the Hugging Face base model with the same logits as this model.

        keras-hub adapts a (hidden, heads, head_dim) kernel with one rank-``r`` factor per
        head, so the query/key/value adapters are written with rank ``heads * r``
        (block-structured, exact); 2-D kernels keep rank ``r``.
        """
        hf.save_peft_adapter(self, path)

    def load_peft_adapter(self, path: str | Path) -> int:
        """Sets this model's LoRA adapters (``lora=`` at construction) from a PEFT adapter
        directory, exactly, so training can go on; returns how many adapters were set.

        Adapters written by ``save_peft_adapter`` always load; other PEFT adapters load on
        2-D projections of the same rank, and on query/key/value only in keras-hub's
        per-head form. Otherwise this raises, and ``merge_peft_adapter`` is the way in.
        """
        return hf.load_peft_adapter(self, path)

    def merge_peft_adapter(self, path: str | Path) -> int:
        """Folds a PEFT LoRA adapter directory into the base weights (exact, float32 math).

        Returns the number of kernels changed. Adapters kithara added (``lora=``) are left
        as they are, so a merged PEFT adapter can be fine-tuned further with new ones.
        """
        return hf.merge_peft_adapter(self, path)

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int | None = None,
        *,
        max_length: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        stop_token_ids: Sequence[int] | str | None = "auto",
        seed: int | jax.Array = 0,
        variables: ModelVariables | None = None,
        tokenizer: Any = None,
    ) -> Any:
        """Continues each prompt with a KV cache in one jitted loop on the model's mesh.

        Prompts, new-token counts and the batch are padded to power-of-two buckets, so
        repeated calls (say, inside a training loop) compile once per bucket and sampling
        mode (see docs/generation.md).

        Args:
            prompts: a string or list of strings (needs ``tokenizer`` or ``self.tokenizer``;
                returns strings), or a list of token-id lists (returns token-id lists).
            max_new_tokens: tokens to add to each prompt at most.
            max_length: instead of ``max_new_tokens``: total length of each row at most.
            temperature: 0 (default) is greedy; otherwise sample from ``softmax(logits / t)``.
            top_k: sample among the ``k`` most likely tokens only.
            top_p: sample from the smallest set of likeliest tokens with mass ``top_p``.
            min_p: sample among the tokens at least ``min_p`` times as likely as the likeliest
                (after temperature, top-k and top-p, as Hugging Face orders them).
            stop_token_ids: a row ends at the first of these (not returned). ``"auto"``: the
                tokenizer's EOS with string prompts, none with token ids.
            seed: an int or a ``jax.random`` key for sampling.
            variables: the variables to generate with (a trainer's current state, or another
                LoRA adapter set); default ``self.variables``. Nothing is copied.
            tokenizer: a ``kithara.Tokenizer`` for string prompts (default ``self.tokenizer``).

        Example:
            >>> model.tokenizer = tokenizer
            >>> model.generate(["2 + 2 ="], max_new_tokens=8, temperature=0.7, top_p=0.9, seed=1)
        """
        given = read_prompts(prompts, tokenizer or self.tokenizer, lambda tok, text: tok.encode_text(text))
        token_ids = given.token_ids
        if (max_new_tokens is None) == (max_length is None):
            raise ValueError("Pass exactly one of max_new_tokens and max_length.")
        if max_length is None:
            new_tokens = cast(int, max_new_tokens)  # exactly one of the two is set
            if new_tokens < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {new_tokens}.")
            ends = [len(r) + new_tokens for r in token_ids]
        else:
            if any(len(r) >= max_length for r in token_ids):
                raise ValueError(f"A prompt is as long as max_length={max_length}; nothing left to generate.")
            ends = [max_length] * len(token_ids)
        check_sampling(temperature, top_k, top_p, min_p)
        stops = given.stop_ids(stop_token_ids)
        rows = self.generator(
            token_ids,
            ends,
            variables=variables if variables is not None else self.variables,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            stop_token_ids=stops,
            rng=as_key(seed),
        )
        return given.output([cut_at_stop(r, stops) for r in rows])

    def sample(
        self,
        token_ids: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        variables: ModelVariables | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        stop_token_ids: Sequence[int] = (),
        seed: int | jax.Array = 0,
    ) -> tuple[list[list[int]], list[bool]]:
        """Completions of token-id prompts for RL: ``(completions, stopped)``.

        ``completions[i]`` holds the new tokens of row ``i`` up to and including its first
        stop token (nothing after it); ``stopped[i]`` is True when that row ended with a stop
        token and False when it was cut at ``max_new_tokens``. The decode is ``generate``'s
        (same buckets and compiled programs; ``temperature=0`` is greedy), so
        ``generate(...)[i]`` is ``completions[i]`` without its stop token.

        Args:
            token_ids: one list of prompt token ids per row (each non-empty).
            max_new_tokens: tokens to add to each prompt at most (the stop token counts).
            variables: the variables to sample with; default ``self.variables``.
            temperature, top_k, top_p, min_p: as in ``generate`` (but ``temperature``
                defaults to 1: plain sampling from the model).
            stop_token_ids: a row ends at the first of these (at most 8).
            seed: an int or a ``jax.random`` key.
        """
        if isinstance(token_ids, str) or any(isinstance(r, str) for r in token_ids):
            raise TypeError("sample() takes token-id lists; encode strings with a tokenizer first.")
        if isinstance(stop_token_ids, str):
            raise TypeError(f"stop_token_ids must be a sequence of ids, got {stop_token_ids!r}.")
        given = read_prompts(token_ids, None, lambda tok, text: [])
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        check_sampling(temperature, top_k, top_p, min_p)
        stops = [int(t) for t in stop_token_ids]
        rows = self.generator(
            given.token_ids,
            [len(r) + max_new_tokens for r in given.token_ids],
            variables=variables if variables is not None else self.variables,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            stop_token_ids=stops,
            rng=as_key(seed),
        )
        split = [split_at_stop(r, stops) for r in rows]
        return [tokens for tokens, _ in split], [stopped for _, stopped in split]

    def summary(self) -> str:
        """A one-screen description: family, precision, mesh, parameter counts, groups."""
        total, trainable = self.num_params, self.num_trainable_params
        policy = self.backbone.dtype_policy.name
        mesh = " ".join(f"{k}={v}" for k, v in self._mesh.shape.items())
        devices = f"{self._mesh.devices.size} {jax.devices()[0].platform} devices"
        share = 100 * trainable / max(total, 1)
        lines = [
            f"{type(self.causal_lm).__name__} ({self.family}), precision {policy}",
            f"mesh {mesh} (strategy {self.strategy.name}) on {devices}",
            f"parameters: {_human(total)} total, {_human(trainable)} trainable ({share:.2f}%)",
        ]
        if self.quantization is not None:
            q, size = self.quantization, quantization_lib.storage_bytes(self.backbone)
            lines.append(
                f"quantized base: {q.method}, scales per {q.block_size}"
                f"{' (double-quantized)' if q.double_quant else ''} on {', '.join(q.targets)}: "
                f"{size['stored'] / 2**20:.1f} MiB stored, {size['bfloat16'] / 2**20:.1f} MiB in bfloat16"
            )
        if self.lora is not None:
            lines.append(
                f"LoRA rank {self.lora.rank}, alpha {self.lora.alpha or self.lora.rank} on "
                f"{', '.join(self.lora.targets)} ({self._lora_layers} layers)"
            )
        table = Table("group", "variables", "parameters", "trainable", "example sharding")
        groups: dict[str, list[str]] = {}
        for path in self._by_path:
            groups.setdefault(_group(path), []).append(path)
        trainable_set = set(self._trainable_paths)
        for group, paths in groups.items():
            sizes = [math.prod(self._by_path[p].shape) for p in paths]
            big = paths[int(np.argmax(sizes))]
            table.add_row(
                group,
                str(len(paths)),
                _human(sum(sizes)),
                _human(sum(s for p, s in zip(paths, sizes, strict=True) if p in trainable_set)),
                str(tuple(self._shardings[big].spec)),
            )
        console = Console(width=110, record=True, file=io.StringIO())
        console.print(table)
        return "\n".join(lines) + "\n" + console.export_text()


def _quantization_argument(quantization: Any, kwargs: dict[str, Any]) -> QuantizationConfig | None:
    """``quantization=``, or TRL's / transformers' ``load_in_4bit``, ``load_in_8bit`` and
    ``quantization_config`` (taken out of ``kwargs``), as one config; more than one is refused."""
    given: dict[str, Any] = {
        k: kwargs.pop(k) for k in ("load_in_4bit", "load_in_8bit", "quantization_config") if k in kwargs
    }
    flags = {k: v for k, v in given.items() if k != "quantization_config"}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}.")
    asked: dict[str, Any] = {k: v for k, v in given.items() if v not in (False, None)}
    if quantization is not None:
        asked["quantization"] = quantization
    if len(asked) > 1:
        raise ValueError(f"Quantization is set more than once ({sorted(asked)}); pass only quantization=.")
    if not asked:
        return None
    ((name, value),) = asked.items()
    if name == "load_in_4bit":
        return QuantizationConfig("nf4")
    if name == "load_in_8bit":
        return QuantizationConfig("int8")
    return QuantizationConfig.coerce(value)


def _model_inputs(inputs: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """What the keras-hub backbone takes (packing goes through ``segments`` instead)."""
    return {"token_ids": inputs["token_ids"], "padding_mask": inputs["padding_mask"]}


def _group(path: str) -> str:
    head = path.split("/", 1)[0]
    for prefix in ("transformer_layer_", "decoder_block_"):
        if head.startswith(prefix):
            return prefix + "*"
    return head


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _check_local_preset(handle: str) -> None:
    if handle.startswith(_REMOTE_SCHEMES):
        return
    path = Path(handle).expanduser()
    looks_local = path.exists() or "/" in handle or handle.startswith(".")
    if not looks_local:
        return  # a keras-hub built-in preset name
    if not path.is_dir():
        raise FileNotFoundError(f"Model preset directory {handle!r} does not exist.")
    if not (path / "config.json").exists():
        raise ValueError(
            f"{handle!r} is neither a keras-hub preset (config.json + metadata.json) nor a "
            "Hugging Face checkpoint (config.json + *.safetensors): no config.json found."
        )
