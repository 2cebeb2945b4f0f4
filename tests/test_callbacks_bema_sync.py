"""The Trainer's callback API (add/pop_callback, assigning frozen variables), BEMACallback
against its formula (numpy, and TRL's own code), and SyncRefModelCallback (TR-DPO) against
``ref <- alpha * policy + (1 - alpha) * ref`` after tau and 2 tau steps."""

import json
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_model, word_tokenizer

import kithara
from kithara.callbacks.bema import BEMACallback
from kithara.callbacks.sync_ref import SyncRefModelCallback
from kithara.data import PreferenceDataset

STEPS = 10
BEMA_SETTINGS: dict[str, dict[str, Any]] = {
    # snapshot at step 3, updates at 5, 7, 9; buffers in pinned host memory
    "burn_in": dict(update_freq=2, update_after=3, lag=5, multiplier=2.0, ema_power=0.5, bias_power=0.3, device="host"),
    # updates at 3, 6, 9; the EMA weight's floor binds from step 6 on
    "floor": dict(update_freq=3, lag=1, min_ema_multiplier=0.4, device="device"),
    # TRL's defaults (update_freq=400): no update in 10 steps, so the starting weights
    "defaults": dict(device="cpu"),
}


def host(tree):
    return {p: np.asarray(v, np.float64) for p, v in tree.items()}


def buffers(tree):
    return {s.data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards}


class Recorder(kithara.Callback):
    """Copies the trainable variables (and the trainer's frozen ones) after every step."""

    def __init__(self, trainer=None):
        self.trainer, self.params, self.frozen = trainer, {}, {}

    def needs_sync(self, step):
        return True

    def on_train_begin(self, info):
        self.on_step_end(info)

    def on_step_end(self, info):
        self.params[info.step] = host(info.state.model.trainable)
        if self.trainer is not None:
            self.frozen[info.step] = host(self.trainer.frozen.trainable)


def bema_formula(params, steps, update_freq=400, ema_power=0.5, bias_power=0.2, lag=10, update_after=0,
                 multiplier=1.0, min_ema_multiplier=0.0, **_):  # fmt: skip
    """BEMA as the paper / TRL define it, in float64 numpy, over recorded weights."""
    theta0 = ema = weights = params[0]
    for t in range(1, steps + 1):
        if t == update_after:
            theta0 = ema = params[t]
        elif t > update_after and (t - update_after) % update_freq == 0:
            beta = max((lag + multiplier * t) ** -ema_power, min_ema_multiplier)
            alpha = (lag + multiplier * t) ** -bias_power
            ema = {p: (1 - beta) * ema[p] + beta * params[t][p] for p in ema}
            weights = {p: ema[p] + alpha * (params[t][p] - theta0[p]) for p in ema}
    return weights


@pytest.fixture(scope="module")
def bema_run(examples):
    model = tiny_model()
    loader = kithara.Dataloader(examples[:64], per_device_batch_size=1, seed=0)
    eval_loader = kithara.Dataloader(examples[64:80], per_device_batch_size=1, shuffle=False)
    trainer = kithara.Trainer(model, kithara.optimizers.adamw(3e-2), loader, eval_dataloader=eval_loader,
                              steps=STEPS, progress_bar=False, eval_steps_interval=100)  # fmt: skip
    callbacks = {name: BEMACallback(**kw) for name, kw in BEMA_SETTINGS.items()}
    recorder = Recorder()
    for cb in (*callbacks.values(), recorder):
        trainer.add_callback(cb)
    trainer.train()
    return trainer, callbacks, recorder


def test_bema_matches_its_formula_over_steps(bema_run):
    trainer, callbacks, recorder = bema_run
    assert trainer.compilations["train_step"] == 1
    assert callbacks["burn_in"].last_update_step == 9 and callbacks["floor"].last_update_step == 9
    assert callbacks["defaults"].last_update_step is None
    moved = max(np.abs(recorder.params[STEPS][p] - recorder.params[0][p]).max() for p in recorder.params[0])
    assert moved > 1e-2  # the weights did move, so the average is not trivially the start
    for name, cb in callbacks.items():
        expected = bema_formula(recorder.params, STEPS, **BEMA_SETTINGS[name])
        got = host(cb.averaged_trainable)
        for path in expected:
            np.testing.assert_allclose(got[path], expected[path], rtol=1e-6, atol=1e-8, err_msg=f"{name} {path}")
    # The floor binds: beta at step 9 is max(10 ** -0.5, 0.4) = 0.4, not 0.316.
    assert callbacks["floor"].ema_beta(9) == 0.4
    # The buffers are sharded like the variables (over the 8 test devices), in host or device memory.
    shardings = trainer.model.variable_shardings.trainable
    assert any(not s.is_fully_replicated for s in shardings.values())
    for cb in callbacks.values():
        assert all(v.sharding.spec == shardings[p].spec for p, v in cb.averaged_trainable.items())
    assert {v.sharding.memory_kind for v in callbacks["burn_in"].averaged_trainable.values()} == {"pinned_host"}
    assert {v.sharding.memory_kind for v in callbacks["floor"].averaged_trainable.values()} == {"device"}


