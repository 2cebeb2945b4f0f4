"""Host offload (``offload_optimizer`` / ``offload_params``): the offloaded leaves stay in
pinned host memory between steps, the step compiles once and gives bit-identical losses and
weights, checkpoints resume in both directions, and evaluation, sampling (GRPO) and
callbacks (BEMA, TR-DPO reference sync, completion logging) read the weights as before."""

import types

import jax
import numpy as np
import pytest
from conftest import pattern_examples, tiny_model, word_tokenizer
from rl_worker import make_trainer as grpo_trainer
from rl_worker import summary

import kithara
from kithara.callbacks.bema import BEMACallback
from kithara.data import PreferenceDataset
from kithara.trainer import offload

STEPS = 3
EXAMPLES = pattern_examples(48, length=13, vocab=61)
MODELS = {
    "f32": dict(family="llama3", vocab_size=61),
    # Mixed precision: float32 master weights; LoRA: only the adapters are trainable.
    "mixed_lora": dict(
        family="qwen3",
        vocab_size=61,
        head_dim=12,
        tie_word_embeddings=False,
        precision="mixed_bfloat16",
        lora=kithara.LoraConfig(rank=2, targets=("query", "value")),
    ),
}


def sft(model_key, **fields):
    spec = dict(MODELS[model_key])
    model = tiny_model(spec.pop("family"), **spec)
    loader = kithara.Dataloader(EXAMPLES, 1, seed=0)
    held_out = kithara.Dataloader(EXAMPLES[:16], 2, shuffle=False)
    return kithara.Trainer(
        model, kithara.optimizers.adamw(1e-2), loader, eval_dataloader=held_out, progress_bar=False, **fields
    )


def host(tree):
    return {p: np.asarray(v) for p, v in tree.items()}


def memory_kinds(tree):
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """Per model: losses, final trainable weights and eval history of a run without offload
    (the float32 one also saves a checkpoint at step 2, in ``checkpoints``)."""
    out = {}
    for key in MODELS:
        where = str(tmp_path_factory.mktemp("plain")) if key == "f32" else None
        trainer = sft(key, steps=STEPS, eval_steps_interval=STEPS, output_dir=where, save_steps=2)
        history = trainer.train()
        out[key] = ([h["loss"] for h in history], host(trainer.model.variables.trainable), trainer.eval_history)
        out["checkpoints"] = out.get("checkpoints") or where
    return out


class StateKinds(kithara.Callback):
    """Records the memory kinds of the trainer's own state after every step."""

    def __init__(self):
        self.trainer, self.seen = None, []

    def needs_sync(self, step):
        return True

    def on_step_end(self, info):
        state = self.trainer.train_state
        self.seen.append((memory_kinds(state.model.trainable), memory_kinds(state.opt_state)))
        assert memory_kinds(info.state.model.trainable) == {"device"}  # callbacks read device copies


@pytest.mark.parametrize(
    "model_key, fields",
    [
        ("f32", dict(offload_optimizer=True)),
        ("f32", dict(offload_params=True)),
        ("mixed_lora", dict(offload_optimizer=True, offload_params=True)),
    ],
)
def test_offload_is_bit_identical_and_stays_on_host(baselines, model_key, fields):
    trainer = sft(model_key, steps=STEPS, eval_steps_interval=STEPS, **fields)
    kinds = StateKinds()
    kinds.trainer = trainer
    trainer.add_callback(kinds)
    history = trainer.train()
    losses, weights, evals = baselines[model_key]
    np.testing.assert_array_equal([h["loss"] for h in history], losses)
    assert trainer.eval_history == evals
    got = host(trainer.model.variables.trainable)
    for path in weights:
        np.testing.assert_array_equal(got[path], weights[path], err_msg=path)
    assert trainer.compilations["train_step"] == 1 and trainer.compilations["eval_step"] == 1
    params = {"pinned_host"} if fields.get("offload_params") else {"device"}
    opt = {"pinned_host"} if fields.get("offload_optimizer") else {"device"}
    assert kinds.seen == [(params, opt)] * STEPS
    state = trainer.train_state
    # Frozen weights (LoRA's base), the step and the rng stay in device memory.
    assert memory_kinds([state.model.non_trainable, state.step, state.rng]) <= {"device"}
    if model_key == "mixed_lora":
        assert {x.dtype for x in state.model.trainable.values()} == {np.dtype("float32")}
        assert len(state.model.non_trainable) > len(state.model.trainable)
    # The handed-back model and evaluation read device memory.
    assert memory_kinds(trainer.model.variables) == {"device"}
    assert trainer.evaluate()["loss"] == pytest.approx(evals[-1]["loss"], rel=1e-6)
    # In the compiled step, the offloaded arguments and results are laid out in host memory.
    batch = next(trainer.batches(0, None))[1]
    layout = trainer.lower_train_step(state, batch).compile().as_text().split("entry_computation_layout=")[1]
    assert ("S(5)" in layout.split("\n")[0]) == bool(fields)


