"""Dataset formats and the Tokenizer: exact token, label and mask tensors for each format."""

import json

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
)

BOS, EOS, START, END = W["<s>"], W["</s>"], W["<|im_start|>"], W["<|im_end|>"]


def ids(*words):
    return [W.get(w, w) for w in words]


def check(example, token_ids, labels, label_mask, prefix=""):
    np.testing.assert_array_equal(example[f"{prefix}token_ids"], token_ids)
    np.testing.assert_array_equal(example[f"{prefix}labels"], labels)
    np.testing.assert_array_equal(example[f"{prefix}label_mask"], label_mask)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def test_tokenizer_special_tokens_follow_the_tokenizer(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (BOS, EOS, W["<pad>"])
    assert tok.encode("hi you") == ids("hi", "you")
    assert tok.encode_text("hi you") == [BOS, *ids("hi", "you")]
    no_bos = word_tokenizer(bos=False)  # Qwen-style: nothing in front of a sequence
    assert no_bos.bos_id is None and no_bos.encode_text("hi") == ids("hi")


def test_bundled_tokenizer_loads_and_round_trips():
    tok = kithara.Tokenizer.from_pretrained(ASSETS / "tokenizer")
    assert tok.vocab_size == 512 and tok.has_generation_markers
    text = "Reverse the word 'kithara', then call get_weather(city=\"Paris\")."
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_text(text)[0] == tok.bos_id and tok.encode_text(text)[1:] == tok.encode(text)


def test_text_format_adds_bos_and_eos_and_trains_on_every_token(tok):
    ex = TextDataset([{"text": "hi how are you"}], tok, max_length=16)[0]
    check(ex, [BOS, *ids("hi", "how", "are", "you")], [*ids("hi", "how", "are", "you"), EOS], [True] * 5)


def test_prompt_completion_masks_the_prompt(tok):
    rows = [{"prompt": "how are you", "completion": "fine thanks"}]
    ex = PromptCompletionDataset(rows, tok, max_length=16)[0]
    check(
        ex,
        [BOS, *ids("how", "are", "you", "fine", "thanks")],
        [*ids("how", "are", "you", "fine", "thanks"), EOS],
        [False, False, False, True, True, True],
    )
    everything = PromptCompletionDataset(rows, tok, max_length=16, completion_only_loss=False)[0]
    assert everything["label_mask"].all()


def test_truncation_keeps_the_start_or_the_end(tok):
    rows = [{"prompt": "how are you", "completion": "fine thanks"}]
    # Sequence: <s> how are you fine thanks </s>, 7 tokens; max_length=4 keeps 5.
    start = PromptCompletionDataset(rows, tok, max_length=4)[0]
    check(start, [BOS, *ids("how", "are", "you")], ids("how", "are", "you", "fine"), [False, False, False, True])
    end = PromptCompletionDataset(rows, tok, max_length=4, truncation_mode="keep_end")[0]
    check(end, ids("are", "you", "fine", "thanks"), [*ids("you", "fine", "thanks"), EOS], [False, True, True, True])
    # A prompt that fills the window leaves no completion token: the row is dropped.
    assert PromptCompletionDataset(rows, tok, max_length=3)[0] is None


def test_prompt_completion_with_messages_uses_the_chat_template(tok):
    rows = [{"prompt": [{"role": "user", "content": "how are you"}], "completion": [
        {"role": "assistant", "content": "fine"}]}]  # fmt: skip
    ex = PromptCompletionDataset(rows, tok, max_length=32)[0]
    sequence = [BOS, START, *ids("user", "how", "are", "you"), END, START, W["assistant"], W["fine"], END]
    targets = [False] * 9 + [True, True]
    check(ex, sequence[:-1], sequence[1:], targets[1:])


CONVERSATION = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "ok bye"},
]
# <s> <im_start> user hi <im_end> <im_start> assistant [hello <im_end>] <im_start> user bye <im_end>
# <im_start> assistant [ok bye <im_end>]   (brackets: the {% generation %} spans)
CHAT_IDS = [BOS, START, W["user"], W["hi"], END, START, W["assistant"], W["hello"], END, START, W["user"],
            W["bye"], END, START, W["assistant"], W["ok"], W["bye"], END]  # fmt: skip
ASSISTANT = [False] * 7 + [True, True] + [False] * 6 + [True, True, True]


def test_conversational_assistant_only_loss(tok):
    ex = ConversationalDataset([{"messages": CONVERSATION}], tok, max_length=32, assistant_only_loss=True)[0]
    check(ex, CHAT_IDS[:-1], CHAT_IDS[1:], ASSISTANT[1:])
    full = ConversationalDataset([{"messages": CONVERSATION}], tok, max_length=32)[0]
    check(full, CHAT_IDS[:-1], CHAT_IDS[1:], [True] * (len(CHAT_IDS) - 1))


