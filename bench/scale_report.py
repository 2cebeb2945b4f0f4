"""Markdown tables of the ``scale`` suite's results (bench/scale.py)."""

from __future__ import annotations

from typing import Any

GiB = 2**30
TARGET_NAMES = {"v5e:2x4": "TPU v5e 2x4", "v5p:2x2x2": "TPU v5p 2x2x2", "cpu": "CPU backend, 8 forced devices"}


def _gib(x: float | None) -> str:
    """GiB with two decimals (MiB for the tiny shapes of a smoke run)."""
    if x is None:
        return "-"
    return f"{x / GiB:.2f}" if abs(x) >= GiB / 100 else f"{x / 2**20:.2f} MiB"


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return ""
    if "oom" in entry:
        oom = entry["oom"]
        return f"OOM ({oom['layers']} layers: {_gib(oom['temp_bytes'])} temp)"
    if "falls" in entry:  # not extrapolable: the shallow compiles' temporaries fall with depth
        return "n/e (" + ", ".join(f"{d} layers: {_gib(t)}" for d, t in entry["falls"].items()) + " temp)"
    if "peak_bytes" not in entry:
        return "not measured" if entry.get("error", "").startswith(NOT_MEASURED) else "failed"
    text = f"{_gib(entry['peak_bytes'])} ({_gib(entry['temp_bytes'])})"
    if "squeezed" in entry:  # XLA may have rematerialised a small-depth program to fit: a lower bound
        text = "≥ " + text
    return text + (" =" if entry.get("no_effect") else "")


NOT_MEASURED = "not measured"


