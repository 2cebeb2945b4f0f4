"""Trainers take one typed config: args=, its fields as keywords, or the Kithara names; TRL's
trainer keywords, trainer.state.log_history and train(resume_from_checkpoint=...)."""

import jax
import numpy as np
import pytest
from conftest import pattern_examples, tiny_model, word_tokenizer

import kithara

ROWS = pattern_examples(64)


def loader(n=64, per_device=1):
    return kithara.Dataloader(pattern_examples(n), per_device, seed=0)


def test_kithara_names_args_and_fields_give_the_same_config():
    a = kithara.Trainer(tiny_model(), None, loader(), steps=3, log_steps_interval=2, eval_steps_interval=3,
                        eval_dataloader=loader(16), progress_bar=False, learning_rate=1e-3)  # fmt: skip
    b = kithara.Trainer(
        tiny_model(),
        train_dataset=loader(),
        eval_dataset=loader(16),
        args=kithara.TrainingConfig(
            max_steps=3, logging_steps=2, eval_strategy="steps", eval_steps=3, disable_tqdm=True, learning_rate=1e-3
        ),
    )
    assert a.args == b.args
    assert (a.total_steps, a.log_steps_interval, a.eval_steps_interval) == (3, 2, 3)
    with pytest.raises(AttributeError, match="args is fixed at construction"):
        a.args = b.args
    with pytest.raises(dataclasses_frozen_error()):
        a.args.learning_rate = 1.0  # type: ignore[misc]


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_unknown_and_contradicting_arguments_are_refused_by_name():
    with pytest.raises(TypeError, match="Trainer: unknown argument 'max_step'; did you mean 'max_steps'"):
        kithara.Trainer(tiny_model(), None, loader(), max_step=3)
    with pytest.raises(TypeError, match="SFTTrainer: unknown argument 'max_seq_length'; did you mean 'max_length'"):
        kithara.SFTTrainer(tiny_model(), ROWS, max_seq_length=8)
    with pytest.raises(TypeError, match="did you mean 'per_device_train_batch_size'"):
        kithara.SFTTrainer(tiny_model(), ROWS, per_device_batch_size=2)
    with pytest.raises(ValueError, match=r"steps=5 contradicts args.max_steps=3"):
        kithara.Trainer(tiny_model(), None, loader(), steps=5, args=kithara.TrainingConfig(max_steps=3))
    with pytest.raises(ValueError, match="steps= and max_steps= disagree"):
        kithara.Trainer(tiny_model(), None, loader(), steps=5, max_steps=3)
    with pytest.raises(TypeError, match=r"args must be a kithara.SFTConfig"):
        kithara.SFTTrainer(tiny_model(), ROWS, args=kithara.DPOConfig())
    with pytest.raises(ValueError, match="Pass train_dataloader or train_dataset, not both"):
        kithara.Trainer(tiny_model(), None, loader(), train_dataset=loader())
    with pytest.raises(TypeError, match=r"train_dataloader must be a kithara.Dataloader"):
        kithara.Trainer(tiny_model(), None, ROWS)
    with pytest.raises(ValueError, match="bf16=True asks for bfloat16 compute"):
        kithara.Trainer(tiny_model(), None, loader(), bf16=True)
    # Settings the run would not use are refused, not ignored.
    with pytest.raises(ValueError, match=r"learning_rate=0.001 configure the optimizer .* optimizer= was given"):
        kithara.Trainer(tiny_model(), kithara.optimizers.adamw(1e-2), loader(), learning_rate=1e-3)
    with pytest.raises(ValueError, match="per_device_train_batch_size=2, but the train Dataloader given has"):
        kithara.Trainer(tiny_model(), None, loader(), per_device_train_batch_size=2)
    with pytest.raises(ValueError, match=r"train_dataset is a ready Dataloader, which would ignore max_length=8"):
        kithara.SFTTrainer(tiny_model(), loader(), max_length=8)
    with pytest.raises(ValueError, match="would ignore truncation_mode='keep_end', packing=True"):
        kithara.SFTTrainer(tiny_model(), loader(), packing=True, truncation_mode="keep_end")
    assert kithara.SFTTrainer(tiny_model(), loader(), max_length=16, disable_tqdm=True)  # the loader's own value
    with pytest.raises(ValueError, match=r"save_steps=3 would be ignored: checkpointer= was given"):
        kithara.Trainer(tiny_model(), None, loader(), checkpointer=kithara.Checkpointer("unused"), save_steps=3)
    with pytest.raises(ValueError, match=r"profile_start_step=2 would be ignored: profiler= was given"):
        kithara.Trainer(tiny_model(), None, loader(), profiler=kithara.Profiler(), profile_start_step=2,
                        logging_dir="unused")  # fmt: skip
    with pytest.raises(ValueError, match="per_device_eval_batch_size=4 is set but there is no evaluation data"):
        kithara.Trainer(tiny_model(), None, loader(), per_device_eval_batch_size=4)
    with pytest.raises(ValueError, match="num_train_epochs=3: IterativeSFTTrainer gets its batches through"):
        kithara.IterativeSFTTrainer(tiny_model(), word_tokenizer(), num_train_epochs=3)
    with pytest.raises(TypeError, match="SFTTrainer got a config as train_dataset"):
        kithara.SFTTrainer(tiny_model(), kithara.SFTConfig())
    with pytest.raises(ValueError, match="max_steps is unset"):
        kithara.IterativeSFTTrainer(tiny_model(), word_tokenizer(), lr_scheduler_type="linear")
    assert kithara.IterativeSFTTrainer(tiny_model(), word_tokenizer(), lr_scheduler_type="linear", max_steps=9)
    # Keywords equal to args's values, or args's defaults overridden, are fine.
    trainer = kithara.Trainer(tiny_model(), None, loader(), steps=3, args=kithara.TrainingConfig(max_steps=3))
    assert trainer.total_steps == 3


