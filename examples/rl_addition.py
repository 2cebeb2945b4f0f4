"""Online RL that learns: two-digit addition, from a brief SFT start, with GRPO, RLOO (and
PPO, when this kithara has it) against continued SFT on the same number of update tokens.

A tiny Llama-style model and a character-level tokenizer (built here) see prompts like
"37+48=" and must answer "85" then end. A short SFT on worked examples gives a policy that
is right on some held-out problems, far from all. From that same checkpoint each method
trains on its own: the RL trainers sample ``num_generations`` answers per prompt and are
rewarded for an exact answer (weight 1) and a well-formed one (digits only, then EOS;
weight 0.1); continued SFT trains on the reference answers for as many completion tokens
as GRPO trained on. The table gives held-out exact match (greedy decoding) before and
after; each method's per-step metrics ("train/reward", "train/rewards/exact/mean", ...)
go to TensorBoard under ``--output-dir``.

Run: python examples/rl_addition.py            (the full table; about 100 s on 2 CPU cores: 97 s measured)
     python examples/rl_addition.py --tiny     (40 GRPO steps: what tests/test_examples.py runs)
     tensorboard --logdir runs/rl_addition     (the reward curves)
"""

import argparse
import logging
import random
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", "--quick", action="store_true", help="the small version (tests/test_examples.py)")
    parser.add_argument(
        "--output-dir", "--logdir", default="runs/rl_addition",
        help="TensorBoard logs, one run per method (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--methods", default=None, help="comma-separated subset of grpo,rloo,ppo,sft")
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse_args()  # before JAX loads: --help answers at once

import numpy as np  # noqa: E402

import kithara  # noqa: E402

logging.basicConfig(level=logging.WARNING, format="%(message)s")

SPECIALS = ["<pad>", "<s>", "</s>"]
CHARS = list("0123456789+=")
LR = 3e-4  # every method after the SFT start: AdamW, peak learning rate


