"""8-bit AdamW (kithara/trainer/adamw_8bit.py): bitsandbytes' maps and quantizer, parity with
bitsandbytes' AdamW8bit on CPU, state bytes, sharding, checkpoints, the config names, and
learning next to float32 AdamW."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import DEFAULT_CODEGEN, pattern_examples
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import kithara
from kithara.trainer import adamw_8bit, optimizers
from kithara.trainer.config import TrainingConfig

LUT_STEPS = 65535  # bitsandbytes' CPU quantize_blockwise rounds [-1, 1] to 65536 points first


def bnb_modules():
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    return torch, bnb


def bnb_reference_quantize(torch, A, code, blocksize):
    """bitsandbytes' own reference quantizer (its ``default`` backend: ``torch.bucketize`` on the
    midpoints between codes, i.e. the nearest code), which a CPU kernel otherwise shadows."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, A, code, blocksize)


def adam_state(opt_state):
    is_state = lambda x: isinstance(x, adamw_8bit.ScaleByAdam8bitState)  # noqa: E731
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x))


def test_maps_are_bitsandbytes_dynamic_maps():
    _, bnb = bnb_modules()
    for signed, ours in ((True, adamw_8bit.SIGNED_MAP), (False, adamw_8bit.UNSIGNED_MAP)):
        np.testing.assert_array_equal(ours, bnb.functional.create_dynamic_map(signed=signed).numpy())


@pytest.mark.parametrize("shape", [(5000,), (8, 512)])  # a padded last block; blocks laid out per row
def test_quantize_round_trip_matches_bitsandbytes(shape):
    torch, bnb = bnb_modules()
    F = bnb.functional
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 10 ** rng.uniform(-7, 0, shape)).astype(np.float32)
    x.reshape(-1)[256:512] = 0.0  # an all-zero block
    for code, values in ((adamw_8bit.SIGNED_MAP, x), (adamw_8bit.UNSIGNED_MAP, np.abs(x))):
        moment = adamw_8bit.quantize(jnp.asarray(values), code)
        codes, absmax = np.asarray(moment.codes), np.asarray(moment.absmax).reshape(-1)
        reference_codes, reference_absmax = bnb_reference_quantize(torch, torch.tensor(values), torch.tensor(code), 256)
        np.testing.assert_array_equal(codes, reference_codes.numpy())
        np.testing.assert_array_equal(absmax, reference_absmax.numpy())
        dequantized = F.dequantize_blockwise(
            torch.tensor(codes), absmax=torch.tensor(absmax), code=torch.tensor(code), blocksize=256
        )
        np.testing.assert_array_equal(np.asarray(adamw_8bit.dequantize(moment, code)), dequantized.numpy())

        # bitsandbytes' CPU kernel (functional.quantize_blockwise on CPU) first rounds each scaled
        # value to one of 65536 evenly spaced points, then takes that point's nearest code: it
        # differs from the nearest code exactly where a midpoint between codes lies within one
        # such step of the value (half a step, plus float32 rounding of the index).
        cpu_codes, state = F.quantize_blockwise(torch.tensor(values), code=torch.tensor(code), blocksize=256)
        np.testing.assert_array_equal(state.absmax.numpy(), absmax)
        blocks = np.pad(values.reshape(-1), (0, -values.size % 256)).reshape(-1, 256)
        with np.errstate(divide="ignore"):
            scaled = (blocks * np.where(absmax > 0, np.float32(1) / absmax, 0)[:, None]).reshape(-1)[: values.size]
        midpoints = (code[:-1] + code[1:]) / np.float32(2)
        near_midpoint = np.abs(scaled[:, None] - midpoints).min(axis=1) <= 1.01 / LUT_STEPS
        differs = cpu_codes.numpy().reshape(-1) != codes.reshape(-1)
        assert differs.any() and not (differs & ~near_midpoint).any()