def test_bema_weights_evaluate_and_save_without_touching_the_model(bema_run, tmp_path):
    from safetensors.numpy import load_file

    trainer, callbacks, recorder = bema_run
    bema = callbacks["burn_in"]
    variables = bema.averaged_variables(trainer)
    shardings = trainer.model.variable_shardings.trainable
    assert all(v.sharding == shardings[p] for p, v in variables.trainable.items())  # device memory, sharded
    own = trainer.eval_metrics(trainer.model.variables)
    averaged = bema.evaluate(trainer)
    assert averaged["loss"] != pytest.approx(own["loss"], rel=1e-4)
    assert averaged == trainer.eval_metrics(variables)
    bema.save(tmp_path / "bema", trainer)
    trained = host(trainer.model.variables.trainable)
    for path, value in recorder.params[STEPS].items():  # the model keeps its trained weights
        np.testing.assert_array_equal(trained[path], value)
    config = json.loads((tmp_path / "bema" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    tensors = load_file(tmp_path / "bema" / "model.safetensors")
    embedding = next(p for p in variables.trainable if p.endswith("token_embedding/embeddings"))
    np.testing.assert_array_equal(tensors["model.embed_tokens.weight"], np.asarray(variables.trainable[embedding]))


@pytest.mark.slow
def test_bema_matches_trl_code(bema_run):
    """TRL's BEMACallback, run on torch tensors set to the same recorded weights."""
    torch = pytest.importorskip("torch")
    trl_callbacks = pytest.importorskip("trl.trainer.callbacks")
    _, callbacks, recorder = bema_run
    paths = sorted(recorder.params[0])
    for name, settings in BEMA_SETTINGS.items():
        trl = trl_callbacks.BEMACallback(**{k: v for k, v in settings.items() if k != "device"})
        start = [torch.tensor(recorder.params[0][p], dtype=torch.float32) for p in paths]
        trl.thetat_params = [t.clone() for t in start]
        trl.theta0_params, trl.ema_params = [t.clone() for t in start], [t.clone() for t in start]
        trl.running_model = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in start])
        for step in range(1, STEPS + 1):
            for param, path in zip(trl.thetat_params, paths, strict=True):
                param.copy_(torch.tensor(recorder.params[step][path], dtype=torch.float32))
            trl.on_step_end(None, types.SimpleNamespace(global_step=step), None, model=None)
        got = host(callbacks[name].averaged_trainable)
        for param, path in zip(trl.running_model.parameters(), paths, strict=True):
            np.testing.assert_allclose(got[path], param.detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(update_freq=0), "update_freq must be an int >= 1"),
        (dict(update_after=-1), "update_after must be an int >= 0"),
        (dict(ema_power=-0.5), "ema_power must be >= 0"),
        (dict(multiplier=0), "multiplier must be > 0"),
        (dict(min_ema_multiplier=2), r"min_ema_multiplier must be in \[0, 1\]"),
        (dict(device="cuda"), "device must be 'host'"),
        (dict(lag=0, multiplier=0.1, update_freq=2), "EMA weight would exceed 1"),
    ],
)
def test_bema_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BEMACallback(**kwargs)
    with pytest.raises(RuntimeError, match="no weights yet"):
        _ = BEMACallback().averaged_trainable


# The Trainer's callback API -------------------------------------------------------------


class OnLog(kithara.Callback):
    def on_log(self, info):
        pass


class AddsDuringTraining(kithara.Callback):
    def __init__(self, trainer):
        self.trainer, self.errors = trainer, []

    def on_train_begin(self, info):
        for call in (lambda: self.trainer.add_callback(kithara.Callback()), lambda: self.trainer.pop_callback(self)):
            try:
                call()
            except RuntimeError as error:
                self.errors.append(str(error))


