"""KTO and BCO: unpaired data and KL rows, the losses against TRL's code, the trainers end to
end against TRL on transformers, learning, and BCO's running moments across a resume."""

import json
import types
from collections import defaultdict

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import W, tiny_model, word_tokenizer

import kithara
from kithara import sharding as sharding_lib
from kithara.data.sources import RowError
from kithara.data.unpaired import UnpairedPreferenceDataset
from kithara.objectives import unpaired_losses
from kithara.objectives.bco import BCOTrainer
from kithara.objectives.kto import KTOTrainer
from kithara.objectives.unpaired_configs import BCOConfig, KTOConfig

sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
ls = lambda x: -np.log1p(np.exp(-x))  # noqa: E731

ROWS = [
    {"prompt": "hi how", "completion": " are you", "label": True},
    {"prompt": "hello", "completion": " bye", "label": False},
    {"prompt": "ok", "completion": " fine thanks", "label": True},
    {"prompt": "hi", "completion": " ok ok", "label": False},
]
# A learnable preference: after "how are you" answer "fine thanks", never "bye".
GOOD, BAD = " fine thanks", " bye bye"
PROMPTS = ["hi how are you", "hello how are you", "how are you", "ok how are you", "user how are you",
           "hi hello how are you", "system how are you", "tool how are you"]  # fmt: skip


def fixed_vector():
    rng = np.random.default_rng(0)
    policy, ref = rng.normal(-20, 4, 8), rng.normal(-20, 4, 8)
    kl_policy, kl_ref = rng.normal(-25, 4, 8), rng.normal(-26, 4, 8)
    label = np.asarray([True, False, True, True, False, False, True, False])
    return policy, ref, kl_policy, kl_ref, label


# Data ------------------------------------------------------------------------------------


def test_unpaired_rows_and_trls_kl_rotation():
    ds = UnpairedPreferenceDataset(ROWS + ROWS[:1], word_tokenizer(), max_length=16, kl_batch_size=2)
    examples = [ds[i] for i in range(len(ds))]
    assert [bool(e["label"]) for e in examples] == [True, False, True, False, True]
    # TRL: within each batch of kl_batch_size rows, completions rotate by one (the last row
    # of an odd tail pairs with itself, as TRL's rotation of a one-row batch does).
    completion = lambda e, p="": e[f"{p}labels"][e[f"{p}label_mask"]].tolist()  # noqa: E731
    for i, partner in enumerate([1, 0, 3, 2, 4]):
        assert completion(examples[i], "kl_") == completion(examples[partner])
        prompt = examples[i]["token_ids"][~examples[i]["label_mask"]][:1]
        assert examples[i]["kl_token_ids"][0] == prompt[0]
    assert examples[0]["token_ids"].tolist() == [1, W["hi"], W["how"], W["are"], W["you"]]
    assert completion(examples[0]) == [W["are"], W["you"], W["</s>"]]


def test_paired_rows_are_unpaired_into_mixed_mismatched_neighbours():
    pairs = [
        {"prompt": "hi", "chosen": " fine", "rejected": " bye"},
        {"prompt": "ok", "chosen": " ok", "rejected": " thanks"},
        {"prompt": "how", "chosen": " are", "rejected": " you"},
    ]
    ds = UnpairedPreferenceDataset(pairs, word_tokenizer(), max_length=8, kl_batch_size=2)
    assert len(ds) == 6 and ds.sequences == ("", "kl_")
    got = [(int(ds[i]["token_ids"][1]), bool(ds[i]["label"]), int(ds[i]["labels"][1])) for i in range(6)]
    # Every answer once, with its own prompt and label; labels alternate along the rows.
    assert got == [
        (W["hi"], True, W["fine"]), (W["ok"], False, W["thanks"]), (W["how"], True, W["are"]),
        (W["hi"], False, W["bye"]), (W["ok"], True, W["ok"]), (W["how"], False, W["you"]),
    ]  # fmt: skip
    for i in range(6):  # each KL row pairs the prompt with another prompt's completion
        partner = ds.kl_partner(i)
        assert ds.locate(partner)[0] != ds.locate(i)[0]
        assert ds[i]["kl_labels"][1] == ds[partner]["labels"][1]


