"""LogCompletionsCallback, WinRateCallback, MergeModelCallback and RichProgressCallback on one
tiny trained run: each callback's output is checked against an independent computation from
the training state of exactly that step (saved by a snapshot callback)."""

from __future__ import annotations

import io
import json
import types

import jax
import numpy as np
import pytest
from conftest import pattern_examples, tiny_model, word_tokenizer
from rich.console import Console

import kithara
from kithara.callbacks import (
    LogCompletionsCallback,
    MergeConfig,
    MergeModelCallback,
    ProgressBar,
    RichProgressCallback,
    StepInfo,
    WinRateCallback,
)
from kithara.judges import BasePairwiseJudge

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

STEPS = 5  # logs and saves every 2 steps: at 2 and 4, and at the end (5)
PROMPTS = ["hi how are", "hello", [{"role": "user", "content": "how are you"}]]
MAX_NEW = 6
TOKENS = np.array([[1, 9, 10, 11, 12, 6, 7, 8]], np.int32)


class LongerWins(BasePairwiseJudge):
    """Prefers the longer text; a tie is undecided (-1)."""

    def judge(self, prompts, completions, shuffle_order=True):
        return [1 if len(b) > len(a) else 0 if len(a) > len(b) else -1 for a, b in completions]


class Snapshot(kithara.Callback):
    """Host copies of the model variables after the chosen steps."""

    def __init__(self, steps):
        self.steps, self.saved = set(steps), {}

    def needs_sync(self, step):
        return step in self.steps

    def on_step_end(self, info):
        if info.step in self.steps:
            self.saved[info.step] = jax.tree.map(np.array, info.state.model)


def numpy_slerp(t, v0, v1):
    """mergekit's slerp, written out again."""
    a, b = v0 / np.linalg.norm(v0), v1 / np.linalg.norm(v1)
    dot = float(np.sum(a * b))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * v0 + np.sin(t * theta) * v1) / np.sin(theta)


def read_safetensors(directory):
    return safetensors_numpy.load_file(str(directory / "model.safetensors"))


