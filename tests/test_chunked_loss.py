"""``TrainingConfig.loss_chunk_size``: every log-prob objective (SFT, DPO with a live and an
adapters-off reference, ORPO, KTO, cycle) gives the same loss, metrics and gradients with its
LM head and log-softmax run a few positions (and vocabulary entries) at a time as from the full
float32 logits; a Trainer run gives the same losses; the compiled step needs far less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_model, word_tokenizer

import kithara
from kithara.data import PreferenceDataset
from kithara.models import logprobs
from kithara.objectives.kto import KTOTrainer
from kithara.objectives.orpo import ORPOTrainer

CHUNKS = (1, 5, 16)  # 5 leaves a padded last chunk of the odd length 13; 16 is longer than it
LENGTH = 13
FAMILIES = {
    "gemma2": dict(head_dim=16),  # final logit soft-cap, tied embeddings
    "llama3": dict(tie_word_embeddings=False),  # a separate output embedding
}


# Each case compiles five train steps' worth (20-30 s on 2 cores): only SFT and DPO on gemma2
# run in the fast set; the rest are marked slow (they still run in CI).
FAMILY_PARAMS = [pytest.param("gemma2"), pytest.param("llama3", marks=pytest.mark.slow)]
SLOW_FAMILIES = [pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


def model_of(family, seed=0, **kwargs):
    return tiny_model(family, vocab_size=61, num_layers=1, seed=seed, **FAMILIES[family], **kwargs)


def perturbed(model, seed=7, only="lora"):
    """``model`` with noise added to its trainable variables whose path holds ``only`` (the
    LoRA B matrices start at zero), so it differs from its reference."""
    rng = np.random.default_rng(seed)
    trainable = {
        p: v + 0.2 * rng.normal(size=v.shape).astype(np.float32) if only in p else v
        for p, v in model.variables.trainable.items()
    }
    model.variables = kithara.ModelVariables(trainable, model.variables.non_trainable)
    return model


def each_chunking(make, batch, frozen=None):
    """Loss sums, metric sums and gradients of ``make(chunk).compute_loss`` for the unchunked
    step and each of ``CHUNKS``, all in one jitted program."""
    trainers = {chunk: make(chunk) for chunk in (None, *CHUNKS)}
    variables = trainers[None].model.variables

    @jax.jit
    def run(variables, batch, frozen):
        results = {}
        for chunk, trainer in trainers.items():

            def total(v, trainer=trainer):
                out, _ = trainer.compute_loss(v, batch, jax.random.key(0), frozen)
                return out.total, out

            (_, out), grads = jax.value_and_grad(total, has_aux=True)(variables)
            results[str(chunk)] = (out, grads.trainable)
        return results

    return run(variables, batch, frozen)


def assert_same_as_unchunked(results, rtol=1e-5):
    want, want_grads = results["None"]
    assert want.sums, "no metrics to compare"
    for chunk in CHUNKS:
        got, grads = results[str(chunk)]
        np.testing.assert_allclose(got.total, want.total, rtol=rtol, err_msg=f"chunk {chunk}: loss")
        np.testing.assert_array_equal(got.weight, want.weight)
        assert set(got.sums) == set(want.sums)
        for key, value in want.sums.items():
            np.testing.assert_allclose(got.sums[key], value, rtol=rtol, atol=1e-6, err_msg=f"chunk {chunk}: {key}")
        for path, value in want_grads.items():
            scale = float(jnp.max(jnp.abs(value)))
            assert scale > 0, path
            np.testing.assert_allclose(
                grads[path], value, rtol=rtol, atol=rtol * 0.1 * scale, err_msg=f"chunk {chunk}: d/d {path}"
            )


def packed_batch(vocab=61, rows=8, seed=0):
    """Two examples per row (segments 1 and 2, positions restarting), then padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (rows, LENGTH)).astype(np.int32)
    segment_ids = np.zeros((rows, LENGTH), np.int32)
    positions = np.zeros((rows, LENGTH), np.int32)
    for r in range(rows):
        first, second = 3 + r % 5, 4 + r % 3
        segment_ids[r, :first], segment_ids[r, first : first + second] = 1, 2
        positions[r, :first], positions[r, first : first + second] = np.arange(first), np.arange(second)
    labels = np.roll(ids, -1, axis=1)
    label_mask = (segment_ids > 0) & (np.roll(segment_ids, -1, axis=1) == segment_ids)
    return {"token_ids": ids, "padding_mask": segment_ids > 0, "labels": labels, "label_mask": label_mask,
            "segment_ids": segment_ids, "positions": positions}  # fmt: skip


