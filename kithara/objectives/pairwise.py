"""PairwiseTrainer: the shared base of the reference-free preference trainers (ORPO, CPO).

It takes what ``DPOTrainer`` takes, less the reference: a model or model path, preference data
(a ``PreferenceDataset`` loader, dataset or raw ``prompt`` / ``chosen`` / ``rejected`` rows),
and a config. ``pair_forward`` runs chosen and rejected through the model in one pass
(``dpo.pair_inputs``) and returns their completion log-probs (``dpo_losses.token_logps``);
subclasses turn them into a loss in ``compute_loss``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import keras
import optax

from kithara.callbacks import Callback, Checkpointer, Profiler
from kithara.data.dataloader import Dataloader
from kithara.data.formats import PreferenceDataset
from kithara.data.sources import Source
from kithara.data.tokenizer import Tokenizer
from kithara.models.model import Model, ModelVariables
from kithara.objectives import dpo_losses
from kithara.objectives.dpo import pair_inputs
from kithara.objectives.inputs import as_loader, check_ready_data, data_argument, lora_config, resolve_model
from kithara.objectives.preference_configs import PairwiseConfig
from kithara.trainer.config import TrainingConfig
from kithara.trainer.trainer import Trainer


@dataclasses.dataclass(frozen=True)
class PairForward:
    """One forward pass over a batch of pairs: per-pair ``[P]`` summed completion log-probs,
    completion lengths and summed vocabulary-mean logits of each side, whether each pair
    counts (both completions non-empty), and the inputs and each position's label log-prob (chosen rows first)."""

    chosen: jax.Array
    rejected: jax.Array
    chosen_len: jax.Array
    rejected_len: jax.Array
    chosen_logit_sum: jax.Array
    rejected_logit_sum: jax.Array
    valid: jax.Array
    inputs: dict[str, jax.Array]
    token_logps: jax.Array

    @property
    def count(self) -> jax.Array:
        """How many pairs count (the loss's weight)."""
        return self.valid.sum().astype(jnp.float32)

    def mean_logps(self) -> tuple[jax.Array, jax.Array]:
        """Per-token mean completion log-probs (chosen, rejected); -1 for pairs that do not
        count, so no 0 / 0 or log(0) reaches a loss or its gradient."""

        def mean(total: jax.Array, n: jax.Array) -> jax.Array:
            return jnp.where(self.valid, total / jnp.maximum(n, 1.0), -1.0)

        return mean(self.chosen, self.chosen_len), mean(self.rejected, self.rejected_len)

    def total(self, x: jax.Array) -> jax.Array:
        """Sum of a per-pair array over the pairs that count."""
        return jnp.where(self.valid, x, 0.0).sum()

    def chosen_nll(self, with_prompt: bool) -> jax.Array:
        """Mean cross-entropy per token of the chosen rows over the batch (TRL's
        ``nn.CrossEntropyLoss`` on the chosen half): of the completions, or of every token
        after the first (prompt included: ORPO) when ``with_prompt``."""
        half = self.chosen.shape[0]
        if not with_prompt:
            return -self.total(self.chosen) / jnp.maximum(self.total(self.chosen_len), 1.0)
        mask = self.inputs["padding_mask"][:half].astype(bool) & self.valid[:, None]
        token_logps = self.token_logps[:half]
        logps, counts, _ = dpo_losses.sequence_sums(token_logps, jnp.zeros_like(token_logps), mask)
        return -logps.sum() / jnp.maximum(counts.sum(), 1.0)

    def metrics(
        self, chosen_rewards: jax.Array, rejected_rewards: jax.Array, chosen_logps: jax.Array, rejected_logps: jax.Array
    ) -> dict[str, jax.Array]:
        """TRL's pairwise metrics as sums over the pairs that count (reported per pair): the
        rewards and log-probs the loss compared, and the mean logit of each completion."""
        return {
            "rewards/chosen": self.total(chosen_rewards),
            "rewards/rejected": self.total(rejected_rewards),
            "rewards/accuracies": self.total((chosen_rewards > rejected_rewards).astype(jnp.float32)),
            "rewards/margins": self.total(chosen_rewards - rejected_rewards),
            "logps/chosen": self.total(chosen_logps),
            "logps/rejected": self.total(rejected_logps),
            "logits/chosen": self.total(self.chosen_logit_sum / jnp.maximum(self.chosen_len, 1.0)),
            "logits/rejected": self.total(self.rejected_logit_sum / jnp.maximum(self.rejected_len, 1.0)),
        }


