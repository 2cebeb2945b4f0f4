"""`kithara train` with the preference objectives beyond DPO (orpo, cpo, kto, bco): each
builds its trainer from the YAML's args section (its own config class) and trains."""

import json

import pytest
import yaml

from kithara import cli
from kithara.config import OBJECTIVES, load_config
from kithara.objectives.preference_configs import CPOConfig, ORPOConfig
from kithara.objectives.unpaired_configs import BCOConfig, KTOConfig

ROWS = [{"prompt": f"Say {w}:", "chosen": f" {w}", "rejected": f" {o}"} for w, o in [("red", "blue")] * 8]


def _overrides(path: str, output_dir: str = "unused") -> list[str]:
    common = [
        f"data.train_file={path}",
        f"args.output_dir={output_dir}",
        "data.tokenizer=@kithara/tokenizer",
        "args.max_length=16",
        "args.per_device_train_batch_size=1",
        "args.max_steps=2",
        "args.disable_tqdm=true",
        "model.num_layers=1",
        "model.hidden_dim=32",
        "model.intermediate_dim=64",
        "cpu_devices=2",
    ]
    return [arg for o in common for arg in ("--set", o)]


@pytest.mark.parametrize(
    ("objective", "args", "config_class"),
    [
        ("orpo", {"beta": 0.5}, ORPOConfig),
        ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.3}, CPOConfig),
        ("kto", {"desirable_weight": 1.5}, KTOConfig),
        ("bco", {"beta": 0.2}, BCOConfig),
    ],
)
def test_kithara_train_runs_each_preference_objective(objective, args, config_class, capsys, tmp_path):
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    path = tmp_path / f"{objective}.yaml"
    path.write_text(yaml.safe_dump({"objective": objective, "args": args}))
    config = load_config(path, ["data.train_file=x.jsonl", "data.tokenizer=@kithara/tokenizer"])
    assert OBJECTIVES[objective] is config_class and type(config.args) is config_class
    assert all(getattr(config.args, k) == v for k, v in args.items())
    assert cli.main(["train", str(path), *_overrides(str(tmp_path / "pairs.jsonl"), str(tmp_path / "out"))]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "loss" in out and objective in out


def test_a_setting_of_another_preference_objective_is_refused(capsys, tmp_path):
    path = tmp_path / "orpo.yaml"
    path.write_text(yaml.safe_dump({"objective": "orpo", "args": {"desirable_weight": 2.0}}))
    assert cli.main(["train", str(path), *_overrides("pairs.jsonl")]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "'desirable_weight' is a setting of objective kto" in out
