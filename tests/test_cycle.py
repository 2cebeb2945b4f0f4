"""CycleTrainer: one side trained per update, labels on the original text only, both modes
end to end, TensorBoard per side, exact resume, and the adapter mode's weight memory."""

import os

import jax
import numpy as np
import pytest
from conftest import WORDS, W, tiny_model, word_tokenizer, xla_flags

import kithara
from kithara.models import adapters
from kithara.objectives.cycle_models import TwoAdapters

rng = np.random.default_rng(0)
TEXTS_A = [" ".join(rng.choice(WORDS[4:8], 3)) for _ in range(16)]
TEXTS_B = [" ".join(rng.choice(WORDS[8:], 3)) for _ in range(16)]
PAIRS_A = list(zip(TEXTS_A[:4], TEXTS_B[:4], strict=True))
PAIRS_B = list(zip(TEXTS_B[:4], TEXTS_A[:4], strict=True))


def make_trainer(models, steps=2, **kwargs):
    options = dict(
        optimizer=kithara.optimizers.adamw(1e-2),
        steps=steps,
        batch_size_per_side=8,
        max_length=16,
        max_new_tokens=4,
        progress_bar=False,
    )
    return kithara.CycleTrainer(
        models=models, tokenizers=word_tokenizer(), train_dataset_A=TEXTS_A, train_dataset_B=TEXTS_B,
        **{**options, **kwargs},
    )  # fmt: skip


def host(tree):
    return jax.tree.map(np.asarray, tree)


def lora_model(seed=1):
    return tiny_model(seed=seed, vocab_size=32, lora=kithara.LoraConfig(rank=2))


def test_labels_cover_only_the_original_text():
    trainer = make_trainer(lora_model())
    ((ids, supervised),) = trainer.prepare_cycle_inputs(["hi hello"], ["fine thanks"], "A")
    # "=" is not in the word vocabulary, so the separator encodes as [UNK].
    assert ids == [W["<s>"], W["hi"], W["hello"], W["[UNK]"], W["fine"], W["thanks"], W["</s>"]]
    arrays = host(trainer._rows_to_arrays([(ids, supervised)]))
    assert arrays["label_mask"].sum() == 3  # the other rows are padding
    supervised_labels = arrays["labels"][0][arrays["label_mask"][0]]
    assert supervised_labels.tolist() == [W["fine"], W["thanks"], W["</s>"]]


@pytest.mark.parametrize("mode", ["adapters", "two_models"])
def test_a_side_update_changes_only_that_side(mode):
    if mode == "adapters":
        trainer = make_trainer(lora_model())
    else:
        trainer = make_trainer(
            {"A": tiny_model(seed=1, vocab_size=32), "B": tiny_model("qwen3", head_dim=8, seed=2, vocab_size=32)}
        )
    state = trainer.init_state()
    before = host(state)
    batch = trainer._rows_to_arrays(trainer.prepare_cycle_inputs(TEXTS_A[:8], TEXTS_B[:8], "A"))
    after = host(trainer.jitted_train_step(state, {"A": {k: v[None] for k, v in batch.items()}})[0])
    for path, value in before.model.trainable.items():
        changed = not np.array_equal(value, after.model.trainable[path])
        if path.startswith("B/"):
            assert not changed, path
    assert any(
        not np.array_equal(v, after.model.trainable[p]) for p, v in before.model.trainable.items() if p.startswith("A/")
    )
    jax.tree.map(np.testing.assert_array_equal, before.model.non_trainable, after.model.non_trainable)
    jax.tree.map(np.testing.assert_array_equal, before.opt_state["B"], after.opt_state["B"])
    assert int(after.step) == int(before.step)  # the step counts after side B


def test_cycle_step_trains_each_side_on_the_other_sides_translation():
    class Recording(kithara.CycleTrainer):
        def prepare_cycle_inputs(self, sources, targets, side):
            self.seen.append((side, list(sources), list(targets)))
            return super().prepare_cycle_inputs(sources, targets, side)

    model = lora_model()
    trainer = Recording(
        models=model, tokenizers=word_tokenizer(), train_dataset_A=TEXTS_A, train_dataset_B=TEXTS_B,
        optimizer=kithara.optimizers.adamw(1e-2), steps=1, batch_size_per_side=8, max_length=16, max_new_tokens=4,
        progress_bar=False,
    )  # fmt: skip
    trainer.seen = []
    state = trainer.init_state()
    expected_b = trainer.translate(state.model, "B", list(next(trainer.batches(0, None))[1]["B"]), seed=0)
    trainer.train()
    (side1, sources1, targets1), (side2, _, targets2) = trainer.seen
    assert (side1, side2) == ("A", "B")
    assert set(targets1) <= set(TEXTS_B) and set(targets2) <= set(TEXTS_A)
    assert sources1 == expected_b  # model B's translation (before any update) is A's input


