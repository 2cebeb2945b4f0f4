"""kithara.judges: TRL's judge interfaces, the request / reply helpers, and judges whose verdicts
are known: RewardModelJudge on a reward model with known scores, ModelPairwiseJudge on a scripted
model and on a tiny model trained to judge by a rule."""

import hashlib
import logging
from pathlib import Path

import jax
import jinja2
import numpy as np
import pytest
from conftest import ASSETS, word_tokenizer

import kithara
from kithara.data.reward_data import reward_tokens
from kithara.judges import (
    PAIRWISE_SYSTEM_PROMPT,
    AllTrueJudge,
    BaseBinaryJudge,
    BasePairwiseJudge,
    BaseRankJudge,
    ModelPairwiseJudge,
    RewardModelJudge,
    as_text,
    check_ranked,
    pairwise_request,
    parse_pairwise,
    shuffled_pairs,
    unflip,
)
from kithara.models.scalar_head import ScalarHeadModel

SIZES = dict(vocab_size=37, num_layers=1, hidden_dim=24, num_heads=4, num_kv_heads=2, intermediate_dim=36)
PROMPTS = ["hi how", "hello", "are you", "ok"]
PAIRS = [[" fine", " bye"], [" how are you", " hi"], [" fine thanks", " fine thanks"], [" ok", " you"]]


@pytest.fixture(scope="module")
def judged():
    tok = word_tokenizer()
    model = ScalarHeadModel.from_config("llama3", **SIZES, head_init_std=1.0)
    return model, tok, RewardModelJudge(model, tok, batch_size=4)


def known_scores(model, tok, prompts, completions):
    """Each completion scored alone, unbatched: the reward RewardTrainer trains (EOS included)."""
    score = jax.jit(model.score)
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = reward_tokens(tok, prompt, completion)
        token_ids, mask = np.zeros((1, 32), np.int32), np.zeros((1, 32), bool)
        token_ids[0, : len(ids)], mask[0, : len(ids)] = ids, True
        out.append(float(score(model.variables, {"token_ids": token_ids, "padding_mask": mask})[0]))
    return np.asarray(out)


def test_the_higher_reward_wins(judged):
    model, tok, judge = judged
    scores = known_scores(
        model, tok, [p for p in PROMPTS for _ in range(2)], [c for pair in PAIRS for c in pair]
    ).reshape(-1, 2)
    assert len(set(scores[:, 0] - scores[:, 1])) > 2  # the pairs really differ
    verdicts = judge.judge(PROMPTS, PAIRS)
    assert verdicts == [int(b > a) for a, b in scores]
    assert verdicts[2] == 0  # identical completions tie: index 0
    assert judge.judge(PROMPTS, PAIRS, shuffle_order=False) == verdicts
    assert judge.judge(PROMPTS, [pair[::-1] for pair in PAIRS])[:2] == [1 - v for v in verdicts[:2]]
    np.testing.assert_allclose(judge.score(PROMPTS, [p[0] for p in PAIRS]), scores[:, 0], rtol=1e-5, atol=1e-6)


def test_return_scores_is_the_sigmoid_of_the_difference(judged):
    model, tok, judge = judged
    scores = known_scores(
        model, tok, [p for p in PROMPTS for _ in range(2)], [c for pair in PAIRS for c in pair]
    ).reshape(-1, 2)
    for temperature in (1.0, 0.5):
        probs = judge.judge(PROMPTS, PAIRS, return_scores=True, temperature=temperature)
        expected = 1 / (1 + np.exp(-(scores[:, 0] - scores[:, 1]) / temperature))
        np.testing.assert_allclose(probs, expected, rtol=1e-5)
    assert probs[2] == pytest.approx(0.5)


def test_chat_prompts_and_reward_function_use(judged):
    model, tok, judge = judged
    messages = [[{"role": "user", "content": p}] for p in PROMPTS]
    rewards = judge(messages, [pair[0] for pair in PAIRS], completion_ids=None)
    expected = known_scores(model, tok, messages, [[{"role": "assistant", "content": p[0]}] for p in PAIRS])
    np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-6)


