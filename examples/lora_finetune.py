"""Pretrain the demo model briefly, then fine-tune it with LoRA adapters only.

Run: python examples/lora_finetune.py   (about a minute on 2 CPU cores)
"""

import logging

import jax

jax.config.update("jax_num_cpu_devices", 8)

import kithara  # noqa: E402
from kithara.config import ASSETS  # noqa: E402
from kithara.data import PromptCompletionDataset  # noqa: E402
from kithara.run import exact_match  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(message)s")


def main() -> None:
    demo = ASSETS / "demo"
    tokenizer = kithara.Tokenizer.from_pretrained(demo / "tokenizer")
    train = kithara.Dataloader(PromptCompletionDataset(str(demo / "train.jsonl"), tokenizer, max_length=24), 8)
    eval_set = PromptCompletionDataset(str(demo / "eval.jsonl"), tokenizer, max_length=24)
    eval_rows = [eval_set.source[i] for i in range(100)]

    base = kithara.KerasHubModel.from_config(
        "llama3", vocab_size=tokenizer.vocab_size, num_layers=2, hidden_dim=128, num_heads=4, num_kv_heads=2,
        intermediate_dim=256, sharding="fsdp",
    )  # fmt: skip
    kithara.Trainer(base, kithara.optimizers.adamw(3e-3), train, steps=150).train()
    print(f"base model exact match: {exact_match(base, tokenizer, eval_rows, 24)[0]:.1%}")

    # Same weights, now frozen, with adapters on every projection.
    base.causal_lm.save_to_preset("runs/lora_example/base")
    lora = kithara.LoraConfig(rank=8, alpha=16, targets=("all",))
    model = kithara.KerasHubModel.from_preset("runs/lora_example/base", lora=lora)
    print(model.summary())
    kithara.Trainer(model, kithara.optimizers.adamw(3e-3), train, steps=150).train()
    print(f"after LoRA fine-tuning: {exact_match(model, tokenizer, eval_rows, 24)[0]:.1%}")


if __name__ == "__main__":
    main()
