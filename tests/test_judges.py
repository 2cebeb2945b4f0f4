"""kithara.judges: TRL's pairwise-judge API, and RewardModelJudge on a reward model whose scores are known."""

import jax
import numpy as np
import pytest
from conftest import word_tokenizer

from kithara.data.reward_data import reward_tokens
from kithara.judges import BasePairwiseJudge, RewardModelJudge
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