def test_sharegpt_rows_equal_their_messages(tok):
    turns = [{"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in CONVERSATION]
    ex = ConversationalDataset([{"conversations": turns}], tok, max_length=32, assistant_only_loss=True)[0]
    check(ex, CHAT_IDS[:-1], CHAT_IDS[1:], ASSISTANT[1:])
    with pytest.raises(RowError, match=r"rows\[0\].*conversations\[0\]\.from.*unknown speaker 'robot'"):
        ConversationalDataset([{"conversations": [{"from": "robot", "value": "hi"}]}], tok, max_length=8)[0]


def test_assistant_only_loss_needs_generation_markers():
    plain = "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}"
    tok = word_tokenizer(chat_template=plain)
    with pytest.raises(ValueError, match=r"\{% generation %\}"):
        ConversationalDataset([{"messages": CONVERSATION}], tok, max_length=32, assistant_only_loss=True)
    assert ConversationalDataset([{"messages": CONVERSATION}], tok, max_length=32)[0] is not None


def test_tools_reach_the_template():
    tok = kithara.Tokenizer.from_pretrained(ASSETS / "tokenizer")
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    ds = ConversationalDataset(
        [{"messages": messages, "tools": [tool]}, {"messages": messages, "tools": json.dumps([tool])}],
        tok,
        max_length=256,
        assistant_only_loss=True,
    )
    first, second = ds[0], ds[1]
    np.testing.assert_array_equal(first["token_ids"], second["token_ids"])  # tools as a JSON string too
    text = tok.decode(first["token_ids"])
    assert "You may call these tools:" in text and '"name": "get_weather"' in text
    trained = tok.decode(first["labels"][first["label_mask"]])
    assert trained == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>' + (
        "It is sunny.<|im_end|>"
    )


def test_preference_rows_give_chosen_and_rejected_with_answer_masks(tok):
    ds = PreferenceDataset([{"prompt": "how are you", "chosen": "fine", "rejected": "bye"}], tok, max_length=16)
    ex = ds[0]
    prompt = [BOS, *ids("how", "are", "you")]
    mask = [False, False, False, True, True]
    check(ex, [*prompt, W["fine"]], [*prompt[1:], W["fine"], EOS], mask, "chosen_")
    check(ex, [*prompt, W["bye"]], [*prompt[1:], W["bye"], EOS], mask, "rejected_")
    chat = PreferenceDataset(
        [{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
          "rejected": [{"role": "assistant", "content": "bye"}]}], tok, max_length=16)[0]  # fmt: skip
    head = [BOS, START, W["user"], W["hi"], END, START, W["assistant"]]
    check(chat, [*head, W["hello"]], [*head[1:], W["hello"], END], [False] * 6 + [True, True], "chosen_")
    check(chat, [*head, W["bye"]], [*head[1:], W["bye"], END], [False] * 6 + [True, True], "rejected_")
    # Either answer truncated away drops the pair.
    assert (
        PreferenceDataset([{"prompt": "how are you", "chosen": "fine", "rejected": "bye"}], tok, max_length=3)[0]
        is None
    )


def test_bad_rows_name_the_file_row_and_field(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"prompt": "hi", "completion": "ok"}) + "\n"
        + json.dumps({"prompt": "hi"}) + "\n"
        + json.dumps({"prompt": 3, "completion": "ok"}) + "\n"
        + "{not json\n"
        + json.dumps({"prompt": [{"content": "x"}], "completion": "ok"}) + "\n"
    )  # fmt: skip
    ds = PromptCompletionDataset(str(path), tok, max_length=8)
    assert ds[0] is not None
    with pytest.raises(RowError, match=r"train\.jsonl:2: field 'completion': missing"):
        ds[1]
    with pytest.raises(
        RowError, match=r"train\.jsonl:3: field 'prompt': expected a string or a list of messages, got int"
    ):
        ds[2]
    with pytest.raises(RowError, match=r"train\.jsonl:4: not valid JSON"):
        ds[3]
    with pytest.raises(RowError, match=r"train\.jsonl:5: field 'prompt\[0\]': expected a message object"):
        ds[4]
    with pytest.raises(ValueError, match="truncation_mode must be one of"):
        PromptCompletionDataset(str(path), tok, max_length=8, truncation_mode="middle")


def test_column_mapping(tok):
    rows = [{"question": "how are you", "answer": "fine"}]
    ds = PromptCompletionDataset(rows, tok, max_length=8, columns={"question": "prompt", "answer": "completion"})
    assert ds[0]["label_mask"].sum() == 2  # "fine" and EOS


