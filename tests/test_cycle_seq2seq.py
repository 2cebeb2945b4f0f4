"""CycleTrainer with seq2seq (BART) sides: the synthetic text goes to the encoder, only the
original text is supervised, one side per update, end to end with a falling loss, exact resume."""

import jax
import numpy as np
import pytest
from conftest import WORDS, W, tiny_model, tiny_seq2seq, word_tokenizer

import kithara

rng = np.random.default_rng(0)
TEXTS_A = [" ".join(rng.choice(WORDS[4:8], 3)) for _ in range(16)]
TEXTS_B = [" ".join(rng.choice(WORDS[8:], 3)) for _ in range(16)]
PAIRS_A = list(zip(TEXTS_A[:4], TEXTS_B[:4], strict=True))


def bart(seed):
    return tiny_seq2seq(seed=seed, vocab_size=32, dropout=0.0)


def make_trainer(models, steps=2, **kwargs):
    options = dict(
        optimizer=kithara.optimizers.adamw(1e-2), steps=steps, batch_size_per_side=8, max_length=16, max_new_tokens=4,
        progress_bar=False,
    )  # fmt: skip
    return kithara.CycleTrainer(
        models=models, tokenizers=word_tokenizer(), train_dataset_A=TEXTS_A, train_dataset_B=TEXTS_B,
        **{**options, **kwargs},
    )  # fmt: skip


def host(tree):
    return jax.tree.map(np.asarray, tree)


def test_seq2seq_rows_put_the_source_in_the_encoder_and_supervise_only_the_target():
    trainer = make_trainer({"A": bart(1), "B": tiny_model(seed=2, vocab_size=32)})
    (row,) = trainer.prepare_cycle_inputs(["hi hello"], ["fine thanks"], "A")
    source, decoder, _ = row
    assert source == [W["<s>"], W["hi"], W["hello"], W["</s>"]]
    assert decoder == [W["</s>"], W["<s>"], W["fine"], W["thanks"], W["</s>"]]
    arrays = host(trainer._rows_to_arrays([tuple(row)]))  # a plain tuple from an override works too
    assert arrays["encoder_token_ids"][0, :4].tolist() == source and arrays["encoder_padding_mask"].sum() == 4
    assert arrays["decoder_token_ids"][0, :4].tolist() == decoder[:-1]
    assert arrays["label_mask"].sum() == 3  # not the forced <s>, not the padding rows
    assert arrays["labels"][0][arrays["label_mask"][0]].tolist() == [W["fine"], W["thanks"], W["</s>"]]
    # The causal side keeps its own row format.
    ((ids, _),) = trainer.prepare_cycle_inputs(["hi hello"], ["fine thanks"], "B")
    assert ids[:3] == [W["<s>"], W["hi"], W["hello"]]


@pytest.mark.parametrize("side", ["A", "B"])
def test_each_update_changes_only_its_side_in_a_mixed_pair(side):
    trainer = make_trainer({"A": bart(1), "B": tiny_model(seed=2, vocab_size=32)})
    state = trainer.init_state()
    before = host(state)
    rows = trainer.prepare_cycle_inputs(TEXTS_A[:8], TEXTS_B[:8], side)
    batch = trainer._rows_to_arrays(rows)
    after = host(trainer.jitted_train_step(state, {side: {k: v[None] for k, v in batch.items()}})[0])
    other = "B" if side == "A" else "A"
    for path, value in before.model.trainable.items():
        if path.startswith(f"{other}/"):
            np.testing.assert_array_equal(value, after.model.trainable[path], err_msg=path)
    assert any(
        not np.array_equal(v, after.model.trainable[p])
        for p, v in before.model.trainable.items()
        if p.startswith(f"{side}/")
    )
    jax.tree.map(np.testing.assert_array_equal, before.opt_state[other], after.opt_state[other])


def test_two_bart_models_end_to_end_loss_falls_and_evaluates():
    models = {"A": bart(3), "B": bart(4)}
    trainer = make_trainer(models, steps=6, eval_dataset_A=PAIRS_A, eval_dataset_B=TEXTS_B[:8])
    history = trainer.train()
    losses = [h["loss"] for h in history]
    assert all(np.isfinite(losses))
    # Each side learns at least its target language's words (the sources are noise at first).
    assert np.mean(losses[-2:]) < 0.7 * losses[0], losses
    # Every translation of a side shared one decode program; each update compiled once.
    assert [models[s].generate_compilations for s in "AB"] == [1, 1]
    assert trainer.compilations["train_step"] == 2  # one program per side
    assert set(trainer.evaluate()) == {"loss_A", "cycle_loss_A"}  # pairs on A, texts on B


def test_resume_is_exact(tmp_path):
    def pair():
        return {"A": bart(5), "B": tiny_model(seed=6, vocab_size=32)}

    straight = make_trainer(pair(), steps=4)
    straight.train()
    ckpt = str(tmp_path / "ckpt")
    make_trainer(pair(), steps=2, checkpointer=kithara.Checkpointer(ckpt, save_interval=2)).train()
    resumed = make_trainer(pair(), steps=4, checkpointer=kithara.Checkpointer(ckpt, save_interval=2))
    resumed.train()
    assert resumed.restored_step == 2
    jax.tree.map(np.testing.assert_array_equal, host(straight.train_state), host(resumed.train_state))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history[2:]]


def test_adapter_mode_rejects_a_seq2seq_model():
    with pytest.raises(ValueError, match="causal only"):
        make_trainer(bart(1))
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_trainer(
            {"A": tiny_seq2seq(vocab_size=32, max_sequence_length=8), "B": bart(2)}, max_length=8, max_new_tokens=8
        )


def test_a_t5gemma_and_a_bart_side_train_together():
    models = {"A": tiny_seq2seq("t5gemma", seed=8, vocab_size=32), "B": bart(9)}
    trainer = make_trainer(models, steps=2)
    ((source, decoder, _),) = trainer.prepare_cycle_inputs(["hi"], ["fine"], "A")
    assert (source, decoder) == ([W["hi"], W["</s>"]], [W["<s>"], W["fine"], W["</s>"]])  # T5Gemma's framing
    before = host(models["A"].variables.trainable)
    history = trainer.train()
    assert all(np.isfinite([h["loss_A"] for h in history] + [h["loss_B"] for h in history]))
    after = host(models["A"].variables.trainable)
    assert any(not np.array_equal(before[p], after[p]) for p in before)
