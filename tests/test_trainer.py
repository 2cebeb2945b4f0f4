import jax
import jax.numpy as jnp
import keras
import numpy as np
import optax
import pytest
from conftest import pattern_examples, tiny_model

import kithara


def make_trainer(model, examples, *, per_device=1, num_devices=None, optimizer=None, **kwargs):
    loader = kithara.Dataloader(examples, per_device, seed=0, num_devices=num_devices)
    kwargs.setdefault("progress_bar", False)
    return kithara.Trainer(model, optimizer or kithara.optimizers.adamw(1e-2), loader, **kwargs)


def losses(trainer):
    return np.asarray([h["loss"] for h in trainer.train()])


def test_step_compiles_once_and_metrics_are_complete(examples):
    trainer = make_trainer(
        tiny_model(),
        examples,
        steps=12,
        eval_dataloader=kithara.Dataloader(examples[:40], 1, shuffle=False, drop_remainder=False),
        eval_steps_interval=4,
    )
    history = trainer.train()
    trainer.evaluate()
    assert trainer.compilations["train_step"] == 1
    assert trainer.compilations["eval_step"] == 1
    assert [h["step"] for h in history] == list(range(1, 13))
    for key in ("loss", "learning_rate", "grad_norm", "step_time", "tokens_per_second", "mfu", "token_accuracy"):
        assert all(np.isfinite(h[key]) for h in history), key
    assert history[0]["learning_rate"] == pytest.approx(1e-2)
    # tokens counts non-padding positions only: the same rows' padding masks, summed.
    loader = trainer.train_dataloader
    first = next(loader.epoch(0))
    assert history[0]["tokens"] == first["padding_mask"].sum()
    assert 0 < history[-1]["mfu"] < 1


@pytest.mark.parametrize("strategy", ["fsdp", kithara.ShardingStrategy("fsdp_tp", tensor_parallel=2), "dp"])
def test_sharded_training_matches_one_device(examples, strategy):
    one = kithara.ShardingStrategy("dp", devices=jax.devices()[:1])
    held_out = kithara.Dataloader(examples[:64], 8, shuffle=False, drop_remainder=False, num_devices=1)
    single = make_trainer(
        tiny_model(sharding=one), examples, per_device=8, num_devices=1, steps=5, eval_dataloader=held_out
    )
    before = single.evaluate()["loss"]
    reference = losses(single)
    sharded = losses(make_trainer(tiny_model(sharding=strategy), examples, per_device=1, steps=5))
    np.testing.assert_allclose(sharded, reference, rtol=2e-6)
    assert single.evaluate()["loss"] < before  # it trained (per-step losses are of different batches)


def test_gradient_accumulation_equals_one_large_batch(examples):
    # SGD keeps the update linear in the gradient; Adam's g/sqrt(v) would amplify fp32
    # rounding of near-zero gradient entries and hide what this test checks.
    big = make_trainer(tiny_model(), examples, per_device=4, steps=3, optimizer=optax.sgd(0.5))
    accumulated = make_trainer(
        tiny_model(), examples, per_device=1, steps=3, gradient_accumulation_steps=4, optimizer=optax.sgd(0.5)
    )
    np.testing.assert_allclose(losses(accumulated), losses(big), rtol=2e-6)
    for path, value in big.model.variables.trainable.items():
        np.testing.assert_allclose(
            np.asarray(accumulated.model.variables.trainable[path]), np.asarray(value), rtol=1e-5, atol=1e-7
        )


def test_loss_falls_on_a_learnable_task():
    examples = pattern_examples(512, seed=1)
    trainer = make_trainer(
        tiny_model(),
        examples,
        per_device=4,
        steps=100,
        eval_dataloader=kithara.Dataloader(pattern_examples(64, seed=2), 4, shuffle=False, drop_remainder=False),
        eval_steps_interval=100,
    )
    history = trainer.train()
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert trainer.eval_history[-1]["token_accuracy"] > 0.55  # chance is 1/64; 3 of ~11 tokens are unguessable


def test_trainer_argument_validation(examples):
    model = tiny_model()
    ev = kithara.Dataloader(examples[:16], 1, shuffle=False, drop_remainder=False)
    with pytest.raises(ValueError, match="not both"):
        make_trainer(model, examples, steps=3, epochs=1)
    with pytest.raises(ValueError, match="only one of eval_steps_interval"):
        make_trainer(model, examples, eval_dataloader=ev, eval_steps_interval=2, eval_epochs_interval=1)
    with pytest.raises(ValueError, match="no eval_dataloader"):
        make_trainer(model, examples, eval_steps_interval=2)
    with pytest.raises(ValueError, match="positive int"):
        make_trainer(model, examples, steps=0)
    with pytest.raises(ValueError, match="fewer than gradient_accumulation_steps"):
        make_trainer(model, examples[:16], gradient_accumulation_steps=3)
    with pytest.raises(TypeError, match="optimizer"):
        kithara.Trainer(model, "adam", kithara.Dataloader(examples, 1))


def test_default_is_one_epoch_and_eval_every_epoch(examples):
    ev = kithara.Dataloader(examples[:16], 1, shuffle=False, drop_remainder=False)
    trainer = make_trainer(tiny_model(), examples[:64], eval_dataloader=ev)
    assert trainer.total_steps == 8 and trainer.eval_epochs_interval == 1
    trainer.train()
    assert [e["step"] for e in trainer.eval_history] == [8]
    trainer = make_trainer(tiny_model(), examples[:64], eval_dataloader=ev, epochs=3)
    trainer.train()
    assert trainer.total_steps == 24 and [e["step"] for e in trainer.eval_history] == [8, 16, 24]
    trainer = make_trainer(tiny_model(), examples[:64], eval_dataloader=ev, steps=10, eval_steps_interval=4)
    trainer.train()
    assert [e["step"] for e in trainer.eval_history] == [4, 8]


