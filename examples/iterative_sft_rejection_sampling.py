"""Iterative SFT as rejection sampling: sample several answers, keep those a checker
accepts, train on them, repeat; the held-out accuracy rises over the rounds.

The task is copying a few digits ("copy 3 7 1 ->" answers " 3 7 1"). A tiny model sees a
handful of worked examples first, then learns from its own accepted samples only. The
jitted step compiles once: every ``trainer.step`` pads to the same shapes.

Run: python examples/iterative_sft_rejection_sampling.py   (under a minute on 2 CPU cores)
"""

import logging
import random
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
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


def draw(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(logits)."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


def make_sampler(model: kithara.KerasHubModel, rows: int):
    """Temperature sampling with fixed [rows, MAX_LENGTH] shapes (compiles once)."""
    forward = jax.jit(lambda v, ids, mask: model.apply(v, {"token_ids": ids, "padding_mask": mask}, training=False)[0])

    def sample(prompts: list[list[int]], new_tokens: int, temperature: float, rng: np.random.Generator):
        ids = np.zeros((rows, MAX_LENGTH), np.int32)
        lengths = np.array([len(p) for p in prompts] + [1] * (rows - len(prompts)))
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
        for _ in range(new_tokens):
            mask = np.arange(MAX_LENGTH)[None] < lengths[:, None]
            logits = np.asarray(forward(model.variables, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
            last = logits[np.arange(rows), lengths - 1]
            tokens = last.argmax(-1) if temperature == 0 else draw(last / temperature, rng)
            ids[np.arange(rows), np.minimum(lengths, MAX_LENGTH - 1)] = tokens
            lengths = np.minimum(lengths + 1, MAX_LENGTH - 1)
        return [ids[i, len(p) : len(p) + new_tokens].tolist() for i, p in enumerate(prompts)]

    return sample


def main() -> None:
    rng, np_rng = random.Random(0), np.random.default_rng(0)
    tokenizer = kithara.Tokenizer.from_pretrained(ASSETS / "tokenizer")
    questions = [question([rng.randint(1, 9) for _ in range(3)]) for _ in range(160)]
    train, held_out = questions[:128], questions[128:]
    model = kithara.KerasHubModel.from_config(
        "llama3", vocab_size=tokenizer.vocab_size, num_layers=2, hidden_dim=64, num_heads=4, num_kv_heads=2,
        intermediate_dim=128,
    )  # fmt: skip
    trainer = kithara.IterativeSFTTrainer(model, tokenizer, learning_rate=3e-3, max_length=MAX_LENGTH)
    answer_tokens = len(tokenizer.encode(train[0][1]))
    sample = make_sampler(model, rows=len(train))

    def accuracy(pairs: list[tuple[str, str]]) -> float:
        prompts = [tokenizer.encode_text(p) for p, _ in pairs]
        outs = sample(prompts, answer_tokens, 0.0, np_rng)
        return float(np.mean([checker(p, tokenizer.decode(o)) for (p, _), o in zip(pairs, outs, strict=True)]))

    # A few worked examples to start from.
    seed = train[:32]
    for _ in range(20):
        trainer.step(texts=[p for p, _ in seed], texts_labels=[a for _, a in seed])
    print(f"round 0: held-out accuracy {accuracy(held_out):.2f}")
    prompts = [tokenizer.encode_text(p) for p, _ in train]
    accepted: list[tuple[str, str]] = []  # every accepted sample so far
    for round_ in range(1, ROUNDS + 1):
        for _ in range(SAMPLES):
            for (p, _), out in zip(train, sample(prompts, answer_tokens, 0.7, np_rng), strict=True):
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
    print("step compilations:", trainer._train_step_fn._cache_size())


if __name__ == "__main__":
    main()