def test_conversational_rows_go_through_the_chat_template():
    tok = word_tokenizer()
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}],
             "label": label} for p, c, label in [("hi", "fine", True), ("how", "bye", False)]]  # fmt: skip
    example = UnpairedPreferenceDataset(rows, tok, max_length=32, kl_batch_size=2)[0]
    prompt_ids, _ = tok.encode_chat(rows[0]["prompt"], add_generation_prompt=True)
    full_ids, _ = tok.encode_chat(rows[0]["prompt"] + rows[0]["completion"])
    assert example["token_ids"].tolist() + example["labels"][-1:].tolist() == full_ids
    assert example["label_mask"].sum() == len(full_ids) - len(prompt_ids)
    assert W["bye"] in example["kl_labels"][example["kl_label_mask"]]


def test_malformed_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "feedback.jsonl"
    rows = [ROWS[0], {"prompt": "hi", "completion": " ok", "label": "yes"}, {"prompt": "hi", "label": True}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = UnpairedPreferenceDataset(str(path), word_tokenizer(), max_length=8)
    with pytest.raises(RowError, match=r"feedback.jsonl:2.*'label'.*expected a bool"):
        ds[1]
    with pytest.raises(RowError, match=r"feedback.jsonl:3.*'completion'.*missing"):
        ds[2]
    with pytest.raises(ValueError, match="kl_batch_size must be an int >= 2"):
        UnpairedPreferenceDataset(ROWS, word_tokenizer(), max_length=8, kl_batch_size=1)


# Losses against TRL ----------------------------------------------------------------------


class FakeFusedModel:
    """Stands in for a transformers model with TRL's fused LM head: returns the given summed
    log-prob of each row (as the first position's per-token log-prob) for its input ids."""

    def __init__(self, by_input):
        self.by_input = by_input

    def __call__(self, input_ids, labels=None, fused_lm_head=False, **kwargs):
        values = self.by_input[input_ids.data_ptr()]
        log_probs = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.float64)
        log_probs[:, 0] = torch.as_tensor(values)
        return types.SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                                     mean_logits=torch.zeros_like(log_probs))  # fmt: skip


def trl_kto_standin(loss_type, beta, dw, uw, model, ref_model=None, precompute=True):
    from trl.trainer.kto_trainer import KTOTrainer as TRLKTOTrainer

    standin = types.SimpleNamespace(
        model=model, ref_model=ref_model, beta=beta, desirable_weight=dw, undesirable_weight=uw, loss_type=loss_type,
        calculate_KL=loss_type == "kto", precompute_ref_logps=precompute, aux_loss_enabled=False, _tp_size=1,
        _total_train_tokens=0, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        accelerator=types.SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, unwrap_model=lambda m: m),
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
    )  # fmt: skip
    standin._compute_kl_logps = types.MethodType(TRLKTOTrainer._compute_kl_logps, standin)
    return standin, TRLKTOTrainer._compute_loss


def trl_kto(loss_type, beta, dw, uw, policy, ref, kl_policy, kl_ref, label):
    n = len(policy)
    batch = {k: torch.ones(n, 4, dtype=torch.long) for k in ("input_ids", "attention_mask", "completion_mask",
             "KL_input_ids", "KL_attention_mask", "KL_completion_mask")}  # fmt: skip
    batch.update(label=torch.as_tensor(label), ref_logps=torch.as_tensor(ref), ref_KL_logps=torch.as_tensor(kl_ref))
    fake = FakeFusedModel({batch["input_ids"].data_ptr(): policy, batch["KL_input_ids"].data_ptr(): kl_policy})
    standin, compute = trl_kto_standin(loss_type, beta, dw, uw, types.SimpleNamespace(training=True))
    loss = compute(standin, fake, batch, return_outputs=False)
    return float(loss), standin._metrics["train"]


