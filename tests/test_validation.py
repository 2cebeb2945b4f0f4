"""Settings that used to be accepted silently or fail cryptically: each is refused at set-up
with a message naming the setting, the value and the fix. Most tests build no model."""

import logging

import jax
import numpy as np
import pytest
from conftest import pattern_examples, tiny_model, word_tokenizer

import kithara
from kithara import cli
from kithara import distributed as distributed_lib
from kithara.config import load_config
from kithara.distributed import runtime
from kithara.objectives import dpo_losses
from kithara.run import build_model

BASE = ["data.train_file=train.jsonl", "data.tokenizer=@kithara/tokenizer"]


def config_error(*overrides: str, error: type[Exception] = ValueError) -> str:
    with pytest.raises(error) as caught:
        load_config(None, [*BASE, *overrides])
    return str(caught.value)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def loader(per_device: int = 1, **options):
    return kithara.Dataloader(pattern_examples(32), per_device, seed=0, shuffle=False, **options)


# Optimizer and loop settings ----------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), [("learning_rate", -1e-4), ("weight_decay", -0.1), ("max_grad_norm", -1.0)])
def test_negative_optimizer_settings_are_refused_naming_them(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be >= 0.*got {value}"):
        kithara.TrainingConfig(**{name: value})
    assert f"args (SFTConfig, for objective sft): {name} must be >= 0" in config_error(f"args.{name}={value}")


def test_cli_refuses_zero_accumulation_and_zero_cpu_devices(capsys):
    """Exit status 2 and one line naming the setting (not a ZeroDivisionError traceback)."""
    for override, message in (
        ("args.gradient_accumulation_steps=0", "gradient_accumulation_steps must be >= 1, got 0"),
        ("cpu_devices=0", "cpu_devices must be >= 1 or null, got 0"),
    ):
        assert cli.main(["config", *[a for o in (*BASE, override) for a in ("--set", o)]]) == 2
        assert message in " ".join(capsys.readouterr().out.split())


# Tensor parallelism -------------------------------------------------------------------


def test_tensor_parallel_must_divide_the_heads_of_a_configured_model():
    tp = ["model.sharding=fsdp_tp", "model.tensor_parallel=4"]
    message = config_error(*tp, "model.num_heads=4", "model.num_kv_heads=2")
    assert "model.tensor_parallel=4" in message and "model.num_kv_heads=2" in message
    assert "tensor_parallel=2" in message  # the largest value that divides both
    assert "model.num_heads=6" in config_error(*tp, "model.num_heads=6", "model.num_kv_heads=2")
    load_config(None, [*BASE, *tp, "model.num_heads=8", "model.num_kv_heads=4"])  # divides both


def test_trainer_refuses_tensor_parallel_that_does_not_divide_the_kv_heads():
    """Today the key/value kernels would be replicated on every device without a word."""
    strategy = kithara.ShardingStrategy("fsdp_tp", tensor_parallel=4)
    model = tiny_model(num_heads=4, num_kv_heads=2, sharding=strategy)
    with pytest.raises(ValueError, match=r"tensor_parallel=4 .*2 key/value heads") as caught:
        kithara.Trainer(model, train_dataloader=loader(), steps=1, progress_bar=False)
    assert "tensor_parallel=2" in str(caught.value)


# Evaluation settings without evaluation data ------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "args.eval_steps=5",
        "args.eval_strategy=epoch",
        "args.max_eval_samples=8",
        "args.per_device_eval_batch_size=2",
    ],
)
def test_eval_settings_without_an_eval_file_are_refused(override):
    message = config_error(override)
    assert override.split("=")[0] in message and "data.eval_file" in message
    load_config(None, [*BASE, override, "data.eval_file=eval.jsonl"])  # with eval data: fine


def test_eval_settings_for_cycle_accept_side_b_eval_data():
    cycle = ["objective=cycle", "data.train_file_b=b.txt", "args.eval_steps=5"]
    assert "data.eval_file" in config_error(*cycle)
    load_config(None, [*BASE, *cycle, "data.eval_file_b=eval_b.jsonl"])


