"""Data defects that used to pass silently or fail cryptically: each test names what it guards."""

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import ASSETS, W, word_tokenizer

import kithara
from kithara.data import (
    ConversationalDataset,
    PreferenceDataset,
    PromptCompletionDataset,
    RowError,
    TextDataset,
    load_source,
)

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


# 1. A huge line costs memory and time bounded by max_length ---------------------------------

_LONG_LINE = textwrap.dedent(
    """
    import json, resource, sys, time
    sys.path.insert(0, {tests!r})
    from conftest import word_tokenizer
    from kithara.data import {cls}
    path, mode, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    tok = word_tokenizer()
    dataset = {cls}(path, tok, max_length=32, truncation_mode=mode, **extra)
    dataset[0]  # a short row: imports and warm-up out of the measurement
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    example = dataset[1]
    seconds = time.perf_counter() - start
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({{"kib": grown, "seconds": seconds, "ids": example["token_ids"].tolist(),
                       "mask": example["label_mask"].tolist()}}))
    """
)


def _encode_long_row(tmp_path, cls, rows, mode, **extra):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    script = _LONG_LINE.format(tests=str(TESTS), cls=cls)
    out = subprocess.run(
        [sys.executable, "-c", script, str(path), mode, json.dumps(extra)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_a_multi_megabyte_line_is_tokenized_only_as_far_as_max_length_reaches(tmp_path, mode):
    # ~6 MB of words, about 1.2 million tokens. Tokenizing all of it grew the process by
    # several hundred MB and took seconds; only the first (or last) 33 tokens can be used.
    words = "hi hello how are you fine thanks bye ok "
    long_text = words * 150_000
    result = _encode_long_row(tmp_path, "TextDataset", [{"text": "hi"}, {"text": long_text}], mode)
    assert result["kib"] < 64 * 1024, result["kib"]  # 6 MB of text, its JSON and its str, at most
    assert result["seconds"] < 2.0
    tok = word_tokenizer()
    full = [*tok.encode_text(long_text[:4000]), tok.eos_id]  # what the whole text gives, near each end
    tail = [*tok.encode(long_text[-4000:]), tok.eos_id]
    expected = full[:32] if mode == "keep_start" else tail[-33:-1]
    assert result["ids"] == expected


def test_a_huge_completion_keeps_the_prompt_and_the_start_of_the_completion(tmp_path):
    long_completion = "fine thanks " * 500_000
    rows = [{"prompt": "hi", "completion": "ok"}, {"prompt": "how are you", "completion": long_completion}]
    result = _encode_long_row(tmp_path, "PromptCompletionDataset", rows, "keep_start")
    assert result["kib"] < 64 * 1024, result["kib"]
    ids = [W["<s>"], W["how"], W["are"], W["you"]] + [W["fine"], W["thanks"]] * 14
    assert result["ids"] == ids
    assert result["mask"] == [False] * 3 + [True] * 29


def test_clipping_changes_nothing_for_rows_that_fit(tok):
    # The clip only applies to texts far longer than max_length allows; here it must equal plain encoding.
    text = "hi hello how are you " * 2000  # 10000 tokens, 50 KB
    for mode in ("keep_start", "keep_end"):
        clipped = TextDataset([{"text": text}], tok, max_length=64, truncation_mode=mode)[0]
        ids = [*tok.encode_text(text), tok.eos_id]
        ids = ids[:65] if mode == "keep_start" else ids[-65:]
        np.testing.assert_array_equal(clipped["token_ids"], ids[:-1])


# 2. Rows that teach nothing or that the template would mangle ---------------------------------


def test_identical_dpo_pairs_are_counted_logged_and_skipped(tok, caplog):
    rows = [
        {"prompt": "hi", "chosen": "fine", "rejected": "fine"},
        {"prompt": "hi", "chosen": "fine", "rejected": "bye"},
        {"prompt": "hi", "chosen": "fine thanks", "rejected": "fine bye"},  # identical once cut to 3 tokens
    ]
    dataset = PreferenceDataset(rows, tok, max_length=2)
    with caplog.at_level(logging.WARNING, logger="kithara.data.formats"):
        examples = [dataset[i] for i in range(3)]
    assert examples[0] is None and examples[1] is not None and examples[2] is None
    assert dataset.skipped == {"chosen and rejected are identical": 1,
                               "chosen and rejected are identical after truncation to max_length": 1}  # fmt: skip
    assert "rows[0]" in caplog.text and "chosen and rejected are identical" in caplog.text


def test_nothing_left_after_skipping_identical_pairs_is_refused(tok):
    rows = [{"prompt": "hi", "chosen": "fine", "rejected": "fine"}] * 8
    with pytest.raises(ValueError, match="No examples left"):
        kithara.Dataloader(PreferenceDataset(rows, tok, max_length=8), per_device_batch_size=1)
    # With some rows left, the loader's stats say why the others went (not "without loss tokens").
    mixed = rows[:3] + [{"prompt": "hi", "chosen": "fine", "rejected": "bye"}] * 8
    loader = kithara.Dataloader(PreferenceDataset(mixed, tok, max_length=8), per_device_batch_size=1)
    assert loader.stats == {"rows": 11, "examples": 8, "dropped_no_loss_tokens": 0, "skipped_nothing_to_learn": 3}


def test_unknown_chat_roles_are_refused_naming_the_row_and_the_known_roles(tok, tmp_path):
    path = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    dataset = ConversationalDataset(str(path), tok, max_length=32)
    assert dataset[0] is not None
    with pytest.raises(RowError, match=r"chats.jsonl:2: field 'messages\[1\].role': unknown role 'bot'.*'assistant'"):
        dataset[1]
    prompt = [{"role": "human", "content": "hi"}]
    with pytest.raises(RowError, match=r"rows\[0\]: field 'prompt\[0\].role': unknown role 'human'"):
        PromptCompletionDataset(
            [{"prompt": prompt, "completion": [{"role": "assistant", "content": "ok"}]}], tok, max_length=32
        )[0]


def _tool_tokenizer():
    return kithara.Tokenizer.from_pretrained(ASSETS / "tokenizer")


def _tool_chat(calls):
    return {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
        ]
    }


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def test_tool_call_arguments_that_are_not_json_are_refused():
    bad = {"type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}}
    dataset = ConversationalDataset([_tool_chat([CALL]), _tool_chat([bad])], _tool_tokenizer(), max_length=256)
    assert dataset[0] is not None
    with pytest.raises(
        RowError, match=r"rows\[1\]: field 'messages\[1\].tool_calls\[0\].function.arguments': not valid JSON"
    ):
        dataset[1]


def test_tool_calls_given_as_a_json_string_are_parsed_and_bad_ones_refused():
    tok = _tool_tokenizer()
    rows = [_tool_chat([CALL]), _tool_chat(json.dumps([CALL])), _tool_chat("not json"), _tool_chat("{}")]
    dataset = ConversationalDataset(rows, tok, max_length=256)
    np.testing.assert_array_equal(dataset[0]["token_ids"], dataset[1]["token_ids"])
    with pytest.raises(RowError, match=r"rows\[2\]: field 'messages\[1\].tool_calls': not valid JSON"):
        dataset[2]
    with pytest.raises(RowError, match=r"rows\[3\]: field 'messages\[1\].tool_calls': expected a list"):
        dataset[3]


def test_empty_rows_are_skipped_and_counted(tok):
    rows = [{"prompt": "", "completion": ""}, {"prompt": "hi", "completion": "ok"}]
    dataset = PromptCompletionDataset(rows, tok, max_length=8)
    assert dataset[0] is None and dataset[1] is not None
    assert dataset.skipped == {"empty prompt and completion": 1}
    text = TextDataset([{"text": "  "}, {"text": "hi"}], tok, max_length=8)
    assert text[0] is None and text[1] is not None
    assert text.skipped == {"empty text": 1}


def test_non_utf8_bytes_in_a_csv_name_the_file_and_line(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"prompt,completion\nhi,ok\nhow,fine\nbad \xff byte,ok\n")
    with pytest.raises(RowError, match=r"rows.csv:4: not UTF-8 text \(byte 0xff at column 5"):
        load_source(str(path))


# 6. Tokenizers ------------------------------------------------------------------------------


def test_a_transformers_tokenizer_is_accepted_where_a_kithara_tokenizer_is_expected(tok):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    wrapped = ConversationalDataset(rows, tok, max_length=32)[0]
    raw = ConversationalDataset(rows, tok.backend, max_length=32)[0]
    np.testing.assert_array_equal(wrapped["token_ids"], raw["token_ids"])
    text = TextDataset([{"text": "hi you"}], tok.backend, max_length=8)[0]
    assert text["token_ids"].tolist() == [W["<s>"], W["hi"], W["you"]]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_apply_chat_template_equals_transformers(add_generation_prompt):
    tok = _tool_tokenizer()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    ours = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    theirs = tok.backend.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert isinstance(ours, str) and ours == theirs
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    out = tok.backend.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, return_dict=True)
    assert ids == list(out["input_ids"])
    assert ids == tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)[0]