def measured(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries that got a figure, an OOM or an error of their own (not those the time budget cut)."""
    return [e for e in entries if not e.get("error", "").startswith(NOT_MEASURED) or "oom" in e]


def memory_tables(results: dict[str, Any]) -> list[str]:
    entries = measured(results["memory"])
    lines: list[str] = []
    for target in dict.fromkeys(e["target"] for e in entries):
        mine = [e for e in entries if e["target"] == target]
        seqs = sorted({e["seq"] for e in mine})
        lines += [
            f"#### Per-chip memory, {TARGET_NAMES.get(target, target)}: peak (temporaries) in GiB",
            "",
            "| model | layers | configuration | " + " | ".join(f"{s:,}" for s in seqs) + " | how |",
            "|---|---|---|" + "---|" * len(seqs) + "---|",
        ]
        for model in dict.fromkeys(e["model"] for e in mine):
            for config in dict.fromkeys(e["config"] for e in mine if e["model"] == model):
                row = {e["seq"]: e for e in mine if e["model"] == model and e["config"] == config}
                methods = {e.get("method", "") for e in row.values() if "method" in e}
                layers = next(iter(row.values()))["layers"]
                lines.append(
                    f"| {model} | {layers} | {config} | "
                    + " | ".join(_cell(row.get(s)) for s in seqs)
                    + f" | {', '.join(sorted(methods))} |"
                )
        lines.append("")
    lines += [
        "Peak = arguments (bf16 weights, AdamW moments, batch) + temporaries + outputs not aliased to "
        "the donated state, per chip, from `compiled.memory_analysis()`. `=`: the program is identical to "
        "the configuration it adds to (the option changed nothing: not implemented yet, or ignored there). "
        "OOM: XLA refused to compile for the target: the program's temporaries alone exceed the chip's HBM "
        "even at the depth shown (what XLA said they need in parentheses). XLA checks temporaries only, "
        "not the arguments, and rematerialises on its own to get under the limit, so v5e temporaries near "
        "15.75 GiB are what XLA squeezed, and a peak past 16 GiB with arguments does not fit a v5e chip. "
        "`≥`: extrapolated from a small-depth compile whose temporaries reached 75% of the chip's usable "
        "HBM, which XLA may have rematerialised to fit, so the per-layer slope and the figure are lower "
        "bounds (the v5p rows, with 95 GiB, are not squeezed). `n/e`: not extrapolable: the two "
        "small-depth compiles' temporaries fall with depth (under remat a layer adds only its saved input, "
        "less than XLA's scheduling differences between a 1- and a 2-layer program), so they give no "
        "per-layer cost; the scanned rows compile the full depth instead.",
        "",
    ]
    return lines


def fits_table(results: dict[str, Any]) -> list[str]:
    rows = results["fits"]
    if not rows:
        return []
    lines = [
        "#### Largest measured sequence that fits 16 GiB (a v5e chip) and 95 GiB (a v5p chip)",
        "",
        "| target | model | configuration | sequences measured | fits 16 GiB | fits 95 GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        seqs = ", ".join(f"{s:,}" for s in r["seqs"])
        fit16, fit95 = (
            (f"{r[f'fits_{b}GiB']:,}" if r[f"fits_{b}GiB"] else "none")
            + (" (longer: ?)" if r[f"unknown_{b}GiB"] else "")
            for b in (16, 95)
        )
        lines.append(f"| {r['target']} | {r['model']} | {r['config']} | {seqs} | {fit16} | {fit95} |")
    return [*lines, ""]


def goals_lines(results: dict[str, Any]) -> list[str]:
    lines = ["#### Issue 19's goals (v5e 2x4, sequence 8,192, full fine-tuning with AdamW)", ""]
    for g in results["goals"]:
        if not g["measured"]:
            lines.append(f"- {g['model']} within {g['budget_gib']:g} GiB: not measured.")
            continue
        if "peak_gib" not in g:
            tried = ", ".join(f"`{c}`" for c in g["oom_configs"])
            lines.append(
                f"- {g['model']} within {g['budget_gib']:g} GiB: not reached: {tried} do not compile for a "
                "v5e chip (out of HBM); the others were not measured."
            )
            continue
        verdict = "reached" if g["reached"] else f"not reached: {g['over_gib']:.2f} GiB over"
        lines.append(
            f"- {g['model']} within {g['budget_gib']:g} GiB: best configuration `{g['config']}` needs "
            f"{g['peak_gib']:.2f} GiB ({g['argument_gib']:.2f} arguments + {g['temp_gib']:.2f} temporaries): "
            f"{verdict}."
        )
    return [*lines, ""]


def checks_table(results: dict[str, Any]) -> list[str]:
    checked = [e for e in results["memory"] if "checked" in e]
    if not checked:
        return []
    lines = [
        "#### Depth extrapolation against a full-depth compile",
        "",
        "| target | model | configuration | seq | layers | extrapolated peak (temp) | compiled peak (temp) | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in checked:
        c = e["checked"]
        lines.append(
            f"| {e['target']} | {e['model']} | {e['config']} | {e['seq']:,} | {e['layers']} | "
            f"{_gib(e['peak_bytes'])} ({_gib(e['temp_bytes'])}) | {_gib(c['peak_bytes'])} ({_gib(c['temp_bytes'])}) | "
            f"{100 * e['check_error']:+.1f}% |"
        )
    return [*lines, ""]


def compile_depth_table(results: dict[str, Any]) -> list[str]:
    rows = results["compile_depth"]
    if not rows:
        return []
    first = rows[0]
    lines = [
        f"#### Compile time against depth ({first['shape']}, {first['target']}, seq {first['seq']:,})",
        "",
        "| layers | unscanned: compile s (CPU s) | scanned: compile s (CPU s) |",
        "|---|---|---|",
    ]

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return ""
        if not r["ok"]:
            return "failed: " + r["error"].splitlines()[-1][:80]
        return f"{r['compile_s']:.1f} ({r['compile_cpu_s']:.1f})"

    by = {(r["layers"], bool(r["scale"].get("scan_layers"))): r for r in rows}
    for layers in sorted({r["layers"] for r in rows}):
        lines.append(f"| {layers} | {cell(by.get((layers, False)))} | {cell(by.get((layers, True)))} |")
    return [*lines, ""]


def step_time_table(results: dict[str, Any]) -> list[str]:
    step = results.get("step_time")
    if not step:
        return []
    if not step["ok"]:
        return ["#### Step time of remat policies", "", f"failed: {step['error']}", ""]
    job = step["job"]
    lines = [
        f"#### Step time of remat policies on this CPU ({job['shape']}, {job['rows']}x{job['seq']}, float32, "
        f"{step['rounds']} rounds of {step['steps_per_round']} steps each, policies side by side)",
        "",
        "| remat | step (s) | step / no remat (median, min-max) | compile (s) |",
        "|---|---|---|---|",
    ]
    for p in step["policies"]:
        if "error" in p:
            lines.append(f"| {p['policy']} | failed: {p['error'][:100]} | | |")
            continue
        ratio = (
            "1"
            if p["policy"] == "none"
            else f"**{p['ratio_vs_none']:.2f}x** ({p['ratio_min']:.2f}-{p['ratio_max']:.2f})"
        )
        lines.append(f"| {p['policy']} | {p['step_s']:.4f} | {ratio} | {p['compile_s']:.1f} |")
    return [*lines, ""]


def same_programs(results: dict[str, Any]) -> list[str]:
    seen: dict[str, list[str]] = {}
    for e in results["memory"]:
        if e.get("no_effect"):
            seen.setdefault(f"{e['config']}: {e['no_effect']}", []).append(f"{e['target']} {e['model']} {e['seq']}")
    if not seen:
        return []
    lines = ["#### Configurations whose program equals another's (`=` above)", ""]
    for what, where in seen.items():
        more = f" (+{len(where) - 3} more)" if len(where) > 3 else ""
        lines.append(f"- {what}: {', '.join(where[:3])}{more}")
    return [*lines, ""]


def errors_list(results: dict[str, Any]) -> list[str]:
    seen: dict[str, list[str]] = {}
    cut = len(results["memory"]) - len(measured(results["memory"]))
    for e in measured(results["memory"]):
        if "error" in e and "oom" not in e and "falls" not in e:  # n/e cells are explained under the tables
            what = f"{e['target']} {e['model']} {e['config']} {e['seq']}"
            seen.setdefault(e["error"].strip().splitlines()[-1][:300], []).append(what)
    lines = (
        [
            f"{cut} (target, model, configuration, sequence) entries of the plan were not measured: the time "
            "budget ran out before them.",
            "",
        ]
        if cut
        else []
    )
    if not seen:
        return lines
    lines += ["#### Configurations that failed", ""]
    for error, where in seen.items():
        more = f" (+{len(where) - 3} more)" if len(where) > 3 else ""
        lines.append(f"- {', '.join(where[:3])}{more}: {error}")
    return [*lines, ""]


def scale_markdown(results: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines = [
        "### Scale: kithara's train step at real model sizes",
        "",
        f"{versions}; {results['seconds'] / 60:.1f} minutes."
        + (" Smoke run: tiny shapes." if results["smoke"] else ""),
        "",
        *goals_lines(results),
        *memory_tables(results),
        *fits_table(results),
        *checks_table(results),
        *compile_depth_table(results),
        *step_time_table(results),
        *same_programs(results),
        *errors_list(results),
    ]
    return "\n".join(lines)
