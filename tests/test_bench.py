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