def kithara_kto(loss_type, beta, dw, uw, policy, ref, kl_policy, kl_ref, label, valid=None):
    valid = np.ones(len(policy), bool) if valid is None else valid
    kl = unpaired_losses.kl_estimate(jnp.asarray(kl_policy), jnp.asarray(kl_ref), jnp.asarray(valid))
    if loss_type != "kto":
        kl = jnp.zeros(())
    per_row = unpaired_losses.kto_loss(jnp.asarray(policy - ref), jnp.asarray(label), kl, beta=beta,
                                       desirable_weight=dw, undesirable_weight=uw, loss_type=loss_type)  # fmt: skip
    return float(jnp.where(valid, per_row, 0).sum() / valid.sum()), float(kl)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("shift", [0.0, 3.0])  # 3.0: a positive KL estimate (not clamped)
def test_kto_loss_matches_trls_compute_loss(loss_type, shift):
    policy, ref, kl_policy, kl_ref, label = fixed_vector()
    kl_policy = kl_policy + shift
    expected, metrics = trl_kto(loss_type, 0.1, 1.0, 1.33, policy, ref, kl_policy, kl_ref, label)
    got, kl = kithara_kto(loss_type, 0.1, 1.0, 1.33, policy, ref, kl_policy, kl_ref, label)
    assert got == pytest.approx(expected, rel=1e-6)
    assert kl == pytest.approx(metrics["kl"][-1], rel=1e-6, abs=1e-7)


def test_kto_loss_hand_formula_and_one_sided_batch():
    policy, ref, kl_policy, kl_ref, label = fixed_vector()
    b, kl = 0.1, max(np.mean(kl_policy - kl_ref), 0.0)
    r = policy - ref
    hand = np.where(label, 1 - sig(b * (r - kl)), 1.5 * (1 - sig(b * (kl - r)))).mean()
    assert kithara_kto("kto", b, 1.0, 1.5, policy, ref, kl_policy, kl_ref, label)[0] == pytest.approx(hand, rel=1e-6)
    # Only desirable rows: TRL trains on those alone (no NaN); so does kithara.
    only = np.ones(8, bool)
    expected, _ = trl_kto("kto", b, 1.0, 1.5, policy, ref, kl_policy, kl_ref, only)
    got = kithara_kto("kto", b, 1.0, 1.5, policy, ref, kl_policy, kl_ref, only)[0]
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-6)


def trl_bco_loss(policy, ref, label, beta, running, udm=None):
    """TRL 0.24's BCOTrainer.bco_loss and RunningMoments.update (trl/trainer/bco_trainer.py,
    trl/trainer/utils.py), transcribed: TRL 1.16 no longer ships them."""
    import torch.nn.functional as F

    chosen_rewards = beta * torch.as_tensor(policy[label] - ref[label])
    rejected_rewards = beta * torch.as_tensor(policy[~label] - ref[~label])
    xs = torch.cat((chosen_rewards, rejected_rewards), 0)
    xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
    delta_m = xs_mean - running["mean"]
    tot = running["count"] + xs.numel()
    old_sum = running["var"] * running["count"] + delta_m**2 * running["count"] * xs.numel() / tot
    running["mean"] += (delta_m * xs.numel() / tot).item()
    running["var"] = ((old_sum + xs_var * xs.numel()) / tot).item()
    running["count"] = tot
    delta = torch.as_tensor(running["mean"])
    chosen_losses = -F.logsigmoid(chosen_rewards - delta)
    rejected_losses = -F.logsigmoid(-(rejected_rewards - delta))
    if udm is not None:
        rejected_losses = torch.as_tensor(udm) * rejected_losses
    return float(torch.cat((chosen_losses, rejected_losses)).nanmean()), running["mean"]