class PairwiseTrainer(Trainer):
    """Base of the reference-free pairwise trainers; not used directly. Subclasses set
    ``config_class``, read their loss settings in ``read_config`` (called before the base
    ``Trainer.__init__``, so they can be step constants) and implement ``compute_loss`` with
    ``pair_forward``. Arguments: see ``ORPOTrainer``."""

    reports_perplexity = False  # the eval loss is a pairwise loss plus an NLL, not a token NLL
    config_class: type[TrainingConfig] = PairwiseConfig

    def __init__(
        self,
        model: Model | str,
        optimizer: optax.GradientTransformation | keras.optimizers.Optimizer | TrainingConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        *,
        args: TrainingConfig | None = None,
        train_dataloader: Dataloader | None = None,
        eval_dataloader: Dataloader | None = None,
        processing_class: Any = None,
        tokenizer: Any = None,
        peft_config: Any = None,
        callbacks: Sequence[Callback] = (),
        checkpointer: Checkpointer | None = None,
        profiler: Profiler | None = None,
        **fields: Any,
    ) -> None:
        name = type(self).__name__
        if isinstance(optimizer, Model):
            raise ValueError(
                f"{name} is reference-free and takes no reference model; the second argument is the optimizer "
                "(or the config, TRL's order). For a loss against a reference model use DPOTrainer."
            )
        if isinstance(optimizer, TrainingConfig):  # TRL's positional order: (model, args, ...)
            if args is not None:
                raise ValueError(f"{name} got a config both as its second argument and as args=; pass one.")
            args, optimizer = optimizer, None
        train_name, train_data = data_argument("train", train_dataset, train_dataloader)
        eval_name, eval_data = data_argument("eval", eval_dataset, eval_dataloader)
        if train_data is None:
            raise ValueError(
                f"{name} needs train_dataloader or train_dataset: preference data (prompt / chosen / rejected)."
            )
        if processing_class is not None and tokenizer is not None:
            raise ValueError("Pass processing_class or tokenizer (the same thing), not both.")
        config = cast(PairwiseConfig, self.resolve_config(args, **fields))
        for where, data in ((train_name, train_data), (eval_name, eval_data)):
            if isinstance(data, TrainingConfig):
                raise TypeError(
                    f"{name} got a config as {where}: its positional order is (model, optimizer or args, "
                    "train_dataset, eval_dataset); pass the config as args=."
                )
            check_ready_data(
                config, data, where, encoding=("max_length", "truncation_mode"), loading=("skip_bad_rows",)
            )
        model, self.tokenizer = resolve_model(
            model, processing_class or tokenizer, lora=lora_config(peft_config), precision=config.precision
        )

        def loader(data: Any, where: str, per_device: int, **options: Any) -> Dataloader:
            def make(source: Source, tokenizer: Tokenizer) -> PreferenceDataset:
                return PreferenceDataset(
                    source, tokenizer, max_length=config.max_length, truncation_mode=config.truncation_mode
                )

            built = as_loader(
                data, where, self.tokenizer, make, per_device_batch_size=per_device, skip_bad_rows=config.skip_bad_rows,
                **options,
            )  # fmt: skip
            if "chosen_" not in getattr(built.dataset, "sequences", ()):
                raise ValueError(f"{name} needs preference data in {where} (a PreferenceDataset with chosen/rejected).")
            return built

        train = loader(train_data, train_name, config.per_device_train_batch_size, seed=config.seed)
        evaluation = (
            None
            if eval_data is None
            else loader(eval_data, eval_name, config.eval_batch_size, shuffle=False, drop_remainder=False)
        )
        self.read_config(config)
        super().__init__(
            model,
            cast(optax.GradientTransformation | keras.optimizers.Optimizer | None, optimizer),
            train,
            evaluation,
            profiler=profiler,
            checkpointer=checkpointer,
            callbacks=callbacks,
            args=config,
        )

    def read_config(self, config: Any) -> None:
        """Sets the loss settings (step constants) from the resolved config."""
        raise NotImplementedError(f"{type(self).__name__} must implement read_config(config).")

    def pair_forward(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array]
    ) -> tuple[PairForward, dict[str, jax.Array]]:
        """Chosen and rejected through the model in one pass (training mode); returns their
        completion log-probs and the model's updated non-trainable variables (``chunk_size``:
        ``args.loss_chunk_size``)."""
        inputs = pair_inputs(batch)
        token_logps, logit_means, non_trainable = dpo_losses.token_logps(
            self.model, variables, inputs, training=True, chunk_size=self.args.loss_chunk_size
        )
        logps, lengths, logit_sums = dpo_losses.sequence_sums(token_logps, logit_means, inputs["label_mask"])
        half = batch["chosen_token_ids"].shape[0]
        forward = PairForward(
            chosen=logps[:half],
            rejected=logps[half:],
            chosen_len=lengths[:half],
            rejected_len=lengths[half:],
            chosen_logit_sum=logit_sums[:half],
            rejected_logit_sum=logit_sums[half:],
            valid=(lengths[:half] > 0) & (lengths[half:] > 0),
            inputs=inputs,
            token_logps=token_logps,
        )
        return forward, non_trainable