def plain_batch(vocab=61, rows=8, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (rows, LENGTH)).astype(np.int32)
    mask = np.arange(LENGTH)[None] < rng.integers(5, LENGTH + 1, (rows, 1))
    return {"token_ids": ids, "padding_mask": mask, "labels": np.roll(ids, -1, axis=1),
            "label_mask": mask & (np.arange(LENGTH)[None] >= 2)}  # fmt: skip


def sft_loader(vocab=61):
    from conftest import pattern_examples

    return kithara.Dataloader(pattern_examples(64, length=LENGTH, vocab=vocab), 1, seed=0, num_devices=8)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_sft_loss_metrics_and_gradients_on_packed_rows(family):
    model = model_of(family)
    loader = sft_loader()

    def make(chunk):
        return kithara.Trainer(model, optax.sgd(0.1), loader, steps=1, progress_bar=False, loss_chunk_size=chunk)

    results = each_chunking(make, packed_batch())
    assert set(results["None"][0].sums) == {"token_accuracy"}
    assert_same_as_unchunked(results)


PAIRS = [
    {"prompt": p, "chosen": c, "rejected": r}
    for p, c, r in [
        ("how are you", "fine thanks", "bye"),
        ("hi", "hello", "bye bye ok"),
        ("hello", "hi how are you", "ok"),
        ("bye", "bye", "hello hello"),
        ("are you fine", "fine thanks you", "ok bye"),
        ("user", "hello", "ok ok ok"),
        ("thanks", "ok", "bye"),
        ("how", "are you", "fine"),
    ]
]


def pair_loader():
    return kithara.Dataloader(PreferenceDataset(PAIRS, word_tokenizer(), max_length=LENGTH), 1, seed=0, num_devices=8)


def first_batch(loader):
    return {k: jnp.asarray(v) for k, v in next(iter(loader.epoch(0))).items()}


# Every input the DPO losses read: the margin (sigmoid), per-token lengths (ipo), the chosen
# NLL alone (sft), the chosen and rejected log-ratios apart (apo_zero).
DPO_LOSS = {"sigmoid": 1.0, "ipo": 0.5, "sft": 0.3, "apo_zero": 0.2}


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_dpo_with_a_live_reference_model(family):
    model, ref = model_of(family), model_of(family, seed=1)
    loader = pair_loader()

    def make(chunk):
        return kithara.DPOTrainer(model, optax.sgd(0.1), loader, ref_model=ref, loss_type=DPO_LOSS, steps=1,
                                  progress_bar=False, loss_chunk_size=chunk)  # fmt: skip

    results = each_chunking(make, first_batch(loader), ref.variables)
    assert {"logits/chosen", "logits/rejected", "rewards/margins"} <= set(results["None"][0].sums)
    assert_same_as_unchunked(results)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama3"])  # one family each: the suite's time; both families run in SFT/DPO
def test_dpo_with_the_adapters_off_reference(family):
    model = perturbed(model_of(family, lora=kithara.LoraConfig(rank=2, targets=("query", "value"))))
    loader = pair_loader()

    def make(chunk):
        trainer = kithara.DPOTrainer(model, optax.sgd(0.1), loader, loss_type=DPO_LOSS, steps=1, progress_bar=False,
                                     loss_chunk_size=chunk)  # fmt: skip
        assert trainer.reference == "adapters_off"
        return trainer

    results = each_chunking(make, first_batch(loader))
    assert float(results["None"][0].sums["rewards/margins"]) != 0.0  # the adapters change the log-probs
    assert_same_as_unchunked(results)