# Batches that do not split over the mesh ----------------------------------------------


def test_a_batch_that_does_not_split_over_the_mesh_is_refused_at_set_up(model):
    """A loader built for 3 devices on the 8-device mesh: JAX's IndivisibleError at the first
    step before; now the constructor names the loader, the sizes and the fix."""
    with pytest.raises(ValueError, match=r"train_dataloader.* 3 rows .* 8 ") as caught:
        kithara.Trainer(model, train_dataloader=loader(num_devices=3), steps=1, progress_bar=False)
    assert "num_devices" in str(caught.value)
    with pytest.raises(ValueError, match=r"eval_dataloader.* 6 rows"):
        kithara.Trainer(
            model,
            train_dataloader=loader(),
            eval_dataloader=loader(2, num_devices=3),
            steps=1,
            progress_bar=False,
        )


# Tokenizer larger than the model's vocabulary -----------------------------------------

ROWS = [{"prompt": "hi", "completion": "hello"}, {"prompt": "how are you", "completion": "fine thanks"}] * 8


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    """Ids past the embedding table train into NaN at step 1; refused naming both sizes."""
    small = tiny_model(vocab_size=8)
    with pytest.raises(ValueError, match=r"19 .*vocabulary of 8") as caught:
        kithara.SFTTrainer(small, train_dataset=ROWS, processing_class=word_tokenizer(), max_steps=1, max_length=8)
    assert "vocab_size" in str(caught.value)


def test_iterative_sft_and_cycle_refuse_a_tokenizer_larger_than_the_vocabulary():
    with pytest.raises(ValueError, match=r"19 ids .*vocabulary of 8"):
        kithara.IterativeSFTTrainer(tiny_model(vocab_size=8), tokenizer=word_tokenizer(), max_length=8)
    texts = ["hi how are you"] * 4
    models = {"A": tiny_model(vocab_size=32), "B": tiny_model(vocab_size=8)}
    with pytest.raises(ValueError, match=r"19 ids .*vocabulary of 8"):
        kithara.CycleTrainer(models, word_tokenizer(), train_dataset_A=texts, train_dataset_B=texts,
                             batch_size_per_side=2, max_length=8, max_new_tokens=4, max_steps=1)  # fmt: skip


def test_cli_model_vocab_size_smaller_than_the_tokenizer_is_refused():
    config = load_config(None, [*BASE, "model.vocab_size=8"])
    with pytest.raises(ValueError, match=r"model.vocab_size=8 .* 19 "):
        build_model(config, vocab_size=19)


# DPO loss types ----------------------------------------------------------------------


def test_dpo_list_of_loss_types_is_the_weighted_sum_by_hand():
    rng = np.random.default_rng(0)
    c, r, c0, r0 = (rng.normal(-20, 5, 4) for _ in range(4))
    p = dpo_losses.PairLogps(*map(jax.numpy.asarray, (c, r, c0, r0, np.full(4, 4.0), np.full(4, 4.0))))
    config = kithara.DPOConfig(beta=0.2, loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 0.5])
    h = 0.2 * ((c - c0) - (r - r0))
    by_hand = np.log1p(np.exp(-h)) + 0.5 * np.maximum(0.0, 1 - h)
    combined = dpo_losses.combined_loss(p, config.loss_weight_map(), 0.2, 0.0)
    np.testing.assert_allclose(combined, by_hand, rtol=1e-5)
    # The registry's own entry point takes TRL's list too (it raised "'list' has no attribute 'items'").
    weights = dpo_losses.loss_weights(["sigmoid", "hinge"], beta=0.2, label_smoothing=0.0)
    assert weights == {"sigmoid": 1.0, "hinge": 1.0}
    with pytest.raises(ValueError, match=r"loss_type must be a loss name .*got 3"):
        dpo_losses.loss_weights(3, beta=0.2, label_smoothing=0.0)  # type: ignore[arg-type]