def test_a_saved_reward_model_directory(judged, tmp_path):
    model, tok, judge = judged
    model.save_in_hf_format(tmp_path, tokenizer=tok)
    assert RewardModelJudge(str(tmp_path)).judge(PROMPTS, PAIRS) == judge.judge(PROMPTS, PAIRS)


def test_bad_arguments_are_refused(judged):
    _, tok, judge = judged
    with pytest.raises(ValueError, match="pair"):
        judge.judge(["hi"], [[" a", " b", " c"]])
    with pytest.raises(ValueError, match="2 prompts and 1"):
        judge.judge(["hi", "ok"], [[" a", " b"]])
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardModelJudge(ScalarHeadModel.from_config("llama3", **SIZES, num_labels=2), tok)
    with pytest.raises(TypeError, match="reward model"):
        RewardModelJudge(object(), tok)


def test_base_pairwise_judge_is_trls_interface():
    class Shorter(BasePairwiseJudge):
        def judge(self, prompts, completions, shuffle_order=True):
            return [int(len(b) < len(a)) for a, b in completions]

    assert Shorter().judge(["hi"], [["hello there", "hey"]]) == [1]
    with pytest.raises(TypeError):
        BasePairwiseJudge()


# -- prompts: TRL's request text, reading replies, shuffling ----------------------------------

# sha256 of TRL's DEFAULT_PAIRWISE_SYSTEM_PROMPT (trl/experimental/judges/judges.py, huggingface/trl
# at 10a4855b), computed from TRL's source text: the prompt must stay verbatim.
TRL_PROMPT_SHA256 = "aa3bedaaa94eb74a11dfa79cb42b5aa4c9aa11d46a98224a887a2315ff22e6b4"
# TRL's SIMPLE_CHAT_TEMPLATE (trl.trainer.utils, trl 0.15): how TRL's online trainers render chat for a judge.
TRL_SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{message['role'].capitalize() + ': ' + message['content'] + '\n\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def test_the_request_is_trls_prompt_filled():
    assert hashlib.sha256(PAIRWISE_SYSTEM_PROMPT.encode()).hexdigest() == TRL_PROMPT_SHA256
    request = pairwise_request("sort cab", " abc", " cba")
    assert '"instruction": """sort cab""",' in request
    assert '"model_identifier": "0",\n        "output": """ abc"""' in request
    assert '"model_identifier": "1",\n        "output": """ cba"""' in request
    assert request.endswith("(no quotation marks, no spaces, no new lines, ...).\n")
    assert "{" + "{" not in request and "{prompt}" not in request  # every placeholder and doubled brace filled


def test_chat_is_rendered_as_trls_simple_chat_template():
    chat = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}]
    reply = [{"role": "assistant", "content": "hello there"}]
    template = jinja2.Environment().from_string(TRL_SIMPLE_CHAT_TEMPLATE)
    assert as_text(chat) == template.render(messages=chat).removesuffix("\n\n")
    assert as_text(reply) == "Assistant: hello there"
    multimodal = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]}
    ]
    assert as_text(multimodal) == "User: ab"
    request = pairwise_request(
        chat, reply, [{"role": "assistant", "content": "bye"}], "{prompt}|{response0}|{response1}"
    )
    assert request == "System: be kind\n\nUser: hi|Assistant: hello there|Assistant: bye"


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("0", 0),
        ("1", 1),
        (" 1\n", 1),
        ('"0"', 0),
        ("'1'", 1),
        ("`1`", 1),
        ("**0**", 0),
        ("1.", 1),
        ("(1)", 1),
        ("Answer: 1", 1),
        ("answer:0", 0),
        ("The best model is 0.", 0),
        ("Model 0 is verbose. Answer: 1", 1),  # a labelled answer wins over a digit in passing
        ("I prefer the second one, so: 1", 1),
        ("model 0", 0),
        ("response 1", 1),
        ('{"model_identifier": "1"}', 1),
        ("<think>0 or 1? 1 is shorter</think>0", 0),
        ("1 1 1 1", 1),
        ("1\n\nModel 0 repeats the question.", 1),  # the answer first, then why (TRL: the first character)
        ("0. Model 1 is wrong", 0),
        ("1 (model 0 is off-topic)", 1),
        ("0 - model 1 rambles", 0),
        ("**1**: model 0 is rude", 1),
        ("0 or 1", None),
        ("0 and 1 are equally good", None),
        ("0/1", None),
        ("Model 1 is better than model 0", None),
        ("Answer: 0, answer: 1", None),
        ("", None),
        ("   ", None),
        ("2", None),
        ("10", None),
        ("0.5", None),
        ("the 1st one", None),
        ("v1 is better", None),
        ("I cannot decide.", None),
    ],
)
def test_parse_pairwise(reply, verdict):
    assert parse_pairwise(reply) == verdict


