"""SFTTrainer on a conversational dataset through the bundled ChatML chat template.

Builds a small list of chats in memory, trains a tiny model on the assistant replies only
(``assistant_only_loss=True``), evaluates before and after, and shows a greedy reply.

Run: python examples/sft_chat_template.py          (about 20 s on 2 CPU cores: 21 s measured)
     python examples/sft_chat_template.py --tiny   (32 chats, one epoch, nothing checked; about 30 s of CPU time)
"""

import argparse
import logging
import random
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 32 chats, one epoch")
    parser.add_argument(
        "--output-dir", default="runs/sft_chat_template", help="TensorBoard logs (default: %(default)s)"
    )
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before JAX loads: --help answers at once

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import kithara  # noqa: E402

logging.basicConfig(level=logging.WARNING, format="%(message)s")
ASSETS = Path(kithara.__file__).resolve().parent / "assets"
COLORS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red"}


def chat(rng: random.Random) -> dict:
    thing = rng.choice(sorted(COLORS))
    return {
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": f"What color is {thing}?"},
            {"role": "assistant", "content": COLORS[thing]},
        ]
    }


def main(args: argparse.Namespace) -> None:
    rng = random.Random(0)
    tokenizer = kithara.Tokenizer.from_pretrained(ASSETS / "tokenizer")  # carries the ChatML template
    model = kithara.KerasHubModel.from_config(
        "llama3", vocab_size=tokenizer.vocab_size, num_layers=2, hidden_dim=64, num_heads=4, num_kv_heads=2,
        intermediate_dim=128,
    )  # fmt: skip
    trainer = kithara.SFTTrainer(
        model,
        [chat(rng) for _ in range(32 if args.tiny else 256)],  # or a path: "chats.jsonl", a Hugging Face dataset, ...
        tokenizer=tokenizer,
        eval_dataset=[chat(rng) for _ in range(32)],
        max_length=64,
        assistant_only_loss=True,
        per_device_train_batch_size=1,
        learning_rate=3e-3,
        epochs=1 if args.tiny else 2,
        progress_bar=False,
        tensorboard_dir=args.output_dir,
    )
    before = trainer.evaluate()["loss"]
    trainer.train()
    after = trainer.eval_history[-1]["loss"]
    print(f"eval loss (assistant replies): {before:.3f} -> {after:.3f}")

    stop = tokenizer.backend.convert_tokens_to_ids("<|im_end|>")
    correct = 0
    for thing, color in sorted(COLORS.items()):
        messages = [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": f"What color is {thing}?"},
        ]
        ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
        (out,) = model.generate([ids], max_length=len(ids) + 8, stop_token_ids=[stop])
        reply = tokenizer.decode(out, skip_special_tokens=True).strip()
        correct += reply == color
        print(f"What color is {thing}? -> {reply}")
    print(f"correct replies: {correct}/{len(COLORS)}")
    assert args.tiny or (after < before / 4 and correct == len(COLORS)), "SFT did not learn the replies"


if __name__ == "__main__":
    main(ARGS)
