import numpy as np
import pytest
from conftest import ASSETS, W, tiny_model, word_tokenizer

import kithara

CHATS = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
    for q, a in [("hi", "hello"), ("how are you", "fine thanks"), ("bye", "bye"), ("hello", "hi")] * 8
]


def test_sft_conversational_assistant_only_trains():
    tok = word_tokenizer()
    trainer = kithara.SFTTrainer(
        tiny_model(),
        CHATS,
        tokenizer=tok,
        eval_dataset=CHATS[:8],
        max_length=24,
        assistant_only_loss=True,
        learning_rate=1e-2,
        steps=12,
        progress_bar=False,
    )
    batch = next(trainer.train_dataloader.epoch(0))
    # Only assistant reply tokens (and their end marker) are targets.
    targets = set(batch["labels"][batch["label_mask"].astype(bool)].tolist())
    assert targets <= {W[w] for w in ("hello", "fine", "thanks", "bye", "hi", "<|im_end|>")}
    before = trainer.evaluate()["loss"]
    history = trainer.train()
    assert len(history) == 12
    assert trainer.evaluate()["loss"] < before
    assert trainer.compilations["train_step"] == 1


def test_sft_formats_and_defaults():
    tok = word_tokenizer()
    rows = [{"prompt": "how are you", "completion": "fine thanks"}] * 16
    trainer = kithara.SFTTrainer(tiny_model(), rows, tokenizer=tok, max_length=8, steps=1, progress_bar=False)
    assert isinstance(trainer.train_dataloader.dataset, kithara.data.PromptCompletionDataset)
    batch = next(trainer.train_dataloader.epoch(0))
    assert batch["labels"][0][batch["label_mask"][0].astype(bool)].tolist() == [W["fine"], W["thanks"], W["</s>"]]
    assert trainer.history == [] and trainer.train()[0]["learning_rate"] == pytest.approx(2e-5)
    whole = kithara.SFTTrainer(
        tiny_model(), rows, tokenizer=tok, max_length=8, completion_only_loss=False, packing=True,
        eval_dataset=rows[:3], progress_bar=False,
    )  # fmt: skip
    batch = next(whole.train_dataloader.epoch(0))
    assert W["how"] in batch["labels"][batch["label_mask"].astype(bool)].tolist()  # the prompt counts too
    assert not whole.eval_dataloader.packing and not whole.eval_dataloader.shuffle
    text = kithara.SFTTrainer(
        tiny_model(), [{"text": "hi hello"}] * 16, tokenizer=tok, max_length=8, packing=True, progress_bar=False
    )
    assert isinstance(text.train_dataloader.dataset, kithara.data.TextDataset) and text.train_dataloader.packing
    loader = kithara.Dataloader(text.train_dataloader.dataset, 1)
    assert kithara.SFTTrainer(tiny_model(), loader, progress_bar=False).train_dataloader is loader


def test_sft_bad_configs_raise():
    tok = word_tokenizer()
    with pytest.raises(ValueError, match="tokenizer"):
        kithara.SFTTrainer(tiny_model(), CHATS)
    with pytest.raises(ValueError, match="dataset_format"):
        kithara.SFTTrainer(tiny_model(), CHATS, tokenizer=tok, dataset_format="chat")
    with pytest.raises(ValueError, match="Cannot tell the format"):
        kithara.SFTTrainer(tiny_model(), [{"question": "hi"}], tokenizer=tok)
    with pytest.raises(ValueError, match="assistant_only_loss"):
        kithara.SFTTrainer(tiny_model(), [{"text": "hi"}] * 8, tokenizer=tok, assistant_only_loss=True)


# Iterative SFT -------------------------------------------------------------------------


def iterative(**kwargs):
    kwargs.setdefault("max_length", 8)
    kwargs.setdefault("learning_rate", 1e-2)
    return kithara.IterativeSFTTrainer(tiny_model(), word_tokenizer(), **kwargs)


def test_iterative_steps_compile_once_and_train():
    trainer = iterative(gradient_accumulation_steps=2)
    rows = [[W["<s>"], W["hi"], W["hello"], W["bye"]]] * 3
    first = trainer.step(input_ids=rows)
    assert first["step"] == 1 and first["steps"] == 1
    # More rows than one step holds (2 x 8) make more steps; other lengths pad to max_length.
    stats = trainer.step(input_ids=[[W["<s>"], W["how"], W["are"], W["you"], W["fine"]]] * 20)
    assert stats["steps"] == 2 and stats["step"] == 3
    for _ in range(8):
        last = trainer.step(input_ids=rows)
    assert last["loss"] < first["loss"]
    assert trainer.compilations["train_step"] == 1
    assert [h["step"] for h in trainer.history] == list(range(1, 12))
    # Between steps the model holds the trained variables, ready to generate.
    out = trainer.model.generate([[W["<s>"], W["hi"]]], max_length=4)
    assert out[0] == [W["hello"], W["bye"]]


