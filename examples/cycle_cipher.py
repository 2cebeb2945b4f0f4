"""Cycle training on a hidden word cipher: does non-parallel text teach translation?

"Language A" and "language B" are random word sequences over two vocabularies related by a
hidden one-to-one word substitution. The models see a few parallel pairs (a supervised warm
start), then only non-parallel text of each language (cycle training). The table compares
held-out exact-match translation accuracy in both directions after the warm start, after
cycle training, and after supervised training on all pairs (the ceiling).

Run: python examples/cycle_cipher.py              (the docs/cycle.md table; 104 s measured on 2 CPU cores)
     python examples/cycle_cipher.py --tiny       (a smoke run, about a minute)
     python examples/cycle_cipher.py --lora 8     (one frozen base, two rank-8 adapters; 115 s measured)
"""

from __future__ import annotations

import argparse
import logging
import random
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a quick smoke run: 10 warm-start and 6 cycle steps")
    parser.add_argument(
        "--output-dir", default="runs/cycle_cipher", help="TensorBoard logs of cycle training (default: %(default)s)"
    )
    parser.add_argument("--words", type=int, default=12)
    parser.add_argument("--parallel", type=int, default=32, help="parallel pairs for the warm start")
    parser.add_argument("--cycle-steps", type=int, default=1500)
    parser.add_argument("--warm-steps", type=int, default=400)
    parser.add_argument("--min-words", type=int, default=2)
    parser.add_argument("--max-words", type=int, default=5)
    parser.add_argument("--cycle-lr", type=float, default=3e-4)
    parser.add_argument("--warm-lr", type=float, default=3e-3)
    parser.add_argument("--lora", type=int, default=0, help="rank: one frozen base with two LoRA adapters")
    parser.add_argument("--pretrain", action="store_true", help="two models: copy-pretrain as the --lora base")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.tiny:
        args.cycle_steps, args.warm_steps = 6, 10
    return args


if __name__ == "__main__":
    ARGS = parse_args()  # before JAX loads: --help answers at once

import numpy as np  # noqa: E402

import kithara  # noqa: E402
from kithara.models import adapters  # noqa: E402

logging.basicConfig(level=logging.WARNING, format="%(message)s")
SPECIALS = ["<pad>", "<s>", "</s>", "[UNK]", "="]


def make_languages(num_words: int, seed: int) -> tuple[list[str], list[str], dict[str, str]]:
    rng = random.Random(seed)
    words_a = [f"a{i}" for i in range(num_words)]
    words_b = [f"b{i}" for i in range(num_words)]
    shuffled = words_b[:]
    rng.shuffle(shuffled)
    return words_a, words_b, dict(zip(words_a, shuffled, strict=True))


def sentences(words: list[str], count: int, rng: random.Random, lengths: tuple[int, int]) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(rng.randint(*lengths))) for _ in range(count)]


def word_tokenizer(words: list[str]) -> kithara.Tokenizer:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS[:4])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return kithara.Tokenizer(hf)


def new_model(vocab_size: int, seed: int, width: int) -> kithara.KerasHubModel:
    return kithara.KerasHubModel.from_config(
        "llama3", vocab_size=vocab_size, num_layers=2, hidden_dim=width, num_heads=4, num_kv_heads=2,
        intermediate_dim=2 * width, seed=seed,
    )  # fmt: skip


def sft(model: kithara.KerasHubModel, tokenizer, rows, steps: int, lr: float, batch: int, seed: int) -> None:
    """Plain SFT of ``model`` on ``(source, target)`` rows, or on plain texts; the model keeps the result."""
    rng = random.Random(seed)
    trainer = kithara.IterativeSFTTrainer(
        model, tokenizer, learning_rate=lr, max_length=16, per_device_train_batch_size=batch, seed=seed
    )
    for _ in range(steps):
        chosen = rng.sample(rows, min(batch, len(rows)))
        if isinstance(chosen[0], str):
            trainer.step(texts=chosen)
        else:
            trainer.step(texts=[f"{s} =" for s, _ in chosen], texts_labels=[f" {t}" for _, t in chosen])
    trainer.finish()


def supervised(models, tokenizer, pairs_ab, steps: int, lr: float, batch: int, seed: int) -> None:
    """Plain SFT of A (a -> b) and B (b -> a) on parallel pairs; the models keep the result."""
    sft(models["A"], tokenizer, pairs_ab, steps, lr, batch, seed)
    sft(models["B"], tokenizer, [(b, a) for a, b in pairs_ab], steps, lr, batch, seed)


def reproduce(model: kithara.KerasHubModel, tokenizer, texts: list[str], args, batch: int) -> None:
    """Monolingual pretraining: ``model`` learns to copy each sentence (``"s = s"``)."""
    sft(model, tokenizer, [(t, t) for t in texts], args.warm_steps, args.warm_lr, batch, args.seed)