def test_shuffled_pairs_flip_a_random_half_and_unflip_maps_back():
    pairs = [[f"a{i}", f"b{i}"] for i in range(2000)]
    shown, flipped = shuffled_pairs(pairs, rng=np.random.default_rng(0))
    assert shown == [[b, a] if f else [a, b] for (a, b), f in zip(pairs, flipped, strict=True)]
    assert 900 < sum(flipped) < 1100  # Binomial(2000, 1/2): mean 1000, sd 22
    assert shuffled_pairs(pairs, rng=5) == shuffled_pairs(pairs, rng=5)
    assert shuffled_pairs(pairs, rng=5)[1] != shuffled_pairs(pairs, rng=6)[1]
    # A judge that picks the "a" completion wherever it is shown: after unflip, always index 0.
    picks_a = [int(s[1].startswith("a")) for s in shown]
    assert unflip(picks_a, flipped) == [0] * len(pairs)
    assert unflip([0, 1, -1, -1], [True, True, True, False]) == [1, 0, -1, -1]  # TRL's 1 - (-1) = 2 is avoided


# -- ModelPairwiseJudge on a scripted model (the parse path) ---------------------------------

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "[UNK]"]
WORDS = ["user", "assistant", "system", "0", "1", "A", "B", "hi", "hello", "how", "are", "you", "what", "why",
         "thanks", "please", "bye", "ok", "no", "bad", "maybe", "sorry", "fine", "Answer"]  # fmt: skip
TEMPLATE = "{prompt} A {response0} B {response1}"


def judge_tokenizer(chat_template: bool = True) -> kithara.Tokenizer:
    """Word-level, with the digits a judge answers in and the bundled ChatML template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=(ASSETS / "tokenizer" / "chat_template.jinja").read_text() if chat_template else None,
    )  # fmt: skip
    return kithara.Tokenizer(hf)


class ScriptedModel:
    """``generate``'s interface; answers each request with ``answer(request_text)`` and records calls."""

    def __init__(self, tokenizer, answer):
        self.tokenizer, self.answer, self.calls = tokenizer, answer, []

    def generate(self, token_ids, max_new_tokens, stop_token_ids):
        self.calls.append(dict(token_ids=token_ids, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids))
        replies = [self.answer(self.tokenizer.decode(ids)) for ids in token_ids]
        return [self.tokenizer.encode_text(r)[1:] for r in replies]  # without the BOS


def good_one(request: str) -> str:
    """The rule the trained model learns: the completion that is "thanks" or "please" wins."""
    words = request.split()
    first = words[words.index("A") + 1 : words.index("B")]
    return "0" if {"thanks", "please"} & set(first) else "1"


ASKED = ["hi", "how are you", "what", "why"]
ASKED_PAIRS = [["thanks", "bye"], ["no", "please"], ["bad", "thanks"], ["please", "ok"]]
TRUTH = [0, 1, 1, 0]


