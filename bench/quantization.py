"""The ``quantization`` suite: what a quantized frozen base (QLoRA) saves and what it costs.

- ``bytes``: bytes of the base at real model shapes, NF4 / NF4 with double quantization / int8
  against bfloat16 (abstract models: exact, nothing allocated).
- ``step_memory``: per-device memory of a LoRA train step with a bfloat16, NF4 or int8 base,
  from XLA's compiled memory analysis of kithara's step compiled ahead of time (a TPU v5e
  topology through libtpu, and this CPU), with the scale suite's recipe (scan, full remat,
  chunked loss, the target's attention kernel); the scale suite's children and cache run it.
- ``quality``: logits of a Hugging Face Llama loaded quantized against the float model, beside
  the error of bitsandbytes' own NF4 / int8 round trip of the same weights run by transformers.
- ``host_rss``: peak host memory (ru_maxrss) of a child that loads a Hugging Face checkpoint
  (bfloat16 base, or quantized while reading) and runs LoRA train steps on this CPU.

    python -m bench.run --only quantization [--smoke]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ("nf4", "nf4_dq", "int8")
# (HF config of the quality model, of the host-memory model). Gaussian weights (std 0.02), as
# transformers initialises them: the distribution NF4's levels are built for.
QUALITY_MODEL = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=4096,
)
RSS_MODEL = dict(
    hidden_size=1536,
    intermediate_size=4096,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=4,
    vocab_size=8192,
)
SMOKE_MODEL = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)
LORA = {"rank": 16, "alpha": 32, "targets": ("all",)}


def config_of(method: str | None) -> Any:
    import kithara

    if method is None:
        return None
    return (
        kithara.QuantizationConfig("nf4", double_quant=True)
        if method == "nf4_dq"
        else kithara.QuantizationConfig(method)
    )


def base_bytes(shapes: tuple[str, ...]) -> list[dict[str, Any]]:
    """Bytes of each shape's weights in bfloat16 and with each method (abstract models)."""
    import math

    import kithara
    from bench.scale_child import SHAPES
    from kithara.models import quantization
    from kithara.models.building import backbone_from_config
    from kithara.models.families import Architecture
    from kithara.models.keras_variables import unallocated

    rows = []
    for shape in shapes:
        spec = dict(SHAPES[shape])
        family, kwargs = spec.pop("family"), spec.pop("kwargs")
        for method in (None, *METHODS):
            with unallocated():
                backbone = backbone_from_config(
                    family,
                    Architecture(**spec),
                    precision="bfloat16",
                    seed=0,
                    builder=kithara.KerasHubModel.from_config,
                    where="bench.quantization",
                    **kwargs,
                )
                if method is not None:
                    quantization.quantize_backbone(backbone, config_of(method))
            storage = quantization.storage_bytes(backbone)
            stored_paths = {v.path for v in quantization.storage_variables(backbone)}
            other = sum(
                2 * math.prod(v.shape) for v in backbone.weights if v.path not in stored_paths and "lora" not in v.path
            )
            rows.append(
                {
                    "shape": shape,
                    "method": method or "bfloat16",
                    "kernels_bytes": storage["stored"] or None,
                    "other_bytes": other,
                    "total_bytes": other + storage["stored"],
                }
            )
    by = {(r["shape"], r["method"]): r for r in rows}
    for r in rows:
        bf16 = by[(r["shape"], "bfloat16")]
        r["total_ratio"] = r["total_bytes"] / bf16["total_bytes"]
        if r["kernels_bytes"]:
            r["kernels_ratio"] = r["kernels_bytes"] / (bf16["total_bytes"] - r["other_bytes"])
    return rows


def step_memory_jobs(smoke: bool) -> list[dict[str, Any]]:
    """Memory-analysis jobs for the scale suite's children: one LoRA step per base."""
    from bench.scale import config_fields
    from bench.scale_child import SHAPES

    if smoke:
        plan = [("cpu", "tiny", 32)]
    else:
        plan = [("v5e:2x4", "llama-3-8b", 2048), ("v5e:2x4", "llama-3-8b", 8192), ("cpu", "llama-3.2-1b", 2048)]
    jobs = []
    for target, shape, seq in plan:
        scale, training = config_fields("+scan", target)
        for method in (None, "nf4", "int8"):
            jobs.append(
                {
                    "kind": "memory",
                    "target": target,
                    "shape": shape,
                    "layers": SHAPES[shape]["num_layers"],
                    "seq": seq,
                    "scale": scale,
                    "training": training,
                    "lora": dict(LORA),
                    "quantization": method,
                    "label": method or "bfloat16",
                    "config": f"+scan, LoRA, {method or 'bfloat16'} base",
                }
            )
    return jobs