def test_a_base_config_upgrades_to_the_objectives_keeping_their_defaults():
    base = kithara.TrainingConfig(max_steps=2, learning_rate=1e-3, disable_tqdm=True)
    tok = word_tokenizer()
    rows = [{"prompt": "hi", "completion": " hello"}] * 16
    trainer = kithara.SFTTrainer(tiny_model(), rows, processing_class=tok, args=base)
    assert isinstance(trainer.args, kithara.SFTConfig) and trainer.args.max_steps == 2
    assert trainer.args.max_length == 1024  # the objective's own default
    # Fields the base config leaves at their defaults keep the objective's (TRL's DPO rate is 1e-6).
    pairs = [{"prompt": "hi", "chosen": " hello", "rejected": " bye"}] * 8
    dpo = kithara.DPOTrainer(tiny_model(), train_dataset=pairs, processing_class=tok,
                             args=kithara.TrainingConfig(max_steps=2, disable_tqdm=True), max_length=8)  # fmt: skip
    assert dpo.args.learning_rate == 1e-6 and dpo.args.logging_steps == 10 and dpo.args.max_steps == 2
    # TRL's keywords and a transformers tokenizer.
    config = kithara.SFTConfig(max_steps=2, max_length=8, disable_tqdm=True)
    trl_style = kithara.SFTTrainer(model=tiny_model(), args=config, train_dataset=rows, processing_class=tok.backend)
    assert trl_style.args.max_length == 8 and isinstance(trl_style.tokenizer, kithara.Tokenizer)
    assert trl_style.train_dataloader.dataset.max_length == 8


def test_default_optimizer_follows_the_config_schedule():
    args = kithara.TrainingConfig(max_steps=6, learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=2,
                                  disable_tqdm=True)  # fmt: skip
    history = kithara.Trainer(tiny_model(), train_dataset=loader(), args=args).train()
    # transformers' linear schedule: k / w during warmup, then (T - k) / (T - w).
    expected = [0.0, 0.5e-2, 1e-2, 0.75e-2, 0.5e-2, 0.25e-2]
    assert [h["learning_rate"] for h in history] == pytest.approx(expected, rel=1e-6)