def test_add_pop_and_remove_callbacks(examples, tmp_path):
    loader = kithara.Dataloader(examples[:16], per_device_batch_size=1, seed=0)
    trainer = kithara.Trainer(tiny_model(), kithara.optimizers.adamw(1e-3), loader, steps=1, progress_bar=False)
    before = list(trainer.callbacks)
    with pytest.raises(TypeError, match="on_log is not a callback hook"):
        trainer.add_callback(OnLog())
    assert trainer.callbacks == before
    trainer.add_callback(BEMACallback)  # a class is built with no arguments
    assert isinstance(trainer.callbacks[-1], BEMACallback)
    checkpointer = kithara.Checkpointer(str(tmp_path / "a"), 10)
    trainer.add_callback(checkpointer)
    assert trainer.checkpointer is checkpointer
    with pytest.raises(ValueError, match="already has a Checkpointer"):
        trainer.add_callback(kithara.Checkpointer(str(tmp_path / "b"), 10))
    assert trainer.pop_callback(kithara.Checkpointer) is checkpointer and trainer.checkpointer is None
    assert trainer.pop_callback(checkpointer) is None
    trainer.remove_callback(BEMACallback)
    assert trainer.callbacks == before
    adds = AddsDuringTraining(trainer)
    trainer.add_callback(adds)
    trainer.train()
    assert len(adds.errors) == 2 and all("while train() runs" in e for e in adds.errors)
    assert trainer.callbacks == [*before, adds]
    with pytest.raises(ValueError, match="already holds one"):  # a state exists: nothing left to restore
        trainer.add_callback(kithara.Checkpointer(str(tmp_path / "c"), 10))


# Frozen variables and TR-DPO --------------------------------------------------------------

ROWS = [
    {"prompt": p, "chosen": c, "rejected": r}
    for p, c, r in [
        ("how are you", "fine thanks", "bye"),
        ("hi", "hello", "bye bye"),
        ("hello", "hi how are you", "ok"),
        ("bye", "bye", "hello hello"),
    ]
    * 4
]
TAU, ALPHA = 2, 0.6


def dpo(model=None, **kwargs):
    loader = kithara.Dataloader(PreferenceDataset(ROWS, word_tokenizer(), max_length=12), 1, seed=0, num_devices=8)
    kwargs = {"steps": 2 * TAU + 1, "progress_bar": False, **kwargs}
    return kithara.DPOTrainer(model or tiny_model(), kithara.optimizers.adamw(3e-2), loader, **kwargs)


def test_frozen_setter_checks_and_places():
    trainer = dpo()
    current = trainer.frozen
    path = next(iter(current.trainable))
    with pytest.raises(ValueError, match=r"missing \.trainable\['"):
        trainer.frozen = kithara.ModelVariables({}, current.non_trainable)
    wrong = dict(current.trainable, **{path: jnp.zeros((3,), current.trainable[path].dtype)})
    with pytest.raises(ValueError, match=rf"Frozen variable \.trainable\['{path}'\]: got float32\[3\]"):
        trainer.frozen = kithara.ModelVariables(wrong, current.non_trainable)
    wrong = dict(current.trainable, **{path: current.trainable[path].astype(jnp.bfloat16)})
    with pytest.raises(ValueError, match="got bfloat16"):
        trainer.frozen = kithara.ModelVariables(wrong, current.non_trainable)
    halved = jax.tree.map(lambda x: np.asarray(x) * 0.5, current)  # host arrays are placed
    trainer.frozen = halved
    for new, old in zip(jax.tree.leaves(trainer.frozen), jax.tree.leaves(current), strict=True):
        assert new.sharding == old.sharding
    np.testing.assert_array_equal(trainer.frozen.trainable[path], np.asarray(current.trainable[path]) * 0.5)
    # Arrays of the train state (donated by the next step) are copied, others are used as they are.
    trainer.train_state = trainer.init_state()
    trainer.frozen = trainer.train_state.model
    assert buffers(trainer.frozen).isdisjoint(buffers(trainer.train_state))
    kept = jax.tree.map(jnp.copy, trainer.frozen)
    trainer.frozen = kept
    assert buffers(trainer.frozen) == buffers(kept)
    with pytest.raises(ValueError, match="passes no frozen variables"):
        dpo(tiny_model(lora=kithara.LoraConfig(rank=2, targets=("query",)))).frozen = current