# 3. CycleTrainer ----------------------------------------------------------------------------


def _cycle_trainer(cls=None, **kwargs):
    from conftest import tiny_model
    from test_cycle import TEXTS_A, TEXTS_B

    options = dict(
        models=tiny_model(seed=1, vocab_size=32, lora=kithara.LoraConfig(rank=2)),
        tokenizers=word_tokenizer(),
        train_dataset_A=TEXTS_A,
        train_dataset_B=TEXTS_B,
        optimizer=kithara.optimizers.adamw(1e-2),
        steps=1,
        batch_size_per_side=8,
        max_length=16,
        max_new_tokens=4,
        progress_bar=False,
    )
    return (cls or kithara.CycleTrainer)(**{**options, **kwargs})


class _LongTranslations(kithara.CycleTrainer):
    """Translates every text to a fixed text (the untrained model's own output is random)."""

    translation = "hi hello how are you fine thanks"  # [BOS] + 7 tokens + separator: 9, all prompt

    def translate(self, variables, side, texts, seed=0):
        return [self.translation] * len(texts)


def test_cycle_rows_cut_to_no_target_are_refused_not_trained_at_loss_zero(caplog):
    trainer = _cycle_trainer(_LongTranslations, max_length=8)
    with pytest.raises(
        ValueError, match=r"cycle step 0: none of model 'A''s 8 rows keeps a supervised token.*max_length=8"
    ):
        trainer.train()


