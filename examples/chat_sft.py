"""Chat SFT: conversations with tools, assistant-only loss, packed rows, the bundled tokenizer.

Writes two small JSONL files of synthetic tool-calling chats, trains a tiny Qwen3-style
model on the assistant turns only, with three conversations packed per row, and shows a
greedy reply to a new tool result.

Run: python examples/chat_sft.py   (about four minutes on 2 CPU cores)
"""

import json
import logging
import random
import tempfile
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)

import kithara  # noqa: E402
from kithara.data import ConversationalDataset  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(message)s")
ASSETS = Path(kithara.__file__).resolve().parent / "assets"
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Dakar"]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def conversation(rng: random.Random) -> dict:
    city, sky = rng.choice(CITIES), rng.choice(["sunny", "rainy", "cloudy"])
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
    return {
        "messages": [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": sky},
            {"role": "assistant", "content": f"It is {sky} there today."},
        ],
        "tools": [WEATHER_TOOL],
    }


def main() -> None:
    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp())
    for part in range(2):
        rows = [conversation(rng) for _ in range(300)]
        (tmp / f"chats-{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    tokenizer = kithara.Tokenizer.from_pretrained(ASSETS / "tokenizer")
    train = ConversationalDataset(str(tmp / "chats-*.jsonl"), tokenizer, max_length=1024, assistant_only_loss=True)
    loader = kithara.Dataloader(train, per_device_batch_size=1, packing=True, seed=0)
    print(f"{loader.stats}; {len(loader.rows)} packed rows of {loader.max_length} tokens")

    model = kithara.KerasHubModel.from_config(
        "qwen3", vocab_size=tokenizer.vocab_size, num_layers=2, hidden_dim=128, num_heads=4, num_kv_heads=2,
        intermediate_dim=256, head_dim=32,
    )  # fmt: skip
    kithara.Trainer(model, kithara.optimizers.adamw(3e-3), loader, epochs=5, log_steps_interval=25).train()

    prompt = conversation(random.Random(7))
    ids, _ = tokenizer.encode_chat(prompt["messages"][:3], tools=prompt["tools"], add_generation_prompt=True)
    stop = tokenizer.backend.convert_tokens_to_ids("<|im_end|>")
    (out,) = model.generate([ids], max_length=len(ids) + 24, stop_token_ids=[stop])
    print("prompt:", prompt["messages"][0]["content"], "| tool said:", prompt["messages"][2]["content"])
    print("reply:", tokenizer.decode(out, skip_special_tokens=True))


if __name__ == "__main__":
    main()