def test_tokenizer_from_a_gs_directory(monkeypatch):
    import fsspec
    from etils.epath import backend as epath_backend

    # gs:// needs the network, so serve the gcs protocol from fsspec's in-memory filesystem instead.
    fs = fsspec.filesystem("memory")
    for path in (ASSETS / "tokenizer").iterdir():
        fs.pipe(f"gs://bucket/tok/{path.name}", path.read_bytes())
    monkeypatch.setattr(epath_backend.fsspec_backend, "_get_filesystem", lambda name: fs)
    remote = kithara.Tokenizer.from_pretrained("gs://bucket/tok")
    local = kithara.Tokenizer.from_pretrained(ASSETS / "tokenizer")
    ids, mask = remote.encode_chat(CONVERSATION[:2], assistant_mask=True)
    assert (ids, mask) == local.encode_chat(CONVERSATION[:2], assistant_mask=True) and any(mask)
    with pytest.raises(FileNotFoundError, match="gs://bucket/missing"):
        kithara.Tokenizer.from_pretrained("gs://bucket/missing")


def test_keras_hub_tokenizer_with_a_chat_template():
    import io

    import keras_hub
    import sentencepiece as spm

    text = ["hello there how are you", "fine thanks and you", "ok bye now"] * 50
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=proto, vocab_size=60, model_type="bpe", pad_id=0, eos_id=1,
        bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2,
    )  # fmt: skip
    template = (ASSETS / "tokenizer" / "chat_template.jinja").read_text()
    tok = kithara.Tokenizer.from_keras_hub(keras_hub.tokenizers.GemmaTokenizer(proto=proto.getvalue()),
                                           chat_template=template)  # fmt: skip
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert tok.encode_text("hello there") == [2, *tok.encode("hello there")]
    ids, mask = tok.encode_chat(
        [{"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine thanks"}],
        assistant_mask=True,
    )
    # Encoded piece by piece (keras-hub gives no offsets), yet equal to encoding the whole rendered
    # text, with the template's "<bos>" string mapped to Gemma's <bos> id.
    rendered = "<|im_start|>user\nhow are you<|im_end|>\n<|im_start|>assistant\nfine thanks<|im_end|>\n"
    assert ids == [2, *tok.encode(rendered)]
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]).strip() == "fine thanks<|im_end|>"
    ds = ConversationalDataset([{"messages": CONVERSATION}], tok, max_length=64, assistant_only_loss=True)
    trained = tok.decode(ds[0]["labels"][ds[0]["label_mask"]].tolist())
    assert trained.replace(" ", "") == "hello<|im_end|>okbye<|im_end|>"


def test_template_errors_become_row_errors_and_can_be_skipped(tok):
    strict = (
        "{% for m in messages %}{% if loop.index0 % 2 == 0 and m.role != 'user' %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
        "{% endif %}{{ m.content }}{% endfor %}"
    )
    rows = [{"messages": CONVERSATION}, {"messages": [CONVERSATION[1], CONVERSATION[0]]}] * 4
    ds = ConversationalDataset(rows, word_tokenizer(chat_template=strict), max_length=32)
    with pytest.raises(RowError, match=r"rows\[1\]: TemplateError: Conversation roles must alternate"):
        ds[1]
    loader = kithara.Dataloader(ds, 1, num_devices=1, skip_bad_rows=True)
    assert loader.stats["skipped_bad_rows"] == 4 and loader.stats["examples"] == 4


def test_named_chat_templates_pick_tool_use_when_tools_are_given():
    default = (ASSETS / "tokenizer" / "chat_template.jinja").read_text()
    tool_use = "TOOLS {{ tools | length }} " + default
    tok = word_tokenizer(chat_template={"default": default, "tool_use": tool_use})
    plain, _ = tok.encode_chat(CONVERSATION[:2])
    with_tools, _ = tok.encode_chat(CONVERSATION[:2], tools=[{"type": "function", "function": {"name": "f"}}])
    assert plain == CHAT_IDS[:9] and with_tools[:3] == [W["[UNK]"], W["[UNK]"], BOS]  # "TOOLS 1 " then <s>


def test_preference_keep_end_keeps_the_same_prompt_for_both_answers(tok):
    row = {"prompt": "how are you how are you", "chosen": "fine", "rejected": "ok thanks bye"}
    ex = PreferenceDataset([row], tok, max_length=6, truncation_mode="keep_end")[0]
    chosen_prompt = ex["chosen_token_ids"][~ex["chosen_label_mask"]]
    rejected_prompt = ex["rejected_token_ids"][~ex["rejected_label_mask"]]
    assert len(ex["rejected_token_ids"]) == 6 and len(ex["chosen_token_ids"]) == 4
    np.testing.assert_array_equal(chosen_prompt, rejected_prompt)


def test_source_options_are_refused_with_a_ready_source(tok):
    source = kithara.data.load_source([{"text": "hi"}])
    with pytest.raises(ValueError, match="pass them to load_source"):
        TextDataset(source, tok, max_length=8, columns={"body": "text"})