def char_tokenizer() -> kithara.Tokenizer:
    """One token per character: digits, '+', '=' and <pad>/<s>/</s>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return kithara.Tokenizer(hf)


def problems(seed: int) -> list[dict[str, str]]:
    """Every a+b with 0 <= a, b < 100, shuffled: {"prompt": "37+48=", "answer": "85"}."""
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(rows)
    return rows


# Rewards: f(prompts, completions, completion_ids, trainer_state, **columns) -> list[float | None].
def exact(prompts, completions, answer, **_):
    """1 for the exact sum (the `answer` column of the dataset), else 0."""
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


def well_formed(prompts, completions, completion_ids, **_):
    """1 when the completion is 1-3 digits and then EOS (``completion_ids`` end with EOS, id 2)."""
    return [
        float(bool(ids) and ids[-1] == 2 and c.isdigit() and len(c) <= 3)
        for c, ids in zip(completions, completion_ids, strict=True)
    ]


def build_model(size: dict) -> kithara.KerasHubModel:
    return kithara.KerasHubModel.from_config(
        "llama3", vocab_size=len(SPECIALS + CHARS), num_kv_heads=2, seed=0, **size
    )  # fmt: skip


def exact_match(model: kithara.KerasHubModel, rows: list[dict[str, str]]) -> float:
    """Held-out share of exact answers under greedy decoding."""
    outs = model.generate([r["prompt"] for r in rows], max_new_tokens=4)
    return float(np.mean([o.strip() == r["answer"] for o, r in zip(outs, rows, strict=True)]))


def main(opts: argparse.Namespace) -> None:
    quick = opts.tiny
    opts.methods = opts.methods or ("grpo" if quick else "grpo,rloo,ppo,sft")
    size = dict(num_layers=2, hidden_dim=64, num_heads=4, intermediate_dim=128)
    # The full run starts from 1000 SFT steps (held-out exact match about 0.3: right often enough
    # that most groups of samples hold both right and wrong answers to compare), takes 16
    # prompts a step and decays the learning rate (cosine); --tiny keeps the 800-step start
    # with a gentler rate, 8 prompts and a constant RL rate of 1e-4: its low sampled reward has room
    # to rise in 40 steps. (The SFT start depends on float rounding, so on the CPU: held-out exact
    # match 0.1-0.36 over seeds and machines; 3e-3 / 3e-4 were too hot for the tiny run on some.)
    sft_steps, rl_steps, prompts_per_step, group = (800, 40, 8, 8) if quick else (1000, 120, 16, 8)
    sft_lr, rl_lr = (1e-3, 1e-4) if quick else (3e-3, LR)
    schedule = "constant" if quick else "cosine"
    tokenizer = char_tokenizer()
    rows = problems(seed=0)
    held_out, train = rows[:200], rows[200:]

    # 1. A brief SFT on worked examples: a non-zero start, far from perfect.
    t0 = time.perf_counter()
    model = build_model(size)
    model.tokenizer = tokenizer
    sft_rows = [{"prompt": r["prompt"], "completion": r["answer"]} for r in train]
    kithara.SFTTrainer(
        model, sft_rows, processing_class=tokenizer, max_length=12, per_device_train_batch_size=32,
        learning_rate=sft_lr, max_steps=sft_steps, logging_steps=10, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=0,
    ).train()  # fmt: skip
    v = model.variables  # a host copy: the trainers donate (and so delete) the arrays they train
    start = type(v)(
        trainable={k: np.array(x) for k, x in v.trainable.items()},
        non_trainable={k: np.array(x) for k, x in v.non_trainable.items()},
    )
    before = exact_match(model, held_out)
    print(f"SFT start: {sft_steps} steps in {time.perf_counter() - t0:.0f}s, held-out exact match {before:.3f}")

    rows_per_step = prompts_per_step * group
    rl_common = dict(
        num_generations=group, per_device_train_batch_size=rows_per_step, max_prompt_length=8,
        max_completion_length=4, learning_rate=rl_lr, lr_scheduler_type=schedule, max_steps=rl_steps,
        temperature=0.7, logging_steps=1, reward_weights=[1.0, 0.1], save_strategy="no", seed=0,
    )  # fmt: skip
    results: list[tuple[str, dict[str, float]]] = []
    grpo_tokens: float | None = None

    def rl(name: str, trainer_class, config_class, **extra):
        def run(model):
            trainer = trainer_class(
                model, reward_funcs=[exact, well_formed], train_dataset=train, processing_class=tokenizer,
                args=config_class(**rl_common, **extra, logging_dir=f"{opts.output_dir}/{name}", disable_tqdm=True),
            )  # fmt: skip
            history = trainer.train()
            tokens = sum(h["completions/mean_length"] * rows_per_step for h in history)
            rewards = [h["rewards/exact/mean"] for h in history]
            return tokens, rewards

        return run

    def sft(model):
        # As many completion tokens (answer digits + EOS) as GRPO trained on.
        per_row = np.mean([len(tokenizer.encode(r["answer"])) + 1 for r in train])
        steps = max(1, round((grpo_tokens or rl_steps * rows_per_step * per_row) / (rows_per_step * per_row)))
        kithara.SFTTrainer(
            model, sft_rows, processing_class=tokenizer, max_length=12, per_device_train_batch_size=rows_per_step,
            disable_tqdm=True, learning_rate=rl_lr, lr_scheduler_type=schedule, max_steps=steps, logging_steps=1,
            save_strategy="no", seed=1, logging_dir=f"{opts.output_dir}/sft",
        ).train()  # fmt: skip
        return steps * rows_per_step * per_row, []

    methods = {
        "grpo": ("GRPO", rl("grpo", kithara.GRPOTrainer, kithara.GRPOConfig, loss_type="dapo", beta=0.0)),
        "rloo": ("RLOO", rl("rloo", kithara.RLOOTrainer, kithara.RLOOConfig, beta=0.0)),
        "sft": ("continued SFT (control)", sft),
    }
    if hasattr(kithara, "PPOTrainer"):
        methods["ppo"] = ("PPO", rl("ppo", kithara.PPOTrainer, kithara.PPOConfig))
    else:
        print("PPO: this kithara has no PPOTrainer; row left out")

    for key in opts.methods.split(","):
        if key not in methods:
            continue
        label, run = methods[key]
        t0 = time.perf_counter()
        model = build_model(size)
        model.tokenizer = tokenizer
        model.variables = start
        tokens, rewards = run(model)
        if key == "grpo":
            grpo_tokens = tokens
        after = exact_match(model, held_out)
        seconds = time.perf_counter() - t0
        results.append((label, dict(after=after, tokens=tokens, seconds=seconds)))
        if rewards:
            k = max(1, len(rewards) // 5)
            print(
                f"{label}: exact-match reward {np.mean(rewards[:k]):.3f} (first {k} steps) -> "
                f"{np.mean(rewards[-k:]):.3f} (last {k} steps)"
            )
        print(f"{label}: held-out exact match {before:.3f} -> {after:.3f} ({seconds:.0f}s)")

    print("\n| method | held-out exact match before | after | update tokens | wall time |")
    print("|---|---|---|---|---|")
    for label, r in results:
        print(f"| {label} | {before:.3f} | {r['after']:.3f} | {r['tokens']:.0f} | {r['seconds']:.0f} s |")


if __name__ == "__main__":
    main(ARGS)
