"""A tiny GRPO run (tests/test_grpo.py), also runnable as one of two processes of 4 devices
each (``main``) for the multi-process comparison."""

import json
import sys

TARGET = 11  # the word "ok" in conftest's word tokenizer
PROMPTS = ["hi", "hello how", "how are you", "fine thanks", "bye", "ok ok", "you", "thanks hi"]


def target_share(prompts, completions, completion_ids, **_):
    """Share of the completion's tokens that are the target word: a reward a tiny model learns."""
    return [sum(t == TARGET for t in ids) / max(len(ids), 1) for ids in completion_ids]


def length_penalty(prompts, completions, completion_ids, kind, **_):
    """A second reward, applicable to half the rows (None elsewhere), reading a dataset column."""
    return [(-len(ids) / 8.0 if k == "short" else None) for ids, k in zip(completion_ids, kind, strict=True)]


def mean_token(prompts, completions, completion_ids, **_):
    """A reward that differs between almost any two completions (so every group has a
    learning signal well above rounding noise)."""
    return [sum(ids) / (64.0 * max(len(ids), 1)) for ids in completion_ids]


def make_trainer(steps, output_dir=None, dense_reward=False, **overrides):
    """The tiny GRPO run; ``dense_reward`` adds ``mean_token`` (weight 1) to the rewards."""
    from conftest import tiny_model, word_tokenizer

    import kithara

    rows = [{"prompt": p, "kind": "short" if i % 2 else "any"} for i, p in enumerate(PROMPTS)]
    settings = dict(
        num_generations=4,
        per_device_train_batch_size=1,
        max_prompt_length=8,
        max_completion_length=8,
        learning_rate=3e-3,
        max_steps=steps,
        temperature=1.0,
        logging_steps=1,
        seed=3,
        output_dir=output_dir,
        reward_weights=[1.0, 0.1],
        num_iterations=2,
        beta=0.04,
    )
    if dense_reward:
        settings["reward_weights"] = [*settings["reward_weights"], 1.0]
    settings.update(overrides)
    if output_dir is None:
        settings["save_strategy"] = "no"
    return kithara.GRPOTrainer(
        tiny_model("qwen3", sharding="fsdp", head_dim=12, tie_word_embeddings=False),
        reward_funcs=[target_share, length_penalty, *([mean_token] if dense_reward else [])],
        train_dataset=rows,
        processing_class=word_tokenizer(),
        args=kithara.GRPOConfig(**settings),
    )


def summary(history):
    keys = ("loss", "reward", "rewards/target_share/mean", "kl", "completions/mean_length")
    return [{k: h[k] for k in keys} for h in history]


def main(coordinator, process_id, out):
    import jax

    import kithara

    kithara.distributed.initialize(coordinator, 2, process_id)
    # 4 devices per process whatever XLA_FLAGS says once conftest is imported (it asks for 8):
    # the devices are not started yet.
    jax.config.update("jax_num_cpu_devices", 4)
    result = {
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "steps": summary(make_trainer(4, dense_reward=True).train()),
    }
    if process_id == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
