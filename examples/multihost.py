"""One training script for one process, for every host of a multi-host job, or for Ray.

Run:
    python examples/multihost.py                      # one process, 8 CPU devices (100 steps: 26 s wall measured)
    python examples/multihost.py --tiny               # a smoke run: 10 steps, about 30 s of CPU time
    # two processes on this machine, 4 CPU devices each (one shell each):
    python examples/multihost.py --coordinator 127.0.0.1:1234 --num-processes 2 --process-id 0
    python examples/multihost.py --coordinator 127.0.0.1:1234 --num-processes 2 --process-id 1
    python examples/multihost.py --ray 2              # 2 Ray workers (pip install "kithara[ray]")

On a Cloud TPU slice or under SLURM, run it with no flags on every host: the processes find
each other. See docs/distributed.md.
"""

import argparse
import logging
import math


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coordinator", help="host:port of process 0")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--ray", type=int, metavar="N", help="run on N Ray workers instead")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="a smoke run: --steps 10")
    parser.add_argument(
        "--output-dir",
        default="runs/multihost",
        help="checkpoints (one directory per process count and step count) and TensorBoard logs "
        "(default: %(default)s; on several hosts, a path every host reaches, e.g. gs://...)",
    )
    args = parser.parse_args()
    if args.tiny:
        args.steps = 10
    return args


if __name__ == "__main__":
    ARGS = parse_args()  # before JAX loads: --help answers at once

import jax  # noqa: E402

import kithara  # noqa: E402
from kithara.config import ASSETS  # noqa: E402
from kithara.data import PromptCompletionDataset  # noqa: E402


def train(steps: int, output_dir: str) -> float:
    """The whole program of one process: data, model, trainer. Returns the last loss."""
    if jax.process_index() != 0:
        logging.getLogger("kithara").setLevel(logging.WARNING)  # one log per job
    demo = ASSETS / "demo"
    tokenizer = kithara.Tokenizer.from_pretrained(demo / "tokenizer")
    # Each process reads and tokenizes only its own share of the rows.
    loader = kithara.Dataloader(PromptCompletionDataset(str(demo / "train.jsonl"), tokenizer, max_length=24), 8)
    model = kithara.KerasHubModel.from_config(  # FSDP over every host's devices
        "llama3", vocab_size=tokenizer.vocab_size, num_layers=2, hidden_dim=128, num_heads=4, num_kv_heads=2,
        intermediate_dim=256, sharding="fsdp",
    )  # fmt: skip
    # The data order depends on the process count, so each count resumes from its own directory.
    checkpointer = kithara.Checkpointer(f"{output_dir}/ckpt-{jax.process_count()}p-{steps}", save_interval=50)
    args = kithara.TrainingConfig(
        max_steps=steps,
        learning_rate=3e-3,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr": 3e-4},
        warmup_steps=min(30, steps - 1),
        weight_decay=0.01,
        logging_steps=10,
        logging_dir=output_dir,  # TensorBoard, written by process 0 only
    )
    trainer = kithara.Trainer(model, train_dataloader=loader, checkpointer=checkpointer, args=args)
    history = trainer.train()
    return history[-1]["loss"] if history else math.nan


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.ray:
        import ray

        ray.init()
        losses = kithara.distributed.run_on_ray(
            train,
            args.ray,
            args=(args.steps, args.output_dir),
            placement_strategy="PACK",  # a one-machine cluster; keep the default STRICT_SPREAD on real hosts
            env_vars={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"},  # CPU only
        )
        print(f"last loss on each worker: {losses}")
        return
    # CPU devices per process (accelerators ignore it), then join: both before devices start.
    jax.config.update("jax_num_cpu_devices", 4 if args.num_processes else 8)
    kithara.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    loss = train(args.steps, args.output_dir)
    if jax.process_index() == 0:
        print(f"last loss: {loss:.4f} ({jax.process_count()} processes, {jax.device_count()} devices)")


if __name__ == "__main__":
    main(ARGS)
