"""Pretrain the demo model briefly, then fine-tune it with LoRA adapters only.

Run: python examples/lora_finetune.py   (about a minute on 2 CPU cores)
"""

import logging

import jax

jax.config.update("jax_num_cpu_devices", 8)

import kithara  # noqa: E402
from kithara.config import load_config  # noqa: E402
from kithara.run import build_dataset, build_model, exact_match  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(message)s")


def main() -> None:
    config = load_config(None, ["trainer.steps=150", "trainer.tensorboard_dir=runs/lora_example"])
    tokenizer = kithara.Tokenizer.from_pretrained(config.data.tokenizer)
    train = kithara.Dataloader(build_dataset(config, config.data.train_file, tokenizer), 8)
    eval_set = build_dataset(config, config.data.eval_file, tokenizer)
    eval_rows = [eval_set.source[i] for i in range(100)]

    base = build_model(config, vocab_size=tokenizer.vocab_size)
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
