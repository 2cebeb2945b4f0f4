import logging

import jax
import pytest
from jax.sharding import PartitionSpec as P

from kithara.sharding import ShardingStrategy, as_strategy, param_shardings, param_spec


def _spec(strategy, path, shape):
    return param_spec(strategy, strategy.make_mesh(), path, shape)


def test_mesh_shapes_per_strategy():
    assert dict(ShardingStrategy("dp").make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(ShardingStrategy("fsdp").make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(ShardingStrategy("fsdp_tp", tensor_parallel=2).make_mesh().shape) == {"data": 1, "fsdp": 4, "tensor": 2}


def test_llama_and_gemma_layouts_follow_the_logical_table():
    tp = ShardingStrategy("fsdp_tp", tensor_parallel=2)
    assert _spec(tp, "transformer_layer_0/self_attention/query/kernel", (64, 4, 16)) == P("fsdp", "tensor", None)
    assert _spec(tp, "decoder_block_0/attention/query/kernel", (4, 64, 16)) == P("tensor", "fsdp", None)
    assert _spec(tp, "transformer_layer_0/feedforward_output_dense/kernel", (128, 64)) == P("tensor", "fsdp")
    assert _spec(tp, "token_embedding/embeddings", (256, 64)) == P("tensor", "fsdp")
    assert _spec(tp, "transformer_layer_0/self_attention_layernorm/scale", (64,)) == P()


def test_data_parallel_replicates_parameters():
    dp = ShardingStrategy("dp")
    assert _spec(dp, "transformer_layer_0/self_attention/query/kernel", (64, 4, 16)) == P(None, None, None)


def test_indivisible_dims_fall_back_to_another_dim_or_replication():
    fsdp = ShardingStrategy("fsdp")
    # vocab 100 and hidden 36 do not divide by 8: hidden is the table's fsdp dim, so FSDP moves.
    assert _spec(fsdp, "token_embedding/embeddings", (104, 36)) == P("fsdp", None)
    assert _spec(fsdp, "token_embedding/embeddings", (100, 36)) == P(None, None)
    # An unknown variable (e.g. a LoRA factor) gets FSDP on its largest divisible dim.
    assert _spec(fsdp, "x/lora_kernel_a", (64, 4, 4)) == P("fsdp", None, None)


def test_user_rules_win():
    strategy = ShardingStrategy("fsdp", rules=[(r"embeddings$", P())])
    assert _spec(strategy, "token_embedding/embeddings", (256, 64)) == P()


def test_large_unsharded_variable_warns(caplog):
    strategy = ShardingStrategy("fsdp")
    with caplog.at_level(logging.WARNING):
        param_shardings(strategy, strategy.make_mesh(), {"token_embedding/embeddings": (1001, 2047)})
    assert "not sharded over the fsdp axis" in caplog.text


def test_invalid_strategies_are_refused():
    with pytest.raises(ValueError, match="Unknown sharding strategy"):
        ShardingStrategy("zero3")
    with pytest.raises(ValueError, match="needs strategy 'fsdp_tp'"):
        ShardingStrategy("fsdp", tensor_parallel=2)
    with pytest.raises(ValueError, match="does not divide"):
        ShardingStrategy("fsdp_tp", tensor_parallel=3).make_mesh()
    with pytest.raises(TypeError):
        ShardingStrategy("fsdp", rules=[("x", ("fsdp",))])
    assert as_strategy(None).name == "fsdp"
    assert len(jax.devices()) == 8
