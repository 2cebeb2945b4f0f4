"""The decoder-block seam and ScaleConfig: options validated, reached only while a training forward
pass is traced, never by cached decoding, and settable from the run YAML."""

import dataclasses

import jax
import keras_hub
import numpy as np
import pytest
from conftest import pattern_examples, tiny_model, tiny_seq2seq

import kithara
from kithara.config import DEMO_CONFIG, load_config
from kithara.models import decoder_seam, remat
from kithara.objectives.cycle_models import TwoModels
from kithara.objectives.policy_value import PolicyAndValue
from kithara.run import build_model


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(remat="ful"), ValueError, "Unknown remat policy 'ful'"),
        (dict(attention="flash"), ValueError, "Unknown attention implementation 'flash'"),
        (dict(attention_chunk_size=0), ValueError, "attention_chunk_size must be a positive int"),
        (dict(scan_layers="yes"), TypeError, "must be bools"),
    ],
)
def test_scale_config_refuses_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        kithara.ScaleConfig(**kwargs)


def test_scale_setter_checks_type():
    model = tiny_model()
    assert model.scale == kithara.ScaleConfig()
    with pytest.raises(TypeError, match=r"kithara\.ScaleConfig"):
        model.scale = {"remat": "full"}


def test_seam_sees_every_training_block_and_no_cached_decoding_call(monkeypatch):
    model = tiny_model("qwen3", num_layers=3, head_dim=6)
    seen = []
    original = decoder_seam.DecoderRun.run

    def spy(self, block, hidden):
        seen.append(block.layer.name)
        return original(self, block, hidden)

    monkeypatch.setattr(decoder_seam.DecoderRun, "run", spy)
    ids = np.arange(14, dtype=np.int32).reshape(2, 7) % 64
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    model.apply(model.variables, inputs, training=True)
    assert seen == [f"transformer_layer_{i}" for i in range(3)]
    seen.clear()
    model.generate([[1, 2, 3]], max_new_tokens=3)
    assert seen == []  # the KV-cache path never goes through the seam
    assert decoder_seam.current() is None  # the context closes with the forward pass


def test_generation_is_unchanged_by_scale_options():
    model = tiny_model("llama3", num_layers=3)
    before = model.generate([[5, 9, 2], [7, 1]], max_new_tokens=6)
    model.scale = kithara.ScaleConfig(remat="full", scan_layers=True, activation_sharding=False)
    assert model.generate([[5, 9, 2], [7, 1]], max_new_tokens=6) == before


def test_run_yaml_sets_the_model_scale():
    config = load_config(DEMO_CONFIG, ["model.scale.remat=full", "model.scale.scan_layers=true"])
    model = build_model(config, 100)
    assert model.scale == kithara.ScaleConfig(remat="full", scan_layers=True)
    assert isinstance(model.scale, kithara.ScaleConfig)
    with pytest.raises(ValueError, match="Unknown remat policy 'ful'"):
        load_config(DEMO_CONFIG, ["model.scale.remat=ful"])
    with pytest.raises(ValueError, match="Did you mean: 'remat'"):
        load_config(DEMO_CONFIG, ["model.scale.remmat=full"])


def test_options_change_no_variable():
    plain = tiny_model()
    scaled = tiny_model(scale=kithara.ScaleConfig(remat="full", scan_layers=True))
    a, b = plain.variables, scaled.variables
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert dataclasses.asdict(scaled.scale)["scan_layers"] is True


def test_loss_chunk_size_is_refused_where_it_would_do_nothing():
    examples = pattern_examples(8, length=8)
    loader = kithara.Dataloader(examples, 1, seed=0)
    with pytest.raises(ValueError, match="computes its logits whole"):
        kithara.Trainer(tiny_seq2seq(), kithara.optimizers.adamw(1e-2), loader, loss_chunk_size=4, progress_bar=False)
    with pytest.raises(ValueError, match="logprob_chunk_size"):
        kithara.GRPOConfig(loss_chunk_size=8)
    for config in (kithara.RewardConfig, kithara.PRMConfig):
        with pytest.raises(ValueError, match="a reward model's head has none"):
            config(loss_chunk_size=8)
    assert tiny_model().supports_chunked_loss


def test_scale_is_refused_for_decoders_the_seam_does_not_reach():
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16, max_sequence_length=16
    )
    causal_lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    model = kithara.KerasHubModel(causal_lm)  # the default options are accepted
    with pytest.raises(ValueError, match="GPT2Backbone's decoder blocks are not among"):
        model.scale = kithara.ScaleConfig(remat="full")
    with pytest.raises(ValueError, match="GPT2Backbone's decoder blocks are not among"):
        remat.enable_gradient_checkpointing(model)


def test_gradient_checkpointing_reaches_every_model_of_a_composite():
    value = kithara.ScalarHeadModel.from_causal_lm(tiny_model("qwen3", head_dim=6))
    both = PolicyAndValue(tiny_model("llama3"), value, seed=0)
    pair = TwoModels({"A": tiny_model("llama3"), "B": tiny_model("gemma2")})
    for composite, parts in ((both, (both.policy, both.value_model)), (pair, (pair.models["A"], pair.models["B"]))):
        remat.enable_gradient_checkpointing(composite)
        assert [part.scale.remat for part in parts] == ["full", "full"]
