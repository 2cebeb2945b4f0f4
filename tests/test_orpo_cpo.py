"""Reference-free preference trainers (ORPO, CPO, SimPO, AlphaPO): each loss against a hand formula
and TRL 1.16.0's own methods (``trl/experimental/orpo/orpo_trainer.py``, ``cpo/cpo_trainer.py``,
called on bare instances), the whole loss against TRL on transformers' logits of the same
weights, the configs, and a tiny learning run. torch / trl import lazily."""

from __future__ import annotations

import dataclasses
import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_model, word_tokenizer
from test_objective_contract import base_private_names, self_attributes_assigned

import kithara
from kithara.data import PreferenceDataset
from kithara.objectives import ref_free_losses as rf
from kithara.objectives.cpo import CPOTrainer
from kithara.objectives.orpo import ORPOTrainer
from kithara.objectives.pairwise import PairwiseTrainer
from kithara.objectives.preference_configs import CPOConfig, ORPOConfig

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# Per-token mean log-probs on both sides of log1mexp's branch point (-ln 2), and summed ones.
MEAN_C = np.array([-0.05, -0.4, -1.2, -2.3, -0.69, -3.1], np.float32)
MEAN_R = np.array([-0.3, -0.9, -1.0, -2.9, -0.2, -3.0], np.float32)
SUM_C = np.array([-4.5, -12.0, -7.25, -20.0, -3.0, -9.5], np.float32)
SUM_R = np.array([-6.0, -11.0, -9.5, -26.0, -2.5, -14.0], np.float32)


class FakeAccelerator:
    device = "cpu"

    def gather_for_metrics(self, x):
        return x


def bare(cls, **attributes):
    """A TRL trainer instance without its __init__: only the attributes its loss code reads."""
    trainer = cls.__new__(cls)
    trainer.__dict__.update(accelerator=FakeAccelerator(), is_encoder_decoder=False, aux_loss_enabled=False)
    trainer.__dict__.update(attributes)
    return trainer


@pytest.fixture(scope="module")
def trl():
    pytest.importorskip("torch")
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOConfig as TRLCPOConfig
    from trl.experimental.cpo import CPOTrainer as TRLCPOTrainer
    from trl.experimental.orpo import ORPOConfig as TRLORPOConfig
    from trl.experimental.orpo import ORPOTrainer as TRLORPOTrainer

    return dict(orpo=TRLORPOTrainer, cpo=TRLCPOTrainer, orpo_config=TRLORPOConfig, cpo_config=TRLCPOConfig)


# --- the loss functions ----------------------------------------------------------------------------------------


def test_odds_ratio_loss_matches_hand_formula_and_a_stored_value():
    c, r = MEAN_C.astype(np.float64), MEAN_R.astype(np.float64)
    log_odds = np.log(np.exp(c) / (1 - np.exp(c))) - np.log(np.exp(r) / (1 - np.exp(r)))
    loss, got_log_odds = rf.odds_ratio_loss(jnp.asarray(MEAN_C), jnp.asarray(MEAN_R), 0.1)
    np.testing.assert_allclose(got_log_odds, log_odds, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.1 * np.log1p(np.exp(-log_odds)), rtol=1e-6)
    assert float(loss.mean()) == pytest.approx(0.0691946666, rel=1e-6)


def test_log1mexp_is_exact_and_has_finite_gradients_on_both_branches():
    x = jnp.asarray([-30.0, -2.0, -0.6931472, -0.5, -1e-3, -1e-6])
    x64 = np.asarray(x, np.float64)  # float64, with the formula that is exact on each side
    np.testing.assert_allclose(rf.log1mexp(x), np.where(x64 < -0.5, np.log1p(-np.exp(x64)), np.log(-np.expm1(x64))),
                               rtol=1e-6)  # fmt: skip
    grads = jax.grad(lambda v: rf.log1mexp(v).sum())(x)
    assert np.isfinite(grads).all()
    # A memorised completion (mean log-prob 0 in float32) keeps the ORPO loss and gradient finite.
    zero = jnp.asarray([0.0, -0.5])
    loss, grad = jax.value_and_grad(lambda c: rf.odds_ratio_loss(c, jnp.asarray([-1.0, -1.0]), 0.1)[0].sum())(zero)
    assert np.isfinite(loss) and np.isfinite(grad).all()


