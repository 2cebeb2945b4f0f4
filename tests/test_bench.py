"""The benchmarks' arithmetic: tokens counted, FLOPs per token, MFU, steady-state summaries."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from bench.common import SIZES, mfu, real_tokens, rows
from bench.dpo import pairs
from bench.report import markdown
from bench.sft import build_model, summarize


def test_rows_pad_and_count_only_real_tokens():
    data = rows(8, 16, 100, seed=1)
    lengths = [int(r["padding_mask"].sum()) for r in data]
    assert all(8 <= n <= 16 for n in lengths) and len(set(lengths)) > 1
    batch = {k: np.stack([r[k] for r in data]) for k in data[0]}
    assert real_tokens(batch) == sum(lengths) < batch["token_ids"].size
    # label masks never exceed the real tokens; ragged pairs count both sequences
    assert all((r["label_mask"] <= r["padding_mask"]).all() for r in data)
    pair_batch = {"chosen_padding_mask": np.ones((2, 4), bool), "rejected_padding_mask": np.eye(2, 4, dtype=bool)}
    assert real_tokens(pair_batch) == 8 + 2
    assert all(int(r["padding_mask"].sum()) == 16 for r in rows(4, 16, 100, full=True))


def test_full_pairs_fill_the_sequence_and_supervise_answers_only():
    for row in pairs(3, 32, 100, full=True):
        for side in ("chosen", "rejected"):
            assert len(row[f"{side}_token_ids"]) == 32
            mask = row[f"{side}_label_mask"]
            # labels[t] is token t+1: the prompt's 8 tokens give 7 unsupervised labels
            assert not mask[:7].any() and mask[7:].all()
        assert (row["chosen_token_ids"][:8] == row["rejected_token_ids"][:8]).all()


def test_flops_per_token_full_and_lora_against_hand_count():
    arch, seq = SIZES["tiny"], 32
    d, inter, vocab, layers = arch["hidden_dim"], arch["intermediate_dim"], arch["vocab_size"], arch["num_layers"]
    head_dim = d // arch["num_heads"]
    kv = arch["num_kv_heads"] * head_dim
    # q, k, v, o projections and the gated MLP, per layer, plus the LM head
    base = layers * (d * d + 2 * d * kv + d * d + 3 * d * inter) + vocab * d
    attention = 4 * layers * seq * arch["num_heads"] * head_dim  # scores and values, full square
    full = build_model("tiny", lora=False).flops_per_token(seq)
    assert full == 6 * base + 3 * attention == 589_824
    model = build_model("tiny", lora=True)
    variables = model.variables
    lora = sum(v.size for p, v in {**variables.trainable, **variables.non_trainable}.items() if "lora_kernel" in p)
    # LoRA: forward 2(base + lora) + attention; backward: activations through every weight
    # (2 base + 2 attention) and weight gradients for the adapters only (4 lora)
    assert model.flops_per_token(seq) == 2 * (base + lora) + attention + 2 * base + 2 * attention + 4 * lora


def test_mfu_and_steady_state_summary():
    assert mfu(6e6, 1000.0, 2e10) == pytest.approx(0.3)
    history = [
        {"step_time": 5.0, "tokens": 100.0, "loss": 2.0},  # compiles
        {"step_time": 0.3, "tokens": 100.0, "loss": 1.9},
        {"step_time": 0.1, "tokens": 60.0, "loss": 1.8},
        {"step_time": 0.3, "tokens": 90.0, "loss": 1.7},
        {"step_time": 0.2, "tokens": 30.0, "loss": 1.6},
    ]
    out = summarize(history)
    assert out["step_s"] == 0.2
    assert out["compile_s"] == pytest.approx(4.8)
    assert out["tokens_per_s"] == pytest.approx((60 + 90 + 30) / 0.6)
    assert out["final_loss"] == 1.6


def test_report_renders_every_section():
    sft = {"size": "tiny", "lora": False, "params": 10, "trainable_params": 10, "global_batch": 4, "seq_len": 8,
           "step_s": 0.01, "compile_s": 1.0, "tokens_per_s": 100.0, "mfu": 0.1, "peak_rss_mib": 500.0}  # fmt: skip
    side = {"step_s": 0.1, "tokens_per_s": 10.0, "peak_rss_mib": 600.0}
    results = {
        "machine": {"cores": 2},
        "command": "python -m bench.run",
        "peak": {"peak_flops": 1e11, "median_flops": 9e10, "matmul_size": 512},
        "sft": [sft],
        "overhead": [
            {
                "size": "tiny",
                "params": 10,
                "raw_step_s": 0.01,
                "program_step_s": 0.01,
                "trainer_step_s": 0.0102,
                "program_overhead": 1.0,
                "overhead": 1.02,
                "overhead_min": 1.0,
                "overhead_max": 1.05,
                "rounds": 3,
            }
        ],
        "trl": [
            {
                "objective": "sft",
                "size": "tiny",
                "params": 10,
                "global_batch": 4,
                "seq_len": 8,
                "kithara": side,
                "trl": side,
                "tokens_per_s_ratio": 1.0,
                "memory_measure": "peak_rss_mib",
                "memory_ratio": 1.0,
            }
        ],
        "dpo": [
            {
                "mode": "copy",
                "lora": False,
                "size": "tiny",
                "batch": 4,
                "seq": 8,
                "step_s": 0.02,
                "step_vs_sft": 2.0,
                "tokens_per_s": 90.0,
                "setup_s": 0.1,
                "peak_rss_mib": 550.0,
                "memory_vs_sft": 1.1,
            }
        ],
        "data": [
            {
                "data": "chat",
                "rows": 3,
                "max_length": 8,
                "encode_rows_per_s": 10.0,
                "padded_batches": 2,
                "packed_batches": 1,
                "packing_speedup": 2.0,
                "padded_fill": 0.5,
                "packed_fill": 0.9,
                "padded_batch_tokens_per_s": 1000.0,
                "packed_batch_tokens_per_s": 900.0,
                "padded_batches_per_s": 50.0,
                "end_to_end_tokens_per_s": 500.0,
            }
        ],
        "cycle": [
            {
                "mode": mode,
                "size": "tiny",
                "batch": 8,
                "seq": 16,
                "weights_bytes": weights * 2**20,
                "trainable_bytes": 2**20,
                "optimizer_bytes": 2 * 2**20,
                "weights_vs_two_models": weights / 2.0,
                "step_s": 0.01,
                "step_vs_two_models": 1.0,
                "compile_s": 1.0,
                "tokens_per_s": 100.0,
                "peak_rss_mib": 800.0,
                "memory_vs_two_models": 1.0,
            }
            for mode, weights in (("two_models", 2.0), ("two_adapters", 1.1))
        ],
    }
    text = markdown(results)
    for title in ("SFT throughput", "Framework overhead", "Side by side with TRL", "DPO reference", "Data loading",
                  "Cycle training"):  # fmt: skip
        assert f"### {title}" in text
    assert "**1.020**" in text and "5.0x the training rate" in text
    assert "| one base, two LoRA adapters | tiny | 8x16 | 1.10 | 1.00 | 2.00 | 0.55x |" in text


def test_accelerator_runs_compare_device_memory():
    from bench.common import peak_memory_mib
    from bench.trl_compare import compare

    host = {"params": 10, "framework": "trl", "torch_threads": 2, "step_s": 0.1, "tokens_per_s": 50.0,
            "loss_is_finite": True, "final_loss": 1.0, "peak_rss_mib": 900.0}  # fmt: skip
    row = compare("sft", "tiny", 4, 8, {**host, "tokens_per_s": 100.0}, {**host, "peak_rss_mib": 600.0})
    assert row["memory_measure"] == "peak_rss_mib" and row["memory_ratio"] == 1.5
    assert row["tokens_per_s_ratio"] == 2.0 and row["trl_device"] == "cpu"
    gpu = compare("sft", "tiny", 4, 8, {**host, "device_peak_mib": 300.0},
                  {**host, "device_peak_mib": 400.0, "device": "cuda"})  # fmt: skip
    assert gpu["memory_measure"] == "device_peak_mib" and gpu["memory_ratio"] == 0.75 and gpu["trl_device"] == "cuda"
    assert peak_memory_mib({"peak_rss_mib": 900.0, "device_peak_mib": 300.0}) == 300.0
    assert peak_memory_mib({"peak_rss_mib": 900.0}) == 900.0
    with pytest.raises(SystemExit, match="models differ"):
        compare("sft", "tiny", 4, 8, {**host, "params": 11}, host)
    table = markdown({"machine": {}, "command": "c", "trl": [gpu],
                      "sft": [{"size": "tiny", "lora": False, "params": 10, "trainable_params": 10, "global_batch": 4,
                               "seq_len": 8, "step_s": 0.01, "compile_s": 1.0, "tokens_per_s": 100.0, "mfu": 0.1,
                               "peak_rss_mib": 500.0, "device_peak_mib": 123.0}]})  # fmt: skip
    assert "| 300 (device) | 400 | 0.75 |" in table
    assert "device peak (MiB) |" in table and "| 123 |" in table


def test_kithara_never_imports_the_bench_frameworks():
    package = Path(__file__).resolve().parents[1] / "kithara"
    pattern = re.compile(r"^\s*(import|from)\s+(torch|trl)\b", re.MULTILINE)
    offenders = [str(p) for p in package.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_median_merge_of_repeated_runs():
    from bench.common import median_merge

    runs = [
        {"step_s": 3.0, "peak_rss_mib": 900.0, "loss_is_finite": True, "framework": "x", "steps": 4},
        {"step_s": 1.0, "peak_rss_mib": 700.0, "loss_is_finite": False, "framework": "y", "steps": 4},
        {"step_s": 2.0, "peak_rss_mib": 800.0, "loss_is_finite": True, "framework": "z", "steps": 4},
    ]
    merged = median_merge(runs)
    assert merged == {"step_s": 2.0, "peak_rss_mib": 800.0, "loss_is_finite": False, "framework": "x", "steps": 4,
                      "repeats": 3}  # fmt: skip
    # An even number of repeats: a varying count becomes its median, a constant one stays an int.
    pair = median_merge([{"params": 5_048_576, "steps": 4}, {"params": 5_048_576, "steps": 5}])
    assert pair == {"params": 5_048_576, "steps": 4.5, "repeats": 2}
    assert isinstance(pair["params"], int)


def test_update_docs_replaces_only_the_marked_tables(tmp_path):
    from bench.report import BEGIN, END, update_docs

    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\nprose before\n\n{BEGIN}\nold table\n{END}\n\nprose after\n")
    results = {"machine": {"cores": 2}, "command": "python -m bench.run", "commit": "abc1234", "date": "2026-11-21",
               "peak": {"peak_flops": 2e11, "median_flops": 1.9e11, "matmul_size": 2048}}  # fmt: skip
    update_docs(doc, results)
    text = doc.read_text()
    assert "old table" not in text and "prose before" in text and text.endswith(f"{END}\n\nprose after\n")
    assert "Commit: abc1234, 2026-11-21." in text and "Peak: 200.0 GFLOP/s" in text
    update_docs(doc, results)  # idempotent: the markers stay
    assert text == doc.read_text()
    with pytest.raises(SystemExit, match="smoke"):
        update_docs(doc, {**results, "smoke": True})
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="bench:latest:begin"):
        update_docs(doc, results)


def test_rl_suite_steady_figures_ratios_and_table():
    from bench.rl import alternating, compare, summarize_steps

    assert alternating(["p"] * 4, ["a", "b", "c", "d"], [[1], [2], [3], [4]]) == [0.0, 1.0, 0.0, 1.0]
    step = {"rows": 8, "prompt_tokens": 80, "completion_tokens": 160}
    records = [
        {**step, "step_s": 30.0, "rollout_s": 20.0, "generation_s": 19.0},  # compiles
        {**step, "step_s": 3.0, "rollout_s": 2.0, "generation_s": 1.5},
        {**step, "step_s": 1.0, "rollout_s": 0.5, "generation_s": 0.4},
        {**step, "step_s": 2.0, "rollout_s": 1.5, "generation_s": 1.1, "completion_tokens": 120},
    ]
    out = summarize_steps(records, skip=1)
    assert out["steps_measured"] == 3 and out["step_s"] == 2.0 and out["first_step_s"] == 30.0
    assert out["update_s"] == 0.5  # median of 1.0, 0.5, 0.5
    assert out["rollout_tokens_per_s"] == pytest.approx(440 / 4.0)
    assert out["generation_tokens_per_s"] == pytest.approx(440 / 3.0)
    assert out["update_tokens_per_s"] == pytest.approx((3 * 80 + 440) / 2.0)
    assert out["generation_share"] == pytest.approx(3.0 / 6.0) and out["rollout_share"] == pytest.approx(4.0 / 6.0)
    assert out["completion_tokens_per_step"] == pytest.approx(440 / 3)

    spec = {"size": "small", "steps": 4, "prompts_per_step": 2, "num_generations": 4, "max_prompt_length": 16,
            "max_completion_length": 20}  # fmt: skip
    side = {"params": 10, "step_s": 2.0, "rollout_tokens_per_s": 100.0, "generation_tokens_per_s": 120.0,
            "update_tokens_per_s": 400.0, "generation_share": 0.5, "completion_tokens_per_step": 160.0,
            "peak_rss_mib": 800.0, "loss_is_finite": True}  # fmt: skip
    ours = {**side, "step_s": 1.0, "rollout_tokens_per_s": 300.0, "update_tokens_per_s": 200.0,
            "completion_tokens_per_step": 152.0, "decode_compilations": 1, "peak_rss_mib": 1000.0}  # fmt: skip
    theirs = {**side, "framework": "trl", "torch_threads": 2}
    row = compare(spec, ours, theirs)
    assert row["rows_per_step"] == 8 and row["decode_compilations"] == 1
    assert row["rollout_tokens_per_s_ratio"] == 3.0 and row["update_tokens_per_s_ratio"] == 0.5
    assert row["step_ratio"] == 0.5 and row["memory_measure"] == "peak_rss_mib" and row["memory_ratio"] == 1.25
    assert row["kithara_fill"] == 0.95 and row["trl_fill"] == 1.0 and row["loss_is_finite"]
    gpu = compare(spec, {**ours, "device_peak_mib": 300.0}, {**theirs, "device_peak_mib": 600.0})
    assert gpu["memory_measure"] == "device_peak_mib" and gpu["memory_ratio"] == 0.5
    with pytest.raises(SystemExit, match="models differ"):
        compare(spec, {**ours, "params": 11}, theirs)
    text = markdown({"machine": {}, "command": "c", "rl": [row]})
    assert "### Online RL (GRPO) side by side with TRL" in text
    assert "| small | 10 | 2x4, 16/20 | 1.000 | 2.000 | 300 | 100 | **3.00x** | 200 | 400 | **0.50x** |" in text
    assert "| 50% / 50% | 95.0% / 100.0% | 1 | 1,000 (host RSS) | 800 | 1.25 |" in text


def test_rl_prompts_fit_one_decode_bucket():
    from bench.rl import prompts

    class Words:  # one token per word, plus a BOS
        def __call__(self, text):
            return {"input_ids": [1, *range(len(text.split()))]}

    out = prompts(5, 16, Words())
    assert len(out) == 5 and all(len(p.split()) == 15 for p in out)
    assert prompts(5, 16, Words()) == out  # seeded


def test_unallocated_model_lowers_kitharas_step_like_an_allocated_one():
    """bench/scale.py compiles real-size steps from abstract models: the step lowered from a model
    built in ``unallocated()`` is the one lowered from the same model with its weights."""
    import jax

    from bench.scale_child import abstract_inputs, build_model, build_trainer
    from kithara.models.keras_variables import is_allocated

    devices = jax.devices()
    abstract = build_model("tiny-gemma2", 2, devices, {"remat": "full"}, abstract=True)
    assert not any(is_allocated(v) for v in abstract._by_path.values())
    variables = abstract.variables
    leaf = variables.trainable["token_embedding/embeddings"]
    assert (
        isinstance(leaf, jax.ShapeDtypeStruct)
        and leaf.sharding == abstract.variable_shardings.trainable["token_embedding/embeddings"]
    )
    texts = []
    for model in (abstract, build_model("tiny-gemma2", 2, devices, {"remat": "full"}, abstract=False)):
        trainer = build_trainer(model, {})
        texts.append(trainer.lower_train_step(*abstract_inputs(trainer, 8, 16)).as_text())
    assert texts[0] == texts[1]
    # Tracing ran keras stateless scopes; the abstract model's variables were not allocated by them.
    assert not any(is_allocated(v) for v in abstract._by_path.values())


def test_scale_memory_job_and_its_cache(tmp_path):
    from bench.scale_child import memory

    job = {"kind": "memory", "target": "cpu", "shape": "tiny", "config": "today", "seq": 16, "layers": 1,
           "scale": {"activation_sharding": False}, "training": {}, "cache": str(tmp_path / "c.jsonl")}  # fmt: skip
    first = memory(job)
    assert first["temp_bytes"] > 0 and first["argument_bytes"] > 0 and "cached" not in first
    again = memory(job)
    assert again["cached"] and again["cache_key"] == first["cache_key"]
    assert {k: again[k] for k in ("temp_bytes", "argument_bytes")} == {
        k: first[k] for k in ("temp_bytes", "argument_bytes")
    }


def test_scale_plan_extrapolation_fits_goals_and_report():
    import json

    from bench.scale import PLANS, GiB, config_fields, extrapolate, goals, largest_fitting, plan_jobs
    from bench.scale_report import scale_markdown

    jobs = plan_jobs(PLANS["full"])
    assert len({json.dumps(j, sort_keys=True) for j in jobs}) == len(jobs)
    scanned = [j for j in jobs if j.get("scale", {}).get("scan_layers") and j["config"] != "compile_depth"]
    assert scanned and all(j["layers"] == 32 for j in scanned if j["shape"] == "llama-3-8b")
    assert config_fields("+attention", "v5e:2x4")[0]["attention"] == "splash"
    assert config_fields("+attention", "cpu")[0]["attention"] == "chunked"
    gemma = [j for j in jobs if j["shape"] == "gemma-2-9b" and j["config"] == "today"]
    assert {j["layers"] for j in gemma} == {2, 4}  # pairs of sliding and global layers

    def row(config, layers, temp, seq=8192, model="llama-3-8b", hlo="a"):
        job = {"target": "v5e:2x4", "shape": model, "config": config, "seq": seq, "layers": layers}
        sizes = {"temp_bytes": temp * GiB, "argument_bytes": 0.25 * layers * GiB, "output_bytes": 0.25 * layers * GiB,
                 "alias_bytes": 0.25 * layers * GiB}  # fmt: skip
        return {"job": job, "ok": True, "hlo_hash": hlo, **sizes}

    rows = [row("today", 1, 3.0), row("today", 2, 5.0), row("today", 32, 66.0),  # 1 + 2 per layer
            row("+act_sharding", 1, 3.0), row("+act_sharding", 2, 5.0),  # same programs: no effect
            row("+remat_full", 1, 1.0, hlo="b"), row("+remat_full", 2, 1.25, hlo="c"),
            row("+scan", 32, 8.0, hlo="d"), row("today", 1, 1.0, seq=1024, hlo="e"), row("today", 2, 1.5, seq=1024),
            # two layers in 12.3 GiB of a v5e chip's 15.75: XLA may have squeezed it, the slope is a lower bound
            row("+chunked_loss", 1, 12.0, seq=4096, hlo="f"), row("+chunked_loss", 2, 12.3, seq=4096, hlo="g"),
            # under remat a layer adds little: XLA's schedule of a 2-layer program can need less than a 1-layer one
            row("+remat_attention_out", 1, 2.55, seq=1024, hlo="h"),
            row("+remat_attention_out", 2, 2.37, seq=1024, hlo="i"),
            {"job": {"target": "v5e:2x4", "shape": "llama-3-8b", "config": "+attention", "seq": 8192, "layers": 1},
             "ok": False, "error": "ValueError: unknown attention"},
            {"job": {"target": "v5e:2x4", "shape": "llama-3-8b", "config": "+remat_full", "seq": 1024, "layers": 1},
             "ok": False, "error": "JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
             "required for HLO temporaries (23.00G) exceeds available HBM (15.75G)."}]  # fmt: skip
    entries = {(e["config"], e["seq"]): e for e in extrapolate(rows)}
    today = entries[("today", 8192)]
    assert today["temp_bytes"] == 65 * GiB and today["per_layer_temp_bytes"] == 2 * GiB
    assert today["peak_bytes"] == (65 + 8) * GiB  # arguments 32 x 0.25, outputs all aliased
    assert today["checked"]["temp_bytes"] == 66 * GiB and abs(today["check_error"] - (73 / 74 - 1)) < 1e-12
    assert entries[("+act_sharding", 8192)]["no_effect"] == "same program as today"
    assert "no_effect" not in entries[("+remat_full", 8192)]
    assert entries[("+remat_full", 8192)]["temp_bytes"] == (1 + 0.25 * 31) * GiB
    assert entries[("+scan", 8192)]["method"] == "compiled at full depth"
    assert entries[("+attention", 8192)]["error"] == "ValueError: unknown attention"
    assert entries[("+remat_full", 1024)]["oom"] == {"layers": 1, "temp_bytes": 23 * GiB, "hbm_bytes": 15.75 * GiB}
    squeezed = entries[("+chunked_loss", 4096)]
    assert squeezed["squeezed"] == {"layers": 2, "temp_bytes": 12.3 * GiB} and "squeezed" not in today
    falls = entries[("+remat_attention_out", 1024)]
    assert "peak_bytes" not in falls and falls["falls"] == {1: 2.55 * GiB, 2: 2.37 * GiB}
    assert falls["error"].startswith("temporaries fall with depth (1 layers: 2.55 GiB, 2: 2.37)")
    fits = {(r["config"]): r for r in largest_fitting(list(entries.values()))}
    # its lower bound (21.3 + 8 GiB) exceeds 16 GiB; whether it fits 95 GiB is unknown
    assert fits["+chunked_loss"]["fits_16GiB"] is None and fits["+chunked_loss"]["fits_95GiB"] is None
    assert fits["+chunked_loss"]["unknown_95GiB"] and not fits["+chunked_loss"]["unknown_16GiB"]
    assert fits["today"]["fits_16GiB"] is None and fits["today"]["fits_95GiB"] == 8192
    assert fits["+scan"]["fits_16GiB"] == 8192
    eight_b = goals(list(entries.values()))[0]
    # 16.00 GiB on a v5e chip whose usable HBM is 15.75 GiB: not reached, 0.25 over
    assert eight_b["config"] == "+scan" and not eight_b["reached"] and eight_b["peak_gib"] == 16.0
    assert eight_b["over_gib"] == 0.25
    text = scale_markdown({"smoke": False, "seconds": 60.0, "versions": {"jax": "0.10.2"},
                           "memory": list(entries.values()), "fits": largest_fitting(list(entries.values())),
                           "goals": goals(list(entries.values())), "compile_depth": [], "step_time": None})  # fmt: skip
    # columns 1,024 | 4,096 | 8,192
    assert "| llama-3-8b | 32 | today | 24.50 (16.50) |  | 73.00 (65.00) | extrapolated from 1 and 2 layers |" in text
    assert "| +act_sharding |  |  | 73.00 (65.00) = |" in text
    assert "| +scan |  |  | 16.00 (8.00) | compiled at full" in text
    assert "| v5e:2x4 | llama-3-8b | today | 8,192 | 32 | 73.00 (65.00) | 74.00 (66.00) | -1.4% |" in text
    assert "llama-3-8b within 15.75 GiB: best configuration `+scan` needs 16.00 GiB" in text
    assert "not reached: 0.25 GiB over." in text
    assert "| +chunked_loss |  | ≥ 29.30 (21.30) |  | extrapolated from 1 and 2 layers |" in text  # 1,024 4,096 8,192
    assert "| +remat_attention_out | n/e (1 layers: 2.55, 2 layers: 2.37 temp) |" in text
    assert "temporaries fall with depth" not in text.split("#### Configurations that failed")[-1]
    fits = {r["config"]: r for r in largest_fitting(list(entries.values()))}
    assert "+remat_attention_out" not in fits  # no figure, no bound: not in the fit table
    assert "ValueError: unknown attention" in text and "| OOM (1 layers: 23.00 temp) |  | 16.75 (8.75) |" in text


def test_scale_step_time_runs_policies_side_by_side():
    from bench.scale_child import step_time

    out = step_time({"shape": "tiny", "rows": 2, "seq": 16, "rounds": 2, "steps": 1, "policies": ("full",)})
    none, full = out["policies"]
    assert (none["policy"], full["policy"]) == ("none", "full") and none["ratio_vs_none"] == 1.0
    assert full["ratio_vs_none"] > 0 and full["ratio_min"] <= full["ratio_vs_none"] <= full["ratio_max"]
    assert full["first_loss"] == pytest.approx(none["first_loss"], rel=1e-5)  # remat recomputes; same loss
