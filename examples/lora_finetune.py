"""Pretrain the demo model briefly, then fine-tune it with LoRA adapters only.

Run: python examples/lora_finetune.py          (about 90 s on 2 CPU cores: 86 s measured)
     python examples/lora_finetune.py --tiny   (10 steps each; about 30 s of CPU time)
     python examples/lora_finetune.py --quantization nf4   (QLoRA: the frozen base stored in NF4)
"""

import argparse
import logging
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 10 steps of each training")
    parser.add_argument(
        "--quantization",
        choices=("none", "nf4", "int8"),
        default="none",
        help="store the frozen base quantized for the fine-tune (QLoRA; default: %(default)s)",
    )
    parser.add_argument(
        "--output-dir", default="runs/lora_example", help="the base model's preset goes here (default: %(default)s)"
    )
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before JAX loads: --help answers at once

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import kithara  # noqa: E402
from kithara.config import ASSETS  # noqa: E402
from kithara.data import PromptCompletionDataset  # noqa: E402
from kithara.run import exact_match  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(message)s")


def main(args: argparse.Namespace) -> None:
    steps, evaluated = (10, 16) if args.tiny else (150, 100)
    demo = ASSETS / "demo"
    tokenizer = kithara.Tokenizer.from_pretrained(demo / "tokenizer")
    train = kithara.Dataloader(PromptCompletionDataset(str(demo / "train.jsonl"), tokenizer, max_length=24), 8)
    eval_set = PromptCompletionDataset(str(demo / "eval.jsonl"), tokenizer, max_length=24)
    eval_rows = [eval_set.source[i] for i in range(evaluated)]

    base = kithara.KerasHubModel.from_config(
        "llama3", vocab_size=tokenizer.vocab_size, num_layers=2, hidden_dim=128, num_heads=4, num_kv_heads=2,
        intermediate_dim=256, sharding="fsdp",
    )  # fmt: skip
    kithara.Trainer(base, kithara.optimizers.adamw(3e-3), train, steps=steps).train()
    print(f"base model exact match: {exact_match(base, tokenizer, eval_rows, 24)[0]:.1%}")

    # Same weights, now frozen (and stored in NF4 or int8 with --quantization), with adapters on every projection.
    preset = str(Path(args.output_dir) / "base")
    base.causal_lm.save_to_preset(preset)
    lora = kithara.LoraConfig(rank=8, alpha=16, targets=("all",))
    quantization = None if args.quantization == "none" else args.quantization
    model = kithara.KerasHubModel.from_preset(preset, lora=lora, quantization=quantization)
    if quantization is not None:
        print(f"quantized base exact match: {exact_match(model, tokenizer, eval_rows, 24)[0]:.1%}")
    print(model.summary())
    kithara.Trainer(model, kithara.optimizers.adamw(3e-3), train, steps=steps).train()
    print(f"after LoRA fine-tuning: {exact_match(model, tokenizer, eval_rows, 24)[0]:.1%}")


if __name__ == "__main__":
    main(ARGS)
