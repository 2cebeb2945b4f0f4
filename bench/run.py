"""Benchmarks: Trainer throughput and framework overhead versus a hand-written jit step,
and the data pipeline (bench/data.py).

Both run side by side in one process on the same model, batch and optimizer. Results go
to bench/results/results.json and a markdown table (bench/results/results.md).

    python -m bench.run            # full sizes
    python -m bench.run --smoke    # tiny sizes, few steps (what CI runs)
    python -m bench.run --only data  # one of the two suites
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax

from bench.data import bench_data
from bench.data import table as data_table

SIZES = {
    "tiny": dict(vocab_size=256, num_layers=2, hidden_dim=64, num_heads=4, num_kv_heads=2, intermediate_dim=128),
    "small": dict(vocab_size=4096, num_layers=4, hidden_dim=256, num_heads=8, num_kv_heads=4, intermediate_dim=704),
    "medium": dict(vocab_size=16384, num_layers=8, hidden_dim=512, num_heads=8, num_kv_heads=4, intermediate_dim=1408),
}


def examples(n: int, length: int, vocab: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        size = int(rng.integers(length // 2, length + 1))
        seq = rng.integers(3, vocab, length + 1).astype(np.int32)
        valid = np.arange(length) < size
        mask = valid.astype(np.int32)
        out.append({"token_ids": seq[:-1], "padding_mask": valid, "labels": seq[1:], "label_mask": mask})
    return out


def bench_size(name: str, arch: dict, *, lora: bool, steps: int, seq: int, per_device: int) -> dict:
    import numpy as np
    import optax

    import kithara
    from kithara.models.model import ModelVariables
    from kithara.sharding import batch_sharding, replicated, shard_batch
    from kithara.trainer.losses import next_token_cross_entropy

    lora_config = kithara.LoraConfig(rank=8, targets=("all",)) if lora else None
    model = kithara.KerasHubModel.from_config("llama3", **arch, lora=lora_config)
    data = examples(per_device * jax.device_count() * (steps + 2), seq, arch["vocab_size"])
    loader = kithara.Dataloader(data, per_device, seed=0)
    trainer = kithara.Trainer(model, optax.adamw(1e-4), loader, steps=steps, progress_bar=False)
    start = time.perf_counter()
    history = trainer.train()
    trainer_wall = time.perf_counter() - start
    steady = history[2:]
    trainer_step = statistics.median(h["step_time"] for h in steady)

    # The minimal hand-written step: same model function, loss, optimizer and shardings.
    tx = optax.adamw(1e-4)
    shardings = model.variable_shardings
    variables = model.variables
    params = jax.tree.map(lambda x: x.copy(), variables.trainable)
    frozen = variables.non_trainable

    def loss_fn(p, batch):
        logits, _ = model.apply(ModelVariables(p, frozen), batch, training=True)
        out = next_token_cross_entropy(logits, batch["labels"], batch["label_mask"])
        return out.total / out.weight

    def step(p, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    opt_state = jax.jit(tx.init)(params)
    opt_shardings = jax.tree.map(lambda x: x.sharding if x.ndim else replicated(model.mesh), opt_state)
    opt_state = jax.device_put(opt_state, opt_shardings)
    jitted = jax.jit(
        step,
        in_shardings=(shardings.trainable, opt_shardings, batch_sharding(model.mesh)),
        out_shardings=(shardings.trainable, opt_shardings, replicated(model.mesh)),
        donate_argnums=(0, 1),
    )
    batch = shard_batch(next(loader.epoch(0)), model.mesh)
    t0 = time.perf_counter()
    params, opt_state, loss = jitted(params, opt_state, batch)
    loss.block_until_ready()
    compile_time_raw = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, opt_state, loss = jitted(params, opt_state, batch)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    raw_step = statistics.median(times[2:] or times)
    tokens = statistics.median(h["tokens"] for h in steady)
    return {
        "size": name,
        "lora": lora,
        "params": model.num_params,
        "trainable_params": model.num_trainable_params,
        "global_batch": loader.global_batch_size,
        "seq_len": seq,
        "trainer_step_s": trainer_step,
        "raw_jit_step_s": raw_step,
        "overhead_ratio": trainer_step / raw_step,
        "first_step_s": history[0]["step_time"],
        "raw_compile_s": compile_time_raw,
        "tokens_per_s": tokens / trainer_step,
        "mfu": statistics.median(h["mfu"] for h in steady),
        "trainer_wall_s": trainer_wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_loss": history[-1]["loss"],
        "loss_is_finite": bool(np.isfinite(history[-1]["loss"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few steps, to prove the suite runs")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--cpu-devices", type=int, default=None)
    parser.add_argument("--only", choices=["model", "data"], default=None, help="run one of the two suites")
    args = parser.parse_args()
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    full = [("tiny", False), ("small", False), ("small", True), ("medium", False), ("medium", True)]
    plan = [("tiny", False), ("tiny", True)] if args.smoke else full
    steps = 6 if args.smoke else 30
    seq = 64 if args.smoke else 128
    if args.only == "data":
        plan = []
    rows = [bench_size(n, SIZES[n], lora=lo, steps=steps, seq=seq, per_device=4) for n, lo in plan]
    for row in rows:
        if not row["loss_is_finite"]:
            raise SystemExit(f"benchmark {row['size']} produced a non-finite loss")
    data_rows = [] if args.only == "model" else bench_data(smoke=args.smoke)
    for row in data_rows:
        if not row["fill_ok"]:
            raise SystemExit(f"packing filled rows worse than padding on {row['data']}")
    machine = {
        "platform": jax.default_backend(),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine, "smoke": args.smoke, "rows": rows, "data": data_rows}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    header = (
        "| size | LoRA | params | trainable | batch x seq | trainer step (s) | raw jit step (s) | overhead "
        "| tokens/s | MFU | first step (s) | peak RSS (MiB) |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['size']} | {'yes' if r['lora'] else 'no'} | {r['params']:,} | {r['trainable_params']:,} | "
            f"{r['global_batch']}x{r['seq_len']} | {r['trainer_step_s']:.4f} | {r['raw_jit_step_s']:.4f} | "
            f"{r['overhead_ratio']:.3f} | {r['tokens_per_s']:,.0f} | {r['mfu']:.3f} | {r['first_step_s']:.2f} | "
            f"{r['peak_rss_mib']:,.0f} |"
        )
    table = "\n".join(lines) + "\n\nData pipeline:\n\n" + data_table(data_rows)
    (out / "results.md").write_text(f"Machine: {machine}\n\n{table}\n")
    print(f"Machine: {machine}\n\n{table}")


if __name__ == "__main__":
    main()