# Callbacks ---------------------------------------------------------------------------


def test_transformers_hook_names_with_a_kithara_equivalent_are_called(model):
    seen = []

    class OnEvaluate(kithara.Callback):
        def on_evaluate(self, info):  # transformers' name of on_eval_end
            seen.append(("evaluate", info.step, sorted(info.metrics)[0]))

    trainer = kithara.Trainer(
        model, train_dataloader=loader(), eval_dataloader=loader(), steps=1, callbacks=[OnEvaluate()]
    )
    trainer.evaluate()
    assert seen == [("evaluate", 0, "loss")]


@pytest.mark.parametrize(
    ("method", "hint"),
    [
        ("on_log", "on_step_end"),
        ("on_save", "Checkpointer"),
        ("on_epoch_end", "info.epoch"),
        ("on_step_ned", "on_step_end"),  # a misspelling
        ("on_batch_end", "on_step_end"),  # Keras' name
    ],
)
def test_unknown_hooks_are_refused_at_construction(model, method, hint):
    callback = type("Mine", (kithara.Callback,), {method: lambda self, info: None})()
    with pytest.raises(TypeError, match=rf"Mine\.{method} .*never call") as caught:
        kithara.Trainer(model, train_dataloader=loader(), steps=1, callbacks=[callback])
    message = str(caught.value)
    assert hint in message and "on_train_begin, on_step_end, on_eval_end, on_train_end" in message


def test_a_hook_under_both_names_is_refused(model):
    class Both(kithara.Callback):
        def on_evaluate(self, info):
            pass

        def on_eval_end(self, info):
            pass

    with pytest.raises(TypeError, match="both on_evaluate and on_eval_end"):
        kithara.Trainer(model, train_dataloader=loader(), steps=1, callbacks=[Both()])


def test_a_transformers_signature_is_refused_naming_the_method(model):
    class HFStyle(kithara.Callback):
        def on_evaluate(self, args, state, control, **kwargs):
            pass

    with pytest.raises(TypeError, match=r"HFStyle\.on_evaluate takes 4 arguments.*def on_evaluate\(self, info\)"):
        kithara.Trainer(model, train_dataloader=loader(), steps=1, callbacks=[HFStyle()])


def test_request_stop_in_an_unsynced_step_end_stops_after_the_next_step(model):
    """docs/trainer.md: on_step_end(k) runs while step k + 1 is already dispatched, so a stop
    requested there ends training after step k + 1 (the synced case, which stops after step k
    exactly, is tests/test_objective_contract.py::test_callbacks_see_step_info_and_can_stop_training)."""

    class StopAtTwo(kithara.Callback):
        def on_step_end(self, info):
            if info.step == 2:
                info.request_stop()

    trainer = kithara.Trainer(
        model, kithara.optimizers.adamw(1e-3), loader(), steps=6, progress_bar=False, callbacks=[StopAtTwo()]
    )
    assert [h["step"] for h in trainer.train()] == [1, 2, 3]
    assert trainer.state.global_step == 3


# Multi-process start-up --------------------------------------------------------------


def test_initialize_names_the_timeout_before_it_waits(monkeypatch, caplog):
    """A process that never joins leaves the others waiting initialization_timeout seconds, after
    which JAX aborts with DEADLINE_EXCEEDED; the log line before the wait names the setting."""
    calls = []
    monkeypatch.setattr(runtime, "_backends_started", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    with caplog.at_level(logging.INFO, logger=runtime.__name__):
        distributed_lib.initialize(
            "10.0.0.1:1234", 4, 1, timeouts=distributed_lib.DistributedTimeouts(initialization=60)
        )
    assert calls and calls[0]["initialization_timeout"] == 60
    text = caplog.text
    assert "60 s" in text and "distributed.initialization_timeout" in text and "4 processes" in text