def mixed(policy, ref, alpha, bound=0.0):
    """``alpha * policy + (1 - alpha) * ref`` exactly (float64), and how far float32 math may land
    from it: the callback rounds alpha and 1 - alpha to float32, each product and the sum (or
    fuses a multiply-add), so within 4 * 2**-24 of the terms' magnitudes; an earlier mix's own
    distance ``bound`` carries over scaled by 1 - alpha. Where the terms cancel, that is far
    more than the result's own ulp; elsewhere it is tighter than rtol 1e-6."""
    terms = np.abs(alpha * policy) + np.abs((1 - alpha) * ref)
    return alpha * policy + (1 - alpha) * ref, (1 - alpha) * bound + 4 * 2.0**-24 * terms


def assert_within(got, want, bound, message):
    excess = np.abs(got - want) - bound
    assert (excess <= 0).all(), f"{message}: {int((excess > 0).sum())} entries off, worst {excess.max():.3g} over"


def test_sync_ref_model_follows_the_tr_dpo_formula_without_recompiling():
    trainer = dpo(sync_ref_model=True, ref_model_mixup_alpha=ALPHA, ref_model_sync_steps=TAU)
    sync = trainer.callbacks[-1]
    assert isinstance(sync, SyncRefModelCallback) and (sync.alpha, sync.sync_steps) == (ALPHA, TAU)
    recorder = Recorder(trainer)
    trainer.pop_callback(sync)
    trainer.add_callback(recorder)
    trainer.add_callback(sync)  # after the recorder: it sees each step's reference before the sync
    history = trainer.train()
    params, frozen = recorder.params, recorder.frozen
    ref, bound = dict(params[0]), dict.fromkeys(params[0], 0.0)  # the starting weights, exactly
    for step in range(1, 2 * TAU + 2):
        for path in ref:  # the reference the step after `step - 1` trained against
            assert_within(frozen[step][path], ref[path], bound[path], f"step {step}, {path}")
        if step % TAU == 0:
            for p in ref:
                ref[p], bound[p] = mixed(params[step][p], ref[p], ALPHA, bound[p])
    final = host(trainer.frozen.trainable)
    for path in ref:
        assert_within(final[path], ref[path], bound[path], path)
    assert not np.allclose(final[path], params[0][path])
    assert sync.synced_steps == [TAU, 2 * TAU]
    assert trainer.compilations["train_step"] == 1 and sync.compilations == 1
    # Up to the first sync the run equals one without it; the step after uses the new reference.
    plain = dpo().train()
    for mine, theirs in zip(history[:TAU], plain[:TAU], strict=True):  # steps 1..tau
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
    assert history[TAU]["rewards/margins"] != pytest.approx(plain[TAU]["rewards/margins"], rel=1e-3)  # step tau+1


def test_sync_ref_model_keeps_a_ref_model_in_step():
    ref_model = tiny_model()
    trainer = dpo(ref_model=ref_model, steps=TAU, sync_ref_model=True, ref_model_sync_steps=TAU)
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()
    got = host(ref_model.variables.trainable)
    for path, start in recorder.params[0].items():
        expected, bound = mixed(recorder.params[TAU][path], start, ALPHA)
        assert_within(got[path], expected, bound, path)
        np.testing.assert_array_equal(got[path], np.asarray(trainer.frozen.trainable[path]))


def test_sync_ref_model_refuses_what_cannot_work():
    lora = kithara.LoraConfig(rank=2, targets=("query",))
    with pytest.raises(ValueError, match="sync_ref_model=True with a LoRA model"):
        dpo(tiny_model(lora=lora), sync_ref_model=True)
    with pytest.raises(ValueError, match="precomputed log-probs assume a fixed reference"):
        dpo(sync_ref_model=True, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="ref_model_sync_steps set but sync_ref_model=False"):
        dpo(ref_model_sync_steps=4)
    with pytest.raises(ValueError, match=r"ref_model_mixup_alpha must be in \[0, 1\]"):
        kithara.DPOConfig(sync_ref_model=True, ref_model_mixup_alpha=1.5)
    with pytest.raises(ValueError, match="no frozen reference"):
        SyncRefModelCallback(dpo(tiny_model(lora=lora)))
    other = tiny_model(hidden_dim=16, intermediate_dim=32)
    with pytest.raises(ValueError, match="The reference does not match the policy"):
        dpo(ref_model=other, sync_ref_model=True)


def check_synced(trainer, sync, recorder, steps):
    """The reference after ``steps`` equals the TR-DPO formula over the recorded policies."""
    ref = {p: np.asarray(v, np.float64) for p, v in recorder.frozen[0].items()}
    for step in range(1, steps + 1):
        if step % sync.sync_steps == 0:
            ref = {p: sync.alpha * recorder.params[step][p] + (1 - sync.alpha) * ref[p] for p in ref}
    final = host(trainer.frozen.trainable)
    for path in ref:
        np.testing.assert_allclose(final[path], ref[path], rtol=1e-6, atol=1e-9, err_msg=path)
    assert max(np.abs(final[p] - recorder.frozen[0][p]).max() for p in ref) > 1e-4  # it did move


