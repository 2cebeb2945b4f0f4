"""Online DPO, XPO and Nash-MD with a rule-based judge whose preference can be checked.

Each prompt names a colour ("Say red:"); a good answer repeats it. A brief SFT on answers of
*random* colours gives a starting policy that knows the format but not the rule. A judge
(``ColourJudge``, a ``kithara.judges.BasePairwiseJudge``) compares two answers: the one that
names the prompt's colour wins; when both or neither do it says -1 (undecided: the trainers
drop that pair). From the same start, each trainer samples its pairs online, lets the judge
rank them and learns:

- Online DPO: two answers of the policy per prompt, the DPO (sigmoid) loss on the pair;
- XPO: the policy's answer against the reference's (the start), DPO plus the exploration term;
- Nash-MD: the policy's answer against one from the geometric mixture of policy and
  reference, a REINFORCE step on the judge's preference against the KL.

The table gives, on 512 held-out prompts, ``trainer.evaluate()``'s ``win_rate``: how often the
judge prefers the trained policy's answer to the start's (decided pairs only; the start
against itself is about 0.5), and the share of sampled answers naming the right colour.

Run: python examples/online_dpo.py          (the table, 60 steps each; about 50 s on 2 CPU cores)
     python examples/online_dpo.py --tiny   (Online DPO only, 30 steps, about 20 s: tests/test_online_dpo.py)
"""

import argparse
import logging
import random
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Online DPO only, 30 steps (the test's run)")
    parser.add_argument("--steps", type=int, default=60, help="steps per trainer (default: %(default)s)")
    parser.add_argument("--output-dir", default="runs/online_dpo", help="TensorBoard logs (default: %(default)s)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of online_dpo,xpo,nash_md")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before JAX loads: --help answers at once

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kithara  # noqa: E402
from kithara import (  # noqa: E402
    NashMDConfig,
    NashMDTrainer,
    OnlineDPOConfig,
    OnlineDPOTrainer,
    XPOConfig,
    XPOTrainer,
)
from kithara.data import PromptCompletionDataset  # noqa: E402
from kithara.judges import BasePairwiseJudge  # noqa: E402
from kithara.models.adapters import frozen_copy  # noqa: E402

logging.basicConfig(level=logging.WARNING, format="%(message)s")
ASSETS = Path(kithara.__file__).resolve().parent / "assets"
COLOURS = ["red", "blue", "green", "pink"]
SHAPE = dict(num_layers=2, hidden_dim=64, num_heads=4, num_kv_heads=2, intermediate_dim=128)


def prompts(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"prompt": f"Say {rng.choice(COLOURS)}:"} for _ in range(n)]


def right(prompt: str, completion: str) -> bool:
    """Whether the answer's first word is the colour the prompt names."""
    words = completion.split()
    return bool(words) and words[0] == prompt.split()[1].rstrip(":")


class ColourJudge(BasePairwiseJudge):
    """The answer naming the prompt's colour wins; -1 when both or neither do."""

    def judge(self, prompts, completions, shuffle_order=True):
        verdicts = []
        for prompt, (a, b) in zip(prompts, completions, strict=True):
            ra, rb = right(prompt, a), right(prompt, b)
            verdicts.append(-1 if ra == rb else (0 if ra else 1))
        return verdicts


def accuracy(model: kithara.KerasHubModel, rows: list[dict[str, str]], seed: int = 0) -> float:
    """Share of sampled held-out answers (temperature 0.9, the trainers' default) naming the right colour."""
    outs = model.generate([r["prompt"] for r in rows], max_new_tokens=4, temperature=0.9, seed=seed)
    return float(np.mean([right(r["prompt"], o) for r, o in zip(rows, outs, strict=True)]))


def main(args: argparse.Namespace) -> None:
    steps = 30 if args.tiny else args.steps
    methods = (args.methods or ("online_dpo" if args.tiny else "online_dpo,xpo,nash_md")).split(",")
    tokenizer = kithara.Tokenizer.from_pretrained(ASSETS / "tokenizer")
    train, held_out = prompts(1024, seed=0), prompts(512, seed=1)
    out = Path(args.output_dir)

    # A starting policy with the answer format but no preference: SFT on random colours.
    t0 = time.perf_counter()
    policy = kithara.KerasHubModel.from_config("llama3", vocab_size=tokenizer.vocab_size, seed=0, **SHAPE)
    policy.tokenizer = tokenizer
    rng = random.Random(2)
    sft_rows = [{"prompt": r["prompt"], "completion": f" {rng.choice(COLOURS)}"} for r in train]
    sft = kithara.Dataloader(PromptCompletionDataset(sft_rows, tokenizer, max_length=16), 16, seed=0)
    kithara.Trainer(
        policy, kithara.optimizers.adamw(3e-3), sft, steps=100, progress_bar=False, log_steps_interval=100
    ).train()
    start = frozen_copy(policy)
    start_accuracy = accuracy(policy, held_out)
    print(f"SFT start ({time.perf_counter() - t0:.0f} s): held-out right-colour share {start_accuracy:.3f}")

    common = dict(
        per_device_train_batch_size=64, max_new_tokens=4, max_length=16, beta=0.1,
        max_steps=steps, logging_steps=max(1, steps // 4), save_strategy="no", disable_tqdm=True,
        seed=0,
    )  # fmt: skip
    trainers = {
        # Learning rates: each trainer's best of 2e-3, 3e-3 and 5e-3 in trial runs (Nash-MD's
        # one-sided REINFORCE step collapsed the policy at 5e-3; XPO learned slowly at 3e-3).
        "online_dpo": ("Online DPO", OnlineDPOTrainer, OnlineDPOConfig, {"learning_rate": 3e-3}),
        "xpo": ("XPO", XPOTrainer, XPOConfig, {"learning_rate": 5e-3, "alpha": 1e-5}),
        "nash_md": ("Nash-MD", NashMDTrainer, NashMDConfig, {"learning_rate": 2e-3, "mixture_coef": 0.5}),
    }
    rows = []
    for key in methods:
        label, trainer_class, config_class, extra = trainers[key]
        t0 = time.perf_counter()
        policy.variables = jax.tree.map(jnp.copy, start)
        trainer = trainer_class(
            policy, judge=ColourJudge(), train_dataset=train, eval_dataset=held_out, processing_class=tokenizer,
            args=config_class(**common, **extra, logging_dir=str(out / key), eval_strategy="no"),
        )  # fmt: skip
        before = trainer.evaluate()["win_rate"]
        history = trainer.train()
        after = trainer.evaluate()["win_rate"]
        undecided = np.mean([h["objective/undecided_rate"] for h in history])
        seconds = time.perf_counter() - t0
        rows.append((label, before, after, accuracy(policy, held_out), undecided, seconds))
        print(f"{label}: held-out win rate against the start {before:.3f} -> {after:.3f} ({seconds:.0f} s)")

    print(f"\n| trainer | win rate vs start, before | after | right-colour share ({start_accuracy:.3f} at the start) "
          "| undecided pairs in training | wall time |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for label, before, after, acc, undecided, seconds in rows:
        print(f"| {label} | {before:.3f} | {after:.3f} | {acc:.3f} | {undecided:.2f} | {seconds:.0f} s |")


if __name__ == "__main__":
    main(ARGS)
