"""Layer scan (ScaleConfig(scan_layers=True)): identical decoder blocks run as one jax.lax.scan with the
same losses and gradients as the unrolled stack, for every family's block pattern, with LoRA, packed
inputs, remat and FSDP, through a Trainer resuming an unscanned checkpoint, and a compiled program
whose size does not grow with depth."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_model

import kithara
from kithara.models import layer_scan
from kithara.models.model import ModelVariables

SCAN = kithara.ScaleConfig(scan_layers=True)
PLAIN = kithara.ScaleConfig()
VOCAB = 61
IDS = (np.arange(26, dtype=np.int32).reshape(2, 13) * 7 + 3) % VOCAB
INPUTS = {"token_ids": IDS, "padding_mask": np.ones_like(IDS)}


def loss_and_grads(model, inputs, training=True):
    variables = model.variables

    def loss(trainable):
        logits, _ = model.apply(ModelVariables(trainable, variables.non_trainable), inputs, training=training)
        logps = jax.nn.log_softmax(logits.astype(jnp.float32))
        labels = jnp.roll(jnp.asarray(inputs["token_ids"]), -1, axis=1)
        return -jnp.mean(jnp.take_along_axis(logps, labels[..., None], -1) * inputs["padding_mask"][..., None])

    return jax.jit(jax.value_and_grad(loss))(variables.trainable)


def assert_close(got, want):
    """rtol 1e-5 on the loss and every gradient; elements near zero are held to 1e-5 of their
    tensor's largest magnitude (a differently fused program rounds sums with cancellation apart)."""
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert got[1].keys() == want[1].keys()
    for path, value in want[1].items():
        value = np.asarray(value)
        np.testing.assert_allclose(got[1][path], value, rtol=1e-5, atol=1e-5 * np.abs(value).max(), err_msg=path)


@pytest.fixture
def scans(monkeypatch):
    """Records (blocks scanned, period) of every scan traced."""
    seen = []
    original = layer_scan.scan_blocks

    def spy(run, block, layers, period, hidden):
        seen.append((len(layers), period))
        return original(run, block, layers, period, hidden)

    monkeypatch.setattr(layer_scan, "scan_blocks", spy)
    return seen


def scanned_equals_unscanned(model, inputs=INPUTS, **kwargs):
    model.scale = PLAIN
    want = loss_and_grads(model, inputs, **kwargs)
    model.scale = SCAN
    assert_close(loss_and_grads(model, inputs, **kwargs), want)


FAMILIES = [
    ("llama3", dict(num_layers=3, tie_word_embeddings=False), (3, 1)),
    ("qwen3", dict(num_layers=3, head_dim=6), (3, 1)),
    ("mistral", dict(num_layers=3, sliding_window=5), (3, 1)),
    # Gemma 2 alternates sliding and global blocks: period 2, and block 4 is a tail run unscanned.
    ("gemma2", dict(num_layers=5, sliding_window_size=4), (4, 2)),
]


