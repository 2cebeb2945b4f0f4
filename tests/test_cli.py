import pytest

from kithara import cli
from kithara.config import ASSETS, load_config


def test_config_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  num_layers: 1\ndata:\n  train_file: data/train.jsonl\ntrainer:\n  steps: 7\n")
    config = load_config(path, ["trainer.steps=9", "lora.enabled=true"])
    assert config.model.num_layers == 1 and config.model.family == "llama3"
    assert config.trainer.steps == 9 and config.lora.enabled is True
    assert config.data.train_file == str(tmp_path / "data" / "train.jsonl")
    assert config.data.tokenizer == str(ASSETS / "demo" / "tokenizer")


def test_bad_configs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"trainer\.stepz"):
        load_config(None, ["trainer.stepz=3"])
    with pytest.raises(ValueError, match="steps"):
        load_config(None, ["trainer.steps=many"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["trainer.steps"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.slow
def test_kithara_train_runs_the_shipped_config(capsys, tmp_path):
    overrides = [
        "trainer.steps=30",
        "trainer.log_steps_interval=10",
        "trainer.eval_steps_interval=30",
        f"trainer.tensorboard_dir={tmp_path}/tb",
        f"trainer.checkpoint_dir={tmp_path}/ckpt",
        "trainer.progress_bar=false",
        "generation_eval.max_samples=16",
        "model.hidden_dim=64",
        "model.intermediate_dim=128",
    ]
    config = str(ASSETS.parent / "configs" / "demo.yaml")
    assert cli.main(["train", config, *[arg for o in overrides for arg in ("--set", o)]]) == 0
    out = capsys.readouterr().out
    assert "held-out exact match" in out and "train loss first -> last" in out
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir()) == [30]
    # The same command with more steps resumes from the checkpoint.
    more = [o if o != "trainer.steps=30" else "trainer.steps=32" for o in overrides] + ["generation_eval.enabled=false"]
    assert cli.main(["train", config, *[arg for o in more for arg in ("--set", o)]]) == 0
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir()) == [30, 32]


def test_kithara_train_dpo_on_preference_data(capsys, tmp_path):
    import json

    rows = [{"prompt": f"Say {w}:", "chosen": f" {w}", "rejected": f" {o}"} for w, o in [("red", "blue")] * 16]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [
        "data.format=preference",
        "data.train_file=pairs.jsonl",
        "data.eval_file=pairs.jsonl",
        "data.tokenizer=@kithara/tokenizer",
        "data.max_seq_len=16",
        "data.per_device_batch_size=1",
        "trainer.steps=2",
        "trainer.eval_steps_interval=2",
        "trainer.tensorboard_dir=null",
        "trainer.progress_bar=false",
        "model.hidden_dim=32",
        "model.intermediate_dim=64",
    ]
    (tmp_path / "dpo.yaml").write_text("objective: dpo\ndpo:\n  beta: 0.2\n  loss_weights: {sigmoid: 1.0, sft: 0.5}\n")
    args = ["train", str(tmp_path / "dpo.yaml"), *[arg for o in common for arg in ("--set", o)]]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "eval reward accuracy / margin" in out and "perplexity" not in out
    # Preference data without the DPO objective, and an unknown objective, are refused.
    assert cli.main([*args, "--set", "objective=sft"]) == 2
    assert "cannot train on data.format=preference" in capsys.readouterr().out
    assert cli.main([*args, "--set", "objective=ppo"]) == 2
    assert "objective must be" in capsys.readouterr().out
