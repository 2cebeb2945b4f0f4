"""Weight and optimizer memory of the two CycleTrainer modes, from the trainer state itself.

Two models hold two bases and two full optimizer states; one LoRA model holds one frozen
base and two adapters with their optimizer states. The figures are the bytes of the arrays
in ``trainer.init_state()`` (what lives on the devices while training).

    python -m bench.cycle_memory            # the "small" size of bench/run.py
    python -m bench.cycle_memory --size tiny
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax


def state_bytes(tree: object) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def measure(size: str, rank: int) -> dict[str, dict[str, int]]:
    import kithara
    from bench.run import SIZES

    arch = SIZES[size]
    texts = ["x"] * 8
    tokenizer = _tokenizer()
    out = {}
    for mode in ("two models", "two LoRA adapters"):
        if mode == "two models":
            models = {s: kithara.KerasHubModel.from_config("llama3", seed=i, **arch) for i, s in enumerate("AB")}
        else:
            lora = kithara.LoraConfig(rank=rank, targets=("all",))
            models = kithara.KerasHubModel.from_config("llama3", lora=lora, **arch)  # type: ignore[assignment]
        trainer = kithara.CycleTrainer(
            models=models, tokenizers=tokenizer, train_dataset_A=texts, train_dataset_B=texts,
            optimizer=kithara.optimizers.adamw(1e-3), steps=1, batch_size=8, progress_bar=False,
        )  # fmt: skip
        state = trainer.init_state()
        out[mode] = {
            "weights": state_bytes(state.model),
            "trainable": state_bytes(state.model.trainable),
            "optimizer": state_bytes(state.opt_state),
        }
    return out


def _tokenizer():
    """A two-word tokenizer: the trainer needs one, the state does not depend on it."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    import kithara

    backend = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "x": 2}, unk_token="x"))
    return kithara.Tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["tiny", "small", "medium"])
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    results = measure(args.size, args.rank)
    mib = 2**20
    print(f"| mode ({args.size}, LoRA rank {args.rank} on all projections) | weights MiB | of which trainable | "
          "optimizer state MiB |\n|---|---|---|---|")  # fmt: skip
    for mode, r in results.items():
        print(f"| {mode} | {r['weights'] / mib:.2f} | {r['trainable'] / mib:.2f} | {r['optimizer'] / mib:.2f} |")


if __name__ == "__main__":
    main()
