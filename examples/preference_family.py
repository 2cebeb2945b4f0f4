"""Reward model, ORPO, SimPO, KTO and BCO on one checkable preference.

Each prompt names a colour ("Say red:"); the preferred answer repeats it, the other names a
different colour. A brief SFT on answers of *random* colours gives a starting policy that
knows the answer format but has no preference (held-out pairwise accuracy about 0.5). Then:

1. RewardTrainer trains a reward model (the same backbone shape with a scalar head) on the
   pairs: its held-out pairwise accuracy (reward of the preferred answer > the other's)
   rises from about 0.5.
2. ORPO, SimPO (CPOTrainer, loss_type="simpo", cpo_alpha=0), KTO and BCO (on the pairs
   unpaired into desirable / undesirable rows, for twice the steps: the same passes over
   the data) each train a copy of the starting policy:
   the held-out pairwise accuracy of the policy (log p(preferred) > log p(other)) and the
   mean log-prob margin rise.

Every figure is measured on 64 held-out pairs the trainers never see.

Run: python examples/preference_family.py          (about 40 seconds on 2 CPU cores)
     python examples/preference_family.py --tiny   (2 steps each, nothing checked; about 35 s)
"""

import argparse
import logging
import random
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 2 steps per trainer, nothing checked")
    parser.add_argument("--steps", type=int, default=80, help="steps per trainer (default: %(default)s)")
    parser.add_argument(
        "--output-dir", default="runs/preference_family", help="TensorBoard logs (default: %(default)s)"
    )
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before JAX loads: --help answers at once

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kithara  # noqa: E402
from kithara.data import PreferenceDataset, PromptCompletionDataset  # noqa: E402
from kithara.models.adapters import frozen_copy  # noqa: E402
from kithara.objectives.dpo import pair_inputs  # noqa: E402
from kithara.objectives.dpo_losses import sequence_logps  # noqa: E402

logging.basicConfig(level=logging.WARNING, format="%(message)s")
ASSETS = Path(kithara.__file__).resolve().parent / "assets"
COLOURS = ["red", "blue", "green", "black", "white", "pink", "grey", "gold"]
MAX_LENGTH = 16
SHAPE = dict(num_layers=2, hidden_dim=64, num_heads=4, num_kv_heads=2, intermediate_dim=128)