def test_precomputed_reference_log_probs_equal_unchunked():
    model, ref = model_of("gemma2"), model_of("gemma2", seed=1)
    stored = {}
    for chunk in (None, 5):
        loader = pair_loader()
        kithara.DPOTrainer(model, optax.sgd(0.1), loader, ref_model=ref, precompute_ref_log_probs=True, steps=1,
                           progress_bar=False, loss_chunk_size=chunk)  # fmt: skip
        stored[chunk] = np.stack([ex["ref_chosen_logps"] for ex in loader.examples])
    np.testing.assert_allclose(stored[5], stored[None], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma2"])  # one family each: the suite's time; both families run in SFT/DPO
def test_orpo_loss_metrics_and_gradients(family):
    model = model_of(family)
    loader = pair_loader()

    def make(chunk):
        return ORPOTrainer(model, optax.sgd(0.1), loader, beta=0.3, steps=1, progress_bar=False, loss_chunk_size=chunk)

    results = each_chunking(make, first_batch(loader))
    assert {"nll_loss", "log_odds_ratio", "logits/chosen"} <= set(results["None"][0].sums)
    assert_same_as_unchunked(results)


UNPAIRED = [
    {"prompt": "hi how", "completion": " are you", "label": True},
    {"prompt": "hello", "completion": " bye", "label": False},
    {"prompt": "ok", "completion": " fine thanks", "label": True},
    {"prompt": "hi", "completion": " ok ok", "label": False},
]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama3"])  # one family each: the suite's time; both families run in SFT/DPO
def test_kto_with_kl_rows_and_a_frozen_copy_reference(family):
    model = model_of(family)
    trainers = {}

    def make(chunk):
        trainers[chunk] = KTOTrainer(model, train_dataset=UNPAIRED * 4, processing_class=word_tokenizer(),
                                     max_length=LENGTH, max_steps=1, per_device_train_batch_size=1, progress_bar=False,
                                     loss_chunk_size=chunk)  # fmt: skip
        assert trainers[chunk].reference == "frozen_copy" and trainers[chunk].uses_kl
        return trainers[chunk]

    reference = make(None)  # its frozen copy of the starting weights is the reference of all
    perturbed(model, only="")  # so the policy differs from it
    batch = jax.tree.map(lambda x: x[0], next(reference.batches(0, None))[1])
    results = each_chunking(make, batch, reference.frozen_variables())
    assert {"kl", "logits/chosen_sum", "logps/rejected_sum"} <= set(results["None"][0].sums)
    assert_same_as_unchunked(results)


@pytest.mark.slow
def test_cycle_side_losses():
    models = {"A": model_of("gemma2", seed=3), "B": model_of("llama3", seed=4)}
    texts = ["hi hello how", "are you fine", "thanks bye ok", "how are you"] * 4

    def make(chunk):
        return kithara.CycleTrainer(models=models, tokenizers=word_tokenizer(), train_dataset_A=texts,
                                    train_dataset_B=texts, optimizer=optax.sgd(0.1), steps=1, batch_size_per_side=8,
                                    max_length=LENGTH, max_new_tokens=2, progress_bar=False,
                                    loss_chunk_size=chunk)  # fmt: skip

    for side in ("A", "B"):
        trainers = {chunk: make(chunk) for chunk in (None, *CHUNKS)}
        batch = plain_batch(seed=2)

        @jax.jit
        def run(variables, batch, trainers=trainers, side=side):
            results = {}
            for chunk, trainer in trainers.items():

                def total(v, trainer=trainer):
                    out, _ = trainer.side_loss(v, batch, jax.random.key(0), side=side)
                    return out.total, out

                (_, out), grads = jax.value_and_grad(total, has_aux=True)(variables)
                results[str(chunk)] = (out, grads.trainable)
            return results

        assert_same_as_unchunked(run(models[side].variables, batch))


@pytest.mark.slow
def test_trainer_run_gives_the_same_losses():
    losses = {}
    for chunk in (None, 5):
        model = model_of("gemma2")
        loader = kithara.Dataloader([dict(ex) for ex in sft_loader().examples], 1, seed=0, num_devices=8, packing=True)
        trainer = kithara.Trainer(model, optax.adamw(1e-2), loader, steps=3, progress_bar=False, loss_chunk_size=chunk)
        history = trainer.train()
        losses[chunk] = [(h["loss"], h["token_accuracy"]) for h in history]
    np.testing.assert_allclose(losses[5], losses[None], rtol=1e-5)
    assert len(losses[None]) == 3


# The vocabulary in slices too -----------------------------------------------------------------


@pytest.mark.parametrize("family", SLOW_FAMILIES)
def test_vocabulary_chunks_equal_the_full_head(family):
    model = model_of(family)
    inputs = packed_batch(seed=3)
    stats = logprobs.STATS

    def loss(out):
        return out["logps"].sum() + 0.3 * out["entropy"].sum() + 0.1 * out["logit_mean"].sum()

    @jax.jit
    def run(variables):
        results = {}
        for chunk, vocab_chunk in ((None, None), (5, 7), (16, 61), (1, 64)):

            def f(v, chunk=chunk, vocab_chunk=vocab_chunk):
                if chunk is None:
                    out, _ = kithara.models.model.Model.token_stats(
                        model, v, inputs, inputs["labels"], training=False, stats=stats
                    )
                else:
                    out, _ = model.token_stats(v, inputs, inputs["labels"], training=False, stats=stats,
                                               chunk_size=chunk, vocab_chunk_size=vocab_chunk)  # fmt: skip
                return loss(out), out

            (_, out), grads = jax.value_and_grad(f, has_aux=True)(variables)
            results[f"{chunk}/{vocab_chunk}"] = (out, grads.trainable)
        return results

    results = run(model.variables)
    want, want_grads = results["None/None"]
    for key, (got, grads) in results.items():
        for name in stats:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=f"{key} {name}")
        for path, value in want_grads.items():
            scale = float(jnp.max(jnp.abs(value)))
            np.testing.assert_allclose(grads[path], value, rtol=1e-5, atol=1e-6 * scale, err_msg=f"{key} {path}")