def hf_logits(directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()


def kithara_logits(model, variables):
    inputs = {"token_ids": TOKENS, "padding_mask": np.ones_like(TOKENS, bool)}
    return np.asarray(model.apply(variables, inputs, training=False)[0])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("generation_callbacks")
    tokenizer = word_tokenizer()
    model = tiny_model(vocab_size=32, seed=3)
    model.save_in_hf_format(out / "start")  # the starting weights, the merges' target
    start = jax.tree.map(np.array, model.variables)
    snapshot = Snapshot({2, 3, 4, STEPS})
    completions = LogCompletionsCallback(model, tokenizer, PROMPTS, every=2, max_new_tokens=MAX_NEW)
    at_eval = LogCompletionsCallback(
        model, tokenizer, PROMPTS[:1], max_new_tokens=MAX_NEW, log_dir=str(out / "tb_eval")
    )
    win_rate = WinRateCallback(LongerWins(), model, tokenizer, PROMPTS, every=2, max_new_tokens=MAX_NEW)
    plain = MergeModelCallback(model, str(out / "plain"), tokenizer=tokenizer, save_steps=2)
    linear = MergeModelCallback(
        model, str(out / "linear"), save_steps=2, merge_config=MergeConfig("linear", 0.7, 0.3, normalize=False)
    )
    slerp = MergeModelCallback(
        model, str(out / "slerp"), merge_at_every_checkpoint=False, merge_config=MergeConfig("slerp", t_values=0.3)
    )
    console = Console(file=io.StringIO(), width=200)
    progress = RichProgressCallback(every=1, console=console)
    examples = pattern_examples(64, vocab=19, seed=5)
    loader = kithara.Dataloader(examples, 1, seed=0)
    held_out = kithara.Dataloader(examples[:8], 1, shuffle=False, drop_remainder=False)
    callbacks = [snapshot, completions, at_eval, win_rate, plain, linear, slerp, progress]
    trainer = kithara.Trainer(
        model,
        kithara.optimizers.adamw(5e-2),
        loader,
        eval_dataloader=held_out,
        eval_steps_interval=3,
        steps=STEPS,
        tensorboard_dir=str(out / "tb"),
        progress_bar=False,
        callbacks=callbacks,
    )
    trainer.train()
    compilations = model.generate_compilations  # before the tests generate with other batch sizes
    return types.SimpleNamespace(**locals())


def generated(run, variables):
    """Completions of PROMPTS with ``variables``, through the model's own string path
    (the conversation through the chat template by hand)."""
    text = run.model.generate(PROMPTS[:2], max_new_tokens=MAX_NEW, tokenizer=run.tokenizer, variables=variables)
    ids = run.tokenizer.apply_chat_template(PROMPTS[2], add_generation_prompt=True)
    chat = run.model.generate([ids], max_new_tokens=MAX_NEW, stop_token_ids=[run.tokenizer.eos_id], variables=variables)
    return [*text, run.tokenizer.decode(chat[0], skip_special_tokens=True)]


def test_logged_completions_are_those_of_the_weights_of_that_step(run):
    rows = [json.loads(line) for line in (run.out / "tb" / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] * 3 + [4] * 3 + [STEPS] * 3
    assert run.completions.table == [(r["step"], r["prompt"], r["completion"]) for r in rows]
    chat_text = run.tokenizer.apply_chat_template(PROMPTS[2], tokenize=False, add_generation_prompt=True)
    assert [r["prompt"] for r in rows[:3]] == [*PROMPTS[:2], chat_text]
    expected = {step: generated(run, run.snapshot.saved[step]) for step in (2, 4, STEPS)}
    for step, texts in expected.items():
        assert [r["completion"] for r in rows if r["step"] == step] == texts, step
    # Weights moved enough between logs for a log of the wrong step to differ.
    assert expected[2] != expected[4] != expected[STEPS]
    # One decode program per batch size (3 prompts, 1 prompt), reused at every log and judgement.
    assert run.compilations == 2
    # every=None: at each evaluation (step 3), and the last step at the end of training.
    at_eval = [json.loads(line) for line in (run.out / "tb_eval" / "completions.jsonl").read_text().splitlines()]
    assert [(r["step"], r["completion"]) for r in at_eval] == [
        (3, generated(run, run.snapshot.saved[3])[0]),
        (STEPS, expected[STEPS][0]),
    ]


def test_completions_table_is_in_tensorboard(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.out / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    tag = next(t for t in tags if t.startswith("completions"))
    events = acc.Tensors(tag)
    assert [e.step for e in events] == [2, 4, STEPS]
    table = events[1].tensor_proto.string_val[0].decode()
    assert table.splitlines()[0] == "| step | prompt | completion |"
    for prompt, completion in zip(PROMPTS[:2], generated(run, run.snapshot.saved[4])[:2], strict=True):
        assert f"| 4 | {prompt} | {completion} |" in table


def test_win_rate_is_the_judges_verdict_on_the_generated_texts(run):
    reference = generated(run, run.start)
    assert run.win_rate.ref_completions == reference
    expected = [(0, 0.0)]  # the reference against itself: every pair ties (-1), counted as a loss as in TRL
    for step in (2, 3, 4):  # every 2 steps, and at the evaluation of step 3
        policy = generated(run, run.snapshot.saved[step])
        wins = sum(len(p) > len(r) for r, p in zip(reference, policy, strict=True))
        expected.append((step, wins / len(PROMPTS)))
    assert run.win_rate.history == expected
    assert len({rate for _, rate in expected}) > 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.out / "tb"))
    acc.Reload()
    events = acc.Scalars("eval/win_rate")
    assert [e.step for e in events] == [step for step, _ in expected]
    np.testing.assert_allclose([e.value for e in events], [rate for _, rate in expected], rtol=1e-6)


def test_merged_checkpoints_load_in_transformers_with_the_logits_of_that_step(run):
    assert run.plain.merged_steps == [2, 4, STEPS]
    assert run.slerp.merged_steps == [STEPS]
    for step in (2, STEPS):
        directory = run.out / "plain" / f"checkpoint-{step}" / "merged"
        want = kithara_logits(run.model, run.snapshot.saved[step])
        np.testing.assert_allclose(hf_logits(directory), want, atol=1e-5, rtol=0)
    assert (run.out / "plain" / "checkpoint-2" / "merged" / "tokenizer.json").exists()


def test_linear_and_slerp_merges_equal_the_numpy_formulas(run):
    target = read_safetensors(run.out / "start")
    policy = read_safetensors(run.out / "plain" / "checkpoint-4" / "merged")
    linear = read_safetensors(run.out / "linear" / "checkpoint-4" / "merged")
    assert linear.keys() == policy.keys() == target.keys()
    for name in policy:
        np.testing.assert_allclose(linear[name], 0.7 * policy[name] + 0.3 * target[name], rtol=1e-6, atol=1e-7)
    last = read_safetensors(run.out / "plain" / f"checkpoint-{STEPS}" / "merged")
    slerped = read_safetensors(run.out / "slerp" / f"checkpoint-{STEPS}" / "merged")
    interpolated = 0
    for name in last:
        a, b = last[name].astype(np.float64), target[name].astype(np.float64)
        np.testing.assert_allclose(slerped[name], numpy_slerp(0.3, a, b), rtol=1e-5, atol=1e-6)
        interpolated += abs(float(np.sum(a * b)) / np.linalg.norm(a) / np.linalg.norm(b)) <= 0.9995
    assert interpolated > 0  # some tensors really took the spherical branch


def test_rich_progress_callback_is_the_progress_bar(run):
    assert issubclass(RichProgressCallback, ProgressBar)
    lines = run.console.file.getvalue().splitlines()
    steps = [line.split()[2] for line in lines if line.startswith("train step")]
    assert steps == [f"{step}/{STEPS}" for step in range(1, STEPS + 1)]
    assert [line.split()[3] for line in lines if line.startswith("eval @ step")] == ["3:"]


def step_info(step, variables):
    state = types.SimpleNamespace(model=variables)
    return StepInfo(step, 0, step, 0, None, {}, None, None, lambda: state, dict)


def test_lora_adapters_are_merged_and_linearly_mixed_with_the_base(tmp_path):
    model = tiny_model(vocab_size=32, seed=4, lora=kithara.LoraConfig(rank=2, targets=("query", "value", "down")))
    plain = MergeModelCallback(model, str(tmp_path / "plain"), merge_at_every_checkpoint=False)
    mixed = MergeModelCallback(
        model, str(tmp_path / "mixed"), merge_at_every_checkpoint=False, merge_config=MergeConfig(normalize=True)
    )
    model.save_in_hf_format(tmp_path / "base")  # adapters start at zero: the base model
    begin = step_info(0, model.variables)
    plain.on_train_begin(begin)
    mixed.on_train_begin(begin)
    rng = np.random.default_rng(0)
    trained = kithara.ModelVariables(
        {p: 0.2 * rng.standard_normal(v.shape).astype(np.float32) for p, v in model.variables.trainable.items()},
        model.variables.non_trainable,
    )
    for callback in (plain, mixed):
        callback.on_train_end(step_info(3, trained))
    merged = tmp_path / "plain" / "checkpoint-3" / "merged"
    np.testing.assert_allclose(hf_logits(merged), kithara_logits(model, trained), atol=1e-5, rtol=0)
    policy, base = read_safetensors(merged), read_safetensors(tmp_path / "base")
    half = read_safetensors(tmp_path / "mixed" / "checkpoint-3" / "merged")
    changed = [name for name in policy if not np.array_equal(policy[name], base[name])]
    assert len(changed) == 3 * 2  # query, value and down of each layer
    for name in policy:
        np.testing.assert_allclose(half[name], (policy[name] + base[name]) / 2, rtol=1e-6, atol=1e-7)


def test_bad_arguments_are_refused_clearly(tmp_path):
    model = tiny_model(vocab_size=32)
    tokenizer = word_tokenizer()
    with pytest.raises(ValueError, match="mergekit"):
        MergeConfig("ties")
    with pytest.raises(ValueError, match="one of"):
        MergeConfig("average")
    with pytest.raises(ValueError, match="needs the checkpoint schedule"):
        MergeModelCallback(model, str(tmp_path))
    with pytest.raises(ValueError, match="differs from the checkpointer"):
        MergeModelCallback(model, str(tmp_path), save_steps=3, checkpointer=kithara.Checkpointer(str(tmp_path), 5))
    with pytest.raises(ValueError, match="non-empty list"):
        LogCompletionsCallback(model, tokenizer, "hi")
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        LogCompletionsCallback(model, tokenizer, ["hi", 3])
    with pytest.raises(ValueError, match=r"needs a kithara\.Tokenizer"):
        LogCompletionsCallback(model, None, ["hi"])
    with pytest.raises(ValueError, match="LogCompletionsCallback: Need temperature >= 0"):
        LogCompletionsCallback(model, tokenizer, ["hi"], temperature=0.7, top_p=1.5)
    with pytest.raises(ValueError, match="every must be"):
        LogCompletionsCallback(model, tokenizer, ["hi"], every=0)
    with pytest.raises(ValueError, match="nowhere to write"):
        LogCompletionsCallback(model, tokenizer, ["hi"]).on_train_begin(step_info(0, model.variables))
    with pytest.raises(TypeError, match="pairwise judge"):
        WinRateCallback(lambda p, c: [0], model, tokenizer, ["hi"])

    class Broken(BasePairwiseJudge):
        def judge(self, prompts, completions, shuffle_order=True):
            return [2] * len(prompts)

    callback = WinRateCallback(Broken(), model, tokenizer, ["hi", "ok"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"returned \[2, 2\]; a pairwise judge returns 0, 1 or -1"):
        callback.on_train_begin(step_info(0, model.variables))

    class Soft(BasePairwiseJudge):  # a probability where a verdict belongs: not rounded into one
        def judge(self, prompts, completions, shuffle_order=True):
            return [0.9] * len(prompts)

    callback = WinRateCallback(Soft(), model, tokenizer, ["hi", "ok"], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"returned \[0\.9, 0\.9\]; a pairwise judge returns 0, 1 or -1"):
        callback.on_train_begin(step_info(0, model.variables))


def test_soft_judge_reports_the_average_win_probability(tmp_path):
    class Soft(BasePairwiseJudge):
        """The probability that the first (the reference's) completion is better, as given."""

        def judge(self, prompts, completions, shuffle_order=True, return_scores=False):
            assert return_scores
            return [0.9, 0.2, 0.5]

    model = tiny_model(vocab_size=32)
    callback = WinRateCallback(
        Soft(),
        model,
        word_tokenizer(),
        ["hi", "ok", "bye"],
        max_new_tokens=2,
        use_soft_judge=True,
        log_dir=str(tmp_path),
    )
    callback.on_train_begin(step_info(0, model.variables))
    callback.on_eval_end(step_info(7, model.variables))
    callback.on_train_end(step_info(7, model.variables))
    # Above 0.5 is the reference's win: verdicts [0, 1, 1]; avg_win_prob = 1 - mean(p).
    assert callback.winner_indices == [0, 1, 1]
    assert callback.history == [(0, 2 / 3), (7, 2 / 3)]
    assert callback.soft_history == [(0, pytest.approx(1 - 1.6 / 3)), (7, pytest.approx(1 - 1.6 / 3))]


def test_weights_are_read_from_the_state_or_its_policy_part():
    from kithara.callbacks.log_completions import state_variables
    from kithara.models.model import join_variables

    model, other = tiny_model(vocab_size=32), tiny_model(vocab_size=32, num_layers=1)
    assert state_variables(model, step_info(1, model.variables)).trainable.keys() == model.variables.trainable.keys()
    joined = join_variables({"policy": model.variables, "value": other.variables})  # a policy-value trainer's state
    policy = state_variables(model, step_info(1, joined))
    assert all(policy.trainable[p] is joined.trainable[f"policy/{p}"] for p in model.variables.trainable)
    assert policy.non_trainable.keys() == model.variables.non_trainable.keys()
    with pytest.raises(ValueError, match="give the callback the model the Trainer trains"):
        state_variables(model, step_info(1, other.variables))
