"""One child process of the ``scale`` suite: compiles kithara's train step ahead of time for
abstract real-size models, or times real steps of a small one, and prints one line per job.

    python -m bench.scale_child '[{"kind": "memory", "target": "v5e:2x4", ...}, ...]'

A ``memory`` job builds the model's backbone inside ``kithara.models.keras_variables.unallocated``
(no weight is allocated), wraps it in ``KerasHubModel`` on a mesh of the target's devices
(a TPU topology's devices from libtpu, which the parent puts on ``PYTHONPATH`` for TPU
targets, or the forced CPU devices), builds a ``kithara.Trainer`` (its own loss, AdamW, its
own jitted step) and lowers and compiles the step for ``jax.ShapeDtypeStruct`` inputs, then
reads ``compiled.memory_analysis()``. Each job's result (or its error) is printed as soon as
it is done, so a child stopped by the parent's deadline keeps what it measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
import traceback
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

ROW_PREFIX = "SCALE_ROW "

# Hugging Face config.json numbers. Llama-3.2-1B ties its embeddings, Llama-3-8B does not;
# Gemma-2-9B: head_dim 256, query_pre_attn_scalar 256 (= head_dim, keras-hub's
# query_head_dim_normalize), soft caps 50 / 30 and a 4,096 sliding window on alternate
# layers (kithara's gemma2 defaults), tied embeddings.
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        family="llama3",
        vocab_size=128256,
        num_layers=16,
        hidden_dim=2048,
        num_heads=32,
        num_kv_heads=8,
        intermediate_dim=8192,
        kwargs=dict(tie_word_embeddings=True),
    ),
    "llama-3-8b": dict(
        family="llama3",
        vocab_size=128256,
        num_layers=32,
        hidden_dim=4096,
        num_heads=32,
        num_kv_heads=8,
        intermediate_dim=14336,
        kwargs=dict(tie_word_embeddings=False),
    ),
    "gemma-2-9b": dict(
        family="gemma2",
        vocab_size=256000,
        num_layers=42,
        hidden_dim=3584,
        num_heads=16,
        num_kv_heads=8,
        intermediate_dim=14336,
        head_dim=256,
        kwargs={},
    ),
    # --smoke and the tests: seconds on the CPU backend.
    "tiny": dict(
        family="llama3",
        vocab_size=256,
        num_layers=4,
        hidden_dim=64,
        num_heads=4,
        num_kv_heads=2,
        intermediate_dim=128,
        kwargs=dict(tie_word_embeddings=False),
    ),
    "tiny-gemma2": dict(
        family="gemma2",
        vocab_size=256,
        num_layers=4,
        hidden_dim=64,
        num_heads=4,
        num_kv_heads=2,
        intermediate_dim=128,
        head_dim=32,
        kwargs=dict(sliding_window_size=16),
    ),
    # The step-time comparison: real arrays on this CPU.
    "small": dict(
        family="llama3",
        vocab_size=4096,
        num_layers=4,
        hidden_dim=256,
        num_heads=8,
        num_kv_heads=4,
        intermediate_dim=704,
        kwargs=dict(tie_word_embeddings=False),
    ),
}


def devices_of(target: str) -> list[Any]:
    """The 8 (or so) devices of a target: ``"cpu"`` or a TPU topology name such as ``"v5e:2x4"``."""
    import jax

    if target == "cpu":
        return list(jax.devices("cpu"))
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(platform="tpu", topology_name=target).devices)


def build_model(
    shape: str,
    layers: int,
    devices: list[Any],
    scale: dict[str, Any],
    *,
    abstract: bool,
    precision: str = "bfloat16",
    quantization: str | None = None,
    lora: dict[str, Any] | None = None,
) -> Any:
    """kithara's ``KerasHubModel`` of ``SHAPES[shape]`` with ``layers`` decoder blocks, FSDP over
    ``devices``; ``abstract``: no weight allocated. ``quantization`` (``"nf4"``, ``"int8"``)
    stores the projections quantized (abstract too); ``lora``: ``LoraConfig`` fields."""
    import contextlib

    import keras_hub

    import kithara
    from kithara.models.building import backbone_from_config
    from kithara.models.families import Architecture, get_family
    from kithara.models.keras_variables import unallocated

    spec = dict(SHAPES[shape])
    family, kwargs = spec.pop("family"), spec.pop("kwargs")
    spec["num_layers"] = layers
    arch = Architecture(**spec)
    where = contextlib.nullcontext() if not abstract else unallocated()
    with where:
        backbone = backbone_from_config(
            family,
            arch,
            precision=precision,
            seed=0,
            builder=kithara.KerasHubModel.from_config,
            where="bench.scale",
            **kwargs,
        )
        if quantization is not None:  # inside unallocated(): the codes are abstract too
            from kithara.models import quantization as quantization_lib

            quantization_lib.quantize_backbone(backbone, kithara.QuantizationConfig(quantization))
    causal_lm = getattr(keras_hub.models, get_family(family).causal_lm_class)(backbone=backbone, preprocessor=None)
    # LoRA's adapters abstract too: a TPU topology's compile-only devices cannot hold arrays.
    with contextlib.nullcontext() if not abstract else unallocated():
        return kithara.KerasHubModel(
            causal_lm,
            sharding=kithara.ShardingStrategy("fsdp", devices=devices),
            family=family,
            scale=kithara.ScaleConfig(**scale),
            lora=kithara.LoraConfig(**lora) if lora is not None else None,
        )


def build_trainer(model: Any, training: dict[str, Any]) -> Any:
    """kithara's base Trainer (SFT's token cross-entropy, AdamW) with ``training`` config fields."""
    import kithara

    config = kithara.TrainingConfig(max_steps=1, learning_rate=1e-4, disable_tqdm=True, report_to="none", **training)
    return kithara.Trainer(model, args=config)


def abstract_inputs(trainer: Any, rows: int, seq: int) -> tuple[Any, dict[str, Any]]:
    """The train state (weights, AdamW moments, step, rng) and one ``[1, rows, seq]`` batch as
    ``jax.ShapeDtypeStruct``s with the trainer's shardings: what ``Trainer.abstract_state`` gives
    for an allocated model, built from the model's abstract variables."""
    import jax
    import jax.numpy as jnp

    from kithara.sharding import batch_sharding
    from kithara.trainer.state import TrainState

    params = trainer.model.variables
    opt_state = jax.eval_shape(trainer.tx.init, params.trainable)
    key = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    state = TrainState(params, opt_state, jax.ShapeDtypeStruct((), jnp.int32), key)
    state = jax.tree.map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), state, trainer.state_shardings
    )
    sharding = batch_sharding(trainer.model.mesh, leading_dims=1)
    dtypes = {"token_ids": jnp.int32, "padding_mask": jnp.bool_, "labels": jnp.int32, "label_mask": jnp.bool_}
    batch = {k: jax.ShapeDtypeStruct((1, rows, seq), d, sharding=sharding) for k, d in dtypes.items()}
    return state, batch