@pytest.mark.parametrize("loss_type", sorted(rf.CPO_LOSSES))
@pytest.mark.parametrize("alpha", [0.0, 0.25])
def test_cpo_losses_match_hand_formulas(loss_type, alpha):
    averaged = loss_type in rf.AVERAGED_LOSSES
    c, r = (MEAN_C, MEAN_R) if averaged else (SUM_C / 10, SUM_R / 10)
    b, e, g = 2.0, (0.1 if loss_type in rf.SMOOTHED_LOSSES else 0.0), 0.7
    reward = (lambda x: (1 - np.exp(x) ** -alpha) / alpha) if alpha else (lambda x: x)
    h = reward(c.astype(np.float64)) - reward(r.astype(np.float64))
    ls = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
    expected = {
        "sigmoid": -(1 - e) * ls(b * h) - e * ls(-b * h),
        "hinge": np.maximum(0.0, 1 - b * h),
        "ipo": (h - 1 / (2 * b)) ** 2,
        "simpo": -(1 - e) * ls(b * h - g) - e * ls(-(b * h - g)),
    }[loss_type]
    losses, rc, rr = rf.cpo_loss(jnp.asarray(c), jnp.asarray(r), loss_type, beta=b, label_smoothing=e,
                                 simpo_gamma=g, alpha=alpha)  # fmt: skip
    np.testing.assert_allclose(losses, expected, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(rc) - np.asarray(rr), b * h, rtol=1e-5)


def test_odds_ratio_loss_matches_trl(trl):
    import torch

    trainer = bare(trl["orpo"], beta=0.25)
    losses, chosen_rewards, rejected_rewards, ratio, log_odds = trainer.odds_ratio_loss(
        torch.tensor(MEAN_C), torch.tensor(MEAN_R)
    )
    loss, got_log_odds = rf.odds_ratio_loss(jnp.asarray(MEAN_C), jnp.asarray(MEAN_R), 0.25)
    np.testing.assert_allclose(loss, -losses.numpy(), rtol=1e-6)  # TRL subtracts beta * log sigmoid
    np.testing.assert_allclose(float(got_log_odds.mean()), log_odds.item(), rtol=1e-6)
    np.testing.assert_allclose(float(rf.ls(got_log_odds).mean()), ratio.item(), rtol=1e-6)
    np.testing.assert_allclose(chosen_rewards.numpy(), 0.25 * MEAN_C, rtol=1e-6)  # ORPOTrainer: beta * logps
    np.testing.assert_allclose(rejected_rewards.numpy(), 0.25 * MEAN_R, rtol=1e-6)


@pytest.mark.parametrize(
    "loss_type, alpha, smoothing",
    [("sigmoid", 0.0, 0.0), ("sigmoid", 0.0, 0.2), ("sigmoid", 0.3, 0.1), ("hinge", 0.0, 0.0), ("hinge", -0.2, 0.0),
     ("ipo", 0.0, 0.0), ("ipo", 0.5, 0.0), ("simpo", 0.0, 0.0), ("simpo", 0.0, 0.15), ("simpo", 0.25, 0.0)],
)  # fmt: skip
def test_cpo_loss_matches_trl(trl, loss_type, alpha, smoothing):
    """Both in float64: a reward difference or ``1 - beta * h`` cancels digits, and float32 would
    measure that rounding, not the formulas."""
    import torch

    beta, gamma = 2.5, 0.8
    c, r = (MEAN_C, MEAN_R) if loss_type in rf.AVERAGED_LOSSES else (SUM_C / 10, SUM_R / 10)
    c, r = c.astype(np.float64), r.astype(np.float64)
    trainer = bare(trl["cpo"], loss_type=loss_type, beta=beta, label_smoothing=smoothing, simpo_gamma=gamma,
                   alpha=alpha)  # fmt: skip
    want, want_c, want_r = trainer.cpo_loss(torch.tensor(c), torch.tensor(r))
    with jax.enable_x64(True):
        got, got_c, got_r = rf.cpo_loss(jnp.asarray(c), jnp.asarray(r), loss_type, beta=beta,
                                        label_smoothing=smoothing, simpo_gamma=gamma, alpha=alpha)  # fmt: skip
        assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    np.testing.assert_allclose(got_c, want_c.numpy(), rtol=1e-6)
    np.testing.assert_allclose(got_r, want_r.numpy(), rtol=1e-6)


