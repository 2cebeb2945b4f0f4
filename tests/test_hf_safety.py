"""Hugging Face directories kithara must not trust: weight shards outside the checkpoint
directory, and custom code a tokenizer or config names in ``auto_map``."""

import builtins
import json
import os

import pytest
from conftest import word_tokenizer

import kithara

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)


def checkpoint(path):
    """A tiny random Llama checkpoint at ``path``, in one safetensors file."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SMALL, num_key_value_heads=2)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def move_out(path, outside, shard_name):
    """Moves the checkpoint's weights at ``path`` to ``outside`` and writes an index that
    names them ``shard_name``."""
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="np") as f:
        names = list(f.keys())
    (path / "model.safetensors").rename(outside)
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, shard_name)}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_shards_outside_the_checkpoint_are_refused(tmp_path, where):
    path = checkpoint(tmp_path / "ckpt")
    outside = tmp_path / "outside.safetensors"  # a perfectly valid shard, in the wrong place
    if where == "parent":
        move_out(path, outside, "../outside.safetensors")
    elif where == "absolute":
        move_out(path, outside, str(outside))
    else:
        move_out(path, outside, "model-00001-of-00001.safetensors")
        (path / "model-00001-of-00001.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        kithara.KerasHubModel.from_preset(str(path))


def test_single_file_symlink_outside_is_refused(tmp_path):
    path = checkpoint(tmp_path / "ckpt")
    (path / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (path / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        kithara.KerasHubModel.from_preset(str(path))


def test_hub_cache_snapshot_links_are_followed(tmp_path):
    """The Hugging Face hub cache's own layout: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    source = checkpoint(tmp_path / "source")
    repo = tmp_path / "hub" / "models--tiny--llama"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(source))):
        (source / name).rename(repo / "blobs" / f"blob{i}")
        (snapshot / name).symlink_to(f"../../blobs/blob{i}")
    model = kithara.KerasHubModel.from_preset(str(snapshot))
    assert model.backbone.num_layers == 1


CUSTOM_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("custom code ran")
from transformers import {base} as _Base


class Custom(_Base):
    pass
"""


@pytest.mark.parametrize("which", ["tokenizer", "config"])
def test_custom_code_in_auto_map_never_runs(tmp_path, monkeypatch, which):
    """A tokenizer whose ``auto_map`` names custom code is refused, and a config's custom class
    ignored, without running that code, even when transformers' "run the custom code? [y/N]"
    prompt would be answered "y"."""
    path = tmp_path / "tok"
    word_tokenizer().backend.save_pretrained(path)
    marker = tmp_path / "marker"
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config.pop("tokenizer_class", None)  # nothing local to fall back on: transformers asks
    if which == "tokenizer":
        tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "custom.Custom"]}
        base = "PreTrainedTokenizerFast"
    else:
        config = {"model_type": "custom", "auto_map": {"AutoConfig": "custom.Custom"}}
        (path / "config.json").write_text(json.dumps(config))
        base = "PretrainedConfig"
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (path / "custom.py").write_text(CUSTOM_CODE.format(marker=str(marker), base=base))
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "TIME_OUT_REMOTE_CODE", 15)  # the prompt is asked, not skipped
    monkeypatch.setattr(builtins, "input", lambda *args: "y")
    if which == "tokenizer":
        with pytest.raises(ValueError, match="auto_map"):
            kithara.Tokenizer.from_pretrained(path)
    else:  # the config's custom class is ignored; the tokenizer files load as they are
        kithara.Tokenizer.from_pretrained(path)
    assert not marker.exists()