def test_bco_loss_matches_trl_over_a_stream_and_by_hand():
    from kithara.utils import Moments, batch_moments, merge

    running_trl = {"mean": 0.0, "var": 1.0, "count": 1e-24}
    prior = Moments(jnp.float32(0), jnp.float32(0), jnp.float32(0))
    b = 0.1
    for seed in range(3):
        rng = np.random.default_rng(seed)
        # Rewards around 0.2, not 0: a float32 mean of values near zero cancels (TRL's in float64 here).
        policy, ref = rng.normal(-20, 4, 6), rng.normal(-22, 4, 6)
        label = np.asarray([True, False, True, False, False, True])
        expected, trl_delta = trl_bco_loss(policy, ref, label, b, running_trl)
        rewards = jnp.asarray(b * (policy - ref), jnp.float32)
        prior = merge(prior, batch_moments(rewards))
        delta = prior.mean
        got = unpaired_losses.bco_loss(jnp.asarray(policy - ref), jnp.asarray(label), delta, beta=b).mean()
        assert float(delta) == pytest.approx(trl_delta, rel=1e-6)
        assert float(got) == pytest.approx(expected, rel=1e-6)
    shifted = b * (policy - ref) - trl_delta
    hand = np.where(label, -ls(shifted), -ls(-shifted)).mean()
    assert float(got) == pytest.approx(hand, rel=1e-6)


def test_udm_weights_scale_the_undesirable_rows():
    prob = jnp.asarray([0.01, 0.3, 0.5, 0.95])
    weights = unpaired_losses.udm_weight(prob, 0.5, 10.0)
    np.testing.assert_allclose(weights, np.clip(np.asarray(prob) / (1 - np.asarray(prob) + 1e-8), 0.5, 10.0), 1e-6)
    policy, ref = np.linspace(-3, 3, 4), np.zeros(4)
    label = np.asarray([True, False, False, False])
    loss = unpaired_losses.bco_loss(jnp.asarray(policy - ref), jnp.asarray(label), 0.2, beta=0.5, udm_weight=weights)
    expected, _ = trl_bco_loss(policy, ref, label, 0.5, {"mean": 0.2, "var": 1.0, "count": 1e30}, np.array(weights[1:]))
    assert float(loss.mean()) == pytest.approx(expected, rel=1e-5)


# Configs ---------------------------------------------------------------------------------


def test_configs_take_trls_names_and_refuse_what_kithara_lacks():
    config = KTOConfig()
    assert (config.beta, config.desirable_weight, config.undesirable_weight, config.loss_type) == (0.1, 1.0, 1.0, "kto")
    assert (config.learning_rate, config.max_length, config.precompute_ref_log_probs) == (1e-6, 1024, False)
    assert config.calculate_kl and not KTOConfig(loss_type="apo_zero_unpaired").calculate_kl
    with pytest.raises(ValueError, match="train_sampling_strategy='sequential'"):
        KTOConfig(train_sampling_strategy="random")
    KTOConfig(train_sampling_strategy="random", loss_type="apo_zero_unpaired")
    with pytest.raises(ValueError, match="loss type"):
        KTOConfig(loss_type="sigmoid")
    with pytest.raises(ValueError, match="ref_model_sync_steps set but sync_ref_model=False"):
        KTOConfig(ref_model_sync_steps=8)
    with pytest.raises(ValueError, match="precomputed log-probs assume a fixed reference"):
        BCOConfig(sync_ref_model=True, precompute_ref_log_probs=True)
    assert (BCOConfig().prompt_sample_size, BCOConfig().min_density_ratio, BCOConfig().max_density_ratio) == (
        1024, 0.5, 10.0)  # fmt: skip
    with pytest.raises(ValueError, match="min_density_ratio <= max_density_ratio"):
        BCOConfig(min_density_ratio=2.0, max_density_ratio=1.0)
    with pytest.raises(TypeError, match="generate with kithara"):
        BCOConfig(generate_during_eval=True)
    with pytest.raises(ValueError, match="max_length=None"):
        BCOConfig(max_length=None)


# Trainers --------------------------------------------------------------------------------


def tiny(seed=0, **kwargs):
    return tiny_model(vocab_size=len(W), hidden_dim=24, intermediate_dim=40, num_layers=1, seed=seed, **kwargs)