def memory(job: dict[str, Any]) -> dict[str, Any]:
    """Per-device bytes of kithara's compiled train step for one shape, depth, sequence and option set."""
    devices = devices_of(job["target"])
    start = time.perf_counter()
    options = {k: job[k] for k in ("quantization", "lora") if job.get(k) is not None}
    model = build_model(job["shape"], job["layers"], devices, job["scale"], abstract=True, **options)
    trainer = build_trainer(model, job["training"])
    state, batch = abstract_inputs(trainer, job.get("rows_per_chip", 1) * len(devices), job["seq"])
    built = time.perf_counter()
    lowered = trainer.lower_train_step(state, batch)
    text = lowered.as_text()
    lowered_at = time.perf_counter()
    out: dict[str, Any] = {
        "build_s": built - start,
        "lower_s": lowered_at - built,
        "hlo_chars": len(text),
        "hlo_hash": hashlib.sha256(text.encode()).hexdigest()[:16],
    }
    if job.get("check_scanned"):  # compile only if the matmuls do not grow with depth
        small = build_model(job["shape"], job["check_scanned"], devices, job["scale"], abstract=True)
        small_trainer = build_trainer(small, job["training"])
        small_text = small_trainer.lower_train_step(*abstract_inputs(small_trainer, len(devices), job["seq"])).as_text()
        # The state's arguments are per layer either way; the matmuls are in the program once when scanned.
        growth = text.count("dot_general") / max(1, small_text.count("dot_general"))
        out["matmul_growth"] = growth
        if growth > 1.5:
            raise RuntimeError(
                f"scan_layers had no effect: the step's matmuls grow {growth:.1f}x from {job['check_scanned']} "
                f"to {job['layers']} layers (not scanned); full-depth compile skipped"
            )
    out["cache_key"] = cache_key(job["target"], text)
    cached = read_cache(job.get("cache")).get(out["cache_key"])
    if cached is not None:  # the same program for the same target and compiler: the same analysis
        return {**out, **cached, "cached": True}
    cpu = time.process_time()
    compiled = lowered.compile()
    out["compile_s"] = time.perf_counter() - lowered_at
    out["compile_cpu_s"] = time.process_time() - cpu
    analysis = compiled.memory_analysis()
    for name in ("temp", "argument", "output", "alias", "generated_code"):
        out[f"{name}_bytes"] = int(getattr(analysis, f"{name}_size_in_bytes"))
        host = getattr(analysis, f"host_{name}_size_in_bytes", None)  # host memory (offloaded state)
        if host is not None:
            out[f"host_{name}_bytes"] = int(host)
    if job.get("cache"):
        write_cache(job["cache"], out["cache_key"], {k: v for k, v in out.items() if k.endswith(("_bytes", "_s"))})
    return out


