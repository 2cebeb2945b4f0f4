"""KerasHubSeq2SeqModel: a keras-hub encoder-decoder LM (BART, T5Gemma) placed on a device mesh."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import keras
import keras_hub
from jax.sharding import Mesh

from kithara import sharding as sharding_lib
from kithara.models.building import check_model_kwargs, host_device
from kithara.models.generation import GeneratesWithCache, as_key, read_prompts
from kithara.models.keras_variables import KerasVariables
from kithara.models.model import ModelVariables
from kithara.models.precision import keras_policy
from kithara.models.sampling import check_sampling
from kithara.models.seq2seq_families import SEQ2SEQ_FAMILIES, Seq2SeqArchitecture
from kithara.models.seq2seq_generation import Seq2SeqGenerator

SEQ2SEQ_INPUTS = ("encoder_token_ids", "encoder_padding_mask", "decoder_token_ids", "decoder_padding_mask")


_BY_CLASS = {spec.lm_class: name for name, spec in SEQ2SEQ_FAMILIES.items()}


class KerasHubSeq2SeqModel(GeneratesWithCache, KerasVariables):
    """A keras-hub ``Seq2SeqLM`` (BART or T5Gemma) whose variables live, sharded, on a device mesh.

    Batches carry ``encoder_token_ids`` / ``encoder_padding_mask`` (the source) and
    ``decoder_token_ids`` / ``decoder_padding_mask`` (the shifted target); ``apply`` returns
    the decoder's logits, so ``labels[t]`` is the decoder token after position ``t``.
    ``generate`` encodes each source once and decodes with keras-hub's self- and
    cross-attention caches in one jitted loop. LoRA and packing are not supported.

    Args:
        seq2seq_lm: a keras-hub ``BartSeq2SeqLM`` or ``T5GemmaSeq2SeqLM`` (e.g.
            ``BartSeq2SeqLM.from_preset(name, preprocessor=None)``).
        sharding: a strategy name (``"dp"``, ``"fsdp"``, ``"fsdp_tp"``) or a ``ShardingStrategy``.

    Example:
        >>> model = KerasHubSeq2SeqModel.from_config(
        ...     "bart", vocab_size=512, num_layers=2, hidden_dim=64, num_heads=4, intermediate_dim=128)
        >>> model.generate([[1, 5, 6, 2]], max_new_tokens=8, decoder_start_ids=[2, 1])
    """

    generator_class = Seq2SeqGenerator

    def __init__(
        self, seq2seq_lm: keras_hub.models.Seq2SeqLM, *, sharding: str | sharding_lib.ShardingStrategy | None = None
    ) -> None:
        family = _BY_CLASS.get(type(seq2seq_lm).__name__)
        if family is None:
            raise TypeError(
                f"KerasHubSeq2SeqModel supports {sorted(_BY_CLASS)}, got {type(seq2seq_lm).__name__}: "
                "other seq2seq families have other cache APIs."
            )
        self.seq2seq_lm = seq2seq_lm
        self.backbone = seq2seq_lm.backbone
        self.family = family
        self.strategy = sharding_lib.as_strategy(sharding)
        self._mesh = self.strategy.make_mesh()
        self.tokenizer: Any = None  # a kithara.Tokenizer; lets generate() take and return strings
        self._index_variables(seq2seq_lm)

    @classmethod
    def from_config(
        cls,
        family: str,
        *,
        vocab_size: int,
        num_layers: int,
        hidden_dim: int,
        num_heads: int,
        intermediate_dim: int,
        max_sequence_length: int = 1024,
        precision: str = "float32",
        sharding: str | sharding_lib.ShardingStrategy | None = None,
        seed: int = 0,
        **backbone_kwargs: Any,
    ) -> KerasHubSeq2SeqModel:
        """A randomly initialised seq2seq model of ``family`` (``"bart"``, ``"t5gemma"``).

        Encoder and decoder get the same sizes; ``num_layers`` is per stack.
        ``max_sequence_length`` bounds encoder and decoder lengths where positions are a
        learned table (BART); T5Gemma's are rotary and ignore it. ``backbone_kwargs`` go to
        the keras-hub backbone unchanged and override the shared sizes (e.g. BART's
        ``dropout``, keras-hub's default 0.1, or T5Gemma's ``decoder_num_key_value_heads``);
        names the backbone's constructor does not take raise ``TypeError`` with the closest one.
        ``seed`` seeds keras' random generator so every process builds identical weights.
        """
        if family not in SEQ2SEQ_FAMILIES:
            raise ValueError(f"Unknown seq2seq family {family!r}; choose one of {sorted(SEQ2SEQ_FAMILIES)}.")
        spec = SEQ2SEQ_FAMILIES[family]
        check_model_kwargs(
            backbone_kwargs,
            cls.from_config,
            getattr(keras_hub.models, spec.backbone_class),
            f"{cls.__name__}.from_config({family!r})",
        )
        keras.utils.set_random_seed(seed)
        with host_device():
            arch = Seq2SeqArchitecture(
                vocab_size, num_layers, hidden_dim, num_heads, intermediate_dim, max_sequence_length
            )
            args = {**spec.backbone_args(arch), **backbone_kwargs}
            backbone = getattr(keras_hub.models, spec.backbone_class)(dtype=keras_policy(precision), **args)
            lm = getattr(keras_hub.models, spec.lm_class)(backbone=backbone, preprocessor=None)
        return cls(lm, sharding=sharding)

    @property
    def max_sequence_length(self) -> int | None:
        """Longest encoder or decoder sequence a learned position table covers (BART);
        ``None`` for rotary positions (T5Gemma)."""
        if not SEQ2SEQ_FAMILIES[self.family].position_table:
            return None
        return int(self.backbone.max_sequence_length)

    def decoder_start_ids(self, tokenizer: Any) -> list[int]:
        """The ids the decoder reads before the target in ``tokenizer`` (BART: ``</s> <s>``,
        T5Gemma: ``<bos>``)."""
        return SEQ2SEQ_FAMILIES[self.family].decoder_start(tokenizer.eos_id, tokenizer.bos_id)

    def encode_source(self, tokenizer: Any, text: str) -> list[int]:
        """Encoder ids of ``text`` as the family's preprocessor packs them (BART:
        ``<s> text </s>``, T5Gemma: ``text <eos>``)."""
        body = tokenizer.encode_text(text) if SEQ2SEQ_FAMILIES[self.family].source_bos else tokenizer.encode(text)
        return [*body, tokenizer.eos_id]

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    def apply(
        self, variables: ModelVariables, inputs: Mapping[str, jax.Array], *, training: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Decoder logits ``[batch, decoder length, vocab]`` for the four seq2seq inputs."""
        if "segment_ids" in inputs:
            raise ValueError("Seq2seq models do not support packed sequences; set packing off.")
        missing = [k for k in SEQ2SEQ_INPUTS if k not in inputs]
        if missing:
            raise ValueError(f"A seq2seq batch needs {list(SEQ2SEQ_INPUTS)}; missing {missing}.")
        trainable = [variables.trainable[p] for p in self._trainable_paths]
        non_trainable = [variables.non_trainable[p] for p in self._non_trainable_paths]
        model_inputs = {k: inputs[k] for k in SEQ2SEQ_INPUTS}
        logits, new_non_trainable = self.seq2seq_lm.stateless_call(
            trainable, non_trainable, model_inputs, training=training
        )
        return logits, dict(zip(self._non_trainable_paths, new_non_trainable, strict=True))

    def flops_per_token(self, sequence_length: int, *, training: bool = True) -> float:
        """PaLM-style count per decoder token, with a source as long as the target: every
        weight (encoder and decoder) used once, plus encoder self-, decoder self- and
        cross-attention over ``sequence_length``."""
        b = self.backbone
        hidden = getattr(b, "hidden_dim", None) or b.decoder_hidden_dim  # T5Gemma names each stack
        layers = getattr(b, "num_layers", None) or b.decoder_num_layers
        weights = sum(math.prod(v.shape) for p, v in self._by_path.items() if p.endswith("/kernel"))
        weights += b.vocabulary_size * hidden  # the LM head
        attention = 3 * 4 * layers * sequence_length * hidden
        forward = 2 * weights + attention
        return float(3 * forward if training else forward)

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        decoder_start_ids: Sequence[int] | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_token_ids: Sequence[int] | str | None = "auto",
        seed: int | jax.Array = 0,
        variables: ModelVariables | None = None,
        tokenizer: Any = None,
    ) -> Any:
        """Writes the decoder's continuation of ``decoder_start_ids`` for each source, with
        KV caches in one jitted loop on the model's mesh (compiled once per bucket of batch,
        source length and new tokens, and per sampling mode).

        Args:
            prompts: sources: a string or list of strings (needs ``tokenizer`` or
                ``self.tokenizer``; encoded ``<s> text </s>``; returns strings), or a list of
                encoder token-id lists (used as they are; returns token-id lists).
            max_new_tokens: tokens to write after the decoder prefix at most.
            decoder_start_ids: what the decoder reads first; default (needs a tokenizer) the
                family's start, ``</s> <s>`` for BART. Not part of the output.
            temperature, top_k, top_p: as in ``KerasHubModel.generate`` (0 is greedy).
            stop_token_ids: a row ends at the first of these (not returned). ``"auto"``: the
                tokenizer's EOS with string prompts, none with token ids.
            seed: an int or a ``jax.random`` key for sampling.
            variables: the variables to generate with; default ``self.variables``.
            tokenizer: a ``kithara.Tokenizer`` (default ``self.tokenizer``).
        """
        given = read_prompts(
            prompts, tokenizer or self.tokenizer, self.encode_source, need_tokenizer=decoder_start_ids is None
        )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
        start = list(decoder_start_ids) if decoder_start_ids is not None else self.decoder_start_ids(given.tokenizer)
        if not start:
            raise ValueError("decoder_start_ids must hold at least one id.")
        check_sampling(temperature, top_k, top_p)
        stops = given.stop_ids(stop_token_ids)
        outputs = self.generator(
            given.token_ids,
            start,
            max_new_tokens,
            variables=variables if variables is not None else self.variables,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_token_ids=stops,
            rng=as_key(seed),
        )
        return given.output(outputs)