# --- configs ---------------------------------------------------------------------------------------------------


def test_configs_take_trls_names_and_defaults(trl):
    import transformers

    for ours, theirs in ((ORPOConfig, trl["orpo_config"]), (CPOConfig, trl["cpo_config"])):
        trl_defaults = {f.name: f.default for f in dataclasses.fields(theirs)}
        own = {n for n in ours.field_names() if n not in kithara.TrainingConfig.field_names()} - {"truncation_mode"}
        assert own <= set(trl_defaults), own - set(trl_defaults)
        for name in (*own, "learning_rate", "logging_steps"):
            assert ours.defaults()[name] == trl_defaults[name], name
        # Every option TRL adds to transformers' TrainingArguments is a field here or refused with a reason.
        training_arguments = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
        trl_own = set(trl_defaults) - training_arguments
        assert not trl_own - set(ours.field_names()) - set(ours.unsupported_arguments), theirs


def test_alphapo_is_simpo_without_nll_and_bad_settings_are_refused():
    config = CPOConfig(loss_type="alphapo", alpha=0.25)
    assert (config.loss_type, config.cpo_alpha, config.alpha, config.averages_logps) == ("simpo", 0.0, 0.25, True)
    with pytest.raises(ValueError, match="would be overwritten"):
        CPOConfig(loss_type="alphapo", cpo_alpha=0.5)
    with pytest.raises(ValueError, match="Unknown CPO loss"):
        CPOConfig(loss_type="sigmoid_norm")
    with pytest.raises(ValueError, match=r"label_smoothing=0\.1 would be ignored"):
        CPOConfig(loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"simpo_gamma=1\.0 would be ignored"):
        CPOConfig(loss_type="sigmoid", simpo_gamma=1.0)
    with pytest.raises(ValueError, match="beta must be a positive"):
        ORPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="cpo_alpha must be >= 0"):
        CPOConfig(cpo_alpha=-1.0)
    with pytest.raises(ValueError, match="max_length=None"):
        ORPOConfig(max_length=None)
    with pytest.raises(TypeError, match="'disable_dropout' is not supported: kithara builds"):
        ORPOConfig(disable_dropout=True)


# --- trainers --------------------------------------------------------------------------------------------------

ROWS = [
    {"prompt": p, "chosen": c, "rejected": r}
    for p, c, r in [
        ("how are you", "fine thanks", "bye"),
        ("hi", "hello", "bye bye ok"),
        ("hello", "hi how are you", "ok"),
        ("bye", "bye", "hello hello"),
        ("are you fine", "fine thanks you", "ok bye"),
        ("user", "hello", "ok ok ok"),
        ("thanks", "ok", "bye"),
        ("how", "are you", "fine"),
    ]
]
ARCH = dict(vocab_size=131, intermediate_dim=37, tie_word_embeddings=False)


def loader(rows=ROWS, per_device=1, **kwargs):
    return kithara.Dataloader(PreferenceDataset(rows, word_tokenizer(), max_length=12), per_device, seed=0,
                              num_devices=8, **kwargs)  # fmt: skip


def test_refuses_a_reference_model_and_non_preference_data():
    model = tiny_model(**ARCH)
    with pytest.raises(ValueError, match="reference-free and takes no reference model"):
        ORPOTrainer(model, model, loader())
    with pytest.raises(TypeError, match="'ref_model' is not supported: this objective is reference-free"):
        CPOTrainer(model, train_dataloader=loader(), ref_model=model)
    with pytest.raises(TypeError, match="'precompute_ref_log_probs' is not supported"):
        ORPOTrainer(model, train_dataloader=loader(), precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="needs train_dataloader or train_dataset"):
        ORPOTrainer(model)
    with pytest.raises(ValueError, match="config both as its second argument and as args="):
        ORPOTrainer(model, ORPOConfig(), loader(), args=ORPOConfig())
    rows = [{"prompt": "hi", "completion": "hello"}] * 8
    sft = kithara.Dataloader(kithara.data.PromptCompletionDataset(rows, word_tokenizer(), max_length=8), 1)
    with pytest.raises(ValueError, match="ORPOTrainer needs preference data in train_dataloader"):
        ORPOTrainer(model, train_dataloader=sft)


