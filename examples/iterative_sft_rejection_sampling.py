"""Iterative SFT as rejection sampling: sample several answers, keep those a checker
accepts, train on them, repeat; the held-out accuracy rises over the rounds.

The task is copying a few digits ("copy 3 7 1 ->" answers " 3 7 1"). A tiny model sees a
handful of worked examples first, then learns from its own accepted samples only. The
jitted step compiles once: every ``trainer.step`` pads to the same shapes.

Run: python examples/iterative_sft_rejection_sampling.py          (under a minute on 2 CPU cores)
     python examples/iterative_sft_rejection_sampling.py --tiny   (one round; about 40 s of CPU time)
"""

import argparse
import logging
import random
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a smoke run: one round of two samples per prompt")
    parser.add_argument("--output-dir", default="runs/iterative_sft", help="TensorBoard logs (default: %(default)s)")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before JAX loads: --help answers at once

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

import kithara  # noqa: E402

logging.basicConfig(level=logging.WARNING, format="%(message)s")
ASSETS = Path(kithara.__file__).resolve().parent / "assets"
SAMPLES, ROUNDS, MAX_LENGTH = 8, 4, 24


def question(digits: list[int]) -> tuple[str, str]:
    text = " ".join(map(str, digits))
    return f"copy {text} ->", f" {text}"


def checker(prompt: str, answer: str) -> bool:
    return answer.strip() == prompt[len("copy ") : -len(" ->")]


def main(args: argparse.Namespace) -> None:
    samples, rounds = (2, 1) if args.tiny else (SAMPLES, ROUNDS)
    rng = random.Random(0)
    tokenizer = kithara.Tokenizer.from_pretrained(ASSETS / "tokenizer")
    questions = [question([rng.randint(1, 9) for _ in range(3)]) for _ in range(160)]
    train, held_out = questions[:128], questions[128:]
    model = kithara.KerasHubModel.from_config(
        "llama3", vocab_size=tokenizer.vocab_size, num_layers=2, hidden_dim=64, num_heads=4, num_kv_heads=2,
        intermediate_dim=128,
    )  # fmt: skip
    trainer = kithara.IterativeSFTTrainer(
        model, tokenizer, learning_rate=3e-3, max_length=MAX_LENGTH, logging_dir=args.output_dir
    )
    answer_tokens = len(tokenizer.encode(train[0][1]))
    draws = iter(range(1_000_000))

    def sample(prompts: list[list[int]], temperature: float) -> list[list[int]]:
        # Between trainer steps the model holds the trained variables; shapes stay in one
        # bucket, so this compiles once per sampling mode.
        return model.generate(prompts, max_new_tokens=answer_tokens, temperature=temperature, seed=next(draws))

    def accuracy(pairs: list[tuple[str, str]]) -> float:
        prompts = [tokenizer.encode_text(p) for p, _ in pairs]
        outs = sample(prompts, 0.0)
        return float(np.mean([checker(p, tokenizer.decode(o)) for (p, _), o in zip(pairs, outs, strict=True)]))

    # A few worked examples to start from.
    seed = train[:32]
    for _ in range(20):
        trainer.step(texts=[p for p, _ in seed], texts_labels=[a for _, a in seed])
    print(f"round 0: held-out accuracy {accuracy(held_out):.2f}")
    prompts = [tokenizer.encode_text(p) for p, _ in train]
    accepted: list[tuple[str, str]] = []  # every accepted sample so far
    for round_ in range(1, rounds + 1):
        for _ in range(samples):
            for (p, _), out in zip(train, sample(prompts, 0.7), strict=True):
                answer = tokenizer.decode(out)
                if checker(p, answer):
                    accepted.append((p, answer))
        accepted = list(dict.fromkeys(accepted))
        if not accepted:
            print(f"round {round_}: no sample accepted")
            continue
        for _ in range(3):
            stats = trainer.step(texts=[p for p, _ in accepted], texts_labels=[a for _, a in accepted])
        print(
            f"round {round_}: {len(accepted)} accepted samples so far, loss {stats['loss']:.3f}, "
            f"held-out accuracy {accuracy(held_out):.2f}"
        )
    trainer.finish()
    steps = trainer.compilations["train_step"]
    print(f"step compilations: {steps}, generate compilations: {model.generate_compilations}")


if __name__ == "__main__":
    main(ARGS)