class PolicyRecorder(Recorder):
    """Records the policy's own variables (``policy_variables``) and the reference at the start."""

    def on_step_end(self, info):
        select = getattr(self.trainer, "policy_variables", lambda variables: variables)
        self.params[info.step] = host(select(info.state.model).trainable)
        if info.step == 0:
            self.frozen[0] = host(self.trainer.frozen.trainable)


def test_sync_ref_callback_works_for_kto():
    """KTOConfig's TR-DPO fields (TRL has them) add the callback, as DPOConfig's do."""
    from test_kto_bco import ROWS as KTO_ROWS
    from test_kto_bco import tiny

    trainer = kithara.KTOTrainer(
        tiny(), train_dataset=KTO_ROWS * 2, processing_class=word_tokenizer(), max_length=10, max_steps=3,
        per_device_train_batch_size=1, learning_rate=1e-2, progress_bar=False,
        sync_ref_model=True, ref_model_mixup_alpha=0.3, ref_model_sync_steps=1,
    )  # fmt: skip
    sync = trainer.callbacks[-1]
    assert isinstance(sync, SyncRefModelCallback) and (sync.alpha, sync.sync_steps) == (0.3, 1)
    recorder = PolicyRecorder(trainer)
    trainer.pop_callback(sync)
    for cb in (recorder, sync):  # the recorder first: it sees each step's reference before the sync
        trainer.add_callback(cb)
    trainer.train()
    check_synced(trainer, sync, recorder, 3)
    assert sync.synced_steps == [1, 2, 3] and trainer.compilations["train_step"] == 1


def test_rollout_configs_sync_the_reference_as_trl_grpo_and_rloo_do():
    from rl_worker import PROMPTS, target_share

    rows = [{"prompt": p} for p in PROMPTS]
    settings = dict(num_generations=2, per_device_train_batch_size=2, max_prompt_length=8, max_completion_length=4)
    trainer = kithara.GRPOTrainer(
        tiny_model(), target_share, train_dataset=rows, processing_class=word_tokenizer(),
        args=kithara.GRPOConfig(beta=0.1, sync_ref_model=True, ref_model_sync_steps=7, **settings),
    )  # fmt: skip
    sync = trainer.callbacks[-1]
    assert isinstance(sync, SyncRefModelCallback) and (sync.alpha, sync.sync_steps) == (0.6, 7)

    class First(kithara.judges.BasePairwiseJudge):
        def judge(self, prompts, completions, shuffle_order=True):
            return [0] * len(prompts)

    online = kithara.OnlineDPOTrainer(
        tiny_model(), judge=First(), train_dataset=rows, processing_class=word_tokenizer(),
        args=kithara.OnlineDPOConfig(per_device_train_batch_size=1, max_new_tokens=4, max_length=12,
                                     sync_ref_model=True, ref_model_sync_steps=3),
    )  # fmt: skip
    assert isinstance(online.callbacks[-1], SyncRefModelCallback) and online.callbacks[-1].sync_steps == 3
    with pytest.raises(ValueError, match="sync_ref_model=True with beta=0"):
        kithara.RLOOConfig(beta=0.0, sync_ref_model=True)
    with pytest.raises(ValueError, match="ref_model_mixup_alpha set but sync_ref_model=False"):
        kithara.GRPOConfig(beta=0.1, ref_model_mixup_alpha=0.5)
    with pytest.raises(ValueError, match="no frozen reference"):
        kithara.GRPOTrainer(
            tiny_model(lora=kithara.LoraConfig(rank=2, targets=("query",))), target_share, train_dataset=rows,
            processing_class=word_tokenizer(), args=kithara.GRPOConfig(beta=0.1, sync_ref_model=True, **settings),
        )  # fmt: skip


@pytest.mark.slow
def test_sync_ref_callback_mixes_only_the_policy_of_ppo():
    """PPO trains a policy and a value head together; its reference is a copy of the policy."""
    from test_ppo import make_ppo

    trainer = make_ppo(3)
    recorder = PolicyRecorder(trainer)
    sync = SyncRefModelCallback(trainer, ref_model_mixup_alpha=0.5, ref_model_sync_steps=1)
    for cb in (recorder, sync):
        trainer.add_callback(cb)
    trainer.train()
    check_synced(trainer, sync, recorder, 3)