def test_matches_bitsandbytes_adamw8bit(monkeypatch):
    """Ten steps of kithara.optimizers.adamw(state_dtype="int8") equal bitsandbytes' AdamW8bit
    (CPU), with weight decay, a tail block, an all-zero block and a small float32 tensor."""
    torch, bnb = bnb_modules()
    from bitsandbytes.backends.cpu import ops as cpu_ops

    # bitsandbytes' CPU optimizer requantizes through its CPU kernel, whose 65536-point
    # rounding is not the nearest code (test_quantize_round_trip_matches_bitsandbytes): have it
    # requantize with bitsandbytes' reference quantizer instead, as its CUDA kernel rounds.
    def requantize(A, code, absmax_out, out_uint8, blocksize):
        out, absmax = bnb_reference_quantize(torch, A, code, blocksize)
        out_uint8.copy_(out)
        absmax_out.copy_(absmax)

    monkeypatch.setattr(cpu_ops, "_quant_blockwise_fp32_direct", requantize)
    steps, lr, weight_decay, b1, b2, eps = 10, 1e-2, 0.1, 0.9, 0.999, 1e-3  # eps near sqrt(v): its place matters
    shapes = {"kernel": (40, 130), "embedding": (24, 256), "bias": (100,)}  # 20.3 blocks, 24 blocks, float32
    rng = np.random.default_rng(0)
    start = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    torch_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in start.items()}
    reference = bnb.optim.AdamW8bit(list(torch_params.values()), lr, (b1, b2), eps, weight_decay)
    tx = kithara.optimizers.adamw(
        lr, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps, max_grad_norm=None, state_dtype="int8"
    )
    params = {k: jnp.asarray(v) for k, v in start.items()}
    state = tx.init(params)

    @functools.partial(jax.jit, compiler_options=DEFAULT_CODEGEN)  # which products fuse, as users compile it
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    largest_grad = 0.0
    for _ in range(steps):
        # Magnitudes spanning three decades inside each block, so many codes are small ones.
        grads = {
            k: (rng.standard_normal(s) * 10 ** rng.uniform(-4, -1, s)).astype(np.float32) for k, s in shapes.items()
        }
        grads["kernel"].reshape(-1)[256:512] = 0.0
        largest_grad = max(largest_grad, float(np.abs(grads["bias"]).max()))
        for k, p in torch_params.items():
            p.grad = torch.tensor(grads[k])
        reference.step()
        params, state = step(params, state, grads)

    # Per step bitsandbytes rounds each parameter twice (p * (1 - lr*wd), then + update) and
    # optax once (p + -lr * (update + wd*p)), each rounding within half an ulp, 2**-24 |p|; the
    # updates themselves agree to ~1e-7 relative (~1e-9 here). So after `steps` the parameters
    # agree to 1.5 * steps * 2**-23 |p|; atol covers parameters that pass near 0 (|p| below the
    # largest move, 0.1). One code off by one (1% of a moment at least) would move a parameter
    # by ~1e-4, 40x over it.
    rtol = 2 * steps * 2.0**-23
    adam = adam_state(state)
    for k, p in torch_params.items():
        np.testing.assert_allclose(np.asarray(params[k]), p.detach().numpy(), rtol=rtol, atol=rtol * 0.1)
        bnb_state, mu, nu = reference.state[p], adam.mu[k], adam.nu[k]
        # The float32 moments are b * m + (1 - b) * g (g * g for v) in one fused multiply-add
        # in torch and in XLA:CPU, but which product XLA fuses depends on the fusion around it:
        # a moment can differ in its last bit each step (an ulp of the larger term, |g| or
        # |g|**2, whatever the cancelling sum), and so can a block's absmax (its largest |moment|).
        # A code moves only if a value lies within that of a midpoint between codes: none here.
        if k == "bias":  # under min_8bit_size: float32 moments
            for ours, theirs, term in ((mu, "state1", largest_grad), (nu, "state2", largest_grad**2)):
                atol = steps * 2.0**-23 * term
                np.testing.assert_allclose(np.asarray(ours), bnb_state[theirs].numpy(), rtol=0, atol=atol)
            continue
        np.testing.assert_array_equal(np.asarray(mu.codes), bnb_state["state1"].numpy())
        np.testing.assert_array_equal(np.asarray(nu.codes), bnb_state["state2"].numpy())
        for ours, theirs in ((mu.absmax, "absmax1"), (nu.absmax, "absmax2")):
            np.testing.assert_allclose(np.asarray(ours).reshape(-1), bnb_state[theirs].numpy(), rtol=steps * 2.0**-23)


def state_bytes(tx, shapes):
    abstract = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(jax.eval_shape(tx.init, abstract)))


def llama_3_2_1b_shapes():
    """Llama 3.2 1B's parameters in keras-hub's layout (tied embeddings)."""
    hidden, heads, kv_heads, head_dim, ffn, vocab = 2048, 32, 8, 64, 8192, 128256
    layer = {
        "query": (hidden, heads, head_dim), "key": (hidden, kv_heads, head_dim), "value": (hidden, kv_heads, head_dim),
        "attention_output": (heads, head_dim, hidden), "gate": (hidden, ffn), "up": (hidden, ffn),
        "down": (ffn, hidden), "attention_norm": (hidden,), "ffn_norm": (hidden,),
    }  # fmt: skip
    shapes = {f"layer_{i}/{name}": shape for i in range(16) for name, shape in layer.items()}
    return {"token_embedding": (vocab, hidden), "final_norm": (hidden,), **shapes}