def cache_key(target: str, program: str) -> str:
    """What a compiled program's memory analysis depends on: the target, the compiler (jax,
    jaxlib, libtpu versions) and the lowered program."""
    from importlib import metadata

    compilers = []
    for name in ("jax", "jaxlib", "libtpu"):
        try:
            compilers.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            compilers.append(f"{name}=none")
    return hashlib.sha256("\n".join([target, *compilers, program]).encode()).hexdigest()[:32]


def read_cache(path: str | None) -> dict[str, Any]:
    """The cache: one JSON object ``{key: memory analysis}`` per line (children append to it)."""
    if not path or not os.path.exists(path):
        return {}
    found: dict[str, Any] = {}
    with open(path) as f:
        for line in f:
            try:
                found.update(json.loads(line))
            except ValueError:  # a line cut short by a stopped child
                continue
    return found


def write_cache(path: str, key: str, analysis: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({key: analysis}) + "\n")


def step_time(job: dict[str, Any]) -> dict[str, Any]:
    """Real steps of a small model on this CPU, one trainer per remat policy, timed side by side:
    each round runs ``steps`` steps of every policy (order rotated per round); a policy's figure
    is the median over rounds of its step time over no remat's in the same round."""
    import jax
    import numpy as np

    from kithara.sharding import shard_batch

    devices = jax.devices()[:1]
    policies = ["none", *[p for p in job["policies"] if p != "none"]]
    rng = np.random.default_rng(0)
    vocab, rows, seq = SHAPES[job["shape"]]["vocab_size"], job["rows"], job["seq"]
    ids = rng.integers(3, vocab, (1, rows, seq + 1)).astype(np.int32)
    host = {"token_ids": ids[..., :-1], "labels": ids[..., 1:], "padding_mask": np.ones((1, rows, seq), bool)}
    host["label_mask"] = host["padding_mask"].copy()
    runs: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for policy in policies:
        try:
            model = build_model(
                job["shape"],
                SHAPES[job["shape"]]["num_layers"],
                devices,
                {"remat": policy},
                abstract=False,
                precision="float32",
            )
            trainer = build_trainer(model, {})
            batch = shard_batch(host, model.mesh, leading_dims=1)
            state = trainer.init_state()
            start = time.perf_counter()
            state, metrics = trainer.jitted_train_step(state, batch)
            jax.block_until_ready(metrics)
            runs[policy] = {
                "trainer": trainer,
                "state": state,
                "batch": batch,
                "compile_s": time.perf_counter() - start,
                "loss": float(metrics["loss"]),
                "times": [],
            }
        except Exception as error:  # reported in the row, the other policies go on
            errors[policy] = f"{type(error).__name__}: {error}"[:300]
    order = [p for p in policies if p in runs]
    for r in range(job["rounds"]):
        for policy in order[r % len(order) :] + order[: r % len(order)]:
            run = runs[policy]
            start = time.perf_counter()
            for _ in range(job["steps"]):
                run["state"], metrics = run["trainer"].jitted_train_step(run["state"], run["batch"])
            jax.block_until_ready(metrics)
            run["times"].append((time.perf_counter() - start) / job["steps"])
    rows_out = []
    for policy in policies:
        if policy not in runs:
            rows_out.append({"policy": policy, "error": errors[policy]})
            continue
        run, base = runs[policy], runs.get("none")
        ratios = [t / b for t, b in zip(run["times"], base["times"], strict=True)] if base else []
        rows_out.append(
            {
                "policy": policy,
                "step_s": statistics.median(run["times"]),
                "ratio_vs_none": statistics.median(ratios) if ratios else None,
                "ratio_min": min(ratios) if ratios else None,
                "ratio_max": max(ratios) if ratios else None,
                "compile_s": run["compile_s"],
                "first_loss": run["loss"],
            }
        )
    return {"policies": rows_out, "rounds": job["rounds"], "steps_per_round": job["steps"]}


def main() -> None:
    jobs = json.loads(sys.argv[1])
    for job in jobs:
        try:
            result = {"ok": True, **(memory(job) if job["kind"] == "memory" else step_time(job))}
        except Exception as error:  # one failing configuration must not stop the suite
            text = "".join(traceback.format_exception_only(type(error), error)).strip()
            result = {"ok": False, "error": text if len(text) < 900 else f"{text[:600]} ... {text[-300:]}"}
        print(ROW_PREFIX + json.dumps({"job": job, **result}), flush=True)


if __name__ == "__main__":
    main()