def test_iterative_labels_derived_masked_and_texts_labels_honoured():
    trainer = iterative()
    ((ids, lab),) = trainer._rows([[1, 7, 8, 0]], [[1, 1, 1, 0]], None, None, None)
    assert ids.tolist() == lab.tolist() == [1, 7, 8]  # padding dropped, labels = inputs
    row = trainer._truncate(*trainer._rows([[1, 7, 8, 9]], None, [[-100, -100, 8, 9]], None, None)[0])
    assert row["token_ids"].tolist() == [1, 7, 8] and row["label_mask"].tolist() == [False, True, True]
    plain = trainer._truncate(*trainer._rows(None, None, None, ["hi"], None)[0])
    assert plain["labels"].tolist() == [W["hi"], W["</s>"]] and plain["label_mask"].all()
    labelled = trainer._truncate(*trainer._rows(None, None, None, ["hi"], [" hello"])[0])
    assert labelled["token_ids"].tolist() == [W["<s>"], W["hi"], W["hello"]]
    assert labelled["labels"][labelled["label_mask"]].tolist() == [W["hello"], W["</s>"]]
    # Training on texts_labels differs from training on the texts alone.
    a, b = iterative(), iterative()
    a.step(texts=["hi"] * 4, texts_labels=[" hello"] * 4)
    b.step(texts=["hi"] * 4)
    assert a.history[0]["loss_weight"] == 8 and b.history[0]["loss_weight"] == 8
    assert a.history[0]["loss"] != pytest.approx(b.history[0]["loss"])


@pytest.mark.parametrize("mode,expected", [("keep_start", [1, 2, 3, 4]), ("keep_end", [3, 4, 5, 6])])
def test_iterative_truncation_modes_exact(mode, expected):
    trainer = iterative(max_length=4, truncation_mode=mode)
    row = trainer._truncate(np.arange(1, 8), np.arange(1, 8))  # 7 tokens; 5 kept give 4 positions
    assert row["token_ids"].tolist() == expected
    assert row["labels"].tolist() == [t + 1 for t in expected]
    batch = trainer._batch([row] * 3)
    assert batch["token_ids"].shape == (1, 8, 4)  # rows are never cut, only lengths
    assert batch["label_mask"].sum() == 12


def test_iterative_bad_inputs_raise():
    with pytest.raises(ValueError, match="truncation_mode"):
        iterative(truncation_mode="middle")
    with pytest.raises(ValueError, match="max_length"):
        iterative(max_length=1)
    trainer = iterative()
    with pytest.raises(ValueError, match="either input_ids"):
        trainer.step()
    with pytest.raises(ValueError, match="either input_ids"):
        trainer.step(input_ids=[[1, 2]], texts=["hi"])
    with pytest.raises(ValueError, match="texts_labels has 2 rows"):
        trainer.step(texts=["hi"], texts_labels=["a", "b"])
    with pytest.raises(ValueError, match="texts_labels goes with texts"):
        trainer.step(input_ids=[[1, 2]], texts_labels=["a"])
    with pytest.raises(ValueError, match="No row has a loss token"):
        trainer.step(input_ids=[[1, 2]], labels=[[-100, -100]])
    with pytest.raises(ValueError, match="no train_dataloader"):
        trainer.train()


def test_iterative_checkpoints_and_resumes(tmp_path):
    trainer = iterative(
        checkpointer=kithara.Checkpointer(str(tmp_path / "ckpt"), save_interval=2), tensorboard_dir=str(tmp_path / "tb")
    )
    for _ in range(3):
        trainer.step(texts=["hi hello"] * 2)
    trainer.finish()
    assert trainer.checkpointer.latest_step() == 3
    assert list((tmp_path / "tb").iterdir())
    again = iterative(checkpointer=kithara.Checkpointer(str(tmp_path / "ckpt")))
    assert again.step(texts=["hi hello"] * 2)["step"] == 4
    again.finish()


def test_sft_and_dpo_take_a_model_directory(tmp_path):
    """A Hugging Face checkpoint directory as ``model``: weights and tokenizer both load from it."""
    tokenizer = kithara.Tokenizer.from_pretrained(ASSETS / "tokenizer")
    source = tiny_model(vocab_size=tokenizer.vocab_size)
    source.save_in_hf_format(tmp_path / "model", tokenizer=tokenizer)
    path = str(tmp_path / "model")
    sft = kithara.SFTTrainer(path, [{"text": "the cat sat"}] * 16, max_length=16, steps=1, progress_bar=False)
    assert sft.tokenizer is not None and sft.tokenizer.vocab_size == tokenizer.vocab_size
    np.testing.assert_array_equal(
        sft.model.variables.trainable["token_embedding/embeddings"],
        source.variables.trainable["token_embedding/embeddings"],
    )
    sft.train()
    pairs = [{"prompt": "Say red:", "chosen": " red", "rejected": " blue"}] * 16
    dpo = kithara.DPOTrainer(path, train_dataset=pairs, max_length=16, steps=1, progress_bar=False)
    assert dpo.reference == "frozen_copy"
    assert dpo.train()[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
