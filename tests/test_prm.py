"""PRMTrainer and StepwiseDataset: tokenization against TRL's PRMTrainer.tokenize_row, the loss
against torch's token-classification cross-entropy, errors, and a tiny learning check."""

import json
from itertools import chain

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import kithara
from kithara.data.sources import RowError
from kithara.data.stepwise import StepwiseDataset
from kithara.models.scalar_head import ScalarHeadModel
from kithara.objectives import reward_losses
from kithara.objectives.prm import PRMTrainer
from kithara.objectives.reward_configs import PRMConfig

SIZES = dict(vocab_size=37, num_layers=1, hidden_dim=24, num_heads=4, num_kv_heads=2, intermediate_dim=36)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def trl_tokenize_row(features, tokenizer, step_separator, max_length, max_completion_length, train_on_last_step_only,
                     is_eval):  # fmt: skip
    """TRL 0.24's PRMTrainer.tokenize_row (trl/experimental/prm/prm_trainer.py), verbatim; the
    reference for StepwiseDataset."""
    prompt_ids = tokenizer(features["prompt"], add_special_tokens=False)["input_ids"]
    completions_ids = [
        tokenizer(completion, add_special_tokens=False)["input_ids"] for completion in features["completions"]
    ]
    if train_on_last_step_only and not is_eval:
        labels = [-100] * (len(features["labels"]) - 1) + [int(features["labels"][-1])]
    else:
        labels = [int(label) for label in features["labels"]]
    separator_ids = tokenizer.encode(step_separator, add_special_tokens=False)
    completions_ids = [completion + separator_ids for completion in completions_ids]
    labels = [
        [-100] * (len(completion) - 1) + [label] for completion, label in zip(completions_ids, labels, strict=True)
    ]
    completion_ids = list(chain(*completions_ids))
    labels = list(chain(*labels))
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    if max_completion_length is not None:
        completion_ids = completion_ids[:max_completion_length]
        labels = labels[:max_completion_length]
    input_ids = prompt_ids + completion_ids
    labels = [-100] * len(prompt_ids) + labels
    if max_length is not None:
        input_ids = input_ids[:max_length]
        labels = labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer trained here (newlines are tokens), with BOS/EOS/PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["Which number is larger, 9.8 or 9.11?\n11 is greater than 8.\nHence, 9.11 > 9.8.\n"] * 20
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


ROWS = [
    {"prompt": "Which number is larger, 9.8 or 9.11?", "completions": ["11 is greater than 8.", "Hence, 9.11 > 9.8."],
     "labels": [True, False]},
    {"prompt": "Is 9.8 larger?", "completions": ["9.8 > 9.11", "yes", "so 9.8."], "labels": [True, True, True]},
]  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(train_on_last_step_only=True),
        dict(step_separator=". "),
        dict(max_completion_length=9),
        dict(max_length=20),
        dict(max_length=20, max_completion_length=14, train_on_last_step_only=True),
    ],
)
def test_tokenization_matches_trl(bpe, options):
    options = {"step_separator": "\n", "max_length": 64, "max_completion_length": None,
               "train_on_last_step_only": False, **options}  # fmt: skip
    ds = StepwiseDataset(ROWS, bpe, **options)
    for i, row in enumerate(ROWS):
        expected = trl_tokenize_row(row, bpe, is_eval=False, **options)
        labels = np.asarray(expected["labels"])
        example = ds[i]
        if (labels == -100).all():
            assert example is None
            continue
        assert example["token_ids"].tolist() == expected["input_ids"]
        np.testing.assert_array_equal(example["label_mask"], labels != -100)
        np.testing.assert_array_equal(example["labels"][labels != -100], labels[labels != -100])


def test_max_prompt_length_keeps_the_prompt_end(bpe):
    prompt_ids = bpe(ROWS[0]["prompt"], add_special_tokens=False)["input_ids"]
    full = StepwiseDataset(ROWS[:1], bpe, max_length=64)[0]["token_ids"].tolist()
    cut = StepwiseDataset(ROWS[:1], bpe, max_length=64, max_prompt_length=3)[0]["token_ids"].tolist()
    steps = full[1 + len(prompt_ids) :]
    assert full == [bpe.bos_token_id, *prompt_ids, *steps]
    assert cut == [bpe.bos_token_id, *prompt_ids[-3:], *steps]


def test_token_classification_loss_matches_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (3, 7, 2)).astype(np.float32)
    labels = rng.integers(0, 2, (3, 7))
    mask = rng.random((3, 7)) < 0.4
    torch_labels = torch.tensor(np.where(mask, labels, -100))
    expected = torch.nn.CrossEntropyLoss()(torch.tensor(logits).view(-1, 2), torch_labels.view(-1))
    nll, count, correct = reward_losses.token_classification_terms(
        jnp.asarray(logits), jnp.asarray(np.where(mask, labels, -100)), jnp.asarray(mask)
    )
    assert float(nll / count) == pytest.approx(float(expected), rel=1e-6)
    assert count == mask.sum()
    assert correct == ((logits.argmax(-1) == labels) & mask).sum()
    hand_nll = np.log(np.exp(logits).sum(-1)) - np.take_along_axis(logits, labels[..., None], -1)[..., 0]
    assert float(nll) == pytest.approx(float(hand_nll[mask].sum()), rel=1e-6)