def test_output_dir_checkpoints_logs_and_resume_from_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def trainer(run="run", **kwargs):
        args = kithara.TrainingConfig(output_dir=str(tmp_path / run), save_steps=2, logging_steps=1,
                                      learning_rate=1e-3, disable_tqdm=True, **kwargs)  # fmt: skip
        return kithara.Trainer(tiny_model(), train_dataset=loader(), eval_dataset=loader(16), args=args)

    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint=True, but there is no checkpoint"):
        trainer(max_steps=4).train(resume_from_checkpoint=True)
    first = trainer(max_steps=4)
    first.train()
    first.evaluate()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["2", "4"]
    events = EventAccumulator(str(tmp_path / "run" / "runs"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    log = first.state.log_history  # logging_steps=1: a record per step, then the evaluation's
    assert [r["step"] for r in log] == [1, 2, 3, 4, 4] and "eval_loss" in log[-1] and "loss" in log[0]
    assert [r["loss"] for r in log[:4]] == [h["loss"] for h in first.history]
    assert first.state.global_step == 4 and first.state.max_steps == 4

    # A later run resumes from the latest (4) by default; from a named step on request.
    again = trainer(max_steps=6)
    assert [h["step"] for h in again.train()] == [5, 6] and again.restored_step == 4
    step_two = str(tmp_path / "run" / "checkpoints" / "2")
    with pytest.raises(ValueError, match=r"already holds later checkpoints \[4, 6\]"):
        trainer(max_steps=6).train(resume_from_checkpoint=step_two)
    from_two = trainer("run2", max_steps=6)
    history = from_two.train(resume_from_checkpoint=step_two)
    assert from_two.restored_step == 2 and [h["step"] for h in history] == [3, 4, 5, 6]
    # Steps 3-6 from the checkpoint of step 2 equal the first run's steps 3-4 exactly.
    np.testing.assert_array_equal([h["loss"] for h in history[:2]], [h["loss"] for h in first.history[2:]])
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=False, but .* holds checkpoints"):
        trainer(max_steps=6).train(resume_from_checkpoint=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        trainer(max_steps=6).train(resume_from_checkpoint=str(tmp_path / "nowhere"))


def test_peft_config_from_peft_and_for_a_path(tmp_path):
    import peft

    lora = kithara.LoraConfig.from_peft(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert (lora.rank, lora.alpha, lora.targets) == (4, 8.0, ("query", "value"))
    assert kithara.LoraConfig.from_peft(peft.LoraConfig(r=2, target_modules="all-linear")).targets == (
        "query", "key", "value", "attention_output", "gate", "up", "down",
    )  # fmt: skip
    with pytest.raises(ValueError, match="lora_dropout"):
        kithara.LoraConfig.from_peft(peft.LoraConfig(r=2, lora_dropout=0.1, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not projections kithara knows"):
        kithara.LoraConfig.from_peft(peft.LoraConfig(r=2, target_modules=["c_attn"]))
    tok = word_tokenizer()
    tiny_model(vocab_size=tok.vocab_size).save_in_hf_format(tmp_path / "m", tokenizer=tok)
    rows = [{"prompt": "hi", "completion": " hello"}] * 16
    trainer = kithara.SFTTrainer(str(tmp_path / "m"), rows, peft_config=lora, max_length=8, max_steps=1,
                                 disable_tqdm=True)  # fmt: skip
    assert trainer.model.lora == lora and trainer.model.num_trainable_params < trainer.model.num_params
    with pytest.raises(ValueError, match="adapters are added when a model is built"):
        kithara.SFTTrainer(tiny_model(), rows, processing_class=tok, peft_config=lora, max_length=8)


def test_sft_dataset_text_field_is_honoured():
    rows = [{"content": "hi hello how are you"}] * 16
    trainer = kithara.SFTTrainer(tiny_model(), rows, processing_class=word_tokenizer(), max_length=8,
                                 dataset_text_field="content", max_steps=1, disable_tqdm=True)  # fmt: skip
    batch = next(iter(trainer.train_dataloader.epoch(0)))
    assert int(batch["label_mask"][0].sum()) == 6  # hi hello how are you </s>, each after its predecessor
    with pytest.raises(ValueError, match="'content' \\(dataset_text_field\\)"):
        kithara.SFTTrainer(tiny_model(), [{"text": "hi"}] * 16, processing_class=word_tokenizer(),
                           dataset_text_field="content")  # fmt: skip


def test_cycle_and_dpo_take_their_configs():
    tok = word_tokenizer()
    texts = ["hi hello", "how are you", "fine thanks", "bye ok"] * 4
    cycle = kithara.CycleTrainer(
        tiny_model(vocab_size=tok.vocab_size, lora=kithara.LoraConfig(rank=2)), tok, texts, texts,
        args=kithara.CycleConfig(max_steps=1, batch_size_per_side=8, max_length=12, max_new_tokens=3,
                                 learning_rate=1e-3, disable_tqdm=True),
    )  # fmt: skip
    assert cycle.args.batch_size_per_side == 8 and cycle.total_steps == 1
    with pytest.raises(TypeError, match="did you mean 'batch_size_per_side'"):
        kithara.CycleTrainer(tiny_model(), tok, texts, texts, batch_size=8)
    pairs = [{"prompt": "hi", "chosen": " hello", "rejected": " bye"}] * 8
    dpo = kithara.DPOTrainer(tiny_model(vocab_size=tok.vocab_size), train_dataset=pairs, processing_class=tok,
                             args=kithara.DPOConfig(beta=0.3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                                                    max_length=8, max_steps=1, disable_tqdm=True))  # fmt: skip
    assert dpo.beta == 0.3 and dpo.loss_weights == {"sigmoid": 1.0, "sft": 0.5}
    assert np.isfinite(dpo.train()[0]["loss"])
    with pytest.raises(TypeError, match=r"train_dataloader takes a kithara.Dataloader"):
        kithara.DPOTrainer(tiny_model(), train_dataloader=pairs, processing_class=tok)
    with pytest.raises(TypeError, match="does not support item assignment"):
        dpo.loss_weights["sft"] = 2.0
    with pytest.raises(ValueError, match="already gives the weights"):
        kithara.DPOTrainer(tiny_model(), train_dataset=pairs, processing_class=tok, loss_type={"sigmoid": 1.0},
                           loss_weights=[1.0])  # fmt: skip


def test_the_default_constant_optimizer_is_the_one_kithara_always_built():
    """Checkpoints written before configs existed (default optimizer: adamw(lr)) keep their
    layout, and the updates are bit-identical."""
    built = kithara.Trainer(tiny_model(), None, loader(), steps=2, disable_tqdm=True, learning_rate=3e-3)
    explicit = kithara.Trainer(tiny_model(), kithara.optimizers.adamw(3e-3), loader(), steps=2, progress_bar=False)
    assert jax.tree.structure(built.abstract_state()) == jax.tree.structure(explicit.abstract_state())
    assert [h["loss"] for h in built.train()] == [h["loss"] for h in explicit.train()]