def test_the_model_is_asked_trls_request_through_the_chat_template():
    tok = judge_tokenizer()
    model = ScriptedModel(tok, lambda _: "1")
    judge = ModelPairwiseJudge(model, tok, max_new_tokens=3)
    assert judge.judge(ASKED[:2], ASKED_PAIRS[:2], shuffle_order=False) == [1, 1]
    (call,) = model.calls
    expected = [
        tok.encode_chat([{"role": "user", "content": pairwise_request(p, a, b)}], add_generation_prompt=True)[0]
        for p, (a, b) in zip(ASKED[:2], ASKED_PAIRS[:2], strict=True)
    ]
    assert call["token_ids"] == expected
    assert tok.decode(call["token_ids"][0]).endswith("<|im_end|> <|im_start|> assistant")
    assert call["max_new_tokens"] == 3
    assert call["stop_token_ids"] == [tok.eos_id, 4]  # EOS and the end of turn <|im_end|>


def test_without_a_chat_template_the_request_is_plain_text(caplog):
    tok = judge_tokenizer(chat_template=False)
    model = ScriptedModel(tok, lambda _: "0")
    with caplog.at_level(logging.INFO, logger="kithara.judges"):
        judge = ModelPairwiseJudge(model, tok, system_prompt=TEMPLATE)
    assert "no chat template" in caplog.text
    assert judge.judge(["hi"], [["thanks", "bye"]], shuffle_order=False) == [0]
    assert model.calls[0]["token_ids"] == [tok.encode_text("hi A thanks B bye")]


def test_unreadable_replies_are_minus_one_and_logged(caplog):
    tok = judge_tokenizer()
    replies = iter(["0", "Answer 1", "0 1", "maybe", "1"])
    judge = ModelPairwiseJudge(ScriptedModel(tok, lambda _: next(replies)), tok, system_prompt=TEMPLATE)
    with caplog.at_level(logging.WARNING, logger="kithara.judges"):
        verdicts = judge.judge(["hi"] * 5, [["ok", "no"]] * 5, shuffle_order=False)
    assert verdicts == [0, 1, -1, -1, 1]
    assert "'0 1'" in caplog.text and "'maybe'" in caplog.text and "pair 2" in caplog.text


def test_rows_go_in_batches_of_batch_size():
    tok = judge_tokenizer()
    model = ScriptedModel(tok, good_one)
    judge = ModelPairwiseJudge(model, tok, system_prompt=TEMPLATE, batch_size=3)
    assert judge.judge(ASKED + ASKED[:1], ASKED_PAIRS + ASKED_PAIRS[:1], shuffle_order=False) == TRUTH + TRUTH[:1]
    assert [len(c["token_ids"]) for c in model.calls] == [3, 2]
    assert judge.judge([], []) == [] and len(model.calls) == 2


def test_shuffle_order_presents_flipped_pairs_and_maps_verdicts_back():
    tok = judge_tokenizer()
    prompts, pairs = ASKED * 8, ASKED_PAIRS * 8
    flips = shuffled_pairs(pairs, np.random.default_rng(7))[1]
    assert 0 < sum(flips) < len(pairs)
    # A position-biased model (always "0"): its verdicts follow the flips, spread over both completions.
    biased = ScriptedModel(tok, lambda _: "0")
    judge = ModelPairwiseJudge(biased, tok, system_prompt=TEMPLATE, seed=7)
    assert judge.judge(prompts, pairs) == [int(f) for f in flips]
    shown = [tok.decode(ids, skip_special_tokens=True).split() for ids in biased.calls[0]["token_ids"]]
    for words, (first, second), flip in zip(shown, pairs, flips, strict=True):
        a = words.index("A")
        assert words[a + 1 : a + 4] == ([second, "B", first] if flip else [first, "B", second])
    # A model that follows the rule on what it is shown: the right verdicts, in the given order.
    fair = ModelPairwiseJudge(ScriptedModel(tok, good_one), tok, system_prompt=TEMPLATE, seed=7)
    assert fair.judge(prompts, pairs) == TRUTH * 8
    assert ModelPairwiseJudge(biased, tok, system_prompt=TEMPLATE, seed=7).judge(prompts, pairs, False) == [0] * 32


