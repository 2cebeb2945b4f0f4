"""RewardTrainer: an outcome reward model (a ``ScalarHeadModel``) trained on preference pairs."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import keras
import optax

from kithara.callbacks import Callback, Checkpointer, Profiler
from kithara.data.dataloader import Dataloader
from kithara.data.reward_data import RewardDataset
from kithara.data.sources import Source
from kithara.data.tokenizer import Tokenizer
from kithara.models.keras_hub_model import KerasHubModel
from kithara.models.lora import LoraConfig
from kithara.models.model import Model, ModelVariables
from kithara.models.scalar_head import ScalarHeadModel, last_token_scores
from kithara.objectives import reward_losses
from kithara.objectives.dpo import pair_inputs
from kithara.objectives.inputs import as_loader, as_tokenizer, check_ready_data, data_argument, lora_config
from kithara.objectives.reward_configs import RewardConfig
from kithara.trainer.config import TrainingConfig
from kithara.trainer.losses import LossOutput
from kithara.trainer.trainer import Trainer

logger = logging.getLogger(__name__)


class RewardTrainer(Trainer):
    """Trains a reward model on preference pairs with TRL's ``RewardTrainer`` loss:
    ``-log sigmoid(r_chosen - r_rejected - margin)`` averaged over pairs, plus
    ``center_rewards_coefficient * mean((r_chosen + r_rejected) ** 2)`` when set. A sequence's
    reward is the model's score at its last token.

    Metrics (TRL's names): ``accuracy`` (share of pairs with ``r_chosen > r_rejected``),
    ``margin`` (mean ``r_chosen - r_rejected``), ``mean_reward`` / ``min_reward`` /
    ``max_reward`` (over both answers; min and max per micro-batch, averaged, as TRL logs
    them), and ``rewards/chosen`` / ``rewards/rejected`` (mean rewards of each side).

    Args:
        model: a ``ScalarHeadModel`` with one label; a ``KerasHubModel`` (its backbone is
            copied under a fresh ``score`` head: TRL's automatic reward head); or a model
            directory (a ``*ForSequenceClassification`` checkpoint, or a causal LM that gets
            a fresh head).
        args: a ``RewardConfig`` (TRL's names: ``max_length``, ``center_rewards_coefficient``,
            ``disable_dropout``, ``learning_rate``, ...; kithara's ``loss_type`` and ``margin``).
        train_dataset: a ``Dataloader`` or ``RewardDataset`` (used as they are), or raw pairs
            (``prompt`` / ``chosen`` / ``rejected``, or ``chosen`` / ``rejected`` alone; text
            or chat messages; optional numeric ``margin``) as a path, glob, list of dicts or
            Hugging Face dataset.
        eval_dataset: like ``train_dataset``, for evaluation (never shuffled).
        processing_class: a ``kithara.Tokenizer`` or ``transformers`` tokenizer (``tokenizer=``
            too; loaded from ``model`` when that is a path).
        peft_config: LoRA adapters (a ``kithara.LoraConfig`` or ``peft.LoraConfig``) for a
            ``model`` given as a path or ``KerasHubModel``; the head is trained fully.
        optimizer: an optax transformation or keras optimizer; default: ``args``'s AdamW.
        callbacks / checkpointer / profiler: as for the base ``Trainer``.
        **fields: ``RewardConfig`` fields, or the base ``Trainer``'s Kithara names.

    Example:
        >>> trainer = RewardTrainer(policy, args=RewardConfig(max_length=512, max_steps=100),
        ...                         train_dataset="pairs.jsonl", processing_class=tokenizer)
        >>> trainer.train()
        >>> reward_model = trainer.model   # a ScalarHeadModel
    """

    reports_perplexity = False  # the loss is a pairwise loss, not a token NLL
    step_constants = (*Trainer.step_constants, "loss_type", "center_rewards_coefficient", "dropout")
    config_class = RewardConfig

    def __init__(
        self,
        model: Model | str,
        args: RewardConfig | None = None,
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
                f"RewardTrainer's second argument is args (a RewardConfig), got {type(args).__name__}; "
                "pass data as train_dataset=."
            )
        train_name, train_data = data_argument("train", train_dataset, train_dataloader)
        eval_name, eval_data = data_argument("eval", eval_dataset, eval_dataloader)
        if train_data is None:
            raise ValueError("RewardTrainer needs train_dataset: preference pairs (prompt / chosen / rejected).")
        if processing_class is not None and tokenizer is not None:
            raise ValueError("Pass processing_class or tokenizer (the same thing), not both.")
        config = cast(RewardConfig, self.resolve_config(args, **fields))
        for name, data in ((train_name, train_data), (eval_name, eval_data)):
            check_ready_data(config, data, name, encoding=("max_length", "margin"), loading=("skip_bad_rows",))
        model, self.tokenizer = scalar_head_model(
            model, processing_class or tokenizer, lora=lora_config(peft_config), precision=config.precision,
            num_labels=1, where="RewardTrainer",
        )  # fmt: skip
        self.loss_type = config.loss_type
        self.center_rewards_coefficient = config.center_rewards_coefficient
        self.dropout = not config.disable_dropout

        def loader(data: Any, name: str, per_device: int, **options: Any) -> Dataloader:
            def make(source: Source, tokenizer: Tokenizer) -> RewardDataset:
                return RewardDataset(source, tokenizer, max_length=config.max_length, margin=config.margin)

            built = as_loader(
                data, name, self.tokenizer, make, per_device_batch_size=per_device,
                skip_bad_rows=config.skip_bad_rows, **options,
            )  # fmt: skip
            if not isinstance(built.dataset, RewardDataset):
                raise ValueError(
                    f"RewardTrainer needs reward pairs in {name}: a RewardDataset (or raw rows), got a "
                    f"{type(built.dataset).__name__} (a DPO PreferenceDataset shifts its tokens for next-token "
                    "log-probs; a reward model reads whole sequences)."
                )
            return built

        train = loader(train_data, train_name, config.per_device_train_batch_size, seed=config.seed)
        evaluation = (
            None
            if eval_data is None
            else loader(eval_data, eval_name, config.eval_batch_size, shuffle=False, drop_remainder=False)
        )
        super().__init__(
            model, optimizer, train, evaluation, profiler=profiler, checkpointer=checkpointer,
            callbacks=callbacks, args=config,
        )  # fmt: skip

    def compute_loss(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        del rng, frozen
        chosen, rejected, non_trainable = self.pair_rewards(variables, batch, training=self.dropout)
        margin = batch["margin"] if "margin" in batch else jnp.zeros_like(chosen)
        valid = batch["chosen_label_mask"].any(-1) & batch["rejected_label_mask"].any(-1)
        per_pair = reward_losses.pair_loss(
            chosen,
            rejected,
            margin,
            loss_type=self.loss_type,
            center_rewards_coefficient=self.center_rewards_coefficient,
        )
        count = valid.sum().astype(jnp.float32)

        def total(x: jax.Array) -> jax.Array:
            return jnp.where(valid, x, 0.0).sum()

        both = jnp.concatenate([chosen, rejected])
        both_valid = jnp.concatenate([valid, valid])
        lowest = jnp.where(both_valid, both, jnp.inf).min()
        highest = jnp.where(both_valid, both, -jnp.inf).max()
        sums = {
            "accuracy": total((chosen > rejected).astype(jnp.float32)),
            "margin": total(chosen - rejected),
            "mean_reward": total((chosen + rejected) / 2),
            "min_reward": jnp.where(count > 0, lowest * count, 0.0),
            "max_reward": jnp.where(count > 0, highest * count, 0.0),
            "rewards/chosen": total(chosen),
            "rewards/rejected": total(rejected),
        }
        return LossOutput(total=total(per_pair), weight=count, sums=sums), non_trainable

    def pair_rewards(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], *, training: bool = False
    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
        """``(r_chosen, r_rejected, new_non_trainable)`` of a batch of pairs: one forward pass
        over chosen and rejected stacked, each row's score read at its last token."""
        inputs = pair_inputs(batch)
        scores_BxLx1, non_trainable = self.model.apply(variables, inputs, training=training)
        rewards = last_token_scores(scores_BxLx1[..., 0], inputs["padding_mask"])
        half = batch["chosen_token_ids"].shape[0]
        return rewards[:half], rewards[half:], non_trainable


def scalar_head_model(
    model: Model | str,
    tokenizer: Any,
    *,
    lora: LoraConfig | None,
    precision: str | None,
    num_labels: int,
    task: str = "sequence_classification",
    where: str,
) -> tuple[ScalarHeadModel, Tokenizer | None]:
    """``(model, tokenizer)`` for a trainer of scoring models: a ``ScalarHeadModel`` as it is,
    a ``KerasHubModel``'s backbone copied under a fresh ``num_labels`` head, or a directory
    loaded with ``ScalarHeadModel.from_preset`` (a classifier checkpoint, or a causal LM that
    gets a fresh head; a tokenizer, when not given, from the same directory)."""
    tokenizer = as_tokenizer(tokenizer)
    if isinstance(model, str):
        loaded = ScalarHeadModel.from_preset(
            model, lora=lora, precision=precision or "float32", num_labels=num_labels, task=task
        )
        return _checked_labels(loaded, num_labels, where), tokenizer or Tokenizer.from_pretrained(model)
    if isinstance(model, KerasHubModel):
        if lora is not None and model.lora != lora:
            raise ValueError(
                f"peft_config={lora} asks for LoRA adapters, but the model was built "
                f"{'with ' + str(model.lora) if model.lora else 'without them'}; build it with lora=..., "
                "or pass the model as a path."
            )
        logger.info("%s: a fresh %d-label score head on a copy of the %s backbone.", where, num_labels, model.family)
        return ScalarHeadModel.from_causal_lm(model, num_labels=num_labels, task=task), tokenizer
    if not isinstance(model, ScalarHeadModel):
        raise TypeError(
            f"{where} trains a scoring model: a kithara.ScalarHeadModel, a KerasHubModel (its backbone gets a fresh "
            f"score head) or a model directory; got {type(model).__name__}, which cannot be converted "
            "(an encoder-decoder or a custom model has no decoder backbone to put a score head on)."
        )
    if lora is not None and model.lora != lora:
        raise ValueError(
            f"peft_config={lora} asks for LoRA adapters, but the ScalarHeadModel was built "
            f"{'with ' + str(model.lora) if model.lora else 'without them'}; adapters are added when a model "
            "is built: ScalarHeadModel.from_config(..., lora=...) or from a KerasHubModel built with lora=."
        )
    return _checked_labels(model, num_labels, where), tokenizer


def _checked_labels(model: ScalarHeadModel, num_labels: int, where: str) -> ScalarHeadModel:
    have = int(getattr(model, "num_labels", 1))
    if have != num_labels:
        use = "a reward model scores a sequence with one number" if num_labels == 1 else "one logit per class"
        raise ValueError(
            f"{where} needs a model with num_labels={num_labels} ({use}); this ScalarHeadModel has "
            f"num_labels={have}. Build one with num_labels={num_labels} (ScalarHeadModel.from_config(..., "
            f"num_labels={num_labels}) or from_causal_lm(model, num_labels={num_labels}))."
        )
    return model