def test_adapter_mode_end_to_end_with_tensorboard_and_one_base(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = lora_model()
    base_before = host(model.variables.non_trainable)
    trainer = make_trainer(
        model, steps=2, eval_dataset_A=PAIRS_A, eval_dataset_B=TEXTS_B[:8], eval_steps_interval=2,
        tensorboard_dir=str(tmp_path / "tb"),
        compute_metrics=lambda side, src, gen, ref: {"exact": np.mean([g == r for g, r in zip(gen, ref, strict=True)])},
    )  # fmt: skip
    history = trainer.train()
    assert {"loss_A", "loss_B", "learning_rate_A", "learning_rate_B"} <= set(history[-1])
    # Every translation (train and eval) shared one decode program; each side's update compiled once.
    assert model.generate_compilations == 1
    assert trainer.compilations["train_step"] == 2  # one program per side
    assert set(trainer.eval_history[-1]) >= {"loss_A", "cycle_loss_A", "exact_A"}
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/loss_A", "train/loss_B", "train/learning_rate_B", "eval/loss_A"} <= set(events.Tags()["scalars"])
    # One base (unchanged) plus two adapters that now differ.
    pair = trainer.pair
    assert isinstance(pair, TwoAdapters)
    jax.tree.map(np.testing.assert_array_equal, base_before, host(model.variables.non_trainable))
    a, b = host(pair.adapter("A")), host(pair.adapter("B"))
    assert any(not np.array_equal(a[p], b[p]) for p in a)
    lora = sum(v.size for v in a.values())
    assert pair.num_params == model.num_params + lora
    # Switching to adapter B for generation copies nothing and leaves the model on A.
    with_b = adapters.with_adapter(model.variables, pair.adapter("B"))
    assert all(with_b.non_trainable[p] is v for p, v in model.variables.non_trainable.items())
    model.generate([[1, 2]], max_new_tokens=2, variables=with_b)
    jax.tree.map(np.testing.assert_array_equal, a, host(adapters.adapter_set(model.variables)))


def test_two_models_of_different_families_and_tokenizers_end_to_end():
    models = {"A": tiny_model("gemma", head_dim=8, seed=3, vocab_size=32), "B": tiny_model(seed=4, vocab_size=32)}
    trainer = kithara.CycleTrainer(
        models=models, tokenizers={"A": word_tokenizer(), "B": word_tokenizer(bos=False)},
        train_dataset_A=TEXTS_A, train_dataset_B=TEXTS_B, eval_dataset_B=PAIRS_B,
        optimizer={"A": kithara.optimizers.adamw(1e-2), "B": kithara.optimizers.adamw(3e-3)},
        steps=2, batch_size_per_side=8, max_length=16, max_new_tokens=4, progress_bar=False,
    )  # fmt: skip
    before = host(models["A"].variables.trainable)
    history = trainer.train()
    assert history[-1]["learning_rate_B"] == pytest.approx(3e-3)
    assert np.isfinite(history[-1]["loss_A"]) and np.isfinite(history[-1]["loss_B"])
    after = host(models["A"].variables.trainable)  # train() hands the variables back
    assert any(not np.array_equal(before[p], after[p]) for p in before)
    assert set(trainer.evaluate()) == {"loss_B"}  # pairs only on the B side, no plain texts


def test_resume_is_exact(tmp_path):
    straight = make_trainer(lora_model(), steps=4)
    straight.train()
    first = make_trainer(
        lora_model(), steps=2, checkpointer=kithara.Checkpointer(str(tmp_path / "ckpt"), save_interval=2)
    )
    first.train()
    resumed = make_trainer(
        lora_model(), steps=4, checkpointer=kithara.Checkpointer(str(tmp_path / "ckpt"), save_interval=2)
    )
    resumed.train()
    assert resumed.restored_step == 2
    jax.tree.map(np.testing.assert_array_equal, host(straight.train_state), host(resumed.train_state))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[2:]]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--lora", "4"]], ids=["two_models", "adapters"])
def test_cipher_example_runs_at_tiny_size(extra):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    env["XLA_FLAGS"] = xla_flags()  # the documented run uses the default devices
    command = [sys.executable, str(root / "examples" / "cycle_cipher.py"), "--tiny", *extra]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=root, env=env).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "training" not in line]
    names = [r.split(" | ")[0] for r in rows]
    assert names == ["| warm start (32 pairs)", "| + 6 cycle steps", "| supervised on 1000 pairs"]
