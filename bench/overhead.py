"""Framework overhead: ``Trainer.train()``'s steady step over a minimal hand-written step.

Three loops on the same model, batch shapes, optimizer and shardings, in one child
process, taking turns round by round (raw, program, trainer, raw, ...) so that drift in
the machine's load hits all three alike:

- raw: a hand-written ``jax.jit`` step (loss, ``value_and_grad``, AdamW, state donated),
  its batch already on device, blocking on the loss after every step;
- program: the Trainer's own jitted step called in that same blocking loop, so
  ``program / raw`` is what the Trainer's step computes beyond the minimum (gradient norm,
  token accuracy, the accumulation scan);
- trainer: ``Trainer.train()`` itself (data iterator, host-to-device copies, metrics read
  one step late, callbacks), so ``trainer / program`` is the loop's host cost.

Each round's figure is the median step of that round; the reported ratio is the median of
the per-round ratios, with their min and max to show the noise. XLA's cost analysis of the
two compiled programs (FLOPs and bytes accessed, program / raw) says without timing noise
how much more work the Trainer's step does.

The optimizer is the one a user gets from ``kithara.optimizers.adamw`` (AdamW, no weight
decay, global-norm clipping at 1.0). The Trainer logs ``grad_norm``; with clipping the
optimizer computes that norm anyway and XLA shares it. The cost analysis is also taken
with plain ``optax.adamw`` (no clipping, as the TRL comparison runs): there the metric is
one more read of every gradient, reported as ``noclip_program_bytes_ratio``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.common import LEARNING_RATE, SIZES, rows, run_configs


def train_once(spec: dict[str, Any]) -> dict[str, Any]:
    import jax
    import optax

    import kithara
    from bench.sft import build_model
    from kithara.models.model import ModelVariables
    from kithara.sharding import batch_sharding, replicated, shard_batch
    from kithara.trainer.losses import next_token_cross_entropy

    size, steps, rounds, per_device, seq = spec["size"], spec["steps"], spec["rounds"], spec["batch"], spec["seq"]
    model = build_model(size, spec.get("lora", False))
    data = rows(per_device * jax.device_count() * 64, seq, SIZES[size]["vocab_size"])
    loader = kithara.Dataloader(data, per_device, seed=0)
    init = jax.tree.map(lambda x: x.copy(), model.variables)
    params, frozen = init.trainable, init.non_trainable
    shardings = model.variable_shardings
    host_batch = next(loader.epoch(0))
    batch = shard_batch(host_batch, model.mesh)
    stacked = shard_batch({k: v[None] for k, v in host_batch.items()}, model.mesh, leading_dims=1)

    def loss_fn(p: dict, batch: dict) -> jax.Array:
        logits, _ = model.apply(ModelVariables(p, frozen), batch, training=True)
        out = next_token_cross_entropy(logits, batch["labels"], batch["label_mask"])
        return out.total / out.weight

    def raw_step_for(tx: optax.GradientTransformation) -> tuple[Any, Any]:
        """The hand-written step with ``tx`` and its initial optimizer state."""

        def step(p: dict, opt_state: Any, batch: dict) -> tuple[dict, Any, jax.Array]:
            loss, grads = jax.value_and_grad(loss_fn)(p, batch)
            updates, opt_state = tx.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, loss

        opt_state = jax.jit(tx.init)(params)
        opt_shardings = jax.tree.map(lambda x: x.sharding if x.ndim else replicated(model.mesh), opt_state)
        jitted = jax.jit(
            step,
            in_shardings=(shardings.trainable, opt_shardings, batch_sharding(model.mesh)),
            out_shardings=(shardings.trainable, opt_shardings, replicated(model.mesh)),
            donate_argnums=(0, 1),
        )
        return jitted, jax.device_put(opt_state, opt_shardings)

    def costs(tx: optax.GradientTransformation, trainer: Any) -> tuple[dict[str, float], dict[str, float]]:
        """XLA's own count of the raw and the Trainer's compiled programs: noise-free."""
        raw_step, opt_state = raw_step_for(tx)
        program = trainer.lower_train_step(trainer.train_state, stacked)
        return _cost(raw_step.lower(params, opt_state, batch)), _cost(program)

    # Without clipping (cost analysis only): a Trainer on a copy of the model's weights.
    noclip = optax.adamw(LEARNING_RATE, weight_decay=0.0)
    noclip_trainer = kithara.Trainer(model, noclip, loader, steps=1, progress_bar=False)
    noclip_trainer.train()
    noclip_raw_cost, noclip_program_cost = costs(noclip, noclip_trainer)
    del noclip_trainer
    model.variables = jax.tree.map(lambda x: x.copy(), init)

    tx = kithara.optimizers.adamw(LEARNING_RATE)  # clipping at 1.0, no weight decay
    trainer = kithara.Trainer(model, tx, loader, steps=2, progress_bar=False)
    trainer.train()  # compiles
    raw_step, opt_state = raw_step_for(tx)
    raw_cost, program_cost = costs(tx, trainer)
    params, opt_state, loss = raw_step(params, opt_state, batch)
    loss.block_until_ready()
    state = {"params": params, "opt": opt_state}

    def run_raw() -> float:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state["params"], state["opt"], loss = raw_step(state["params"], state["opt"], batch)
            loss.block_until_ready()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    def run_program() -> float:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.train_state, metrics = trainer.jitted_train_step(trainer.train_state, stacked)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])

    def run_trainer() -> float:
        trainer.total_steps = int(jax.device_get(trainer.train_state.step)) + steps
        first = len(trainer.history)
        trainer.train()
        return statistics.median(h["step_time"] for h in trainer.history[first + 1 :])

    loops = {"raw": run_raw, "program": run_program, "trainer": run_trainer}
    times: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(rounds):
        for name, loop in loops.items():
            times[name].append(loop())
    trainer_ratios = [t / r for t, r in zip(times["trainer"], times["raw"], strict=True)]
    program_ratios = [p / r for p, r in zip(times["program"], times["raw"], strict=True)]
    return {
        "params": model.num_params,
        "global_batch": loader.global_batch_size,
        "rounds": rounds,
        "steps_per_round": steps,
        "raw_step_s": statistics.median(times["raw"]),
        "program_step_s": statistics.median(times["program"]),
        "trainer_step_s": statistics.median(times["trainer"]),
        "overhead": statistics.median(trainer_ratios),
        "overhead_min": min(trainer_ratios),
        "overhead_max": max(trainer_ratios),
        "program_overhead": statistics.median(program_ratios),
        "program_flops_ratio": program_cost["flops"] / raw_cost["flops"],
        "program_bytes_ratio": program_cost["bytes accessed"] / raw_cost["bytes accessed"],
        "noclip_program_flops_ratio": noclip_program_cost["flops"] / noclip_raw_cost["flops"],
        "noclip_program_bytes_ratio": noclip_program_cost["bytes accessed"] / noclip_raw_cost["bytes accessed"],
        "optimizer": "kithara.optimizers.adamw (clip 1.0, no weight decay)",
        "round_times": times,
    }


def _cost(lowered: Any) -> dict[str, float]:
    analysis = lowered.compile().cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per program
        analysis = analysis[0]
    return {k: float(analysis.get(k, float("nan"))) for k in ("flops", "bytes accessed")}


def bench_overhead(
    sizes: list[str], *, steps: int, rounds: int, seq: int, batch: int, shared: bool = False
) -> list[dict[str, Any]]:
    base = {"kind": "overhead", "steps": steps, "rounds": rounds, "seq": seq, "batch": batch}
    specs = [{**base, "size": size} for size in sizes]
    results = run_configs(specs, shared=shared)
    return [{"size": s["size"], "seq_len": seq, **r} for s, r in zip(specs, results, strict=True)]
