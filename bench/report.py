"""Markdown tables of a benchmark run (bench/results/results.md and docs/performance.md).

    python -m bench.report bench/results/results.json --docs docs/performance.md

puts a full run's tables into docs/performance.md, between its ``bench:latest`` markers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.data import table as data_table
from bench.rl import table as rl_table


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _with_device_memory(header: list[str], body: list[list[str]], rows: list[dict[str, Any]]) -> str:
    """The table, with a device-memory column when the run was on an accelerator."""
    if any("device_peak_mib" in r for r in rows):
        header = [*header, "device peak (MiB)"]
        body = [[*cells, f"{r.get('device_peak_mib', float('nan')):,.0f}"] for cells, r in zip(body, rows, strict=True)]
    return _table(header, body)


def sft_table(rows: list[dict[str, Any]]) -> str:
    header = ["size", "LoRA", "params", "trainable", "batch x seq", "step (s)", "compile (s)", "tokens/s", "MFU",
              "peak RSS (MiB)"]  # fmt: skip
    body = [
        [r["size"], _yes(r["lora"]), f"{r['params']:,}", f"{r['trainable_params']:,}",
         f"{r['global_batch']}x{r['seq_len']}", f"{r['step_s']:.4f}", f"{r['compile_s']:.2f}",
         f"{r['tokens_per_s']:,.0f}", f"{r['mfu']:.3f}", f"{r['peak_rss_mib']:,.0f}"]
        for r in rows
    ]  # fmt: skip
    return _with_device_memory(header, body, rows)


def overhead_table(rows: list[dict[str, Any]]) -> str:
    header = ["size", "params", "raw jit step (s)", "trainer program (s)", "Trainer.train() (s)",
              "program / raw", "overhead (train / raw)", "min-max over rounds",
              "XLA FLOPs / bytes, program / raw", "bytes without clipping"]  # fmt: skip
    body = [
        [r["size"], f"{r['params']:,}", f"{r['raw_step_s']:.4f}", f"{r['program_step_s']:.4f}",
         f"{r['trainer_step_s']:.4f}", f"{r['program_overhead']:.3f}", f"**{r['overhead']:.3f}**",
         f"{r['overhead_min']:.3f}-{r['overhead_max']:.3f} ({r['rounds']} rounds)",
         f"{r.get('program_flops_ratio', float('nan')):.3f} / {r.get('program_bytes_ratio', float('nan')):.3f}",
         f"{r.get('noclip_program_bytes_ratio', float('nan')):.3f}"]
        for r in rows
    ]  # fmt: skip
    return _table(header, body)


def trl_table(rows: list[dict[str, Any]]) -> str:
    header = ["objective", "size", "params", "batch x seq", "cores", "kithara step (s)", "TRL step (s)",
              "kithara tokens/s", "TRL tokens/s", "tokens/s ratio", "kithara peak (MiB)", "TRL peak (MiB)",
              "memory ratio"]  # fmt: skip
    names = {"peak_rss_mib": "host RSS", "device_peak_mib": "device"}
    body = [
        [r["objective"], r["size"], f"{r['params']:,}", f"{r['global_batch']}x{r['seq_len']}",
         str(r.get("cores", r.get("torch_threads", ""))), f"{r['kithara']['step_s']:.4f}", f"{r['trl']['step_s']:.4f}",
         f"{r['kithara']['tokens_per_s']:,.0f}",
         f"{r['trl']['tokens_per_s']:,.0f}", f"**{r['tokens_per_s_ratio']:.2f}x**",
         f"{r['kithara'][r['memory_measure']]:,.0f} ({names[r['memory_measure']]})",
         f"{r['trl'][r['memory_measure']]:,.0f}", f"{r['memory_ratio']:.2f}"]
        for r in rows
    ]  # fmt: skip
    return _table(header, body)


def threads_table(rows: list[dict[str, Any]]) -> str:
    """kithara's SFT step under XLA:CPU thread and layout settings (bench/cpu_threads.py)."""
    header = ["variant", "size", "batch x seq", "step (s)", "tokens/s", "vs 2 cores", "compile (s)", "peak RSS (MiB)"]
    body = [
        [r["variant"], r["size"], f"{r['global_batch']}x{r['seq_len']}", f"{r['step_s']:.4f}",
         f"{r['tokens_per_s']:,.0f}", f"**{r['speed_vs_default']:.2f}x**", f"{r['compile_s']:.1f}",
         f"{r['peak_rss_mib']:,.0f}"]
        for r in rows
    ]  # fmt: skip
    return _table(header, body)