def adapter_pair(base, tokenizer, texts, pairs_ab, args, batch: int) -> tuple[kithara.KerasHubModel, dict]:
    """The one-model mode: ``base`` learns to reproduce sentences of both languages
    (``"s = s"``, monolingual text only), then freezes under LoRA; adapters A and B each get
    the warm start. Returns the LoRA model and both adapters.

    Not a plain LM: the texts are uniformly random words, so a language model of them only
    ever predicts "some word of this language", and its frozen output layer (embeddings,
    final norm) cannot then tell the words of one language apart: LoRA on the projections
    stays at chance. Reproducing a sentence needs every word's own logit.
    """
    reproduce(base, tokenizer, texts, args, batch)
    model = kithara.KerasHubModel(base.causal_lm, lora=kithara.LoraConfig(rank=args.lora, targets=("all",)))
    # Copies: a trainer donates the arrays it starts from.
    start = {p: v.copy() for p, v in adapters.adapter_set(model.variables).items()}
    warm = {}
    for side, rows in (("A", pairs_ab), ("B", [(b, a) for a, b in pairs_ab])):
        model.variables = adapters.with_adapter(model.variables, {p: v.copy() for p, v in start.items()})
        sft(model, tokenizer, rows, args.warm_steps, args.warm_lr, batch, args.seed)
        warm[side] = {p: v.copy() for p, v in adapters.adapter_set(model.variables).items()}
    return model, warm


def scores(side: str, sources: list[str], generated: list[str], references: list[str]) -> dict[str, float]:
    """Exact sentence match and per-position word accuracy of translations."""
    words = []
    for out, ref in zip(generated, references, strict=True):
        o, r = out.split(), ref.split()
        words.append(sum(x == y for x, y in zip(o, r, strict=False)) / max(len(o), len(r)))
    exact = [o == t for o, t in zip(generated, references, strict=True)]
    return {"exact": float(np.mean(exact)), "word_accuracy": float(np.mean(words))}


def main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    lengths = (args.min_words, args.max_words)
    words_a, words_b, cipher = make_languages(args.words, args.seed)
    tokenizer = word_tokenizer(words_a + words_b)

    def translate(sentence: str) -> str:
        return " ".join(cipher[w] for w in sentence.split())

    mono_a, mono_b = (
        sentences(words_a, 1000, rng, lengths),
        [translate(s) for s in sentences(words_a, 1000, rng, lengths)],
    )
    parallel = [(s, translate(s)) for s in sentences(words_a, args.parallel, rng, lengths)]
    held_out = [(s, translate(s)) for s in sentences(words_a, 64, rng, lengths)]
    eval_a, eval_b = held_out, [(b, a) for a, b in held_out]
    batch, width = 16, 64

    def build(seed: int) -> dict[str, kithara.KerasHubModel]:
        return {s: new_model(tokenizer.vocab_size, seed + i, width) for i, s in enumerate("AB")}

    def cycle(models, steps: int, tensorboard_dir: str | None = None) -> kithara.CycleTrainer:
        return kithara.CycleTrainer(
            models=models, tokenizers=tokenizer, train_dataset_A=mono_a, train_dataset_B=mono_b,
            optimizer=kithara.optimizers.adamw(args.cycle_lr), steps=max(steps, 1), batch_size_per_side=batch,
            max_length=16, max_new_tokens=8, progress_bar=False, seed=args.seed, eval_dataset_A=eval_a,
            eval_dataset_B=eval_b, eval_steps_interval=max(steps // 6, 1), compute_metrics=scores,
            tensorboard_dir=tensorboard_dir,
        )  # fmt: skip

    def row(name: str, trainer: kithara.CycleTrainer) -> None:
        m = trainer.evaluate()
        results[name] = m
        print(f"{name}: A->B exact {m['exact_A']:.2f} words {m['word_accuracy_A']:.2f} | "
              f"B->A exact {m['exact_B']:.2f} words {m['word_accuracy_B']:.2f}  ({time.time() - start:.0f}s)",
              flush=True)  # fmt: skip

    start = time.time()
    results: dict[str, dict[str, float]] = {}
    if args.lora:
        base = new_model(tokenizer.vocab_size, args.seed, width)
        model, warm = adapter_pair(base, tokenizer, mono_a + mono_b, parallel, args, batch)
        trainer = cycle(model, args.cycle_steps, args.output_dir)
        both = {f"{s}/{p}": v for s in "AB" for p, v in warm[s].items()}
        trainer.pair.variables = kithara.ModelVariables(both, model.variables.non_trainable)
    else:
        models = build(args.seed)
        if args.pretrain:
            for m in models.values():
                reproduce(m, tokenizer, mono_a + mono_b, args, batch)
        supervised(models, tokenizer, parallel, args.warm_steps, args.warm_lr, batch, args.seed)
        trainer = cycle(models, args.cycle_steps, args.output_dir)
    row(f"warm start ({len(parallel)} pairs)", trainer)
    trainer.train()
    for m in trainer.eval_history:
        print(f"  cycle step {m['step']}: exact A->B {m['exact_A']:.2f} B->A {m['exact_B']:.2f}, "
              f"loss A {m['loss_A']:.3f} B {m['loss_B']:.3f}")  # fmt: skip
    row(f"+ {args.cycle_steps} cycle steps", trainer)
    ceiling = build(args.seed)
    all_pairs = [(a, translate(a)) for a in mono_a]
    supervised(ceiling, tokenizer, all_pairs, args.warm_steps + args.cycle_steps, args.warm_lr, batch, args.seed)
    row(f"supervised on {len(all_pairs)} pairs", cycle(ceiling, 1))  # only its evaluate() runs
    print("\n| training | A->B exact | A->B words | B->A exact | B->A words |\n|---|---|---|---|---|")
    for name, m in results.items():
        cells = [m[k] for k in ("exact_A", "word_accuracy_A", "exact_B", "word_accuracy_B")]
        print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main(ARGS)