def demo_rows():
    rows = []
    for p in PROMPTS:
        rows += [{"prompt": p, "completion": GOOD, "label": True}, {"prompt": p, "completion": BAD, "label": False}]
    return rows


def margin(trainer, prompts):
    """Mean held-out log-prob margin of the good over the bad completion."""
    rows = [{"prompt": p, "chosen": GOOD, "rejected": BAD} for p in prompts]
    data = kithara.data.PreferenceDataset(rows, trainer.tokenizer, max_length=12)
    batch = kithara.Dataloader(data, 1, shuffle=False, drop_remainder=False)
    total = []
    for local in batch.epoch(0):
        inputs = {k[len("chosen_") :]: v for k, v in local.items() if k.startswith("chosen_")}
        worse = {k[len("rejected_") :]: v for k, v in local.items() if k.startswith("rejected_")}
        out = []
        for part in (inputs, worse):
            logits, _ = trainer.model.apply(trainer.model.variables, part, training=False)
            out.append(kithara.objectives.dpo_losses.sequence_logps(logits, part["labels"], part["label_mask"])[0])
        total.extend(np.asarray(out[0] - out[1])[: len(prompts)])
    return float(np.mean(total[: len(prompts)]))


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A policy and a different reference, in kithara and in transformers (same weights)."""
    import transformers
    from trl.trainer.utils import add_fused_lm_head

    policy, ref = tiny(), tiny(seed=1)
    out = {}
    for name, model in (("policy", policy), ("ref", ref)):
        path = tmp_path_factory.mktemp(name)
        model.save_in_hf_format(path)
        out[name] = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        add_fused_lm_head(out[name], outputs=("log_probs", "entropy", "mean_logits"))
    return policy, ref, out["policy"], out["ref"]


def trl_batch(local):
    """TRL's collated batch (input_ids, attention_mask, completion_mask and the KL_ ones) of
    a kithara batch: the whole token sequence is the inputs plus the last label."""
    out = {}
    for prefix, trl in (("", ""), ("kl_", "KL_")):
        if f"{prefix}token_ids" not in local:
            continue
        ids, labels, mask = (local[f"{prefix}{k}"] for k in ("token_ids", "labels", "label_mask"))
        n = local[f"{prefix}padding_mask"].sum(-1)
        full = np.zeros((ids.shape[0], ids.shape[1] + 1), np.int64)
        completion = np.zeros_like(full)
        for i, length in enumerate(n):
            full[i, :length] = ids[i, :length]
            full[i, length] = labels[i, length - 1]
            completion[i, 1 : length + 1] = mask[i, :length]
        attention = (np.arange(full.shape[1]) <= n[:, None]).astype(np.int64)
        out.update({f"{trl}input_ids": torch.as_tensor(full), f"{trl}attention_mask": torch.as_tensor(attention),
                    f"{trl}completion_mask": torch.as_tensor(completion)})  # fmt: skip
    out["label"] = torch.as_tensor(local["label"])
    return out


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_batch_loss_equals_trl_on_transformers(hf_pair, loss_type):
    policy, ref, hf_policy, hf_ref = hf_pair
    trainer = KTOTrainer(policy, ref, train_dataset=ROWS * 2, processing_class=word_tokenizer(), max_length=10,
                         per_device_train_batch_size=1, loss_type=loss_type, max_steps=1, beta=0.5,
                         undesirable_weight=1.3, progress_bar=False)  # fmt: skip
    local = next(iter(trainer.train_dataloader.epoch(0)))
    out = trainer.jitted_eval_step(trainer.model.variables, sharding_lib.shard_batch(local, policy.mesh))
    standin, compute = trl_kto_standin(loss_type, 0.5, 1.0, 1.3, hf_policy, hf_ref, precompute=False)
    with torch.no_grad():
        expected = float(compute(standin, hf_policy, trl_batch(local), return_outputs=False))
    assert float(out.total / out.weight) == pytest.approx(expected, rel=1e-5)
    kl = float(out.sums["kl"] / out.weight)
    assert kl == pytest.approx(standin._metrics["eval"]["kl"][-1], rel=1e-4, abs=1e-6)
    chosen = float(out.sums["rewards/chosen_sum"] / out.sums["count/chosen"])
    assert abs(chosen) > 1e-3  # the reference differs from the policy
    assert chosen == pytest.approx(standin._metrics["eval"]["rewards/chosen"][-1], rel=1e-4, abs=1e-6)


def train_rows(prompts):
    rows = []
    for p in prompts:
        rows += [{"prompt": p, "completion": GOOD, "label": True}, {"prompt": p, "completion": BAD, "label": False}]
    return rows


@pytest.mark.parametrize("trainer_class", [KTOTrainer, BCOTrainer])
def test_learns_to_prefer_the_desirable_completion_on_held_out_prompts(trainer_class):
    trainer = trainer_class(tiny(), train_dataset=train_rows(PROMPTS[:6]), processing_class=word_tokenizer(),
                            max_length=12, per_device_train_batch_size=1, max_steps=12, learning_rate=3e-3,
                            progress_bar=False)  # fmt: skip
    before = margin(trainer, PROMPTS[6:])
    history = trainer.train()
    after = margin(trainer, PROMPTS[6:])
    assert np.isfinite([h["loss"] for h in history]).all()
    assert after > before + 2.0, (before, after)
    assert history[-1]["loss"] < history[0]["loss"]
    assert trainer.compilations["train_step"] == 1  # BCO's running-moment columns keep one shape


@pytest.mark.parametrize("cls", [KTOTrainer, BCOTrainer], ids=lambda c: c.__name__)
def test_objective_contract_holds(cls):
    import inspect

    from test_objective_contract import base_private_names, self_attributes_assigned

    private = base_private_names()
    for klass in cls.__mro__[: cls.__mro__.index(kithara.Trainer)]:
        assert not {n for n in vars(klass) if n in private}, klass
        assert not self_attributes_assigned(inspect.getsource(inspect.getmodule(klass))) & private


def test_one_sided_batches_train_without_nan_and_precomputed_reference_starts_at_it():
    only_good = [r for r in train_rows(PROMPTS) if r["label"]]
    trainer = KTOTrainer(tiny(lora=kithara.LoraConfig(rank=4, targets=("query", "value"))), train_dataset=only_good,
                         processing_class=word_tokenizer(), max_length=12, per_device_train_batch_size=1, max_steps=2,
                         learning_rate=1e-2, precompute_ref_log_probs=True, progress_bar=False)  # fmt: skip
    assert trainer.reference == "precomputed" and trainer.frozen is None
    history = trainer.train()
    assert history[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # at the reference: 1 - sigmoid(0)
    assert history[0]["count/rejected"] == 0 and history[0]["rewards/rejected_sum"] == 0
    assert np.isfinite([h["loss"] for h in history]).all() and history[1]["loss"] < 0.5


def test_reference_modes_and_refusals():
    lora = tiny(lora=kithara.LoraConfig(rank=4, targets=("query", "value")))
    common = dict(train_dataset=ROWS * 2, processing_class=word_tokenizer(), max_length=10, max_steps=1,
                  per_device_train_batch_size=1, progress_bar=False)  # fmt: skip
    assert BCOTrainer(lora, **common).reference == "adapters_off"
    assert BCOTrainer(tiny(), **common).reference == "frozen_copy"
    assert KTOTrainer(tiny(), tiny(seed=1), **common).reference == "ref_model"
    model = tiny()
    with pytest.raises(ValueError, match="ref_model is the model being trained"):
        KTOTrainer(model, ref_model=model, **common)
    with pytest.raises(ValueError, match="unpaired preference data"):
        KTOTrainer(tiny(), train_dataset=kithara.data.PreferenceDataset(
            [{"prompt": "hi", "chosen": " ok", "rejected": " bye"}] * 8, word_tokenizer(), max_length=8),
            max_steps=1, per_device_train_batch_size=1)  # fmt: skip
    no_kl = UnpairedPreferenceDataset(ROWS * 2, word_tokenizer(), max_length=10)
    with pytest.raises(ValueError, match="no KL rows"):
        KTOTrainer(tiny(), train_dataset=no_kl, max_steps=1, per_device_train_batch_size=1)
    KTOTrainer(tiny(), train_dataset=no_kl, max_steps=1, per_device_train_batch_size=1, loss_type="apo_zero_unpaired")


def test_bco_running_moments_survive_resume_exactly(tmp_path):
    def run(steps, checkpointer=None):
        trainer = BCOTrainer(tiny(), train_dataset=train_rows(PROMPTS) * 2, processing_class=word_tokenizer(),
                             max_length=12, per_device_train_batch_size=1, max_steps=steps, learning_rate=3e-3,
                             checkpointer=checkpointer, progress_bar=False)  # fmt: skip
        return [h["loss"] for h in trainer.train()], [h["delta"] for h in trainer.history], trainer.running

    losses, deltas, running = run(4)
    assert running.count == 4 * 8 and deltas[0] == 0 and deltas[1] != 0  # at step 1 the policy is the reference
    run(2, kithara.Checkpointer(str(tmp_path), save_interval=2))
    resumed, resumed_deltas, resumed_running = run(4, kithara.Checkpointer(str(tmp_path), save_interval=2))
    assert resumed_running.state_dict() == running.state_dict()
    assert resumed_deltas == deltas[2:] and resumed == losses[2:]


def test_udm_classifier_is_scikit_learns_objective_minimised():
    import scipy.optimize

    from kithara.objectives.bco import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    y = x[:, 0] + 0.5 * rng.normal(size=40) > 0.3
    clf = LogisticRegression.fit(x, y)
    # LogisticRegression(class_weight="balanced"): C * sum_i w_i log(1 + e^(-y_i z_i)) + |coef|^2 / 2.
    weights = (len(y) / (2 * np.bincount(y.astype(int))))[y.astype(int)]

    def objective(theta):
        return (
            np.sum(weights * np.logaddexp(0, -(2 * y - 1) * (x @ theta[:-1] + theta[-1]))) + theta[:-1] @ theta[:-1] / 2
        )

    best = scipy.optimize.minimize(objective, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose([*clf.coef, clf.intercept], best, rtol=1e-6, atol=1e-7)


def test_udm_weights_the_undesirable_rows_of_bco():
    rows = []
    for i, p in enumerate(PROMPTS):
        rows += [
            {"prompt": p, "completion": GOOD, "label": i % 2 == 0},
            {"prompt": p, "completion": BAD, "label": i % 2 == 1},
        ]
    rows += [{"prompt": "bye", "completion": BAD, "label": False}] * 4  # prompts only undesirable rows have
    trainer = BCOTrainer(tiny(), train_dataset=rows, processing_class=word_tokenizer(), max_length=12, max_steps=1,
                         per_device_train_batch_size=1, progress_bar=False, embedding_func="policy")  # fmt: skip
    examples = trainer.train_dataloader.examples
    weights = np.asarray([float(ex["udm_weight"]) for ex in examples])
    labels = np.asarray([bool(ex["label"]) for ex in examples])
    assert (weights[labels] == 1).all() and (weights[~labels] >= 0.5).all() and (weights[~labels] <= 10).all()
    assert weights[-4:] == pytest.approx([0.5] * 4)  # "bye" is never a desirable row's prompt: clamped low
    # Step 1 is at the reference (rewards and delta 0): each row's loss is log 2 times its weight.
    history = trainer.train()
    assert history[0]["loss"] == pytest.approx(np.log(2) * weights[:8].mean(), rel=1e-6)
    with pytest.raises(TypeError, match="embedding_func must be a callable"):
        BCOTrainer(tiny(), train_dataset=rows, processing_class=word_tokenizer(), max_length=12,
                   per_device_train_batch_size=1, max_steps=1, embedding_func="sentence-transformers")  # fmt: skip