def step_memory(smoke: bool, budget_s: float) -> list[dict[str, Any]]:
    from bench.scale import CACHE, libtpu_missing, peak_bytes, run_jobs

    jobs = step_memory_jobs(smoke)
    if libtpu_missing():
        jobs = [j for j in jobs if j["target"] == "cpu"]
    # One child at a time for real sizes: two 8B compiles at 8,192 tokens at once ran this 24 GiB VM out of memory.
    rows = run_jobs(jobs, 2 if smoke else 1, time.time() + budget_s, CACHE)
    order = {json.dumps(j, sort_keys=True): i for i, j in enumerate(jobs)}
    out = []
    for row in sorted(rows, key=lambda r: order.get(json.dumps(r["job"], sort_keys=True), len(jobs))):
        job = row["job"]
        entry = {k: job[k] for k in ("target", "shape", "seq", "label")}
        if not row.get("ok") or "temp_bytes" not in row:
            entry["error"] = str(row.get("error", "not measured"))[:200]
        else:
            entry.update(
                argument_gib=row["argument_bytes"] / 2**30,
                temp_gib=row["temp_bytes"] / 2**30,
                peak_gib=peak_bytes(row) / 2**30,
            )
        out.append(entry)
    return out


def write_checkpoint(config: dict[str, Any], path: Path, dtype: str = "float32") -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config, tie_word_embeddings=False))
    model.to(getattr(torch, dtype)).save_pretrained(path)


def quality(config: dict[str, Any], directory: Path) -> list[dict[str, Any]]:
    """Logit error of each quantized base against the float model, kithara and bitsandbytes."""
    import numpy as np
    import torch
    import transformers
    from bitsandbytes import functional as bnb

    import kithara

    write_checkpoint(config, directory)
    tokens = np.random.default_rng(0).integers(0, config["vocab_size"], (4, 64)).astype(np.int32)
    inputs = {"token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)}

    def kithara_logits(method: str | None) -> Any:
        model = kithara.KerasHubModel.from_preset(str(directory), quantization=config_of(method))
        return np.asarray(model.apply(model.variables, inputs, training=False)[0], np.float64)

    torch_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in torch_model.state_dict().items()}

    def bnb_logits(method: str) -> Any:
        torch_model.load_state_dict(original)
        with torch.no_grad():
            for name, module in torch_model.named_modules():
                if isinstance(module, torch.nn.Linear) and name != "lm_head":
                    w = module.weight.data
                    if method == "int8":  # LLM.int8's weights: absmax per output row, round to nearest
                        scale = w.abs().amax(dim=1, keepdim=True) / 127
                        module.weight.data = torch.round(w / scale) * scale
                    else:
                        q, state = bnb.quantize_4bit(
                            w, blocksize=64, quant_type="nf4", compress_statistics=method == "nf4_dq"
                        )
                        module.weight.data = bnb.dequantize_4bit(q, state)
            return torch_model(torch.tensor(tokens, dtype=torch.long)).logits.double().numpy()

    def errors(got: Any, want: Any) -> dict[str, float]:
        def log_softmax(x: Any) -> Any:
            x = x - x.max(-1, keepdims=True)
            return x - np.log(np.exp(x).sum(-1, keepdims=True))

        lp, lq = log_softmax(want), log_softmax(got)
        return {
            "relative_rms": float(np.sqrt(((got - want) ** 2).mean() / (want**2).mean())),
            "kl": float((np.exp(lp) * (lp - lq)).sum(-1).mean()),
            "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).mean()),
        }

    reference = kithara_logits(None)
    with torch.no_grad():
        torch_reference = torch_model(torch.tensor(tokens, dtype=torch.long)).logits.double().numpy()
    rows = [{"method": "float32 (kithara vs transformers)", "kithara": errors(reference, torch_reference)}]
    for method in METHODS:
        rows.append(
            {
                "method": method,
                "kithara": errors(kithara_logits(method), reference),
                "bitsandbytes": errors(bnb_logits(method), torch_reference),
            }
        )
    return rows


RSS_CHILD = """
import json, re, sys, time
from pathlib import Path
import numpy as np, optax, kithara
from bench.quantization import LORA, config_of


def peak_gib():  # VmHWM: this process's own peak (ru_maxrss would carry the parent's across fork + exec)
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 2**20


path, method, steps, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
quantization = config_of(None if method == "bfloat16" else method)
lora = kithara.LoraConfig(**LORA)
model = kithara.KerasHubModel.from_preset(path, precision="bfloat16", quantization=quantization, lora=lora)
loaded = peak_gib()
rng = np.random.default_rng(0)
tokens = rng.integers(0, model.backbone.vocabulary_size, (16, seq + 1)).astype(np.int32)
ones = np.ones(seq, bool)
rows = [{"token_ids": t[:-1], "padding_mask": ones, "labels": t[1:], "label_mask": ones} for t in tokens]
loader = kithara.Dataloader(rows, 1)
history = kithara.Trainer(model, optax.adam(1e-3), loader, steps=steps, progress_bar=False).train()
peak = peak_gib()
row = {"method": method, "load_gib": loaded, "peak_gib": peak, "seconds": time.perf_counter() - start}
print("RSS_ROW " + json.dumps({**row, "loss": [h["loss"] for h in history]}))
"""


