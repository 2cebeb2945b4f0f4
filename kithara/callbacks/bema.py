"""``BEMACallback``: a bias-corrected exponential moving average of the trained weights
(BEMA, Block and Zhang 2025, arXiv 2508.00180), as TRL's callback computes it."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import keras

from kithara.callbacks.base import Callback, StepInfo
from kithara.models.model import Model, ModelVariables

if TYPE_CHECKING:
    from kithara.trainer.trainer import Trainer

logger = logging.getLogger(__name__)

Params = dict[str, jax.Array]
DEVICES = ("host", "device")


def snapshot(theta: Params) -> tuple[Params, Params]:
    """``(theta0, ema)``: copies of ``theta``, the EMA in float32."""
    return {p: jnp.copy(v) for p, v in theta.items()}, {p: v.astype(jnp.float32) for p, v in theta.items()}


def bema_update(
    theta: Params, theta0: Params, ema: Params, beta: jax.Array, alpha: jax.Array, on_device: Any = None
) -> tuple[Params, Params]:
    """One BEMA update at weights ``theta``: ``ema <- (1 - beta) * ema + beta * theta`` and
    the BEMA weights ``ema + alpha * (theta - theta0)`` (float32 math, in ``theta``'s dtypes).
    ``on_device`` (shardings by path) moves host-memory buffers to device memory first."""
    new_ema, weights = {}, {}
    for path, value in theta.items():
        start, average = theta0[path], ema[path]
        if on_device is not None:
            start, average = jax.device_put(start, on_device[path]), jax.device_put(average, on_device[path])
        value32 = value.astype(jnp.float32)
        new_ema[path] = (1.0 - beta) * average + beta * value32
        weights[path] = (new_ema[path] + alpha * (value32 - start.astype(jnp.float32))).astype(value.dtype)
    return new_ema, weights


class BEMACallback(Callback):
    r"""Keeps BEMA weights of the trainable variables: an EMA plus a bias correction that
    removes the EMA's lag, updated every ``update_freq`` steps (TRL's ``BEMACallback``).

    At update step ``t`` (the global step), with ``theta_t`` the trained weights and
    ``theta_0`` those at step ``update_after`` (at the start of training when it is 0 or
    already past)::

        beta_t  = max((lag + multiplier * t) ** -ema_power, min_ema_multiplier)
        alpha_t = (lag + multiplier * t) ** -bias_power
        ema     = (1 - beta_t) * ema + beta_t * theta_t      # ema starts at theta_0
        bema    = ema + alpha_t * (theta_t - theta_0)

    Until the first update the BEMA weights are the starting weights (as TRL's). The EMA is
    kept in float32 (TRL keeps it in the parameters' dtype, which rounds small updates away
    in bfloat16); ``theta_0`` and the BEMA weights have the parameters' dtypes. The three
    buffers are sharded like the trainable variables and updated by one jitted function
    (the old EMA donated) on the update steps, which the trainer waits for
    (``needs_sync``). They are not checkpointed: a resumed run starts averaging again from
    its resumed weights (TRL's callback does the same).

    The averaged weights are used on request: ``averaged_variables(trainer)`` for
    ``trainer.eval_metrics`` or ``model.generate(variables=...)``, ``evaluate(trainer)``,
    and ``save(path, trainer)`` (a Hugging Face checkpoint; TRL writes one at the end of
    training to ``{output_dir}/bema``).

    Args:
        update_freq: TRL. Update the BEMA weights every this many steps (phi).
        ema_power: TRL. The EMA weight's power (kappa); 0 disables the EMA.
        bias_power: TRL. The bias correction's power (eta); large values turn it off, 0
            keeps ``alpha_t = 1``.
        lag: TRL. The schedules' offset (rho): a virtual starting age.
        update_after: TRL. Burn-in steps before averaging starts (tau); ``theta_0`` is taken
            at this step.
        multiplier: TRL. The step's factor in the schedules (gamma).
        min_ema_multiplier: TRL. The EMA weight's floor.
        device: where the three buffers live: ``"host"`` (TRL's default ``"cpu"``, also
            accepted: pinned host memory, sharded like the variables, so accelerator memory
            stays free; plain device memory on backends without it) or ``"device"``
            (accelerator memory: faster updates, three more copies of the trainable weights).

    Example:
        >>> bema = BEMACallback(update_freq=50, update_after=100)
        >>> trainer = kithara.Trainer(model, optimizer, loader, steps=1000, callbacks=[bema])
        >>> trainer.train()
        >>> bema.evaluate(trainer)                      # eval metrics of the BEMA weights
        >>> bema.save("runs/bema", trainer, tokenizer=tokenizer)
    """

    def __init__(
        self,
        update_freq: int = 400,
        ema_power: float = 0.5,
        bias_power: float = 0.2,
        lag: int = 10,
        update_after: int = 0,
        multiplier: float = 1.0,
        min_ema_multiplier: float = 0.0,
        device: str = "host",
    ) -> None:
        for name, value, low in (("update_freq", update_freq, 1), ("update_after", update_after, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"BEMACallback: {name} must be an int >= {low}, got {value!r}.")
        for name, number in (("ema_power", ema_power), ("bias_power", bias_power), ("lag", lag)):
            if not number >= 0:
                raise ValueError(f"BEMACallback: {name} must be >= 0, got {number!r}.")
        if not multiplier > 0:
            raise ValueError(f"BEMACallback: multiplier must be > 0 (the schedules' step factor), got {multiplier!r}.")
        if not 0 <= min_ema_multiplier <= 1:
            raise ValueError(f"BEMACallback: min_ema_multiplier must be in [0, 1], got {min_ema_multiplier!r}.")
        if lag + multiplier * (update_after + update_freq) < 1 and ema_power > 0:
            raise ValueError(
                f"BEMACallback: lag + multiplier * t is below 1 at the first update (t={update_after + update_freq}), "
                "so the EMA weight would exceed 1; raise lag or multiplier."
            )
        device = "host" if device == "cpu" else device
        if device not in DEVICES:
            raise ValueError(
                f"BEMACallback: device must be 'host' (or TRL's 'cpu') or 'device' (accelerator memory), "
                f"got {device!r}."
            )
        self.update_freq, self.update_after = update_freq, update_after
        self.ema_power, self.bias_power = float(ema_power), float(bias_power)
        self.lag, self.multiplier, self.min_ema_multiplier = lag, float(multiplier), float(min_ema_multiplier)
        self.device = device
        self.last_update_step: int | None = None  # the step of the latest BEMA update
        self._theta0: Params | None = None
        self._ema: Params | None = None
        self._weights: Params | None = None
        self._param_shardings: dict[str, Any] = {}
        self._snapshot: Any = None
        self._update: Any = None

    # The schedules (TRL's _ema_beta and _bema_alpha) ------------------------------------

    def ema_beta(self, step: int) -> float:
        """The EMA weight ``beta_t = max((lag + multiplier * t) ** -ema_power, min_ema_multiplier)``."""
        return max((self.lag + self.multiplier * step) ** -self.ema_power, self.min_ema_multiplier)

    def bema_alpha(self, step: int) -> float:
        """The bias correction's weight ``alpha_t = (lag + multiplier * t) ** -bias_power``."""
        return float((self.lag + self.multiplier * step) ** -self.bias_power)

    # Hooks ----------------------------------------------------------------------------

    def needs_sync(self, step: int) -> bool:
        return step == self.update_after or (
            step > self.update_after and (step - self.update_after) % self.update_freq == 0
        )

    def on_train_begin(self, info: StepInfo) -> None:
        state = info.state
        if state is None:
            raise RuntimeError("BEMACallback.on_train_begin: the trainer has no state.")
        theta = state.model.trainable
        self._param_shardings = {p: v.sharding for p, v in theta.items()}
        buffers = {p: self._buffer_sharding(s) for p, s in self._param_shardings.items()}
        on_device = None if buffers == self._param_shardings else self._param_shardings
        self._snapshot = jax.jit(snapshot, out_shardings=(buffers, buffers))
        self._update = jax.jit(
            lambda theta, theta0, ema, beta, alpha: bema_update(theta, theta0, ema, beta, alpha, on_device),
            out_shardings=(buffers, buffers),
            donate_argnums=2,
        )
        self._theta0, self._ema = self._snapshot(theta)
        self._weights = self._theta0  # the starting weights until the first update (TRL's)
        self.last_update_step = None

    def on_step_end(self, info: StepInfo) -> None:
        step = info.step
        if step < self.update_after or not self.needs_sync(step):
            return
        state = info.state
        if state is None or self._theta0 is None or self._ema is None:
            raise RuntimeError("BEMACallback.on_step_end before on_train_begin.")
        theta = state.model.trainable
        if step == self.update_after:
            self._theta0, self._ema = self._snapshot(theta)
            return
        beta, alpha = jnp.float32(self.ema_beta(step)), jnp.float32(self.bema_alpha(step))
        self._ema, self._weights = self._update(theta, self._theta0, self._ema, beta, alpha)
        self.last_update_step = step
        logger.info("Updated BEMA weights at step %d", step)

    # Using the averaged weights -------------------------------------------------------

    @property
    def averaged_trainable(self) -> Params:
        """The BEMA weights of the trainable variables, by path, where the buffers live."""
        if self._weights is None:
            raise RuntimeError("BEMACallback has no weights yet: they are created when training begins.")
        return self._weights

    def averaged_variables(self, source: Trainer | Model | ModelVariables) -> ModelVariables:
        """The BEMA weights as a model's variables, on the variables' shardings in device
        memory (copied there when ``device="host"``): the trainable variables averaged, the
        non-trainable ones (a LoRA model's base weights, layer state) taken from ``source``:
        a trainer (its current state), a model, or model variables.

        Example:
            >>> metrics = trainer.eval_metrics(bema.averaged_variables(trainer))
            >>> model.generate(prompts, max_new_tokens=16, variables=bema.averaged_variables(model))
        """
        weights = self.averaged_trainable
        if isinstance(source, ModelVariables):
            variables = source
        elif isinstance(source, Model):
            variables = source.variables
        elif hasattr(source, "train_state") and isinstance(getattr(source, "model", None), Model):
            variables = source.train_state.model if source.train_state is not None else source.model.variables
        else:
            raise TypeError(
                f"source must be a Trainer, a kithara.Model or ModelVariables, got {type(source).__name__}."
            )
        if set(variables.trainable) != set(weights):
            missing = sorted(set(weights) - set(variables.trainable)) or sorted(set(variables.trainable) - set(weights))
            raise ValueError(
                f"The source's trainable variables are not those BEMA averaged (first difference: {missing[0]}); "
                "pass the trainer (or model) this callback trained with."
            )
        placed = {p: jax.device_put(w, self._param_shardings[p]) for p, w in weights.items()}
        return ModelVariables(placed, dict(variables.non_trainable))

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """``trainer.eval_metrics`` of the BEMA weights (nothing is logged or recorded)."""
        return trainer.eval_metrics(self.averaged_variables(trainer))

    def save(self, path: str | os.PathLike, source: Trainer | Model, **kwargs: Any) -> None:
        """Writes the BEMA weights as a Hugging Face checkpoint with the model's
        ``save_in_hf_format(path, **kwargs)`` (``tokenizer=``, ``dtype=``, ...); ``source``
        is the trainer or its model. The model's own variables are left as they are."""
        model: Any = source if isinstance(source, Model) else getattr(source, "model", None)
        if not hasattr(model, "save_in_hf_format") or not hasattr(model, "state_mapping"):
            raise TypeError(
                f"save needs a trainer of a keras-hub model (kithara.KerasHubModel) or that model; got "
                f"{type(source).__name__} of {type(model).__name__}."
            )
        variables = self.averaged_variables(source)
        # Inside the scope, keras variables read these values: the model is not modified.
        with keras.StatelessScope(state_mapping=model.state_mapping(variables)):
            model.save_in_hf_format(path, **kwargs)

    def _buffer_sharding(self, sharding: Any) -> Any:
        """The parameter's sharding, in pinned host memory when ``device="host"`` and the
        devices have it."""
        if self.device == "device" or not isinstance(sharding, jax.sharding.NamedSharding):
            return sharding
        device: Any = next(iter(sharding.addressable_devices))  # one of this process's
        kinds = {m.kind for m in device.addressable_memories()}
        return sharding.with_memory_kind("pinned_host") if "pinned_host" in kinds else sharding