def test_simpo_with_gradient_accumulation_equals_one_large_batch():
    """Without the NLL term (``cpo_alpha=0``) the loss is a mean over pairs, so micro-batches
    combine exactly. (With it, each micro-batch's NLL is its own token mean, as in TRL.)"""

    def run(per_device, accumulation):
        model = tiny_model(**ARCH)
        settings = dict(loss_type="simpo", cpo_alpha=0.0, beta=2.0, gradient_accumulation_steps=accumulation)
        trainer = CPOTrainer(
            model, optax.sgd(0.5), loader(ROWS * 2, per_device), steps=1, disable_tqdm=True, **settings
        )
        return trainer.train()[0], model.variables.trainable

    (big, big_vars), (acc, acc_vars) = run(2, 1), run(1, 2)
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert acc[key] == pytest.approx(big[key], rel=1e-5), key
    for path, value in big_vars.items():
        np.testing.assert_allclose(np.asarray(acc_vars[path]), np.asarray(value), rtol=1e-5, atol=1e-7)


def test_objectives_use_only_the_public_hooks():
    private = base_private_names()
    for cls in (ORPOTrainer, CPOTrainer, PairwiseTrainer):
        assert not {n for n in vars(cls) if n in private}, cls
        assert not self_attributes_assigned(inspect.getsource(inspect.getmodule(cls))) & private, cls