def pairs(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word, other = rng.sample(COLOURS, 2)
        rows.append({"prompt": f"Say {word}:", "chosen": f" {word}", "rejected": f" {other}"})
    return rows


def held_out_batches(rows: list[dict[str, str]], tokenizer: kithara.Tokenizer) -> list[dict[str, np.ndarray]]:
    data = PreferenceDataset(rows, tokenizer, max_length=MAX_LENGTH)
    return list(kithara.Dataloader(data, 16, shuffle=False, drop_remainder=False))


def policy_preference(model: kithara.KerasHubModel, batches: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """Held-out (pairwise accuracy, mean log p(chosen) - log p(rejected)) under ``model``."""

    @jax.jit
    def margins(variables: kithara.ModelVariables, batch: dict[str, jax.Array]) -> jax.Array:
        inputs = pair_inputs(batch)
        logits, _ = model.apply(variables, inputs, training=False)
        logps, _, _ = sequence_logps(logits, inputs["labels"], inputs["label_mask"])
        half = batch["chosen_token_ids"].shape[0]
        return logps[:half] - logps[half:]

    found = np.concatenate([np.asarray(margins(model.variables, jax.tree.map(jnp.asarray, b))) for b in batches])
    return float(np.mean(found > 0)), float(np.mean(found))


def reward_accuracy(model: kithara.ScalarHeadModel, tokenizer: kithara.Tokenizer, rows: list[dict[str, str]]) -> float:
    """Held-out fraction of pairs whose preferred answer gets the higher reward, judged by
    ``RewardModelJudge`` (which encodes each answer as ``RewardTrainer`` trains: with EOS)."""
    judge = kithara.judges.RewardModelJudge(model, tokenizer)
    first_wins = judge.judge([r["prompt"] for r in rows], [[r["chosen"], r["rejected"]] for r in rows],
                             return_scores=True)  # fmt: skip
    return float(np.mean(np.asarray(first_wins) > 0.5))


def main(args: argparse.Namespace) -> None:
    steps = 2 if args.tiny else args.steps
    tokenizer = kithara.Tokenizer.from_pretrained(ASSETS / "tokenizer")
    train, held_out = pairs(256, seed=0), pairs(64, seed=1)
    batches = held_out_batches(held_out, tokenizer)
    out = Path(args.output_dir)
    common = dict(
        max_length=MAX_LENGTH, per_device_train_batch_size=8, max_steps=steps, logging_steps=steps, save_strategy="no"
    )
    # KTO and BCO read each pair as two rows (desirable, undesirable): twice the steps is the
    # same number of passes over the data.
    unpaired = {**common, "max_steps": 2 * steps, "logging_steps": 2 * steps}
    results: dict[str, tuple[float, float]] = {}

    # 1. The reward model.
    reward_model = kithara.ScalarHeadModel.from_config("llama3", vocab_size=tokenizer.vocab_size, **SHAPE)
    before = reward_accuracy(reward_model, tokenizer, held_out)
    kithara.RewardTrainer(
        reward_model, train_dataset=train, processing_class=tokenizer,
        args=kithara.RewardConfig(learning_rate=1e-3, output_dir=str(out / "reward"), **common),
    ).train()  # fmt: skip
    results["reward model"] = (before, reward_accuracy(reward_model, tokenizer, held_out))

    # 2. A starting policy with the answer format but no preference: SFT on random colours.
    policy = kithara.KerasHubModel.from_config("llama3", vocab_size=tokenizer.vocab_size, **SHAPE)
    rng = random.Random(2)
    sft_rows = [{"prompt": r["prompt"], "completion": f" {rng.choice(COLOURS)}"} for r in train]
    sft = kithara.Dataloader(PromptCompletionDataset(sft_rows, tokenizer, max_length=MAX_LENGTH), 8, seed=0)
    kithara.Trainer(policy, kithara.optimizers.adamw(3e-3), sft, steps=20, progress_bar=False).train()
    start = frozen_copy(policy)
    start_preference = policy_preference(policy, batches)

    objectives = {
        "ORPO": lambda: kithara.ORPOTrainer(
            policy, train_dataset=train, processing_class=tokenizer,
            args=kithara.ORPOConfig(learning_rate=1e-3, beta=1.0, output_dir=str(out / "orpo"), **common),
        ),
        "SimPO": lambda: kithara.CPOTrainer(
            policy, train_dataset=train, processing_class=tokenizer,
            args=kithara.CPOConfig(
                loss_type="simpo", cpo_alpha=0.0, learning_rate=1e-3, beta=2.0, simpo_gamma=0.5,
                output_dir=str(out / "simpo"), **common,
            ),
        ),
        "KTO": lambda: kithara.KTOTrainer(
            policy, train_dataset=train, processing_class=tokenizer,
            args=kithara.KTOConfig(learning_rate=3e-4, beta=1.0, output_dir=str(out / "kto"), **unpaired),
        ),
        "BCO": lambda: kithara.BCOTrainer(
            policy, train_dataset=train, processing_class=tokenizer,
            args=kithara.BCOConfig(learning_rate=3e-4, beta=1.0, output_dir=str(out / "bco"), **unpaired),
        ),
    }  # fmt: skip
    for name, make in objectives.items():
        policy.variables = jax.tree.map(jnp.copy, start)
        make().train()
        results[name] = (start_preference[0], policy_preference(policy, batches)[0])
        results[f"{name} margin"] = (start_preference[1], policy_preference(policy, batches)[1])

    print("held-out pairwise accuracy (and log-prob margin), before -> after")
    for name, (a, b) in results.items():
        print(f"  {name:16s} {a:7.3f} -> {b:7.3f}")
    if not args.tiny:
        failed = [name for name, (a, b) in results.items() if not b > a]
        assert not failed, f"no improvement for {failed}"


if __name__ == "__main__":
    main(ARGS)