def test_bad_options_are_refused():
    hidden = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match="stats must name some of"):
        logprobs.chunked_token_stats(hidden, lambda h: h, jnp.zeros((2, 3), jnp.int32), 2, ("logp",))
    with pytest.raises(ValueError, match="vocab_chunk_size needs the LM head as a"):
        logprobs.chunked_token_stats(hidden, lambda h: h, jnp.zeros((2, 3), jnp.int32), 2, vocab_chunk_size=2)
    with pytest.raises(ValueError, match="loss_chunk_size"):
        kithara.TrainingConfig(loss_chunk_size=0)


# Memory ---------------------------------------------------------------------------------------


def sft_step_temp_bytes(chunk, vocab=32000, length=512, rows=8):
    model = tiny_model("llama3", vocab_size=vocab, num_layers=1, hidden_dim=64, intermediate_dim=128,
                       tie_word_embeddings=False)  # fmt: skip
    examples = [
        {"token_ids": np.ones(length, np.int32), "padding_mask": np.ones(length, bool),
         "labels": np.ones(length, np.int32), "label_mask": np.ones(length, np.int32)}
    ] * rows  # fmt: skip
    loader = kithara.Dataloader(examples, 1, seed=0, num_devices=8)
    trainer = kithara.Trainer(model, optax.sgd(0.1), loader, steps=1, progress_bar=False, loss_chunk_size=chunk)
    batch = next(trainer.batches(0, None))[1]
    return trainer.lower_train_step(trainer.init_state(), batch).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_chunked_loss_cuts_the_compiled_steps_memory():
    """8 rows x 512 positions x 32000 vocabulary on 8 devices: float32 logits are 65.5 MB per
    device, and the step holds several such arrays (logits, their gradient, the softmax);
    chunks of 64 positions hold an eighth of one. Measured: 152.8 MiB -> 44.6 MiB."""
    full, chunked = sft_step_temp_bytes(None), sft_step_temp_bytes(64)
    logits_per_device = 512 * 32000 * 4
    assert full - chunked > logits_per_device and chunked < full / 3, (full, chunked)
