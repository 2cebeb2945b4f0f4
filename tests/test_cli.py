import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from kithara import cli
from kithara.config import ASSETS, DEMO_CONFIG, load_config, to_yaml
from kithara.objectives.configs import CycleConfig, DPOConfig, IterativeSFTConfig, SFTConfig

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
TINY_MODEL = {"num_layers": 1, "hidden_dim": 32, "intermediate_dim": 64}


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


def write_yaml(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_config_defaults_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  num_layers: 1\ndata:\n  train_file: data/train.jsonl\n  tokenizer: '@kithara/demo/tokenizer'\n"
        "args:\n  max_steps: 7\n  learning_rate: 3e-3\n"
    )
    config = load_config(path, ["args.max_steps=9", "lora.enabled=true"])
    assert config.model.num_layers == 1 and config.model.family == "llama3"
    assert isinstance(config.args, SFTConfig) and config.objective == "sft"
    assert config.args.max_steps == 9 and config.args.learning_rate == 3e-3 and config.lora.enabled is True
    assert config.data.train_file == str(tmp_path / "data" / "train.jsonl")
    assert config.data.tokenizer == str(ASSETS / "demo" / "tokenizer")
    assert config.model.precision == "float32"  # unset: float32 unless args.bf16
    assert load_config(path, ["args.bf16=true"]).model.precision == "mixed_bfloat16"
    # Each objective's args section is its own config class, with its own fields.
    classes = {"sft": SFTConfig, "dpo": DPOConfig, "iterative_sft": IterativeSFTConfig, "cycle": CycleConfig}
    extra = {"cycle": ["data.train_file_b=b.txt"], "dpo": ["args.beta=0.3"]}
    for objective, config_class in classes.items():
        config = load_config(path, [f"objective={objective}", *extra.get(objective, [])])
        assert type(config.args) is config_class
    assert load_config(path, ["objective=dpo", "args.beta=0.3"]).args == DPOConfig(
        beta=0.3, max_steps=7, learning_rate=3e-3
    )