def letter_steps(n, seed, steps=3):
    """Each step names two letters; it is correct when they go forward in the alphabet (``"c q"``)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        completions, labels = [], []
        for _ in range(steps):
            x, y = rng.choice(26, size=2, replace=False)
            completions.append(f"{LETTERS[x]} {LETTERS[y]}")
            labels.append(bool(x < y))
        rows.append({"prompt": "forward", "completions": completions, "labels": labels})
    return rows


def test_errors_name_the_row_and_field(tmp_path):
    tok = kithara.Tokenizer.from_pretrained("kithara/assets/demo/tokenizer")
    good = letter_steps(1, 0)[0]
    bad_rows = [
        ({**good, "labels": [True]}, r"steps.jsonl:2.*'labels'.*1 labels for 3 completions"),
        ({**good, "labels": [True, 1, False]}, r"steps.jsonl:2.*'labels\[1\]'.*expected a boolean"),
        ({**good, "completions": ["a b", 3, "c d"]}, r"steps.jsonl:2.*'completions\[1\]'.*expected a string"),
        ({**good, "completions": []}, r"steps.jsonl:2.*'completions'.*non-empty list"),
        ({"prompt": "x", "completions": ["a"]}, r"steps.jsonl:2.*'labels'.*missing"),
    ]
    for bad, message in bad_rows:
        path = tmp_path / "steps.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(RowError, match=message):
            StepwiseDataset(str(path), tok, max_length=32)[1]


def test_config_follows_trl_prm_config():
    defaults = PRMConfig.defaults()
    assert defaults["step_separator"] == "\n" and defaults["train_on_last_step_only"] is False
    assert defaults["learning_rate"] == 1e-5 and defaults["max_length"] == 1024
    assert defaults["max_completion_length"] is None and defaults["disable_dropout"] is True
    with pytest.raises((TypeError, NotImplementedError, ValueError), match="dataset_num_proc"):
        PRMConfig(dataset_num_proc=4)
    with pytest.raises(ValueError, match="max_completion_length"):
        PRMConfig(max_completion_length=0)


def test_needs_a_two_label_model():
    tok = kithara.Tokenizer.from_pretrained("kithara/assets/demo/tokenizer")
    one_label = ScalarHeadModel.from_config("llama3", **SIZES)
    with pytest.raises(ValueError, match="num_labels=2"):
        PRMTrainer(one_label, args=PRMConfig(max_length=16, max_steps=1), train_dataset=letter_steps(8, 0),
                   processing_class=tok)  # fmt: skip


@pytest.mark.slow
def test_learns_step_correctness():
    """From a causal LM (automatic two-label head): held-out step accuracy from chance to high."""
    tok = kithara.Tokenizer.from_pretrained("kithara/assets/demo/tokenizer")
    policy = kithara.KerasHubModel.from_config("llama3", **{**SIZES, "vocab_size": tok.vocab_size, "hidden_dim": 32})
    args = PRMConfig(max_length=24, max_steps=150, learning_rate=3e-3, per_device_train_batch_size=2,
                     disable_tqdm=True, logging_steps=50, eval_strategy="no")  # fmt: skip
    trainer = PRMTrainer(policy, args=args, train_dataset=letter_steps(512, 0), eval_dataset=letter_steps(128, 1),
                         processing_class=tok)  # fmt: skip
    assert trainer.model.num_labels == 2
    before = trainer.evaluate()["accuracy"]
    history = trainer.train()
    after = trainer.evaluate()
    assert 0.3 < before < 0.7 and after["accuracy"] > 0.75, (before, after)
    assert history[-1]["loss"] < history[0]["loss"]
    assert trainer.compilations["train_step"] == 1


def test_loss_of_a_batch_matches_torch(bpe):
    """The trainer's loss on a real batch: torch's cross-entropy on the same logits and labels."""
    model = ScalarHeadModel.from_config("llama3", **{**SIZES, "vocab_size": len(bpe)}, num_labels=2)
    trainer = PRMTrainer(model, args=PRMConfig(max_length=40, max_steps=1, disable_tqdm=True,
                                               per_device_train_batch_size=1),
                         train_dataset=ROWS * 4, processing_class=bpe)  # fmt: skip
    batch = jax.tree.map(jnp.asarray, next(iter(trainer.train_dataloader.epoch(0))))
    out, _ = trainer.compute_loss(model.variables, batch, jax.random.key(0), None)
    logits, _ = model.apply(model.variables, batch, training=False)
    labels = np.where(batch["label_mask"], batch["labels"], -100)
    expected = torch.nn.CrossEntropyLoss()(
        torch.tensor(np.asarray(logits)).view(-1, 2), torch.tensor(labels, dtype=torch.long).view(-1)
    )
    assert float(out.total / out.weight) == pytest.approx(float(expected), rel=1e-6)