def test_max_eval_samples_evaluates_exactly_that_many(examples):
    model = tiny_model()
    ev_all = kithara.Dataloader(examples[:20], 1, shuffle=False, drop_remainder=False)
    limited = make_trainer(model, examples, eval_dataloader=ev_all, max_eval_samples=11).evaluate()
    ev_11 = kithara.Dataloader(examples[:11], 1, shuffle=False, drop_remainder=False)
    exact = make_trainer(model, examples, eval_dataloader=ev_11).evaluate()
    full = make_trainer(model, examples, eval_dataloader=ev_all).evaluate()
    assert limited["loss"] == pytest.approx(exact["loss"], rel=1e-6)
    assert limited["loss"] != pytest.approx(full["loss"], rel=1e-6)
    assert limited["perplexity"] == pytest.approx(np.exp(limited["loss"]))


def test_lora_training_changes_only_adapters(examples):
    model = tiny_model(lora=kithara.LoraConfig(rank=4, targets=("query", "value", "up")))
    before = jax.tree.map(np.asarray, model.variables)
    make_trainer(model, examples, steps=5).train()
    after = jax.tree.map(np.asarray, model.variables)
    for path, value in before.non_trainable.items():
        np.testing.assert_array_equal(after.non_trainable[path], value, err_msg=path)
    changed = [p for p, v in before.trainable.items() if not np.array_equal(after.trainable[p], v)]
    assert len(changed) == len(before.trainable)
    trainer = make_trainer(model, examples, steps=1)
    trainer.train()
    opt_leaves = jax.tree.leaves(trainer.train_state.opt_state)
    assert sum(x.size for x in opt_leaves if x.ndim) == 2 * model.num_trainable_params  # Adam: mu and nu


def test_tensorboard_events_have_the_expected_tags(examples, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = kithara.Dataloader(examples[:16], 1, shuffle=False, drop_remainder=False)
    make_trainer(
        tiny_model(),
        examples,
        steps=6,
        log_steps_interval=2,
        eval_dataloader=ev,
        eval_steps_interval=3,
        tensorboard_dir=str(tmp_path),
    ).train()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/learning_rate",
        "train/grad_norm",
        "train/tokens_per_second",
        "train/mfu",
        "train/step_time",
        "eval/loss",
        "eval/perplexity",
        "eval/token_accuracy",
    ):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("eval/loss")] == [3, 6]


class PoisonedTrainer(kithara.Trainer):
    """Turns the loss into NaN for batches holding a row marked ``poison``."""

    def compute_loss(self, variables, batch, rng, frozen):
        out, non_trainable = super().compute_loss(variables, batch, rng, frozen)
        out.total = jnp.where(batch["poison"].any(), jnp.nan, out.total)
        return out, non_trainable


def test_nan_loss_stops_training_with_a_clear_error(examples):
    rows = [{**e, "poison": np.int32(i >= 24)} for i, e in enumerate(examples[:64])]
    model = tiny_model()
    seen = []

    class Record(kithara.Callback):
        def on_step_end(self, info):
            seen.append(info.step)

        def on_train_end(self, info):
            seen.append(type(info.error).__name__)

    loader = kithara.Dataloader(rows, 1, shuffle=False)
    trainer = PoisonedTrainer(
        model, kithara.optimizers.adamw(1e-3), loader, steps=8, progress_bar=False, callbacks=[Record()]
    )
    with pytest.raises(FloatingPointError, match="at step 4"):
        trainer.train()
    assert seen == [1, 2, 3, "FloatingPointError"]


def test_keras_optimizer_works_and_reports_its_learning_rate(examples):
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=1, decay_rate=0.5)
    trainer = make_trainer(tiny_model(), examples, steps=4, optimizer=keras.optimizers.Adam(schedule))
    history = trainer.train()
    assert [h["learning_rate"] for h in history] == pytest.approx([1e-2, 5e-3, 2.5e-3, 1.25e-3])
    assert history[-1]["loss"] < history[0]["loss"]
    assert trainer.compilations["train_step"] == 1
    slots = trainer.train_state.opt_state.variables
    mu_key = next(k for k in slots if k.startswith("transformer_layer_0/self_attention/query/kernel#"))
    assert (
        slots[mu_key].sharding
        == trainer.model.variable_shardings.trainable["transformer_layer_0/self_attention/query/kernel"]
    )


def test_optax_schedule_and_clipping(examples):
    tx = kithara.optimizers.adamw(optax.linear_schedule(1e-2, 0.0, 4), max_grad_norm=1e-3)
    history = make_trainer(tiny_model(), examples, steps=4, optimizer=tx).train()
    assert [h["learning_rate"] for h in history] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])


def test_callbacks_can_ask_for_the_exact_state(examples):
    states = {}

    class Snapshot(kithara.Callback):
        def needs_sync(self, step):
            return step == 3

        def on_step_end(self, info):
            states[info.step] = int(jax.device_get(info.state.step))

    make_trainer(tiny_model(), examples, steps=6, callbacks=[Snapshot()]).train()
    assert states[3] == 3
    assert states[4] == 5  # other steps report one step late, while the next one runs


def test_profiler_writes_a_trace(examples, tmp_path):
    profiler = kithara.Profiler(start_step=2, num_steps=2)
    make_trainer(tiny_model(), examples, steps=5, tensorboard_dir=str(tmp_path), profiler=profiler).train()
    traces = list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert not profiler.active
