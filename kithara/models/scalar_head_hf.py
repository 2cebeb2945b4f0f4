"""``ScalarHeadModel`` <-> Hugging Face ``*ForSequenceClassification`` / ``*ForTokenClassification``
directories: loading, export and PEFT adapters (the mapping itself is ``hf.classification``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast

from kithara import sharding as sharding_lib
from kithara.models.building import host_device
from kithara.models.hf import classification
from kithara.models.lora import LoraConfig
from kithara.models.precision import keras_policy

if TYPE_CHECKING:
    from kithara.models.scalar_head import ScalarHeadModel


class HuggingFaceClassifier:
    """``ScalarHeadModel``'s Hugging Face methods: ``from_preset``, ``save_in_hf_format`` and
    ``save_peft_adapter`` (see docs/huggingface.md, "Classification and reward models")."""

    _setup: Callable[..., None]  # ScalarHeadModel's

    @classmethod
    def from_preset(
        cls,
        path: str | Path,
        *,
        precision: str = "float32",
        sharding: str | sharding_lib.ShardingStrategy | None = None,
        lora: LoraConfig | None = None,
        num_labels: int | None = None,
        task: str | None = None,
        head_init_std: float | None = None,
        seed: int = 0,
    ) -> Self:
        """Loads a local Hugging Face ``*ForSequenceClassification`` or ``*ForTokenClassification``
        directory (head, ``num_labels`` and ``task`` from its ``config.json``; passing other
        ones raises), or a causal LM, whose LM head is left out and a new head added with a
        logged note (as TRL's ``RewardTrainer`` does). The backbone loads exactly as
        ``KerasHubModel.from_preset``'s; classes and layout in docs/huggingface.md.

        Args:
            path: the checkpoint directory (``config.json`` + safetensors).
            precision: the keras dtype policy (``"float32"``, ``"bfloat16"``, ``"mixed_bfloat16"``).
            sharding: a strategy name or a ``ShardingStrategy``.
            lora: adapters to add to the backbone.
            num_labels: scores per position (a causal LM's new head; a classifier's must match).
            task: ``"sequence_classification"`` or ``"token_classification"`` (as ``num_labels``).
            head_init_std: standard deviation of a new head.
            seed: seed of a new head.

        Example:
            >>> reward = ScalarHeadModel.from_preset("path/to/Qwen2ForSequenceClassification")
            >>> reward.save_in_hf_format("out", tokenizer=tokenizer)
        """
        with host_device():
            loaded = classification.load_classifier(
                path, dtype=keras_policy(precision), num_labels=num_labels, task=task
            )
        head = None
        if loaded.kernel is not None:
            head = {"kernel": loaded.kernel, **({"bias": loaded.bias} if loaded.bias is not None else {})}
        model = cls.__new__(cls)
        model._setup(
            loaded.backbone,
            sharding=sharding,
            lora=lora,
            head_init_std=head_init_std,
            family=loaded.config["model_type"],
            seed=seed,
            num_labels=loaded.num_labels,
            task=loaded.task,
            head_bias=loaded.bias is not None,
            initial=None,
            head=head,
            hf_config=loaded.config,
        )
        return model

    def save_in_hf_format(
        self,
        path: str | Path,
        *,
        max_shard_size: int | str = "5GB",
        dtype: str = "float32",
        tokenizer: Any = None,
    ) -> None:
        """Writes a directory transformers' ``AutoModelForSequenceClassification``
        (``AutoModelForTokenClassification`` for ``task="token_classification"``) loads with
        the same scores: as ``KerasHubModel.save_in_hf_format`` (LoRA merged), no LM head,
        ``config.json`` with ``architectures``, ``id2label`` and, given ``tokenizer``, its
        ``pad_token_id``. transformers reads a row's score at its last token that is not
        ``pad_token_id`` (kithara: the last ``padding_mask`` position), so a row ending in
        the pad id (pad = EOS) is scored at an earlier token there.

        Args:
            path: a local directory, or a ``gs://`` URL.
            max_shard_size: the largest safetensors file to write.
            dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the written tensors.
            tokenizer: a kithara ``Tokenizer`` whose files (and pad id) go with the weights.
        """
        classification.save_classifier(
            cast("ScalarHeadModel", self), path, max_shard_size=max_shard_size, dtype=dtype, tokenizer=tokenizer
        )

    def save_peft_adapter(self, path: str | Path) -> None:
        """Writes the LoRA adapters in the PEFT format with ``task_type`` ``"SEQ_CLS"`` (or
        ``"TOKEN_CLS"``) and the trained head as ``modules_to_save=["score"]``:
        ``peft.PeftModel.from_pretrained(base_classifier, path)`` then scores as this model."""
        classification.save_classifier_adapter(cast("ScalarHeadModel", self), path)
