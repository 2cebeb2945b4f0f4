"""Re-makes the demo's bundled data and tokenizer (kithara/assets/demo/).

The tokenizer is character-level (the task is about letters; a subword tokenizer makes it
much harder for a tiny model), saved as a Hugging Face tokenizer directory whose
post-processor puts ``<bos>`` in front of every sequence.

The task: small string operations a tiny model can learn on a CPU in a few minutes, with
held-out words so exact match measures generalisation, not memorisation.

    rev <word> =   -> the word reversed        (rev abc = cba)
    next <word> =  -> each letter shifted by 1  (next abz = bca)
    dup <word> =   -> each letter doubled       (dup abc = aabbcc)

Run: python scripts/make_demo_data.py
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parent.parent / "kithara" / "assets" / "demo"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
ALPHABET = [*string.ascii_lowercase, " ", "="]
OPS = {
    "rev": lambda w: w[::-1],
    "next": lambda w: "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in w),
    "dup": lambda w: "".join(c + c for c in w),
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per letter, space and '='."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + ALPHABET)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def make_rows(words: list[str], rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for word in words:
        op = rng.choice(sorted(OPS))
        rows.append({"prompt": f"{op} {word} =", "completion": f" {OPS[op](word)}"})
    return rows


def main() -> None:
    rng = random.Random(0)
    words = sorted({"".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6))) for _ in range(6000)})
    rng.shuffle(words)
    eval_words, train_words = words[:200], words[200:]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train_words), ("eval", eval_words)):
        with open(OUT / f"{name}.jsonl", "w") as f:
            for row in make_rows(split, rng):
                f.write(json.dumps(row) + "\n")
    make_tokenizer().save_pretrained(OUT / "tokenizer")
    print(f"wrote {len(train_words)} train and {len(eval_words)} eval rows and a tokenizer to {OUT}")


if __name__ == "__main__":
    main()
