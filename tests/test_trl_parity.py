"""TRL users' code runs as written: seed 004's SFT example and seed 001's IterativeSFT
examples, with only the model / tokenizer / dataset loading lines changed (no hub here)."""

import json
import os
import random

import numpy as np
import pytest
from conftest import ASSETS

import kithara

WORDS = ["yes", "no", "maybe", "hello", "bye"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama-3-family Hugging Face checkpoint with the bundled ChatML tokenizer."""
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tokenizer = kithara.Tokenizer.from_pretrained(ASSETS / "tokenizer")
    # Small: the seed's SFTConfig pads every row to TRL's default max_length of 1024 tokens.
    model = kithara.KerasHubModel.from_config(
        "llama3", vocab_size=tokenizer.vocab_size, num_layers=1, hidden_dim=32, num_heads=2, num_kv_heads=1,
        intermediate_dim=64, seed=3,
    )  # fmt: skip
    model.save_in_hf_format(path, tokenizer=tokenizer)
    return str(path)


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    rng = random.Random(0)
    rows = []
    for _ in range(128):
        word = rng.choice(WORDS)
        rows.append({"messages": [{"role": "user", "content": f"Say {word}"}, {"role": "assistant", "content": word}]})
    path = tmp_path_factory.mktemp("data") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
def test_seed_004_sft_example_runs_as_written(model_dir, chat_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # --- seed 004, "Basic SFT": only the loading lines differ (local files, no hub) ---
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from kithara import KerasHubModel, SFTConfig, SFTTrainer

    # Load model and tokenizer
    model = KerasHubModel.from_preset(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    # Load and format dataset
    dataset = load_dataset("json", data_files=chat_file, split="train")

    def format_sample(example):
        messages = [{k: v for k, v in m.items() if v is not None} for m in example["messages"]]
        return {"text": tokenizer.apply_chat_template(messages, tokenize=False)}

    formatted = dataset.map(format_sample)

    # Train
    trainer = SFTTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=formatted,
        args=SFTConfig(
            output_dir="./output",
            num_train_epochs=3,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=4,
            learning_rate=2e-5,
            logging_steps=10,
            save_steps=100,
        ),
    )
    trainer.train()
    # --- end of the seed's code ---
    history = trainer.history
    # 128 rows / (4 rows x 8 devices x 4 micro-batches) = 1 step per epoch, 3 epochs.
    assert [h["step"] for h in history] == [1, 2, 3]
    assert history[0]["learning_rate"] == pytest.approx(2e-5)
    assert history[-1]["loss"] < history[0]["loss"]
    # TRL's log: every logging_steps=10 steps and at the end, the loss averaged over the window.
    (record,) = trainer.state.log_history
    assert (record["step"], record["epoch"]) == (3, 3.0)
    assert record["loss"] == pytest.approx(np.mean([h["loss"] for h in history]))
    assert trainer.args.gradient_accumulation_steps == 4 and trainer.train_dataloader.global_batch_size == 32
    # save_steps=100 > 3 steps: the final step is saved, under output_dir.
    assert sorted(os.listdir(tmp_path / "output" / "checkpoints")) == ["3"]
    assert list((tmp_path / "output" / "runs").glob("events.out.tfevents.*"))

    # The same run from YAML: the same rows, model and settings give the same losses.
    from kithara.config import load_config
    from kithara.run import run

    (tmp_path / "sft.yaml").write_text(
        f"objective: sft\nmodel:\n  preset: {model_dir}\ndata:\n  train_file: {chat_file}\n"
        "args:\n  output_dir: yaml_output\n  num_train_epochs: 3\n  per_device_train_batch_size: 4\n"
        "  gradient_accumulation_steps: 4\n  learning_rate: 2.0e-5\n  logging_steps: 10\n  save_steps: 100\n"
    )
    result = run(load_config(tmp_path / "sft.yaml"))
    assert result["steps_run"] == 3
    assert result["first_loss"] == history[0]["loss"] and result["final_loss"] == history[-1]["loss"]
    assert sorted(os.listdir(tmp_path / "yaml_output" / "checkpoints")) == ["3"]


def test_seed_001_iterative_sft_quickstart_and_usage(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from transformers import AutoTokenizer

    from kithara import IterativeSFTConfig, IterativeSFTTrainer, KerasHubModel

    # Using a model identifier (a local directory here)
    trainer = IterativeSFTTrainer(model_dir, args=IterativeSFTConfig(max_length=512, output_dir="./output"))
    assert trainer.args.max_length == 512 and trainer.tokenizer is not None

    # Or using a pre-instantiated model
    model = KerasHubModel.from_preset(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = IterativeSFTTrainer(
        model,
        args=IterativeSFTConfig(
            max_length=512,
            output_dir="./output",
        ),
        processing_class=tokenizer,
    )
    texts = [f"Say {w}: {w}" for w in WORDS * 2]
    encoded = tokenizer(texts, padding=True)
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]

    # Using a list of tensors as input
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
    }
    first = trainer.step(**inputs)

    # Using a list of strings as input
    texts_labels = [f" {w}" for w in WORDS * 2]
    inputs = {
        "texts": [f"Say {w}:" for w in WORDS * 2],
        "texts_labels": texts_labels,  # Optional, defaults to texts
    }
    second = trainer.step(**inputs)
    trainer.finish()
    assert first["step"] == 2 and second["step"] == 4  # 10 rows, 8 per step (1 per device)
    assert np.isfinite(first["loss"]) and np.isfinite(second["loss"])
    assert sorted(os.listdir(tmp_path / "output" / "checkpoints")) == ["4"]

    # Data preprocessing: both truncation modes, as in the seed.
    config = IterativeSFTConfig(
        max_length=512,
        truncation_mode="keep_end",  # or "keep_start"
    )
    assert IterativeSFTTrainer(model, args=config, processing_class=tokenizer).truncation_mode == "keep_end"
    # The seed's other options that kithara cannot honour are refused, never ignored.
    with pytest.raises(TypeError, match="model_init_kwargs"):
        IterativeSFTConfig(model_init_kwargs={"torch_dtype": "bfloat16"})
    with pytest.raises(ValueError, match="report_to"):
        IterativeSFTConfig(report_to="wandbb")
    with pytest.raises(TypeError, match="did you mean 'max_length'"):
        IterativeSFTConfig(max_seq_length=512)