@pytest.mark.parametrize(
    "shapes",
    [
        {"embedding": (512, 256), "mlp": (256, 1024), "heads": (256, 8, 64), "odd": (4099,), "norm": (256,)},
        llama_3_2_1b_shapes(),
    ],
    ids=["mixed", "llama-3.2-1b"],
)
def test_state_is_a_quarter_of_adams(shapes):
    """Per moment an 8-bit parameter of n values holds n codes and ceil(n / 256) float32 scales
    (the last block padded); below 4096 values both moments stay float32, 4n bytes each."""
    sizes = [math.prod(s) for s in shapes.values()]
    expected = 4 + sum(2 * (n + 4 * -(-n // 256)) if n >= 4096 else 8 * n for n in sizes)  # + the int32 count
    ours = state_bytes(adamw_8bit.scale_by_adam_8bit(), shapes)
    adam = state_bytes(optax.scale_by_adam(), shapes)
    assert ours == expected and adam == 4 + 8 * sum(sizes)
    # (1 + 4/256) / 4 per moment when every parameter is 8-bit and fills its blocks; float32
    # parameters add at most their share of the values, and each padded block or count a byte
    # per 8 values of the total (mixed: 0.25427 <= 0.25440; Llama 3.2 1B: 0.253947 <= 0.253961).
    share_float32 = sum(n for n in sizes if n < 4096) / sum(sizes)
    upper = (1 + 4 / 256) / 4 + share_float32 + (len(sizes) + 1) / sum(sizes)
    assert (1 + 4 / 256) / 4 < ours / adam <= upper


def test_sharded_update_equals_unsharded_and_state_shards_like_params():
    mesh = jax.make_mesh((4, 2), ("fsdp", "model"), axis_types=(AxisType.Auto,) * 2)  # as kithara's meshes
    specs = {
        "mlp": ((64, 512), PartitionSpec("fsdp", "model")),  # scales (64, 2), split both ways
        "heads": ((64, 8, 64), PartitionSpec("fsdp", "model")),  # 4 heads = one block per device: (64, 2)
        "rows": ((16, 2, 128), PartitionSpec(None, "model")),  # a block spans both model shards: (16, 1)
        "odd": ((4099,), PartitionSpec()),  # padded flat blocks: replicated scales
        "norm": ((64,), PartitionSpec("model")),  # float32 moments
    }
    shapes = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, (s, _) in specs.items()}
    param_shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in specs.items()}
    tx = kithara.optimizers.adamw(1e-2, weight_decay=0.1, max_grad_norm=None, state_dtype="int8")
    shardings = optimizers.state_shardings(jax.eval_shape(tx.init, shapes), param_shardings, shapes, mesh)
    adam = adam_state(shardings)
    absmax_specs = {"mlp": ("fsdp", "model"), "heads": ("fsdp", "model"), "rows": (None, None), "odd": ()}
    for k, spec in absmax_specs.items():
        for moment in (adam.mu[k], adam.nu[k]):
            assert moment.codes == param_shardings[k] and moment.absmax.spec == PartitionSpec(*spec), k
    assert adam.mu["norm"] == adam.nu["norm"] == param_shardings["norm"]

    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(s.shape).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s.shape).astype(np.float32) * 1e-2 for k, s in shapes.items()} for _ in range(3)]

    def run(step, params, state):
        for g in grads:
            params, state = step(params, state, g)
        return params, state

    def update(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    sharded_step = jax.jit(
        update, in_shardings=(param_shardings, shardings, param_shardings), out_shardings=(param_shardings, shardings)
    )
    start = (jax.device_put(params, param_shardings), jax.jit(tx.init, out_shardings=shardings)(params))
    compiled = sharded_step.lower(*start, grads[0]).compile()
    # Each device (de)quantizes its own shard: the one collective is the max over "rows"' blocks,
    # which span both of its model shards (one all-reduce for both moments' scales).
    hlo = compiled.as_text()
    assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute"))
    assert hlo.count(" all-reduce(") == 1
    sharded = run(compiled, *start)
    one_device = run(jax.jit(update), params, jax.jit(tx.init)(params))
    assert adam_state(sharded[1]).mu["heads"].codes.sharding == param_shardings["heads"]
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(one_device), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def small_model(seed=0, **kwargs):
    """The embedding and the three feed-forward kernels hold 4096 values, so their moments are
    8-bit; the attention kernels' stay float32. head_dim (16) is not hidden_dim / num_heads (8)."""
    return kithara.KerasHubModel.from_config(
        "qwen3", vocab_size=128, num_layers=1, hidden_dim=32, num_heads=4, num_kv_heads=2, intermediate_dim=128,
        head_dim=16, seed=seed, **kwargs,
    )  # fmt: skip


def losses(history):
    return np.asarray([h["loss"] for h in history])


@pytest.mark.parametrize("name", ["adamw_8bit", "adamw_bnb_8bit"])
def test_config_names_build_the_8bit_adamw(name):
    config = TrainingConfig(optim=name, learning_rate=1e-2, weight_decay=0.01)
    tx = config.build_optimizer(total_steps=4)
    same = kithara.optimizers.adamw(1e-2, weight_decay=0.01, state_dtype="int8")
    params = {"w": jnp.ones((64, 64)), "b": jnp.ones((8,))}
    state = tx.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(same.init(params))
    assert adam_state(state).mu["w"].codes.dtype == jnp.uint8 and adam_state(state).mu["b"].dtype == jnp.float32
    assert float(optimizers.learning_rate(state)) == pytest.approx(1e-2)  # injected, so logged


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "adamw_torch_4bit", "lion_8bit", "adamw_torch_8bit"])
def test_unsupported_names_and_state_dtypes_are_refused_with_the_choices(name):
    with pytest.raises(NotImplementedError, match=f"optim='{name}' is not supported yet") as error:
        TrainingConfig(optim=name)
    assert "'adamw', " in str(error.value) and "'adamw_8bit', 'adamw_bnb_8bit'" in str(error.value)
    assert ("offload_optimizer=True" in str(error.value)) == name.startswith("paged_")
    with pytest.raises(ValueError, match=r"state_dtype must be one of \['float32', 'int8'\], got 'uint8'"):
        kithara.optimizers.adamw(1e-3, state_dtype="uint8")


