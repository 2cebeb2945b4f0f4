"""Re-makes kithara's small bundled tokenizer (kithara/assets/tokenizer/).

A byte-level BPE (any text encodes; no unknown token) trained in well under a second on
the demo data and a fixed English sample, saved as a Hugging Face tokenizer directory with
a ChatML chat template that supports ``tools=`` and marks assistant replies with
``{% generation %}`` (for assistant-only loss). Llama-style specials: ``<s>`` is added in
front of every sequence by the post-processor, ``</s>`` ends one, ``<pad>`` pads.

Run: python scripts/make_tokenizer.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "kithara" / "assets" / "tokenizer"
DEMO = ROOT / "kithara" / "assets" / "demo" / "train.jsonl"
VOCAB_SIZE = 512
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
ENGLISH = """
The quick brown fox jumps over the lazy dog. A user asks a question and the assistant answers it.
What is the weather like today? It is sunny and warm, with a light wind from the west.
Please summarise the following text in one sentence. Translate this into French.
The capital of France is Paris. Two plus two is four. Water boils at one hundred degrees.
Call the tool to look up the answer, then reply with the result. The function returned an error.
You are a helpful assistant. Think step by step before you answer the question.
Once upon a time there was a small model that learned to reverse words and count letters.
"""

# ChatML with tool schemas in the system turn and {% generation %} around assistant replies.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set has_system = messages and messages[0].role == 'system' -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if has_system -%}{{- messages[0].content + '\\n\\n' -}}{%- endif -%}"
    "{{- 'You may call these tools:\\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson -}}{{- '\\n' -}}{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif has_system -%}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- generation -%}"
    "{{- message.content or '' -}}"
    "{%- for call in message.tool_calls or [] -%}"
    "{{- '<tool_call>' -}}{{- call.function | tojson -}}{{- '</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- elif message.role != 'system' or not loop.first -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def corpus() -> list[str]:
    rows = [json.loads(line) for line in DEMO.read_text().splitlines() if line.strip()]
    return [row["prompt"] + row["completion"] for row in rows] + ENGLISH.strip().splitlines() * 20


def main() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    OUT.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(OUT)
    print(f"wrote a {tokenizer.get_vocab_size()}-token byte-level BPE to {OUT}")


if __name__ == "__main__":
    main()