def host_rss(config: dict[str, Any], directory: Path, steps: int, seq: int) -> list[dict[str, Any]]:
    """Peak RSS of a child loading the checkpoint (bfloat16 base or quantized while reading) and training LoRA."""
    write_checkpoint(config, directory, dtype="bfloat16")
    rows = []
    for method in ("bfloat16", *METHODS):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
        done = subprocess.run(
            [sys.executable, "-c", RSS_CHILD, str(directory), method, str(steps), str(seq)],
            capture_output=True,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
        line = next((x for x in done.stdout.splitlines() if x.startswith("RSS_ROW ")), None)
        rows.append(json.loads(line[8:]) if line else {"method": method, "error": done.stderr[-400:]})
    return rows


def bench_quantization(*, smoke: bool, out: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        results: dict[str, Any] = {
            "bytes": base_bytes(("tiny",) if smoke else ("llama-3.2-1b", "llama-3-8b", "gemma-2-9b")),
            "quality": quality(SMOKE_MODEL if smoke else QUALITY_MODEL, tmp_path / "quality"),
            "host_rss": host_rss(
                SMOKE_MODEL if smoke else RSS_MODEL, tmp_path / "rss", 2 if smoke else 3, 32 if smoke else 256
            ),
            "step_memory": step_memory(smoke, 5 * 60 if smoke else 40 * 60),
        }
    (out / "quantization.json").write_text(json.dumps(results, indent=2))
    (out / "quantization.md").write_text(markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    """The suite's tables, as docs/performance.md shows them."""
    gb = 2**30
    lines = ["#### Bytes of the base (weights only, bfloat16 = 2 bytes per weight)", ""]
    lines += ["| model | base | projections GiB | ratio | whole model GiB | ratio |", "|---|---|---|---|---|---|"]
    for r in results["bytes"]:
        kernels = f"{r['kernels_bytes'] / gb:.2f} | {r['kernels_ratio']:.3f}" if r["kernels_bytes"] else "- | 1"
        lines.append(
            f"| {r['shape']} | {r['method']} | {kernels} | {r['total_bytes'] / gb:.2f} | {r['total_ratio']:.3f} |"
        )
    lines += ["", "#### LoRA step, per-device memory from XLA's compiled memory analysis (GiB)", ""]
    lines += ["| target | model | seq | base | arguments | temporaries | peak |", "|---|---|---|---|---|---|---|"]
    for r in results["step_memory"]:
        if "error" in r:
            lines.append(f"| {r['target']} | {r['shape']} | {r['seq']} | {r['label']} | {r['error'][:80]} | | |")
        else:
            lines.append(
                f"| {r['target']} | {r['shape']} | {r['seq']:,} | {r['label']} | {r['argument_gib']:.2f} "
                f"| {r['temp_gib']:.2f} | {r['peak_gib']:.2f} |"
            )
    lines += ["", "#### Logits of the quantized base against the float model", ""]
    lines += ["| base | who | relative RMS error | KL(float ‖ quantized) | top-1 agreement |", "|---|---|---|---|---|"]
    for r in results["quality"]:
        for who in ("kithara", "bitsandbytes"):
            if who in r:
                e = r[who]
                lines.append(
                    f"| {r['method']} | {who} | {e['relative_rms']:.4f} | {e['kl']:.2e} | {e['top1_agreement']:.3f} |"
                )
    lines += ["", "#### Host memory of loading a checkpoint and training LoRA on this CPU (VmHWM, GiB)", ""]
    lines += ["| base | after loading | peak | seconds | losses |", "|---|---|---|---|---|"]
    for r in results["host_rss"]:
        if "error" in r:
            lines.append(f"| {r['method']} | error: {r['error'][-80:]} | | | |")
        else:
            losses = ", ".join(f"{x:.3f}" for x in r["loss"])
            lines.append(
                f"| {r['method']} | {r['load_gib']:.2f} | {r['peak_gib']:.2f} | {r['seconds']:.0f} | {losses} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    result = bench_quantization(smoke="--smoke" in sys.argv, out=Path("bench/results"))
    print(json.dumps(result, indent=2))