def peers_table(rows: list[dict[str, Any]]) -> str:
    """kithara against its peers on the same backend (bench/peers.py): every ratio kithara / peer.
    The program columns are XLA's cost analysis of each side's compiled step (FLOPs, and layout
    copies left outside fusions)."""
    names = {"tunix": "Tunix", "maxtext": "MaxText"}
    header = ["objective", "size", "peer", "params (trainable k / p)", "batch x seq", "step-0 check", "max loss diff",
              "step k / p (s)", "tokens/s k / p", "tokens/s ratio", "compile k / p (s)", "peak RSS k / p (MiB)",
              "memory ratio", "GFLOP k / p", "copies k / p"]  # fmt: skip
    body = []
    for r in rows:
        k, t = r["kithara"], r["other"]
        trainable = "" if r["objective"] != "sft_lora" else f" ({k['trainable_params']:,} / {t['trainable_params']:,})"
        kp, tp = k.get("program"), t.get("program")
        flops = f"{kp['flops'] / 1e9:,.1f} / {tp['flops'] / 1e9:,.1f}" if kp and tp else "-"
        copies = f"{kp['copies']} / {tp['copies']}" if kp and tp else "-"
        diff = f"{r['max_loss_abs_diff']:.1e}" if "max_loss_abs_diff" in r else "- (own batches)"
        body.append([
            r["objective"], r["size"], names.get(r["peer"], r["peer"]), f"{r['params']:,}{trainable}",
            f"{r['global_batch']}x{r['seq_len']}", f"{r['step0_check']} {r['step0_rel_diff']:.1e}", diff,
            f"{k['step_s']:.4f} / {t['step_s']:.4f}", f"{k['tokens_per_s']:,.0f} / {t['tokens_per_s']:,.0f}",
            f"**{r['tokens_per_s_ratio']:.2f}x**", f"{k['compile_s']:.1f} / {t['compile_s']:.1f}",
            f"{k['peak_rss_mib']:,.0f} / {t['peak_rss_mib']:,.0f}", f"{r['memory_ratio']:.2f}", flops, copies,
        ])  # fmt: skip
    return _table(header, body)


def dpo_table(rows: list[dict[str, Any]]) -> str:
    header = ["objective", "LoRA", "size", "batch x seq", "step (s)", "vs SFT", "tokens/s", "setup (s)",
              "peak RSS (MiB)", "vs SFT"]  # fmt: skip
    names = {"sft": "SFT (chosen only)", "copy": "DPO, frozen copy", "precomputed": "DPO, precomputed",
             "adapter_off": "DPO, adapters off"}  # fmt: skip
    body = [
        [names[r["mode"]], _yes(r["lora"]), r["size"], f"{r['batch']}x{r['seq']}", f"{r['step_s']:.4f}",
         f"{r['step_vs_sft']:.2f}x", f"{r['tokens_per_s']:,.0f}", f"{r['setup_s']:.2f}", f"{r['peak_rss_mib']:,.0f}",
         f"{r['memory_vs_sft']:.2f}x"]
        for r in rows
    ]  # fmt: skip
    return _with_device_memory(header, body, rows)


def cycle_table(rows: list[dict[str, Any]]) -> str:
    header = ["mode", "size", "batch x seq", "weights (MiB)", "trainable (MiB)", "optimizer (MiB)", "vs two models",
              "step (s)", "vs two models", "compile (s)", "tokens/s", "peak RSS (MiB)", "vs two models"]  # fmt: skip
    mib = 2**20
    names = {"two_models": "two models", "two_adapters": "one base, two LoRA adapters"}
    body = [
        [names[r["mode"]], r["size"], f"{r['batch']}x{r['seq']}", f"{r['weights_bytes'] / mib:.2f}",
         f"{r['trainable_bytes'] / mib:.2f}", f"{r['optimizer_bytes'] / mib:.2f}", f"{r['weights_vs_two_models']:.2f}x",
         f"{r['step_s']:.4f}", f"{r['step_vs_two_models']:.2f}x", f"{r['compile_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
         f"{r['peak_rss_mib']:,.0f}", f"{r['memory_vs_two_models']:.2f}x"]
        for r in rows
    ]  # fmt: skip
    return _with_device_memory(header, body, rows)


