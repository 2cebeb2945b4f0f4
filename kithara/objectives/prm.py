"""PRMTrainer: a process reward model (a two-label token classifier) trained on stepwise labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import keras
import optax

from kithara.callbacks import Callback, Checkpointer, Profiler
from kithara.data.dataloader import Dataloader
from kithara.data.sources import Source
from kithara.data.stepwise import StepwiseDataset
from kithara.data.tokenizer import Tokenizer
from kithara.models.model import Model, ModelVariables
from kithara.objectives import reward_losses
from kithara.objectives.inputs import as_loader, check_ready_data, data_argument, lora_config
from kithara.objectives.reward import scalar_head_model
from kithara.objectives.reward_configs import PRMConfig
from kithara.trainer.config import TrainingConfig
from kithara.trainer.losses import LossOutput
from kithara.trainer.trainer import Trainer

PRM_ENCODING = ("max_length", "max_prompt_length", "max_completion_length", "step_separator")


class PRMTrainer(Trainer):
    """Trains a process reward model as TRL's ``PRMTrainer`` did (TRL 0.x; removed in 0.29):
    a two-label token classifier (``ScalarHeadModel`` with ``num_labels=2``) reads each
    reasoning step at its last token (the separator's) and learns whether the step is correct,
    with the cross-entropy averaged over the labelled positions of the batch.

    Metrics: ``accuracy`` (share of labelled steps whose argmax label is right; TRL's
    ``compute_accuracy``), during training and evaluation. Evaluation rows label every step,
    also with ``train_on_last_step_only`` (TRL's ``is_eval``).

    Args:
        model: a ``ScalarHeadModel`` with ``num_labels=2``; a ``KerasHubModel`` (its backbone
            copied under a fresh two-label head); or a model directory (a
            ``*ForTokenClassification`` checkpoint, or a causal LM that gets a fresh head).
        args: a ``PRMConfig`` (``step_separator``, ``train_on_last_step_only``, ``max_length``,
            ``max_prompt_length``, ``max_completion_length``, ``learning_rate``, ...).
        train_dataset: a ``Dataloader`` or ``StepwiseDataset`` (used as they are), or raw rows
            (``prompt``, ``completions``: the steps, ``labels``: one boolean per step) as a
            path, glob, list of dicts or Hugging Face dataset.
        eval_dataset: like ``train_dataset``, for evaluation (never shuffled).
        processing_class: a ``kithara.Tokenizer`` or ``transformers`` tokenizer (``tokenizer=``
            too; loaded from ``model`` when that is a path).
        peft_config: LoRA adapters for a ``model`` given as a path or ``KerasHubModel``.
        optimizer / callbacks / checkpointer / profiler: as for the base ``Trainer``.
        **fields: ``PRMConfig`` fields, or the base ``Trainer``'s Kithara names.

    Example:
        >>> trainer = PRMTrainer(policy, args=PRMConfig(max_length=512, max_steps=100),
        ...                      train_dataset="steps.jsonl", processing_class=tokenizer)
        >>> trainer.train()
    """

    reports_perplexity = False  # the loss is a step-label cross-entropy, not a token NLL
    step_constants = (*Trainer.step_constants, "dropout")
    config_class = PRMConfig

    def __init__(
        self,
        model: Model | str,
        args: PRMConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        *,
        processing_class: Any = None,
        tokenizer: Any = None,
        peft_config: Any = None,
        optimizer: optax.GradientTransformation | keras.optimizers.Optimizer | None = None,
        train_dataloader: Dataloader | None = None,
        eval_dataloader: Dataloader | None = None,
        callbacks: Sequence[Callback] = (),
        checkpointer: Checkpointer | None = None,
        profiler: Profiler | None = None,
        **fields: Any,
    ) -> None:
        if args is not None and not isinstance(args, TrainingConfig):
            raise TypeError(
                f"PRMTrainer's second argument is args (a PRMConfig), got {type(args).__name__}; "
                "pass data as train_dataset=."
            )
        train_name, train_data = data_argument("train", train_dataset, train_dataloader)
        eval_name, eval_data = data_argument("eval", eval_dataset, eval_dataloader)
        if train_data is None:
            raise ValueError("PRMTrainer needs train_dataset: rows with prompt, completions (steps) and labels.")
        if processing_class is not None and tokenizer is not None:
            raise ValueError("Pass processing_class or tokenizer (the same thing), not both.")
        config = cast(PRMConfig, self.resolve_config(args, **fields))
        check_ready_data(config, train_data, train_name, encoding=(*PRM_ENCODING, "train_on_last_step_only"),
                         loading=("skip_bad_rows",))  # fmt: skip
        check_ready_data(config, eval_data, eval_name, encoding=PRM_ENCODING, loading=("skip_bad_rows",))
        model, self.tokenizer = scalar_head_model(
            model, processing_class or tokenizer, lora=lora_config(peft_config), precision=config.precision,
            num_labels=2, task="token_classification", where="PRMTrainer",
        )  # fmt: skip
        self.dropout = not config.disable_dropout

        def loader(data: Any, name: str, per_device: int, last_step_only: bool, **options: Any) -> Dataloader:
            def make(source: Source, tokenizer: Tokenizer) -> StepwiseDataset:
                return StepwiseDataset(
                    source, tokenizer, max_length=config.max_length, step_separator=config.step_separator,
                    train_on_last_step_only=last_step_only, max_prompt_length=config.max_prompt_length,
                    max_completion_length=config.max_completion_length,
                )  # fmt: skip

            built = as_loader(
                data, name, self.tokenizer, make, per_device_batch_size=per_device,
                skip_bad_rows=config.skip_bad_rows, **options,
            )  # fmt: skip
            if not isinstance(built.dataset, StepwiseDataset):
                raise ValueError(
                    f"PRMTrainer needs stepwise rows in {name}: a StepwiseDataset (or raw rows with prompt, "
                    f"completions and labels), got a {type(built.dataset).__name__}."
                )
            return built

        train = loader(
            train_data, train_name, config.per_device_train_batch_size, config.train_on_last_step_only, seed=config.seed
        )
        evaluation = (
            None
            if eval_data is None
            else loader(eval_data, eval_name, config.eval_batch_size, False, shuffle=False, drop_remainder=False)
        )
        super().__init__(
            model, optimizer, train, evaluation, profiler=profiler, checkpointer=checkpointer,
            callbacks=callbacks, args=config,
        )  # fmt: skip

    def compute_loss(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        del rng, frozen
        inputs = {"token_ids": batch["token_ids"], "padding_mask": batch["padding_mask"]}
        logits_BxLx2, non_trainable = self.model.apply(variables, inputs, training=self.dropout)
        nll, count, correct = reward_losses.token_classification_terms(
            logits_BxLx2, batch["labels"], batch["label_mask"]
        )
        return LossOutput(total=nll, weight=count, sums={"accuracy": correct}), non_trainable
