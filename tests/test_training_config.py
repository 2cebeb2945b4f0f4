"""Typed configs: TRL names, did-you-mean errors, validation, and schedules equal to transformers'."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from conftest import TINY_SEQ2SEQ, tiny_model

import kithara
from kithara.naming import ALIASES, check_names, suggest
from kithara.objectives import dpo_losses
from kithara.objectives.configs import CycleConfig, DPOConfig, IterativeSFTConfig, SFTConfig
from kithara.trainer import optimizers
from kithara.trainer.config import TrainingConfig


def test_suggest_prefers_aliases_then_case_then_similarity():
    known = ["max_length", "truncation_mode", "learning_rate", "max_steps", "batch_size_per_side"]
    assert suggest("max_seq_length", known) == "max_length"
    assert suggest("truncation", known) == "truncation_mode"
    assert suggest("LearningRate", known) == "learning_rate"
    assert suggest("learning_rat", known) == "learning_rate"
    assert suggest("batch_size", known) == "batch_size_per_side"
    assert suggest("batch_size", ["per_device_train_batch_size"]) == "per_device_train_batch_size"
    assert suggest("zzz", known) is None
    assert suggest("max_length", known) is None  # known already
    # An alias is only offered when its target is known to the caller.
    assert suggest("tokenizer", ["max_length"]) is None
    assert suggest("tokenizer", ["processing_class"]) == "processing_class"
    assert all(isinstance(targets, tuple) and targets for targets in ALIASES.values())


def test_check_names_messages():
    check_names(["a"], ["a", "b"], "f")  # nothing unknown: no error
    with pytest.raises(TypeError) as error:
        check_names(["max_seq_length"], ["max_length", "packing"], "SFTConfig")
    assert str(error.value) == "SFTConfig: unknown argument 'max_seq_length'; did you mean 'max_length'?"
    with pytest.raises(TypeError) as error:
        check_names(["epochs", "zzz", "gone"], ["num_train_epochs", "seed"], "f", unsupported={"gone": "do X."})
    assert str(error.value) == (
        "f:\n  unknown argument 'epochs'; did you mean 'num_train_epochs'?\n  unknown argument 'zzz'\n"
        "  argument 'gone' is not supported: do X.\n  (known: 'num_train_epochs', 'seed')"
    )
    with pytest.raises(ValueError, match=r"^g: unknown loss type 'x' \(see the docs\)$"):
        check_names(["x"], ["sigmoid"], "g", what="loss type", docs="the docs", error=ValueError)
    with pytest.raises(TypeError, match=r"\(none are accepted\)"):
        check_names(["x"], [], "h")


@pytest.mark.parametrize(
    ("cls", "given", "meant"),
    [
        (SFTConfig, "max_seq_length", "max_length"),
        (SFTConfig, "max_seq_len", "max_length"),
        (IterativeSFTConfig, "truncation", "truncation_mode"),
        (SFTConfig, "per_device_batch_size", "per_device_train_batch_size"),
        (TrainingConfig, "steps", "max_steps"),
        (TrainingConfig, "epochs", "num_train_epochs"),
        (TrainingConfig, "log_steps_interval", "logging_steps"),
        (TrainingConfig, "eval_steps_interval", "eval_steps"),
        (TrainingConfig, "evaluation_strategy", "eval_strategy"),
        (TrainingConfig, "tensorboard_dir", "logging_dir"),
        (TrainingConfig, "learning_rat", "learning_rate"),
        (DPOConfig, "bta", "beta"),
        (DPOConfig, "loss_types", "loss_type"),
        (CycleConfig, "batch_size", "batch_size_per_side"),
    ],
)
def test_unknown_field_names_the_closest(cls, given, meant):
    message = f"{cls.__name__}: unknown argument '{given}'; did you mean '{meant}'?"
    with pytest.raises(TypeError) as error:
        cls(**{given: 1})
    assert str(error.value) == message
    with pytest.raises(TypeError) as error:
        cls.from_dict({given: 1})
    assert str(error.value) == message


def test_from_dict_replace_and_frozen():
    config = SFTConfig.from_dict({"max_length": 256, "num_train_epochs": 2, "length_buckets": [128, 64, 128]})
    assert config == SFTConfig(max_length=256, num_train_epochs=2, length_buckets=(64, 128))
    with pytest.raises(
        TypeError, match=r"^trainer section: unknown argument 'max_seq_len'; did you mean 'max_length'\?$"
    ):
        SFTConfig.from_dict({"max_seq_len": 5}, where="trainer section")
    with pytest.raises(TypeError, match="unknown argument 'epochs'"):
        config.replace(epochs=3)
    with pytest.raises(ValueError, match="not both"):
        config.replace(max_steps=10)  # replace re-validates: num_train_epochs is still 2
    assert config.replace(num_train_epochs=None, max_steps=10).max_steps == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_length = 5  # type: ignore[misc]
    multiple = (
        r"SFTConfig:\n  unknown argument 'steps'; did you mean 'max_steps'\?\n  unknown argument 'qqq'\n  \(see help"
    )
    with pytest.raises(TypeError, match=multiple):
        SFTConfig(steps=1, qqq=2)


def test_trl_options_kithara_lacks_say_what_to_do():
    with pytest.raises(TypeError, match=r"'rpo_alpha' is not supported: .*loss_type=\['sigmoid', 'sft'\]"):
        DPOConfig(rpo_alpha=1.0)
    with pytest.raises(TypeError, match="'max_prompt_length' is not supported"):
        DPOConfig(max_prompt_length=128)
    with pytest.raises(TypeError, match=r"'deepspeed' is not supported: .*sharding="):
        SFTConfig(deepspeed="ds.json")


def test_trl_spellings_of_values_are_normalised():
    config = TrainingConfig(
        max_steps=-1,
        num_train_epochs=3.0,
        learning_rate=1,
        logging_steps=5.0,
        warmup_steps=4.0,
        lr_scheduler_type="linear",
    )
    assert config.max_steps is None
    assert config.num_train_epochs == 3 and isinstance(config.num_train_epochs, int)
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    assert config.logging_steps == 5 and isinstance(config.logging_steps, int)
    assert config.warmup_steps == 4 and isinstance(config.warmup_steps, int)
    assert DPOConfig().loss_type == ("sigmoid",)
    assert DPOConfig(loss_type=["ipo"]).loss_type == ("ipo",)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(num_train_epochs=1.5), ValueError, r"num_train_epochs=1.5: kithara trains whole epochs; use max_steps"),
        (dict(max_steps=0), ValueError, "max_steps must be >= 1"),
        (dict(max_steps=10, num_train_epochs=2), ValueError, r"Set max_steps \(10\) or num_train_epochs \(2\)"),
        (dict(fp16=True, bf16=True), ValueError, "bf16 or fp16, not both"),
        (
            dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}),
            TypeError,
            r"'gradient_checkpointing_kwargs' is not supported: torch.utils.checkpoint's options",
        ),
        (dict(learning_rate="1e-5"), ValueError, r"TrainingConfig.learning_rate must be float, got '1e-5' \(str\)"),
        (dict(per_device_train_batch_size=True), ValueError, "per_device_train_batch_size must be int"),
        (dict(per_device_train_batch_size=0), ValueError, "per_device_train_batch_size must be >= 1"),
        (dict(logging_steps=0.1), ValueError, "logging_steps=0.1: a fraction of all steps is not supported"),
        (
            dict(eval_steps=50, eval_strategy="no"),
            ValueError,
            r"eval_steps=50 needs eval_strategy='steps' \(got 'no'\)",
        ),
        (dict(eval_epochs=2, eval_strategy="steps"), ValueError, "eval_epochs=2 needs eval_strategy='epoch'"),
        (dict(eval_strategy="step"), ValueError, "unknown strategy 'step'; did you mean 'steps'"),
        (dict(save_strategy="epoch"), NotImplementedError, "save_strategy='epoch' is not supported yet"),
        (dict(save_total_limit=2), ValueError, "save_total_limit=2 has no effect"),
        (dict(optim="paged_adamw_8bit"), NotImplementedError, "optim='paged_adamw_8bit' is not supported yet"),
        (dict(lr_scheduler_type="cosin"), ValueError, "unknown scheduler 'cosin'; did you mean 'cosine'"),
        (dict(lr_scheduler_type="polynomial"), NotImplementedError, "'polynomial' is not supported yet"),
        (dict(warmup_steps=10), ValueError, "'constant' has no warmup"),
        (dict(warmup_steps=10, warmup_ratio=0.1, lr_scheduler_type="linear"), ValueError, "not both"),
        (dict(warmup_steps=2.5, lr_scheduler_type="linear"), ValueError, "warmup_steps=2.5: give a whole number"),
        (dict(lr_scheduler_type="cosine_with_min_lr"), ValueError, "exactly one of lr_scheduler_kwargs"),
        (
            dict(lr_scheduler_type="linear", lr_scheduler_kwargs={"num_cycles": 1}),
            ValueError,
            "lr_scheduler_kwargs for 'linear': unknown option 'num_cycles'",
        ),
        (
            dict(lr_scheduler_type="cosine", lr_scheduler_kwargs={"num_cycle": 1}),
            ValueError,
            "unknown option 'num_cycle'; did you mean 'num_cycles'",
        ),
        (dict(adam_beta2=1.0), ValueError, r"adam_beta2 must be in \[0, 1\)"),
        (dict(report_to="wandbb"), ValueError, "did you mean 'wandb'"),
        (dict(report_to="none", logging_dir="runs/x"), ValueError, "logging_dir='runs/x' is a TensorBoard directory"),
        (dict(profile_start_step=5), ValueError, "profiles go to the TensorBoard directory and there is none"),
    ],
)
def test_bad_values_are_refused_naming_the_field(kwargs, error, match):
    with pytest.raises(error, match=match):
        TrainingConfig(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (SFTConfig, dict(max_length=None), "max_length=None .* not supported"),
        (SFTConfig, dict(truncation_mode="left"), "truncation_mode must be one of"),
        (SFTConfig, dict(dataset_format="chat"), "unknown format 'chat'"),
        (SFTConfig, dict(max_length=64, length_buckets=[32, 128]), r"length_buckets must be row lengths in \[1, "),
        (IterativeSFTConfig, dict(max_length=1), "max_length must be >= 2"),
        (DPOConfig, dict(loss_type="sigmod"), "unknown loss type 'sigmod'; did you mean 'sigmoid'"),
        (DPOConfig, dict(loss_type=["sigmoid", "exo_pair"]), "'exo_pair' is not supported: TRL has it"),
        (DPOConfig, dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "one weight per loss_type entry"),
        (DPOConfig, dict(loss_type=["sigmoid", "sigmoid"]), "more than once"),
        (DPOConfig, dict(beta=0.0), "beta must be positive"),
        (DPOConfig, dict(loss_type="robust", label_smoothing=0.5), "robust loss needs"),
        (CycleConfig, dict(per_device_train_batch_size=4), "set batch_size_per_side, not per_device_train_batch_size"),
        (CycleConfig, dict(gradient_accumulation_steps=2), "not gradient_accumulation_steps"),
        (CycleConfig, dict(max_length=3), "max_length must be >= 4"),
        (CycleConfig, dict(generation_kwargs={"temprature": 0.7}), "did you mean 'temperature'"),
        (CycleConfig, dict(generation_kwargs={"do_sample": True}), "set temperature > 0 to sample"),
    ],
)
def test_objective_configs_validate_their_fields(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_defaults_and_derived_settings():
    assert (SFTConfig().learning_rate, DPOConfig().learning_rate, IterativeSFTConfig().learning_rate) == (
        2e-5,
        1e-6,
        1e-5,
    )
    assert (SFTConfig().max_length, SFTConfig().truncation_mode, SFTConfig().completion_only_loss) == (
        1024,
        "keep_start",
        None,
    )
    assert (IterativeSFTConfig().max_length, IterativeSFTConfig().truncation_mode) == (512, "keep_end")
    config = TrainingConfig()
    assert (config.checkpoint_dir, config.tensorboard_dir, config.precision, config.eval_every_steps) == (None,) * 4
    assert config.eval_batch_size == 1
    config = TrainingConfig(output_dir="gs://bucket/run/", eval_strategy="steps", bf16=True, logging_steps=25)
    assert config.checkpoint_dir == "gs://bucket/run/checkpoints"
    assert config.tensorboard_dir == "gs://bucket/run/runs"
    assert config.eval_every_steps == 25  # transformers: eval_steps falls back to logging_steps
    assert config.eval_every_epochs is None
    assert config.precision == "mixed_bfloat16"
    assert TrainingConfig(output_dir="o", save_strategy="no").checkpoint_dir is None
    assert TrainingConfig(output_dir="o", report_to="none").tensorboard_dir is None
    assert TrainingConfig(output_dir="o", logging_dir="tb", report_to=["tensorboard"]).tensorboard_dir == "tb"
    assert TrainingConfig(eval_strategy="epoch").eval_every_epochs == 1
    assert TrainingConfig(eval_strategy="epoch", eval_epochs=3).eval_every_epochs == 3
    assert TrainingConfig(per_device_train_batch_size=4, per_device_eval_batch_size=16).eval_batch_size == 16


def test_trl_field_names_exist_in_transformers():
    """Fields documented as TRL names are transformers.TrainingArguments fields (warmup_ratio and
    logging_dir were dropped by transformers 5, which this venv has; TRL 1.x still runs on 4.x)."""
    ours = {f.name for f in dataclasses.fields(TrainingConfig)}
    kithara_own = {"eval_epochs", "max_eval_samples", "resume", "profile_start_step", "profile_num_steps"}
    kithara_own |= {"peak_flops_per_device", "warmup_ratio", "logging_dir", "skip_bad_rows"}
    kithara_own |= {"loss_chunk_size", "offload_optimizer", "offload_params"}
    theirs = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    assert ours - kithara_own <= theirs


def transformers_lrs(kind, lr, warmup, total, kwargs=None):
    """The learning rate of each of ``total`` optimizer steps under transformers' scheduler."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = transformers.get_scheduler(
        kind, optimizer, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=kwargs
    )
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(lrs)