def test_cycle_rows_cut_to_no_target_are_counted_and_logged(caplog):
    class SomeLong(_LongTranslations):
        def translate(self, variables, side, texts, seed=0):
            return [self.translation if i % 2 else "hi" for i in range(len(texts))]

    from test_cycle import TEXTS_A

    trainer = _cycle_trainer(SomeLong, max_length=8)
    rows = trainer.prepare_cycle_inputs(trainer.translate(None, "B", TEXTS_A[:8]), TEXTS_A[:8], "A")
    with caplog.at_level(logging.WARNING, logger="kithara.objectives.cycle"):
        assert trainer._check_targets_left(rows, "A", "cycle step 0", count=True) == 4
    assert "cycle step 0: 4 of model 'A''s 8 rows keep no supervised token" in caplog.text
    assert trainer.rows_without_targets["A"] == 4


def test_cycle_evaluate_refuses_instead_of_nan():
    from test_cycle import TEXTS_A, TEXTS_B

    long_source = " ".join(["hi"] * 20)
    trainer = _cycle_trainer(eval_dataset_A=[(long_source, TEXTS_B[0])], max_length=8)
    with pytest.raises(ValueError, match=r"evaluate\(\), model 'A': none of model 'A''s 1 rows"):
        trainer.evaluate()
    assert np.isfinite(_cycle_trainer(eval_dataset_A=[(TEXTS_A[0], TEXTS_B[0])]).evaluate()["loss_A"])


def test_cycle_reads_the_text_column_of_a_datasets_dataset():
    import datasets
    from test_cycle import TEXTS_A, TEXTS_B

    trainer = _cycle_trainer(
        train_dataset_A=datasets.Dataset.from_dict({"text": TEXTS_A}),
        train_dataset_B=[{"text": t} for t in TEXTS_B],
        tokenizers=word_tokenizer().backend,  # a transformers tokenizer is wrapped
    )
    assert trainer.train_texts == {"A": TEXTS_A, "B": TEXTS_B}
    with pytest.raises(ValueError, match=r"train_dataset_A is a datasets.Dataset with columns \['sentence'\].*'text'"):
        _cycle_trainer(train_dataset_A=datasets.Dataset.from_dict({"sentence": TEXTS_A}))
    with pytest.raises(ValueError, match=r"train_dataset_B\[0\] is int; expected a string"):
        _cycle_trainer(train_dataset_B=list(range(16)))


# 4. IterativeSFTTrainer ---------------------------------------------------------------------


def test_iterative_sft_counts_and_logs_rows_truncation_empties(caplog):
    from conftest import tiny_model

    trainer = kithara.IterativeSFTTrainer(tiny_model(), word_tokenizer(), max_length=4, truncation_mode="keep_start")
    long_prompt = [1, 6, 7, 8, 9, 10, 11]
    labels = [-100] * 6 + [11]  # the only label is past max_length
    with caplog.at_level(logging.WARNING, logger="kithara.objectives.iterative_sft"):
        stats = trainer.step(input_ids=[long_prompt, [1, 6, 7]], labels=[labels, [1, 6, 7]])
    assert stats["dropped_rows"] == 1 and stats["steps"] == 1
    assert "dropped 1 of 2 rows (rows [0]) left without a loss token" in caplog.text


def test_iterative_sft_refuses_a_seq2seq_model_at_construction():
    from conftest import tiny_seq2seq

    with pytest.raises(ValueError, match=r"IterativeSFTTrainer trains causal LMs.*KerasHubSeq2SeqModel"):
        kithara.IterativeSFTTrainer(tiny_seq2seq(), word_tokenizer(), max_length=8)


# 5. Lists of dict rows as train data --------------------------------------------------------


def test_a_list_of_dict_rows_is_accepted_by_sft_and_explained_by_the_base_trainer():
    from conftest import tiny_model

    rows = [{"prompt": "hi", "completion": "hello"}] * 8
    model = tiny_model()
    tok = word_tokenizer()
    trainer = kithara.SFTTrainer(model, rows, processing_class=tok.backend, max_length=8, steps=1, progress_bar=False)
    assert trainer.train_dataloader.stats["examples"] == 8
    with pytest.raises(ValueError, match=r"pre-tokenized examples.*PromptCompletionDataset"):
        kithara.Trainer(model, train_dataset=rows, steps=1)
    with pytest.raises(TypeError, match="pass data to be batched as train_dataset"):
        kithara.Trainer(model, None, rows, steps=1)