def test_bad_configs_fail_clearly(tmp_path):
    with pytest.raises(TypeError, match=r"args .*unknown argument 'stepz'"):
        load_config(None, ["args.stepz=3"])
    with pytest.raises(ValueError, match="max_steps"):
        load_config(None, ["args.max_steps=many"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(None, ["args.max_steps"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2


def test_bad_input_exits_2_naming_the_key_and_the_fix(capsys, tmp_path):
    rows = [{"prompt": "rev ab =", "completion": " ba"}] * 8
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_yaml(
        tmp_path / "run.yaml",
        {"model": TINY_MODEL, "data": {"train_file": "train.jsonl", "tokenizer": "@kithara/demo/tokenizer"}},
    )

    def error(*overrides: str, path: Path = config) -> str:
        assert cli.main(["train", str(path), *sets(*overrides)]) == 2
        return flat(capsys.readouterr().out)

    assert "args (SFTConfig, for objective sft): unknown argument 'max_seq_length'; did you mean 'max_length'?" in (
        error("args.max_seq_length=8")
    )
    assert "'beta' is a setting of objective dpo / orpo / cpo / kto / bco, not sft" in error("args.beta=0.1")
    assert "data: unknown key 'train_files'; did you mean 'train_file'?" in error("data.train_files=x.jsonl")
    assert "args.max_steps" in error("trainer.steps=3")  # the earlier schema's keys say where they went
    assert "args.max_length" in error("data.max_length=8")
    assert "did you mean 'dpo'" in error("objective=dpp")
    assert "args.bf16" in error("model.precision=float32", "args.bf16=true")
    assert "max_steps" in error("args.max_steps=3", "args.num_train_epochs=1")
    assert "data.train_file_b is for objective cycle" in error("data.train_file_b=b.txt")
    assert "generation_eval.enabled needs data.eval_file" in error("generation_eval.enabled=true")
    assert "data.tokenizer is required" in error("data.tokenizer=null")
    assert "model.sharding" in error("model.sharding=zero3")
    assert "model.num_layers: Value 'two'" in error("model.num_layers=two")
    missing = tmp_path / "nowhere.jsonl"
    assert f"data.train_file: Data path '{missing}' does not exist" in error("data.train_file=" + str(missing))
    assert "data.tokenizer" in error(f"data.tokenizer={tmp_path}")
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"prompt": "rev ab =", "completion": 3}\n')
    assert "bad.jsonl:2: field 'completion'" in error(f"data.train_file={tmp_path}/bad.jsonl")
    # No data.train_file at all: a user's YAML does not fall back on anything.
    empty = write_yaml(tmp_path / "empty.yaml", {"args": {"max_steps": 3}})
    assert "data.train_file is required" in error(path=empty)


def test_a_user_yaml_does_not_inherit_the_demo(capsys, tmp_path):
    user = write_yaml(tmp_path / "user.yaml", {"data": {"train_file": "t.jsonl", "tokenizer": "@kithara/tokenizer"}})
    assert cli.main(["config", str(user)]) == 0
    printed = capsys.readouterr().out
    assert "assets/demo" not in printed and "runs/demo" not in printed
    resolved = yaml.safe_load(printed)
    assert resolved["args"]["max_steps"] is None and resolved["args"]["max_length"] == 1024  # SFTConfig's defaults
    assert resolved["args"]["learning_rate"] == SFTConfig().learning_rate and resolved["args"]["output_dir"] is None
    assert resolved["generation_eval"]["enabled"] is False and resolved["cpu_devices"] is None
    assert resolved["data"]["eval_file"] is None
    # The printed config is a config: loading it again gives the same run.
    again = write_yaml(tmp_path / "again.yaml", resolved)
    assert to_yaml(load_config(again)) == to_yaml(load_config(user))
    # Without a file, `kithara config` shows the demo's.
    assert cli.main(["config"]) == 0
    demo = yaml.safe_load(capsys.readouterr().out)
    assert demo["args"]["max_steps"] == 400 and demo["data"]["train_file"] == str(ASSETS / "demo" / "train.jsonl")


def test_relative_paths_resolve_against_the_file_or_the_working_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (tmp_path / "exp" / "model").mkdir(parents=True)
    path = write_yaml(
        tmp_path / "exp" / "run.yaml",
        {
            "model": {"preset": "model"},
            "data": {"train_file": "data/*.jsonl", "eval_file": "/abs/eval.jsonl", "tokenizer": "@kithara/tokenizer"},
            "args": {"output_dir": "out", "logging_dir": "gs://bucket/tb"},
        },
    )
    config = load_config(path, ["data.train_file_b=b.txt", "objective=cycle", "args.max_steps=1"])
    assert config.model.preset == str(tmp_path / "exp" / "model")  # an existing directory next to the file
    assert config.data.train_file == str(tmp_path / "exp" / "data" / "*.jsonl")  # globs too
    assert config.data.eval_file == "/abs/eval.jsonl" and config.args.logging_dir == "gs://bucket/tb"
    assert config.data.tokenizer == str(ASSETS / "tokenizer")
    assert config.args.output_dir == str(tmp_path / "exp" / "out")
    assert config.data.train_file_b == str(work / "b.txt")  # --set: the working directory
    assert config.args.checkpoint_dir == str(tmp_path / "exp" / "out" / "checkpoints")
    # A bare preset name that is no path stays a keras-hub preset name.
    assert load_config(path, ["model.preset=gemma_2b_en", "data.tokenizer=tok"]).model.preset == "gemma_2b_en"
    # No data.tokenizer: the model.preset directory.
    assert load_config(path, ["data.tokenizer=null"]).data.tokenizer == str(tmp_path / "exp" / "model")
    # The demo's relative paths are the working directory's (what `kithara demo` does).
    demo = load_config(DEMO_CONFIG, relative_to=Path.cwd())
    assert demo.args.output_dir == str(work / "runs" / "demo")
    assert demo.args.tensorboard_dir == str(work / "runs" / "demo" / "runs")
    assert load_config(DEMO_CONFIG).args.output_dir == str(DEMO_CONFIG.parent / "runs" / "demo")


@pytest.mark.slow
def test_kithara_train_runs_the_shipped_config(capsys, tmp_path):
    overrides = [
        "args.max_steps=30",
        "args.logging_steps=10",
        "args.eval_steps=30",
        f"args.output_dir={tmp_path}/out",
        "args.save_strategy=steps",
        "args.save_steps=30",
        "args.disable_tqdm=true",
        "generation_eval.max_samples=16",
        "model.hidden_dim=64",
        "model.intermediate_dim=128",
    ]
    config = str(DEMO_CONFIG)
    assert cli.main(["train", config, *sets(*overrides)]) == 0
    out = capsys.readouterr().out
    assert "held-out exact match" in out and "train loss first -> last" in out
    assert list((tmp_path / "out" / "runs").glob("events.out.tfevents.*"))
    checkpoints = tmp_path / "out" / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [30]
    # The same command with more steps would resume on another learning-rate schedule (the
    # shipped config's is linear over max_steps): refused before any step, the checkpoint kept.
    more = [o if o != "args.max_steps=30" else "args.max_steps=32" for o in overrides]
    more.append("generation_eval.enabled=false")
    assert cli.main(["train", config, *sets(*more)]) == 2
    assert "max_steps: checkpoint 30, this run 32" in flat(capsys.readouterr().out)
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [30]
    # With a schedule that does not span max_steps, the same command resumes from step 30.
    assert (
        cli.main(
            [
                "train",
                config,
                *sets(*more, "args.lr_scheduler_type=constant_with_warmup", "args.lr_scheduler_kwargs=null"),
            ]
        )
        == 0
    )
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [30, 32]


def test_kithara_train_dpo_on_preference_data(capsys, tmp_path):
    rows = [{"prompt": f"Say {w}:", "chosen": f" {w}", "rejected": f" {o}"} for w, o in [("red", "blue")] * 16]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [
        "data.train_file=pairs.jsonl",
        "data.eval_file=pairs.jsonl",
        "data.tokenizer=@kithara/tokenizer",
        "args.max_length=16",
        "args.per_device_train_batch_size=1",
        "args.max_steps=2",
        "args.eval_steps=2",
        "args.disable_tqdm=true",
        "model.hidden_dim=32",
        "model.intermediate_dim=64",
    ]
    (tmp_path / "dpo.yaml").write_text(
        "objective: dpo\nargs:\n  beta: 0.2\n  loss_type: [sigmoid, sft]\n  loss_weights: [1.0, 0.5]\n"
    )
    args = ["train", str(tmp_path / "dpo.yaml"), *sets(*common)]
    # --set paths are relative to the working directory.
    assert cli.main(args) == 2
    assert "data.train_file: Data path" in flat(capsys.readouterr().out)
    common = [c.replace("=pairs.jsonl", f"={tmp_path}/pairs.jsonl") for c in common]
    args = ["train", str(tmp_path / "dpo.yaml"), *sets(*common)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "eval reward accuracy / margin" in out and "perplexity" not in out
    # Preference data without the DPO objective, and an unknown objective, are refused.
    sft = write_yaml(tmp_path / "sft.yaml", {"objective": "sft"})
    assert cli.main(["train", str(sft), *sets(*common)]) == 2
    assert "Cannot tell the format of train_dataset" in flat(capsys.readouterr().out)
    assert cli.main([*args, "--set", "objective=ppo"]) == 2
    expected = "objective must be one of sft, dpo, orpo, cpo, kto, bco, iterative_sft, cycle"
    assert expected in flat(capsys.readouterr().out)


def _docs_section(title: str) -> str:
    text = DOCS.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


@pytest.mark.slow  # about 20 s on 2 cores
def test_the_dpo_command_in_the_docs_works_as_written(capsys, tmp_path, monkeypatch):
    section = _docs_section("A DPO run")
    snippet = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip()
    shipped = DEMO_CONFIG.parent / "dpo.yaml"
    body = "".join(line for line in shipped.read_text().splitlines(True) if not line.startswith("#"))
    assert snippet == body, "docs/cli.md shows kithara/configs/dpo.yaml: keep them the same"
    # Run it "from the repository root": a stand-in root whose kithara/ is the package.
    (tmp_path / "kithara").symlink_to(DEMO_CONFIG.parent.parent, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command)
    assert argv[0] == "kithara"
    assert cli.main(argv[1:]) == 0
    out = capsys.readouterr().out
    assert "eval reward accuracy / margin" in out and "train loss first -> last" in out
    assert [p.name for p in (tmp_path / "runs" / "dpo" / "checkpoints").iterdir() if p.name.isdigit()] == ["20"]
    assert list((tmp_path / "runs" / "dpo" / "runs").glob("events.out.tfevents.*"))


def _texts(tmp_path: Path) -> None:
    """Digits (side A) and the same digits as letters (side B), non-parallel, plus eval pairs."""
    import random

    rng = random.Random(0)
    digits = [" ".join(rng.choice("123456789") for _ in range(3)) for _ in range(40)]
    letters = str.maketrans("123456789", "abcdefghi")
    (tmp_path / "a.txt").write_text("\n".join(digits[:20]) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(d.translate(letters) for d in digits[20:]) + "\n")
    pairs = [{"source": d, "reference": d.translate(letters)} for d in digits[:4]]
    (tmp_path / "pairs_a.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))


def test_sft_from_yaml_with_columns(capsys, tmp_path):
    rows = [{"question": f"rev {w} =", "answer": f" {w[::-1]}"} for w in ("abc", "xyz", "hello", "kit")] * 4
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "model": TINY_MODEL,
        "data": {
            "train_file": "qa.jsonl",
            "eval_file": "qa.jsonl",
            "tokenizer": "@kithara/demo/tokenizer",
            "columns": {"question": "prompt", "answer": "completion"},
        },
        "args": {"max_steps": 3, "max_length": 16, "per_device_train_batch_size": 1, "learning_rate": 3e-3},
        "generation_eval": {"enabled": True, "max_samples": 4},
    }
    assert cli.main(["train", str(write_yaml(tmp_path / "sft.yaml", config))]) == 0
    out = capsys.readouterr().out
    assert "kithara run (sft)" in out and "eval loss / perplexity / token acc" in out
    assert "held-out exact match before -> after" in out


def test_iterative_sft_from_yaml(capsys, tmp_path):
    rows = [{"prompt": f"rev {w} =", "completion": f" {w[::-1]}"} for w in ("abc", "xyz", "hello")] * 4
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "objective": "iterative_sft",
        "model": TINY_MODEL,
        "data": {"train_file": "train.jsonl", "eval_file": "train.jsonl", "tokenizer": "@kithara/demo/tokenizer"},
        "args": {"num_train_epochs": 2, "max_length": 16, "learning_rate": 3e-3, "output_dir": "out"},
        "generation_eval": {"enabled": True, "max_samples": 3},
    }
    assert cli.main(["train", str(write_yaml(tmp_path / "it.yaml", config))]) == 0
    out = capsys.readouterr().out
    assert "kithara run (iterative_sft)" in out and "held-out exact match before -> after" in out
    # 12 rows, 8 per step (1 per device, 8 devices): 2 steps an epoch, 2 epochs.
    assert re.search(r"steps run\s*│\s*4\b", out), out
    assert (tmp_path / "out" / "checkpoints" / "4").is_dir()
    # Text rows (a .txt file) train on every token.
    (tmp_path / "lines.txt").write_text("rev abc = cba\nrev xyz = zyx\n")
    assert cli.main(["train", str(tmp_path / "it.yaml"), *sets(f"data.train_file={tmp_path}/lines.txt")]) == 0


def test_cycle_from_yaml_two_adapters(capsys, tmp_path):
    _texts(tmp_path)
    config = {
        "objective": "cycle",
        "model": TINY_MODEL,
        "lora": {"enabled": True, "rank": 4, "targets": ["all"]},
        "data": {
            "train_file": "a.txt",
            "train_file_b": "b.txt",
            "eval_file": "pairs_a.jsonl",
            "tokenizer": "@kithara/tokenizer",
        },
        "args": {"max_steps": 2, "batch_size_per_side": 8, "max_length": 24, "max_new_tokens": 8},
        "generation_eval": {"enabled": True},
    }
    assert cli.main(["train", str(write_yaml(tmp_path / "cycle.yaml", config))]) == 0
    out = capsys.readouterr().out
    assert "kithara run (cycle)" in out and "eval loss_A" in out and "eval exact_match_A" in out
    assert "held-out exact match before -> after" in out


@pytest.mark.slow
def test_cycle_from_yaml_two_models(capsys, tmp_path):
    _texts(tmp_path)
    config = {
        "objective": "cycle",
        "model": TINY_MODEL,
        "data": {"train_file": "a.txt", "train_file_b": "b.txt", "tokenizer": "@kithara/tokenizer"},
        "args": {"max_steps": 2, "batch_size_per_side": 8, "max_length": 24, "max_new_tokens": 8},
    }
    assert cli.main(["train", str(write_yaml(tmp_path / "cycle.yaml", config))]) == 0
    out = capsys.readouterr().out
    assert "kithara run (cycle)" in out and "train loss first -> last" in out
    # Pairs are for evaluation only: training texts must be texts.
    args = ["train", str(tmp_path / "cycle.yaml"), "--set", f"data.train_file_b={tmp_path}/pairs_a.jsonl"]
    assert cli.main(args) == 2
    assert "data.train_file_b holds texts" in flat(capsys.readouterr().out)


def test_values_the_run_would_ignore_are_refused(tmp_path):
    from kithara.config import load_config

    (tmp_path / "m").mkdir()
    base = ["data.train_file=x.jsonl", "data.tokenizer=@kithara/tokenizer"]
    with pytest.raises(ValueError, match=r"model.num_layers would be ignored"):
        load_config(None, [*base, f"model.preset={tmp_path / 'm'}", "model.num_layers=5"], relative_to=tmp_path)
    with pytest.raises(ValueError, match=r"uses data\.eval_file only for generation_eval"):
        load_config(None, [*base, "objective=iterative_sft", "data.eval_file=y.jsonl"], relative_to=tmp_path)