def trl_batch(batch):
    """TRL's tokenized pair columns for the same sequences as a kithara batch: whole rows of ids
    (kithara's inputs plus the last label), prompt labels -100, right-padded."""
    import torch

    out = {}
    for side in ("chosen", "rejected"):
        ids, valid = np.asarray(batch[f"{side}_token_ids"]), np.asarray(batch[f"{side}_padding_mask"]).astype(bool)
        labels, mask = np.asarray(batch[f"{side}_labels"]), np.asarray(batch[f"{side}_label_mask"]).astype(bool)
        n = valid.sum(1)
        width = int(n.max()) + 1
        rows = np.zeros((len(n), width), np.int64)
        trl_labels = np.full((len(n), width), -100, np.int64)
        attention = np.zeros((len(n), width), np.int64)
        for i, k in enumerate(n):
            rows[i, : k + 1] = [*ids[i, :k], labels[i, k - 1]]
            trl_labels[i, 1 : k + 1] = np.where(mask[i, :k], labels[i, :k], -100)
            attention[i, : k + 1] = 1
        out |= {f"{side}_input_ids": rows, f"{side}_attention_mask": attention, f"{side}_labels": trl_labels}
    return {k: torch.tensor(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def same_weights(tmp_path_factory):
    """(kithara model, the same weights in transformers, one batch of 8 pairs of varied lengths)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = tiny_model(**ARCH)
    # Larger output weights than initialisation's: log-probs further from uniform, pairs ordered both ways.
    variables = model.variables
    trainable = dict(variables.trainable)
    trainable["token_embedding/reverse_embeddings"] = trainable["token_embedding/reverse_embeddings"] * 12.0
    model.variables = kithara.ModelVariables(trainable, variables.non_trainable)
    path = tmp_path_factory.mktemp("orpo_cpo_hf")
    model.save_in_hf_format(str(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = {k: jnp.asarray(v) for k, v in next(iter(loader().epoch(0))).items()}
    return model, hf, batch


def kithara_loss(trainer, model, batch):
    out, _ = jax.jit(trainer.compute_loss)(model.variables, batch, jax.random.key(0), None)
    return float(out.total / out.weight), {k: float(v / out.weight) for k, v in out.sums.items()}


def check_metrics(got, want, skip=("logits/chosen", "logits/rejected")):
    for key, value in want.items():
        if key not in skip:
            assert got[key] == pytest.approx(float(value), rel=2e-5, abs=1e-6), key


def test_orpo_loss_equals_trl_on_transformers_logits(trl, same_weights):
    import torch

    model, hf, batch = same_weights
    trainer = ORPOTrainer(model, optax.sgd(0.0), loader(), beta=0.3, disable_tqdm=True)
    loss, metrics = kithara_loss(trainer, model, batch)
    stand_in = bare(trl["orpo"], beta=0.3, padding_value=0)
    with torch.no_grad():
        want, want_metrics = stand_in.get_batch_loss_metrics(hf, trl_batch(batch))
    assert loss == pytest.approx(want.item(), rel=1e-5)
    check_metrics(metrics, want_metrics)
    assert set(want_metrics) <= set(metrics)


@pytest.mark.parametrize(
    "settings",
    [dict(loss_type="sigmoid", beta=0.2), dict(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.4),
     dict(loss_type="alphapo", alpha=0.3, beta=2.0), dict(loss_type="ipo", beta=0.5, cpo_alpha=0.5)],
    ids=lambda s: s["loss_type"],
)  # fmt: skip
def test_cpo_loss_equals_trl_on_transformers_logits(trl, same_weights, settings):
    import torch

    model, hf, batch = same_weights
    config = CPOConfig(disable_tqdm=True, **settings)
    trainer = CPOTrainer(model, optax.sgd(0.0), loader(), args=config)
    loss, metrics = kithara_loss(trainer, model, batch)
    fields = ("loss_type", "beta", "label_smoothing", "cpo_alpha", "simpo_gamma", "alpha")
    stand_in = bare(trl["cpo"], pad_token_id=0, **{f: getattr(config, f) for f in fields})
    with torch.no_grad():
        want, want_metrics = stand_in.get_batch_loss_metrics(hf, trl_batch(batch))
    assert loss == pytest.approx(want.item(), rel=1e-5)
    # TRL logs nll_loss 0 when cpo_alpha is 0 (it skips computing it); kithara logs the NLL.
    check_metrics(
        metrics, want_metrics, skip=("logits/chosen", "logits/rejected", *(["nll_loss"] * (not config.cpo_alpha)))
    )


# --- learning --------------------------------------------------------------------------------------------------

# The chosen answer ends with "thanks", the rejected one with "bye"; held-out pairs have prompts
# and first words the training pairs never show.
WORDS = ["hi", "hello", "how", "are", "you", "fine", "ok", "user", "assistant", "system"]
TRAIN = [{"prompt": f"{a} {b}", "chosen": f"{c} thanks", "rejected": f"{c} bye"}
         for a, b, c in zip(WORDS[:6] * 3, WORDS[2:8] * 3, WORDS[:6] * 2 + WORDS[3:9], strict=True)]  # fmt: skip
HELD_OUT = [{"prompt": f"{a} {b}", "chosen": f"{c} thanks", "rejected": f"{c} bye"}
            for a, b, c in [("system", "tool", "tool"), ("tool", "system", "system"), ("assistant", "ok", "tool"),
                            ("fine", "system", "assistant"), ("tool", "hi", "ok"), ("ok", "tool", "how"),
                            ("system", "are", "system"), ("assistant", "tool", "fine")]]  # fmt: skip


@pytest.mark.parametrize(
    "cls, settings",
    [(ORPOTrainer, dict(beta=0.5)), (CPOTrainer, dict(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5))],
    ids=["orpo", "simpo"],
)
def test_training_raises_the_held_out_preference(cls, settings):
    model = tiny_model(**ARCH) if cls is ORPOTrainer else tiny_model("qwen3", head_dim=12, **ARCH)
    trainer = cls(model, kithara.optimizers.adamw(3e-3), loader(TRAIN),
                  eval_dataloader=loader(HELD_OUT), steps=12, disable_tqdm=True, **settings)  # fmt: skip
    before = trainer.evaluate()
    history = trainer.train()
    after = trainer.evaluate()
    assert after["rewards/margins"] > before["rewards/margins"] + 0.05, (before, after)
    assert after["rewards/accuracies"] >= 0.75 and after["rewards/accuracies"] > before["rewards/accuracies"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert trainer.compilations["train_step"] == 1 and trainer.compilations["eval_step"] == 1
