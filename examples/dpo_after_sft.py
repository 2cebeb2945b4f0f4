"""DPO after SFT: teach a tiny model to prefer the answer that repeats the prompt's word.

Each prompt names a colour; the chosen answer repeats it, the rejected one names another
colour, so "better" is checkable. A brief SFT on the chosen answers gives the starting
policy; DPO (sigmoid loss, reference log-probs precomputed once from the SFT model) then
raises reward accuracy and margin, and the policy's preference for the chosen answer on
held-out pairs (mean log p(chosen) - log p(rejected)) goes up.

Run: python examples/dpo_after_sft.py          (about 30 seconds on 2 CPU cores)
     python examples/dpo_after_sft.py --tiny   (4 DPO steps, nothing checked; about 40 s of CPU time)
"""

import argparse
import logging
import random
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 4 DPO steps")
    parser.add_argument("--output-dir", default="runs/dpo_after_sft", help="TensorBoard logs (default: %(default)s)")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before JAX loads: --help answers at once

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

import kithara  # noqa: E402
from kithara.data import PreferenceDataset, PromptCompletionDataset  # noqa: E402

logging.basicConfig(level=logging.WARNING, format="%(message)s")
ASSETS = Path(kithara.__file__).resolve().parent / "assets"
COLOURS = ["red", "blue", "green", "black", "white", "pink", "grey", "gold"]


def pairs(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word, other = rng.sample(COLOURS, 2)
        rows.append({"prompt": f"Say {word}:", "chosen": f" {word}", "rejected": f" {other}"})
    return rows


def preference(trainer: kithara.DPOTrainer) -> float:
    """Held-out mean of log p(chosen) - log p(rejected) under the current policy."""
    metrics = trainer.evaluate()
    return metrics["logps/chosen"] - metrics["logps/rejected"]


def main(args: argparse.Namespace) -> None:
    tokenizer = kithara.Tokenizer.from_pretrained(ASSETS / "tokenizer")
    train, held_out = pairs(256, seed=0), pairs(64, seed=1)
    model = kithara.KerasHubModel.from_config(
        "llama3", vocab_size=tokenizer.vocab_size, num_layers=2, hidden_dim=64, num_heads=4, num_kv_heads=2,
        intermediate_dim=128,
    )  # fmt: skip

    # 1. A short SFT on the chosen answers.
    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in train]
    sft = kithara.Dataloader(PromptCompletionDataset(sft_rows, tokenizer, max_length=16), 4, seed=0)
    kithara.Trainer(model, kithara.optimizers.adamw(3e-3), sft, steps=10, progress_bar=False).train()

    # 2. DPO from the SFT model, which is also the (precomputed) reference.
    def loader(rows: list[dict[str, str]]) -> kithara.Dataloader:
        return kithara.Dataloader(PreferenceDataset(rows, tokenizer, max_length=16), 4, seed=0)

    trainer = kithara.DPOTrainer(
        model, kithara.optimizers.adamw(1e-3), loader(train), loader(held_out), steps=4 if args.tiny else 24,
        eval_steps_interval=4 if args.tiny else 24, tensorboard_dir=str(Path(args.output_dir) / "dpo"), beta=0.1,
        loss_type="sigmoid", precompute_ref_log_probs=True, progress_bar=False,
    )  # fmt: skip
    before = preference(trainer)
    history = trainer.train()
    after = trainer.eval_history[-1]["logps/chosen"] - trainer.eval_history[-1]["logps/rejected"]  # the final eval

    def mean(key: str, rows: list[dict[str, float]]) -> float:
        return float(np.mean([h[key] for h in rows]))

    k = 2 if args.tiny else 4
    first, last = history[:k], history[-k:]
    acc0, acc1 = mean("rewards/accuracies", first), mean("rewards/accuracies", last)
    mar0, mar1 = mean("rewards/margins", first), mean("rewards/margins", last)
    print(f"reward accuracy {acc0:.2f} -> {acc1:.2f}; reward margin {mar0:.3f} -> {mar1:.3f}")
    print(f"held-out preference for chosen (log p chosen - log p rejected): {before:.3f} -> {after:.3f}")
    print(f"held-out eval: {trainer.eval_history[-1]}")
    assert args.tiny or (acc1 > acc0 and mar1 > mar0 and after > before), "DPO did not improve the preference"


if __name__ == "__main__":
    main(ARGS)