def test_model_judge_refuses_bad_arguments():
    tok = judge_tokenizer()
    model = ScriptedModel(tok, lambda _: "0")
    with pytest.raises(TypeError, match="chat model"):
        ModelPairwiseJudge(object(), tok)
    assert ModelPairwiseJudge(model).tokenizer is tok  # model.tokenizer by default
    with pytest.raises(ValueError, match="tokenizer="):
        ModelPairwiseJudge(ScriptedModel(None, lambda _: "0"))
    with pytest.raises(ValueError, match=r"lacks the placeholder\(s\) \{response1\}"):
        ModelPairwiseJudge(model, tok, system_prompt="{prompt} {response0}")
    with pytest.raises(ValueError, match=r"not a valid str\.format template"):
        ModelPairwiseJudge(model, tok, system_prompt="{prompt} {response0} {response1} {other}")
    with pytest.raises(ValueError, match="max_new_tokens"):
        ModelPairwiseJudge(model, tok, max_new_tokens=0)
    with pytest.raises(ValueError, match="batch_size"):
        ModelPairwiseJudge(model, tok, batch_size=0)
    judge = ModelPairwiseJudge(model, tok)
    with pytest.raises(ValueError, match="2 prompts and 1 completion pairs"):
        judge.judge(["a", "b"], [["x", "y"]])
    with pytest.raises(ValueError, match=r"completions\[0\] must be a pair"):
        judge.judge(["a"], [["x", "y", "z"]])
    with pytest.raises(ValueError, match=r"completions\[0\] must be a pair"):
        judge.judge(["a"], ["xy"])
    with pytest.raises(TypeError, match="strings or chat message lists"):
        judge.judge([3], [["x", "y"]])
    with pytest.raises(ValueError, match="verdict 0 is 2"):
        unflip([2], [False])
    with pytest.raises(TypeError, match="str"):
        parse_pairwise(1)


# -- ModelPairwiseJudge on a real model trained to judge ---------------------------------------

GOOD, BAD = ["thanks", "please"], ["bye", "ok", "no", "bad", "maybe", "sorry", "fine"]
JUDGE_PROMPTS = ["hi", "hello", "how are you", "what", "why", "hi you", "are you ok"]


@pytest.fixture(scope="module")
def trained_judge():
    """A tiny Llama trained with SFT on (request -> index of the "thanks"/"please" completion);
    24 of the 196 cases are held out."""
    cases = [(p, [g, b][:: 1 - 2 * o], o) for p in JUDGE_PROMPTS for g in GOOD for b in BAD for o in (0, 1)]
    np.random.default_rng(0).shuffle(cases)
    held_out, train = cases[:24], cases[24:]
    rows = [
        {"messages": [{"role": "user", "content": pairwise_request(p, a, b, TEMPLATE)},
                      {"role": "assistant", "content": str(o)}]}
        for p, (a, b), o in train
    ]  # fmt: skip
    tok = judge_tokenizer()
    model = kithara.KerasHubModel.from_config(
        "llama3", vocab_size=32, num_layers=2, hidden_dim=32, num_heads=4, num_kv_heads=2, intermediate_dim=64
    )
    trainer = kithara.SFTTrainer(
        model, rows, tokenizer=tok, max_length=32, assistant_only_loss=True, learning_rate=3e-2, steps=150,
        per_device_train_batch_size=4, progress_bar=False,
    )  # fmt: skip
    trainer.train()
    return trainer.model, tok, held_out