@pytest.mark.parametrize("family, kwargs, plan", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_scanned_equals_unscanned(family, kwargs, plan, scans):
    model = tiny_model(family, vocab_size=VOCAB, **kwargs)
    scanned_equals_unscanned(model)
    assert scans == [plan]


@pytest.mark.slow
def test_gemma3_scans_groups_of_five_local_and_one_global_block(scans):
    # Blocks 0-4 and 6-10 slide (RoPE 10k), 5 and 11 are global (RoPE 1M): period 6, block 12 a tail.
    model = tiny_model("gemma3", vocab_size=VOCAB, num_layers=13, sliding_window_size=4, hidden_dim=16, head_dim=4)
    scanned_equals_unscanned(model)
    assert scans == [(12, 6)]


def test_plan_finds_the_period_and_refuses_single_groups():
    gemma2 = tiny_model("gemma2", num_layers=3).backbone.transformer_layers
    assert layer_scan.find_plan(gemma2, 0) is None  # one group of (sliding, global) only
    llama = tiny_model("llama3", num_layers=4).backbone.transformer_layers
    assert layer_scan.find_plan(llama, 0) == layer_scan.Plan(0, 1, 4)
    assert layer_scan.find_plan(llama, 3) is None
    assert layer_scan.find_plan(llama[:1], 0) is None


def test_with_lora_packed_inputs_and_remat(scans):
    lora = kithara.LoraConfig(rank=2, targets=("query", "value", "down"))
    model = tiny_model("qwen3", vocab_size=VOCAB, num_layers=3, head_dim=6, lora=lora)
    segment_ids = np.array([[1] * 6 + [2] * 7, [1] * 9 + [0] * 4], np.int32)
    positions = np.array([list(range(6)) + list(range(7)), list(range(9)) + [0] * 4], np.int32)
    packed = {"token_ids": IDS, "padding_mask": segment_ids > 0, "segment_ids": segment_ids, "positions": positions}
    model.scale = PLAIN
    want = loss_and_grads(model, packed)
    assert all("lora" in path for path in want[1])  # only the adapters train
    for options in (SCAN, kithara.ScaleConfig(scan_layers=True, remat="full")):
        model.scale = options
        assert_close(loss_and_grads(model, packed), want)
    assert scans == [(3, 1), (3, 1)]


def test_fsdp_sharded_equals_one_device():
    one = tiny_model(
        "llama3", vocab_size=VOCAB, num_layers=3, sharding=kithara.ShardingStrategy(devices=jax.devices()[:1])
    )
    sharded = tiny_model("llama3", vocab_size=VOCAB, num_layers=3, sharding="fsdp")
    assert sharded.mesh.devices.size == 8
    batch = {key: np.tile(value, (4, 1)) for key, value in INPUTS.items()}  # 8 rows: one per device
    one.scale = PLAIN
    want = loss_and_grads(one, batch)
    for model in (one, sharded):
        model.scale = SCAN
        assert_close(loss_and_grads(model, batch), want)


@pytest.mark.parametrize("remat", ["none", pytest.param("full", marks=pytest.mark.slow)])
def test_dropout_draws_the_same_masks_and_advances_every_layer_seed(remat, scans):
    model = tiny_model("llama3", vocab_size=VOCAB, num_layers=3, dropout=0.25)
    variables = model.variables
    assert any("seed_generator" in path for path in variables.non_trainable)

    def step(trainable):
        logits, state = model.apply(ModelVariables(trainable, variables.non_trainable), INPUTS, training=True)
        return logits.astype(jnp.float32).sum(), state

    def run(options):
        model.scale = options
        return jax.jit(jax.value_and_grad(step, has_aux=True))(variables.trainable)

    (want_loss, want_state), want_grads = run(kithara.ScaleConfig(remat=remat))
    (loss, state), grads = run(kithara.ScaleConfig(scan_layers=True, remat=remat))
    assert_close((loss, grads), (want_loss, want_grads))
    for path, value in want_state.items():  # each layer's seed state advanced as unscanned
        assert not np.array_equal(value, variables.non_trainable[path]), path
        np.testing.assert_array_equal(state[path], value, err_msg=path)
    assert scans == [(3, 1)]


def _grad_hlo_size(num_layers, options):
    model = tiny_model("llama3", num_layers=num_layers, scale=options)
    variables = model.variables

    def loss(trainable):
        logits, _ = model.apply(ModelVariables(trainable, variables.non_trainable), INPUTS, training=True)
        return logits.sum()

    return len(jax.jit(jax.grad(loss)).lower(variables.trainable).as_text())


def test_program_size_does_not_grow_with_depth():
    scanned = [_grad_hlo_size(n, SCAN) for n in (2, 8)]
    unscanned = [_grad_hlo_size(n, PLAIN) for n in (2, 8)]
    # Only the per-layer variables (arguments, stacking and the gradient slices) grow with depth.
    assert scanned[1] < 1.5 * scanned[0], scanned
    assert unscanned[1] > 3 * unscanned[0], unscanned


def make_trainer(model, examples, steps, checkpointer=None):
    loader = kithara.Dataloader(examples, 1, seed=0)
    tx = kithara.optimizers.adamw(optax.linear_schedule(1e-2, 1e-3, 6), weight_decay=0.01)
    return kithara.Trainer(model, tx, loader, steps=steps, checkpointer=checkpointer, progress_bar=False)


@pytest.mark.slow
def test_trainer_resumes_an_unscanned_checkpoint_and_exports_the_same(examples, tmp_path):
    data = examples[:48]
    reference = make_trainer(tiny_model(num_layers=3), data, steps=4)
    expected = [h["loss"] for h in reference.train()]
    checkpoints = str(tmp_path / "c")
    first = make_trainer(tiny_model(num_layers=3), data, steps=2, checkpointer=kithara.Checkpointer(checkpoints))
    np.testing.assert_array_equal([h["loss"] for h in first.train()], expected[:2])

    scanned = tiny_model(num_layers=3, seed=1, scale=SCAN)
    second = make_trainer(scanned, data, steps=4, checkpointer=kithara.Checkpointer(checkpoints))
    history = second.train()
    assert second.restored_step == 2 and second.compilations["train_step"] == 1
    np.testing.assert_allclose([h["loss"] for h in history], expected[2:], rtol=1e-5)

    from safetensors.numpy import load_file

    reference.model.save_in_hf_format(tmp_path / "plain")
    scanned.save_in_hf_format(tmp_path / "scanned")
    want, got = (
        load_file(tmp_path / "plain" / "model.safetensors"),
        load_file(tmp_path / "scanned" / "model.safetensors"),
    )
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5 * np.abs(value).max(), err_msg=name)


def test_hidden_states_path_scans_too(scans):
    model = tiny_model("gemma2", vocab_size=VOCAB, num_layers=4)
    hidden = jax.jit(lambda v: model.hidden_states(v, INPUTS, training=False)[0])
    want = np.asarray(hidden(model.variables))
    model.scale = SCAN
    hidden = jax.jit(lambda v: model.hidden_states(v, INPUTS, training=False)[0])
    np.testing.assert_allclose(hidden(model.variables), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert scans == [(4, 2)]
