"""BCOTrainer: binary classifier optimisation on unpaired feedback, the implicit reward
shifted by the running mean of all rewards so far (TRL's ``RunningMoments`` ``delta``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from kithara.models.model import Model, ModelVariables
from kithara.objectives import unpaired_losses
from kithara.objectives.kto import UnpairedPreferenceTrainer
from kithara.objectives.unpaired_configs import BCOConfig
from kithara.trainer.evaluation import evaluate_loader
from kithara.trainer.losses import LossOutput
from kithara.trainer.state import TrainState
from kithara.utils.running_moments import EMPTY, Moments, RunningMoments, batch_moments, merge

logger = logging.getLogger(__name__)

RUNNING_FIELDS = ("count", "mean", "m2")
STATE_KEY = "bco_running"  # in the checkpoint's data state


class BCOTrainer(UnpairedPreferenceTrainer):
    """Trains a ``Model`` on unpaired feedback with BCO (TRL's ``BCOTrainer``, removed from
    TRL in 0.29): desirable rows' implicit rewards ``beta * (log pi - log pi_ref)`` are pushed
    above ``delta``, undesirable rows' below it, where ``delta`` is the running mean of every
    reward seen in training so far, this batch's included.

    The running moments live on the device between steps (they enter each step as batch
    columns and leave it as metrics, so the host never waits for them) and are saved in the
    checkpoint's data state, so a resumed run continues with the same ``delta`` exactly.
    With ``gradient_accumulation_steps > 1`` every micro-batch's ``delta`` folds that
    micro-batch into the moments as of the step's start (TRL folds the earlier micro-batches
    of the step in too); with one micro-batch the two agree. Evaluation uses the moments
    without updating them, as TRL does.

    Underlying-distribution matching (UDM, TRL's ``embedding_func``): each undesirable row's
    loss is weighted by the density ratio ``p / (1 - p)`` (clamped to ``[min_density_ratio,
    max_density_ratio]``) of a logistic regression's probability ``p`` that its prompt is a
    desirable row's, fitted once before training on ``prompt_sample_size`` prompts of each
    kind (balanced classes, L2 with C = 1: scikit-learn's defaults). ``embedding_func`` maps
    prompt ``(token_ids [N, L], padding_mask [N, L])`` to ``[N, D]`` embeddings;
    ``embedding_func="policy"`` uses the policy's own final hidden states, mean-pooled over the
    prompt, at its starting weights. The weights are computed once per example at
    construction (a resumed run recomputes the same ones).

    The reference policy and the constructor are ``KTOTrainer``'s (``DPOTrainer``'s
    conventions), plus ``embedding_func``. Metrics: ``delta``, ``rewards/chosen_sum``, ``count/chosen``, ... (per
    row of the batch; a ``_sum`` over its count is TRL's per-kind mean).

    Args: see ``UnpairedPreferenceTrainer``.

    Example:
        >>> trainer = kithara.BCOTrainer(model, train_dataset="feedback.jsonl", processing_class=tokenizer,
        ...     args=kithara.BCOConfig(max_length=512, max_steps=100, per_device_train_batch_size=4))
        >>> trainer.train(); trainer.running.mean  # delta after training
        >>> udm = kithara.BCOTrainer(model, train_dataset="feedback.jsonl", processing_class=tokenizer,
        ...     embedding_func="policy", args=kithara.BCOConfig(min_density_ratio=0.5, max_density_ratio=10.0))
    """

    config_class = BCOConfig

    def __init__(self, *args: Any, embedding_func: Callable[..., Any] | str | None = None, **kwargs: Any) -> None:
        self.running_moments = Moments(*(jnp.zeros((), jnp.float32) for _ in RUNNING_FIELDS))
        super().__init__(*args, **kwargs)
        self.classifier: LogisticRegression | None = None
        if embedding_func is not None:
            self.fit_udm(policy_embeddings(self.model) if embedding_func == "policy" else embedding_func)

    def fit_udm(self, embed: Any) -> None:
        """Fits the density-ratio classifier on sampled prompts of the train data and stores
        each example's UDM weight (1 for desirable rows) in the train and eval loaders."""
        if not callable(embed):
            raise TypeError(f"embedding_func must be a callable or 'policy', got {embed!r}.")
        if jax.process_count() > 1:
            raise ValueError("BCO's UDM classifier is fitted on one process only; run it single-process.")
        config = cast(BCOConfig, self.args)
        loader = self.train_dataloader
        if loader is None:
            raise ValueError("fit_udm needs the trainer's train data: the classifier is fitted on its prompts.")
        labels = np.asarray([bool(ex["label"]) for ex in loader.examples])
        if labels.all() or not labels.any():
            raise ValueError("UDM needs desirable and undesirable rows in the train data to fit its classifier.")
        rng = np.random.default_rng(config.seed)
        picked = np.concatenate([
            rng.choice(np.flatnonzero(labels == kind), min(config.prompt_sample_size, int((labels == kind).sum())),
                       replace=False) for kind in (True, False)
        ])  # fmt: skip
        features = prompt_embeddings(embed, [loader.examples[i] for i in picked])
        self.classifier = LogisticRegression.fit(features, labels[picked])
        for data in (self.train_dataloader, self.eval_dataloader):
            if data is None:
                continue
            prob = self.classifier.predict_proba(prompt_embeddings(embed, data.examples))
            weights = np.asarray(
                unpaired_losses.udm_weight(jnp.asarray(prob), config.min_density_ratio, config.max_density_ratio)
            )
            for ex, weight in zip(data.examples, weights, strict=True):
                ex["udm_weight"] = np.asarray(weight if not ex["label"] else 1.0, np.float32)
            data.extras["udm_weight"] = np.zeros((), np.float32)

    @property
    def running(self) -> RunningMoments:
        """A host copy of the running moments of the rewards (reads the device)."""
        return RunningMoments(Moments(*(float(x) for x in jax.device_get(list(vars(self.running_moments).values())))))

    def load_running(self, running: RunningMoments) -> None:
        """Continues from ``running``'s moments (a checkpoint restore does this itself)."""
        self.running_moments = Moments(*(jnp.asarray(v, jnp.float32) for v in running.state_dict().values()))

    # The loss ---------------------------------------------------------------------------

    def compute_loss(
        self, variables: ModelVariables, batch: Mapping[str, jax.Array], rng: jax.Array, frozen: Any
    ) -> tuple[LossOutput, dict[str, jax.Array]]:
        del rng
        policy, ref, extras, non_trainable = self.row_logps(variables, batch, frozen)
        label, valid = batch["label"].astype(bool), extras["lengths"] > 0
        logratio = policy[""] - ref[""]
        rewards = jax.lax.stop_gradient(self.beta * logratio)
        if f"bco_{RUNNING_FIELDS[0]}" in batch:
            prior = Moments(*(batch[f"bco_{k}"][0] for k in RUNNING_FIELDS))
            update = batch["bco_update"][0] > 0
        else:
            prior, update = Moments(*(jnp.zeros((), jnp.float32) for _ in RUNNING_FIELDS)), jnp.asarray(True)
        delta = jnp.where(update, merge(prior, batch_moments(rewards, valid)).mean, prior.mean)
        per_row = unpaired_losses.bco_loss(logratio, label, delta, beta=self.beta, udm_weight=batch.get("udm_weight"))
        weight = valid.sum().astype(jnp.float32)
        sums = {
            "delta": delta * weight,
            **self.kind_sums(label, valid, rewards, policy[""], extras["mean_logits"]),
            # For the host's update of the running moments (popped from the metrics).
            "bco/sum": jnp.where(valid, rewards, 0.0).sum(),
            "bco/sq": jnp.where(valid, (rewards - prior.mean) ** 2, 0.0).sum(),
        }
        return LossOutput(jnp.where(valid, per_row, 0.0).sum(), weight, sums), non_trainable

    # The running moments across steps ----------------------------------------------------

    def running_columns(self, like: jax.Array, update: bool) -> dict[str, jax.Array]:
        """The running moments as batch columns shaped and sharded like ``like`` (the label)."""
        values = {f"bco_{k}": getattr(self.running_moments, k) for k in RUNNING_FIELDS}
        values["bco_update"] = jnp.asarray(1.0 if update else 0.0, jnp.float32)
        return {k: jax.device_put(jnp.broadcast_to(v, like.shape), like.sharding) for k, v in values.items()}

    def host_step(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        prior = self.running_moments
        state, metrics = self.jitted_train_step(state, {**batch, **self.running_columns(batch["label"], True)})
        metrics = dict(metrics)
        count = metrics["loss_weight"]
        mean, sq = metrics.pop("bco/sum"), metrics.pop("bco/sq")  # already divided by max(count, 1)
        m2 = jnp.maximum(count * (sq - (mean - prior.mean) ** 2), 0.0)
        self.running_moments = merge(prior, Moments(count, mean, m2))  # on device: the host does not wait
        return state, metrics

    def eval_metrics(self, variables: ModelVariables) -> dict[str, float]:
        if self.eval_dataloader is None:
            raise ValueError("evaluate() needs an eval_dataloader.")

        def step(v: ModelVariables, batch: dict[str, jax.Array]) -> LossOutput:
            return self.jitted_eval_step(v, {**batch, **self.running_columns(batch["label"], False)})

        metrics = evaluate_loader(step, variables, self.eval_dataloader, self.model.mesh,
                                  max_eval_samples=self.max_eval_samples, reports_perplexity=False)  # fmt: skip
        return {k: v for k, v in metrics.items() if not k.startswith("bco/")}

    def data_state(self) -> dict[str, Any]:
        """The loader position and the running moments (read from the device now)."""
        return {**super().data_state(), STATE_KEY: self.running.state_dict()}

    def batches(self, start_step: int, data_state: dict[str, Any] | None) -> Iterator[tuple[int, Any]]:
        if data_state is not None:
            data_state = dict(data_state)
            saved = data_state.pop(STATE_KEY, None)
            if saved is None:
                logger.warning("The checkpoint holds no BCO running moments; delta starts again from 0.")
                self.load_running(RunningMoments(EMPTY))
            else:
                self.load_running(RunningMoments.from_state_dict(saved))
        elif start_step == 0:
            self.load_running(RunningMoments(EMPTY))
        return super().batches(start_step, data_state)


class LogisticRegression:
    """Binary logistic regression with balanced class weights and an L2 penalty on the
    weights (not the intercept), ``C = 1``: scikit-learn's ``LogisticRegression(
    class_weight="balanced")`` objective, minimised by Newton's method in float64.

    Example:
        >>> clf = LogisticRegression.fit(np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([0, 0, 1, 1]))
        >>> clf.predict_proba(np.array([[3.0]]))
    """

    def __init__(self, coef: np.ndarray, intercept: float) -> None:
        self.coef, self.intercept = coef, intercept

    @classmethod
    def fit(cls, features: np.ndarray, labels: np.ndarray, c: float = 1.0, steps: int = 100) -> LogisticRegression:
        x = np.concatenate([np.asarray(features, np.float64), np.ones((len(features), 1))], axis=1)
        y = np.asarray(labels, np.float64)
        counts = np.asarray([np.sum(y == 0), np.sum(y == 1)])
        sample_weight = (len(y) / (2 * counts))[y.astype(int)]  # class_weight="balanced"
        penalty = np.ones(x.shape[1])
        penalty[-1] = 0.0  # the intercept is not penalised
        theta = np.zeros(x.shape[1])
        for _ in range(steps):
            p = 1 / (1 + np.exp(-(x @ theta)))
            gradient = c * x.T @ (sample_weight * (p - y)) + penalty * theta
            hessian = c * (x.T * (sample_weight * p * (1 - p))) @ x + np.diag(penalty)
            step = np.linalg.solve(hessian, gradient)
            theta -= step
            if np.max(np.abs(step)) < 1e-12:
                break
        return cls(theta[:-1], float(theta[-1]))

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """The probability of the positive (desirable) class of each row."""
        return 1 / (1 + np.exp(-(np.asarray(features, np.float64) @ self.coef + self.intercept)))


def prompt_embeddings(embed: Callable[..., Any], examples: list[Any], chunk: int = 8) -> np.ndarray:
    """``embed(token_ids, padding_mask)`` of the examples' prompts (the tokens before the
    first completion label), right-padded in chunks of ``chunk`` rows."""
    prompts = []
    for ex in examples:
        first = int(np.argmax(ex["label_mask"]))  # labels[first] is the first completion token
        prompts.append(np.asarray(ex["token_ids"][: first + 1]))
    length = max(len(p) for p in prompts)
    out = []
    for start in range(0, len(prompts), chunk):
        rows = prompts[start : start + chunk]
        padded = rows + [rows[0]] * (chunk - len(rows))
        ids = np.stack([np.pad(p, (0, length - len(p))) for p in padded]).astype(np.int32)
        mask = np.arange(length)[None, :] < np.asarray([len(p) for p in padded])[:, None]
        out.append(np.asarray(embed(ids, mask), np.float64)[: len(rows)])
    return np.concatenate(out)


def policy_embeddings(model: Model) -> Callable[[np.ndarray, np.ndarray], jax.Array]:
    """Prompt embeddings from ``model``'s current weights: its final hidden states,
    mean-pooled over the prompt tokens."""
    variables = model.variables
    hidden_states = getattr(model, "hidden_states", None)
    if hidden_states is None:
        raise TypeError(
            f"embedding_func='policy' needs a model with hidden_states (a KerasHubModel), got {type(model).__name__}; "
            "pass your own embedding_func(token_ids, padding_mask)."
        )

    @jax.jit
    def embed(token_ids: jax.Array, padding_mask: jax.Array) -> jax.Array:
        inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
        hidden, _ = hidden_states(variables, inputs, training=False)
        mask = padding_mask[..., None].astype(jnp.float32)
        return (hidden.astype(jnp.float32) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)

    return embed