def test_a_trained_judge_model_picks_the_right_completion(trained_judge):
    model, tok, held_out = trained_judge
    prompts, pairs, truth = [c[0] for c in held_out], [c[1] for c in held_out], [c[2] for c in held_out]
    assert 0 < sum(truth) < len(truth)
    judge = ModelPairwiseJudge(model, tok, system_prompt=TEMPLATE, max_new_tokens=4)
    assert judge.judge(prompts, pairs, shuffle_order=False) == truth
    assert judge.judge(prompts, pairs) == truth  # shown in a random order, mapped back
    # The verdict is the reply's digit: generate it directly on the request's chat encoding.
    ids = [
        tok.encode_chat([{"role": "user", "content": f"{p} A {a} B {b}"}], add_generation_prompt=True)[0]
        for p, (a, b) in zip(prompts, pairs, strict=True)
    ]
    replies = [
        tok.decode(r, skip_special_tokens=True) for r in model.generate(ids, max_new_tokens=4, stop_token_ids=[4])
    ]
    assert [parse_pairwise(r) for r in replies] == truth


def test_return_scores_is_the_softmax_of_the_two_digits_logits(trained_judge):
    model, tok, held_out = trained_judge
    prompts, pairs, truth = [c[0] for c in held_out], [c[1] for c in held_out], [c[2] for c in held_out]
    judge = ModelPairwiseJudge(model, tok, system_prompt=TEMPLATE, batch_size=16)
    forward = jax.jit(lambda v, ids: model.apply(v, {"token_ids": ids, "padding_mask": ids >= 0}, training=False)[0])
    digits = [tok.encode_text(d)[1] for d in ("0", "1")]
    for temperature in (1.0, 3.0):
        expected = []  # each request alone, unpadded: the full logits at its last position
        for p, (a, b) in zip(prompts, pairs, strict=True):
            ids = judge.encode(p, a, b)
            logits = np.asarray(forward(model.variables, np.asarray([ids], np.int32)))[0, -1, digits] / temperature
            expected.append(float(np.exp(logits[0]) / np.exp(logits).sum()))
        probs = judge.judge(prompts, pairs, shuffle_order=False, return_scores=True, temperature=temperature)
        np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert [int(p < 0.5) for p in probs] == truth
    shuffled = judge.judge(prompts, pairs, return_scores=True)  # shown swapped where flipped, mapped back
    assert [int(p < 0.5) for p in shuffled] == truth
    with pytest.raises(ValueError, match="temperature"):
        judge.judge(prompts, pairs, return_scores=True, temperature=0.0)
    with pytest.raises(TypeError, match="KerasHubModel"):
        ModelPairwiseJudge(ScriptedModel(tok, good_one), tok).judge(["hi"], [["a", "b"]], return_scores=True)


def test_a_judge_model_directory(trained_judge, tmp_path):
    model, tok, held_out = trained_judge
    model.save_in_hf_format(tmp_path, tokenizer=tok)
    judge = ModelPairwiseJudge(str(tmp_path), system_prompt=TEMPLATE)
    assert judge.judge([c[0] for c in held_out], [c[1] for c in held_out]) == [c[2] for c in held_out]


# -- interfaces: binary, rank, AllTrueJudge ------------------------------------------------------


class ShortEnough(BaseBinaryJudge):
    """1 when the completion has at most ``limit`` words; -1 for an empty one (cannot judge)."""

    def __init__(self, limit):
        self.limit = limit

    def judge(self, prompts, completions, gold_completions=None, shuffle_order=True):
        return [-1 if not c else int(len(c.split()) <= self.limit) for c in completions]


class MatchesGold(BaseBinaryJudge):
    def judge(self, prompts, completions, gold_completions=None, shuffle_order=True):
        return [int(c == g) for c, g in zip(completions, gold_completions, strict=True)]