@pytest.mark.parametrize(
    ("kind", "warmup", "kwargs"),
    [
        ("constant", {}, None),
        ("constant_with_warmup", dict(warmup_steps=10), None),
        ("linear", dict(warmup_steps=10), None),
        ("linear", dict(warmup_ratio=0.1), None),
        ("cosine", dict(warmup_steps=10), None),
        ("cosine", dict(warmup_steps=0.07), {"num_cycles": 1.5}),
        ("cosine_with_min_lr", dict(warmup_steps=10), {"min_lr": 3e-5}),
        ("cosine_with_min_lr", dict(warmup_ratio=0.25), {"min_lr_rate": 0.1}),
    ],
)
@pytest.mark.parametrize("total", [1, 7, 100])
def test_schedules_equal_transformers_step_by_step(kind, warmup, kwargs, total):
    config = TrainingConfig(learning_rate=3e-4, lr_scheduler_type=kind, lr_scheduler_kwargs=kwargs, **warmup)
    expected = transformers_lrs(kind, 3e-4, config.num_warmup_steps(total), total, kwargs)
    ours = np.asarray(jax.jit(jax.vmap(config.schedule(total)))(jnp.arange(total)))
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0)


def test_warmup_steps_count_like_transformers():
    assert TrainingConfig(lr_scheduler_type="linear", warmup_steps=12).num_warmup_steps(100) == 12
    assert TrainingConfig(lr_scheduler_type="linear", warmup_steps=0.1).num_warmup_steps(95) == 10  # ceil(9.5)
    assert TrainingConfig(lr_scheduler_type="linear", warmup_ratio=0.03).num_warmup_steps(1000) == 30
    assert TrainingConfig().num_warmup_steps(50) == 0
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        TrainingConfig().schedule(0)


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "sgd"])
def test_build_optimizer_matches_torch_under_the_transformers_schedule(optim):
    """Three updates of config.build_optimizer equal torch's optimizer (AdamW or SGD with weight
    decay) under transformers' linear schedule and gradient clipping; the logged LR follows."""
    adam = {"adam_beta1": 0.8, "adam_beta2": 0.99, "adam_epsilon": 1e-6} if optim != "sgd" else {}
    config = TrainingConfig(
        optim=optim,
        learning_rate=0.1,
        lr_scheduler_type="linear",
        warmup_steps=1,
        weight_decay=0.01,
        max_grad_norm=1.0,
        **adam,
    )
    rng = np.random.default_rng(0)
    start = rng.standard_normal(6).astype(np.float32)
    grads = [rng.standard_normal(6).astype(np.float32) * s for s in (3.0, 0.1, 2.0)]  # clipped, not, clipped

    param = torch.nn.Parameter(torch.tensor(start))
    if optim == "sgd":
        reference = torch.optim.SGD([param], lr=0.1, weight_decay=0.01)
    else:
        reference = torch.optim.AdamW([param], lr=0.1, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)
    scheduler = transformers.get_scheduler("linear", reference, num_warmup_steps=1, num_training_steps=4)
    tx = config.build_optimizer(total_steps=4)
    params = {"w": jnp.asarray(start)}
    state = tx.init(params)
    schedule = config.schedule(4)
    for step, grad in enumerate(grads):
        param.grad = torch.tensor(grad)
        torch.nn.utils.clip_grad_norm_([param], 1.0)
        reference.step()
        scheduler.step()
        updates, state = tx.update({"w": jnp.asarray(grad)}, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(np.asarray(params["w"]), param.detach().numpy(), rtol=1e-6, atol=0)
        assert float(optimizers.learning_rate(state)) == pytest.approx(float(schedule(step)), rel=1e-7)


def test_dpo_loss_weight_map_is_trls_list_form():
    assert DPOConfig().loss_weight_map() == {"sigmoid": 1.0}
    rpo = DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    assert rpo.loss_weight_map() == {"sigmoid": 1.0, "sft": 0.5}
    assert DPOConfig(loss_type=["sigmoid", "bco_pair"]).loss_weight_map() == {"sigmoid": 1.0, "bco_pair": 1.0}
    # The map is what dpo_losses adds up: sigmoid + 0.5 * token-mean NLL of the chosen answer (RPO).
    p = dpo_losses.PairLogps(
        chosen=jnp.array([-4.0, -9.0]),
        rejected=jnp.array([-6.0, -7.0]),
        ref_chosen=jnp.array([-5.0, -8.0]),
        ref_rejected=jnp.array([-5.5, -7.5]),
        chosen_len=jnp.array([2.0, 3.0]),
        rejected_len=jnp.array([2.0, 4.0]),
    )
    combined = dpo_losses.combined_loss(p, rpo.loss_weight_map(), beta=rpo.beta, label_smoothing=0.0)
    margin = (p.chosen - p.ref_chosen) - (p.rejected - p.ref_rejected)
    expected = -jax.nn.log_sigmoid(0.1 * margin) + 0.5 * (-p.chosen / p.chosen_len)
    np.testing.assert_allclose(np.asarray(combined), np.asarray(expected), rtol=1e-6)


def test_model_builders_refuse_unknown_keyword_arguments(tmp_path):
    with pytest.raises(
        TypeError, match=r"^KerasHubModel.from_config\('llama3'\): unknown argument 'bogus_option' \(known: "
    ):
        tiny_model(bogus_option=1)
    with pytest.raises(TypeError, match="'device_map' is not supported: kithara places the weights on its device mesh"):
        tiny_model(device_map="auto")
    with pytest.raises(TypeError, match="unknown argument 'dtype'; did you mean 'precision'"):
        tiny_model(dtype="bfloat16")
    with pytest.raises(TypeError, match="unknown argument 'rope_max_wavelenght'; did you mean 'rope_max_wavelength'"):
        tiny_model(rope_max_wavelenght=10_000)
    # A name the keras-hub backbone takes still goes through.
    assert tiny_model(layer_norm_epsilon=1e-5).backbone.layer_norm_epsilon == 1e-5
    with pytest.raises(TypeError, match=r"^KerasHubModel.from_preset: unknown argument 'bogus_option'"):
        kithara.KerasHubModel.from_preset(str(tmp_path / "anything"), bogus_option=1)
    with pytest.raises(TypeError, match="'device_map' is not supported"):
        kithara.KerasHubModel.from_preset(str(tmp_path / "anything"), device_map="auto")
    with pytest.raises(TypeError, match="unknown argument 'preprocessor'; did you mean 'load_preprocessor'"):
        kithara.KerasHubModel.from_preset(str(tmp_path / "anything"), preprocessor=None)
    with pytest.raises(TypeError, match=r"from_config\('bart'\): unknown argument 'dropuot'; did you mean 'dropout'"):
        kithara.KerasHubSeq2SeqModel.from_config("bart", **TINY_SEQ2SEQ, dropuot=0.0)
    with pytest.raises(TypeError, match=r"from_config\('t5gemma'\): unknown argument 'dropout'; did you mean"):
        kithara.KerasHubSeq2SeqModel.from_config("t5gemma", **TINY_SEQ2SEQ, dropout=0.0)