def test_checkpoints_resume_exactly_across_offload(baselines, tmp_path):
    """A checkpoint saved without offload resumes with it, and one saved with it resumes
    without: step 3 and the final weights equal the straight run's."""
    both = dict(offload_params=True, offload_optimizer=True)
    offloaded = sft("f32", steps=STEPS, output_dir=str(tmp_path), save_steps=2, **both)
    np.testing.assert_array_equal([h["loss"] for h in offloaded.train()], baselines["f32"][0])
    sources = {"plain": baselines["checkpoints"], "offloaded": str(tmp_path)}
    for saved, fields in (("plain", both), ("offloaded", {})):
        resumed = sft("f32", steps=STEPS, **fields)
        history = resumed.train(resume_from_checkpoint=f"{sources[saved]}/checkpoints/2")
        assert resumed.restored_step == 2 and [h["step"] for h in history] == [3]
        assert history[0]["loss"] == baselines["f32"][0][2], saved
        weights, got = baselines["f32"][1], host(resumed.model.variables.trainable)
        for path in weights:
            np.testing.assert_array_equal(got[path], weights[path], err_msg=f"{saved} {path}")
        expected = {"pinned_host"} if fields else {"device"}
        assert memory_kinds(resumed.train_state.opt_state) == expected
        assert memory_kinds(resumed.train_state.model.trainable) == expected


@pytest.mark.slow
def test_grpo_with_offload_samples_scores_and_logs_like_without():
    """Rollouts sample and score with the offloaded weights (copied to device memory);
    the run repeats the one without offload exactly."""
    plain = summary(grpo_trainer(2).train())
    trainer = grpo_trainer(2, offload_optimizer=True, offload_params=True, log_completions=True)
    assert summary(trainer.train()) == plain
    assert trainer.compilations["train_step"] == 1
    assert memory_kinds(trainer.train_state.model.trainable) == {"pinned_host"}


ROWS = [
    {"prompt": "hi how", "chosen": "fine thanks", "rejected": "bye"},
    {"prompt": "hello", "chosen": "ok ok", "rejected": "you are"},
]


@pytest.mark.slow
def test_dpo_with_reference_sync_and_bema_matches_without_offload():
    """SyncRef mixes the policy (read from the offloaded state) into the device reference;
    BEMA keeps its buffers in host memory; both give what they give without offload."""

    def run(**fields):
        loader = kithara.Dataloader(PreferenceDataset(ROWS * 8, word_tokenizer(), max_length=12), 1, seed=0)
        bema = BEMACallback(update_freq=1, device="host")
        trainer = kithara.DPOTrainer(tiny_model(), kithara.optimizers.adamw(3e-2), loader, steps=STEPS,
                                     progress_bar=False, sync_ref_model=True, ref_model_sync_steps=2,
                                     ref_model_mixup_alpha=0.6, callbacks=[bema], **fields)  # fmt: skip
        history = [h["loss"] for h in trainer.train()]
        return history, host(trainer.frozen.trainable), host(bema.averaged_trainable), trainer

    losses, reference, averaged, _ = run()
    got_losses, got_reference, got_averaged, trainer = run(offload_params=True, offload_optimizer=True)
    np.testing.assert_array_equal(got_losses, losses)
    for path in reference:
        np.testing.assert_array_equal(got_reference[path], reference[path], err_msg=path)
        np.testing.assert_array_equal(got_averaged[path], averaged[path], err_msg=path)
    assert trainer.compilations["train_step"] == 1


def test_backend_without_host_memory_is_refused():
    memory = types.SimpleNamespace(kind="device")
    device = types.SimpleNamespace(platform="neuron", device_kind="Trn1", addressable_memories=lambda: [memory])
    mesh = types.SimpleNamespace(local_devices=[device])
    with pytest.raises(ValueError, match=r"offload_params=True.*'neuron' backend.*\['device'\]"):
        offload.check_supported(mesh, offload_optimizer=False, offload_params=True)
    offload.check_supported(mesh, offload_optimizer=False, offload_params=False)  # nothing asked: fine
    cpu = jax.devices()[0]
    assert {m.kind for m in cpu.addressable_memories()} >= {"device", "pinned_host"}


def test_model_variables_stay_readable_until_the_first_step():
    """With offload_params the state's weights move to host at train begin; the model's own device
    arrays stay readable for callbacks at train begin (a generate there), and are released by the
    first step, as its donation releases them without offload."""

    class GenerateAtBegin(kithara.Callback):
        def __init__(self):
            self.trainer, self.generated, self.deleted_after_step = None, None, None

        def on_train_begin(self, info):
            self.generated = self.trainer.model.generate([[5, 9, 2]], max_new_tokens=2)

        def needs_sync(self, step):
            return True

        def on_step_end(self, info):
            if self.deleted_after_step is None:
                self.deleted_after_step = all(x.is_deleted() for x in starting)

    model = tiny_model("llama3", vocab_size=61)
    expected = model.generate([[5, 9, 2]], max_new_tokens=2)
    starting = list(model.variables.trainable.values())
    probe = GenerateAtBegin()
    trainer = kithara.Trainer(
        model,
        kithara.optimizers.adamw(1e-2),
        kithara.Dataloader(EXAMPLES[:8], 1, seed=0),
        steps=2,
        offload_params=True,
        progress_bar=False,
        callbacks=[probe],
    )
    probe.trainer = trainer
    trainer.train()
    assert probe.generated == expected
    assert probe.deleted_after_step is True