def test_all_true_judge_truth_table():
    # (short, matches gold) per completion -> combined, TRL's rule: any -1 -> -1, all 1 -> 1, else 0
    completions = ["a", "a b c", "b", "a b c", ""]
    gold = ["a", "a b c", "a", "x", "a"]
    short, match = ShortEnough(1), MatchesGold()
    assert short.judge([""] * 5, completions) == [1, 0, 1, 0, -1]
    assert match.judge([""] * 5, completions, gold) == [1, 1, 0, 0, 0]
    assert AllTrueJudge([short, match]).judge([""] * 5, completions, gold) == [1, 0, 0, 0, -1]
    assert AllTrueJudge([match]).judge([""] * 5, completions, gold) == [1, 1, 0, 0, 0]
    assert AllTrueJudge([ShortEnough(5), ShortEnough(1)]).judge([""] * 3, ["a", "a b", ""]) == [1, 0, -1]


def test_all_true_judge_refuses_bad_judges_and_verdicts():
    class Broken(BaseBinaryJudge):
        def __init__(self, out):
            self.out = out

        def judge(self, prompts, completions, gold_completions=None, shuffle_order=True):
            return self.out

    with pytest.raises(ValueError, match="at least one judge"):
        AllTrueJudge([])
    with pytest.raises(TypeError, match=r"judges\[0\] is a RewardModelJudge"):
        AllTrueJudge([RewardModelJudge.__new__(RewardModelJudge)])
    with pytest.raises(ValueError, match="Broken returned 2"):
        AllTrueJudge([Broken([1, 2])]).judge(["", ""], ["a", "b"])
    with pytest.raises(ValueError, match="Broken returned 1 verdicts for 2 prompts"):
        AllTrueJudge([Broken([1])]).judge(["", ""], ["a", "b"])
    with pytest.raises(ValueError, match="2 prompts and 1 completions"):
        AllTrueJudge([ShortEnough(1)]).judge(["", ""], ["a"])
    with pytest.raises(ValueError, match="1 gold_completions"):
        AllTrueJudge([MatchesGold()]).judge(["", ""], ["a", "b"], ["a"])


class FewestWords(BaseRankJudge):
    """Ranks completions by word count, fewest first; ties go to the one shown first, so the
    shown order matters and ``shuffle_order`` breaks ties at random."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)

    def judge(self, prompts, completions, shuffle_order=True):
        check_ranked(prompts, completions, "FewestWords")
        ranks = []
        for group in completions:
            order = self.rng.permutation(len(group)) if shuffle_order else np.arange(len(group))
            shown = sorted(range(len(group)), key=lambda j: len(group[order[j]].split()))  # stable: ties by shown place
            ranks.append([int(order[j]) for j in shown])
        return ranks


def test_a_rank_judge():
    judge = FewestWords()
    prompts = ["capital of France", "capital of Germany"]
    completions = [["it is Paris", "Paris", "Lyon I think"], ["Munich", "Berlin", "the capital is Berlin"]]
    assert judge.judge(prompts, completions, shuffle_order=False) == [[1, 0, 2], [0, 1, 2]]
    ties = {tuple(judge.judge(prompts[1:], completions[1:])[0]) for _ in range(40)}
    assert ties == {(0, 1, 2), (1, 0, 2)}  # the tie is broken both ways; the longest is always last
    with pytest.raises(ValueError, match=r"completions\[1\] must be a non-empty list"):
        judge.judge(prompts, [["a"], []])
    with pytest.raises(ValueError, match="2 prompts and 1 completions"):
        judge.judge(prompts, [["a"]])
    with pytest.raises(TypeError):
        BaseRankJudge()


def test_the_package_exports_and_refuses_unknown_names():
    for name in kithara.judges.__all__:
        if name != "OpenAIPairwiseJudge":  # imported on first use
            assert getattr(kithara.judges, name) is not None
    if (Path(kithara.judges.__file__).parent / "openai_judge.py").exists():
        assert issubclass(kithara.judges.OpenAIPairwiseJudge, BasePairwiseJudge)
    # Judges that run a model on the mesh judge every pair on every process (online trainers read this).
    assert RewardModelJudge.runs_on_every_row and ModelPairwiseJudge.runs_on_every_row
    with pytest.raises(AttributeError, match="NoSuchJudge"):
        kithara.judges.NoSuchJudge  # noqa: B018