def data_section(rows: list[dict[str, Any]], sft_rows: list[dict[str, Any]]) -> str:
    text = data_table(rows)
    if rows and sft_rows:
        fastest = max(sft_rows, key=lambda r: r["tokens_per_s"])
        text += (
            f"\n\nInput versus training: the fastest training run above ({fastest['size']}, "
            f"{'LoRA' if fastest['lora'] else 'full'}) consumes {fastest['tokens_per_s']:,.0f} real tokens/s "
            f"({1 / fastest['step_s']:,.1f} steps/s)."
        )
        for r in rows:
            per_batch = r["padded_batch_tokens_per_s"] / r["padded_batches_per_s"]
            text += (
                f"\n- {r['data']} (padded): {r['end_to_end_tokens_per_s']:,.0f} real tokens/s counting the "
                f"tokenization of every row ({r['end_to_end_tokens_per_s'] / fastest['tokens_per_s']:,.1f}x the "
                f"training rate); once encoded, {r['padded_batches_per_s']:,.0f} batches/s of {per_batch:,.0f} real "
                f"tokens ({r['padded_batch_tokens_per_s'] / fastest['tokens_per_s']:,.0f}x)."
            )
    return text


def _machine(m: dict[str, Any]) -> str:
    """``cpu (x86_64), 1 device, 2 cores, load 0.56 at the start`` from ``bench.common.machine()``."""
    words = [f"{m.get('device_kind', '?')} ({m.get('cpu', '?')})", f"{m.get('devices', '?')} JAX device(s)",
             f"{m.get('cores', '?')} cores"]  # fmt: skip
    if "load_avg_1m" in m:
        words.append(f"load average {m['load_avg_1m']:.2f} at the start")
    return ", ".join(words)


def markdown(results: dict[str, Any]) -> str:
    parts = [f"Machine: {_machine(results['machine'])}", f"Command: `{results['command'].strip()}`"]
    if results.get("commit"):
        parts.append(f"Commit: {results['commit']}, {results.get('date', 'date not recorded')}.")
    peak = results.get("peak")
    if peak:
        parts.append(
            f"Peak: {peak['peak_flops'] / 1e9:,.1f} GFLOP/s, best of a jitted float32 "
            f"{peak['matmul_size']}x{peak['matmul_size']} matmul (median {peak['median_flops'] / 1e9:,.1f})."
        )
    sections = [
        ("SFT throughput, compile time, memory, MFU", "sft", sft_table),
        ("Framework overhead", "overhead", overhead_table),
        ("Side by side with TRL", "trl", trl_table),
        ("XLA:CPU threads and layout", "threads", threads_table),
        ("DPO reference modes against SFT", "dpo", dpo_table),
        ("Peers on the same backend: Tunix and MaxText", "peers", peers_table),
    ]
    for title, key, render in sections:
        if results.get(key):
            parts.append(f"### {title}\n\n{render(results[key])}")
    if results.get("data"):
        parts.append(f"### Data loading\n\n{data_section(results['data'], results.get('sft') or [])}")
    if results.get("cycle"):
        parts.append(
            f"### Cycle training: two models vs one base with two LoRA adapters\n\n{cycle_table(results['cycle'])}"
        )
    if results.get("rl"):
        parts.append(f"### Online RL (GRPO) side by side with TRL\n\n{rl_table(results['rl'])}")
    return "\n\n".join(parts) + "\n"


BEGIN, END = "<!-- bench:latest:begin -->", "<!-- bench:latest:end -->"


def update_docs(doc: Path, results: dict[str, Any]) -> None:
    """Replaces what lies between the ``bench:latest`` markers of ``doc`` with the tables
    of ``results`` (a full run: smoke figures mean nothing and are refused)."""
    if results.get("smoke"):
        raise SystemExit("refusing to put a --smoke run's figures into the docs: run the full `make bench`")
    text = doc.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{doc} needs one {BEGIN} line followed by one {END} line")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    tables = markdown(results).replace("\n### ", "\n#### ")
    doc.write_text(f"{head}{BEGIN}\n{tables}{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a run's results.json")
    parser.add_argument("--docs", type=Path, required=True, help="the markdown file to update")
    args = parser.parse_args()
    update_docs(args.docs, json.loads(args.results.read_text()))


if __name__ == "__main__":
    main()