@pytest.mark.slow
def test_learns_like_float32_adamw_and_resumes_exactly(tmp_path):
    """optim="adamw_8bit" next to optim="adamw" from the same weights and data order; then the
    8-bit run resumed from its halfway checkpoint ends identical to it (one test: three short
    runs share two compilations)."""
    data = pattern_examples(64, vocab=128)

    def run(optim, checkpointer=None, seed=0):
        args = TrainingConfig(max_steps=20, learning_rate=3e-2, optim=optim, disable_tqdm=True, report_to="none")
        loader = kithara.Dataloader(data, 1, seed=0)
        trainer = kithara.Trainer(small_model(seed), train_dataset=loader, args=args, checkpointer=checkpointer)
        return trainer, losses(trainer.train())

    _, fp32 = run("adamw")
    reference, int8 = run("adamw_8bit", kithara.Checkpointer(str(tmp_path), save_interval=10))
    uint8_leaves = [leaf for leaf in jax.tree.leaves(reference.train_state.opt_state) if leaf.dtype == jnp.uint8]
    assert len(uint8_leaves) == 2 * 4  # the embedding and 3 feed-forward kernels, 2 moments each
    print(f"loss first/last: adamw {fp32[0]:.4f}/{fp32[-1]:.4f}, adamw_8bit {int8[0]:.4f}/{int8[-1]:.4f}")
    # Same weights and batches: the runs start equal and drift apart only through the moments'
    # 8-bit rounding (about 1% of each value). The loss falls by a third in 20 steps (4.87 to
    # 3.20 for both); the last five steps' means (3.39 and 3.41 on CPU) agree within 0.05.
    assert int8[0] == fp32[0] and int8[-1] < 0.7 * int8[0]
    assert abs(int8[-5:].mean() - fp32[-5:].mean()) < 0.05

    kithara.Checkpointer(str(tmp_path)).manager.delete(20)  # resume from step 10
    resumed, tail = run("adamw_8bit", kithara.Checkpointer(str(tmp_path), save_interval=10), seed=1)
    assert resumed.restored_step == 10
    np.testing.assert_array_equal(tail, int8[10:])
    ours, theirs = resumed.train_state.opt_state, reference.train_state.opt_state
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for path, value in reference.model.variables.trainable.items():
        np.testing.assert_array_equal(np.asarray(resumed.model.variables.trainable[path]), np.asarray(value))
