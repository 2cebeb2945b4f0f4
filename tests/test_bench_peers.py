"""The peers suite's fairness checks (bench/peers.py): both frameworks see the same tokens and
targets, a different model or a different loss stops the suite, and Tunix's side imports no
kithara code (it runs in Tunix's own environment)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import peers
from bench.report import markdown

SPEC = {"size": "tiny", "steps": 3, "seq": 32, "batch": 2}


def test_sft_rows_supervise_what_tunix_default_loss_predicts():
    for r in peers.sft_rows(SPEC):
        ids, labels, mask = r["token_ids"], r["labels"], r["label_mask"]
        assert len(ids) == 32 and r["padding_mask"].all()
        # Tunix: logits[:, :-1] against input_tokens[:, 1:] under input_mask[:, 1:]
        assert (labels[:-1] == ids[1:]).all()
        assert mask[:-1].all() and not mask[-1]


def test_dpo_rows_are_the_same_pairs_for_both_frameworks():
    ours, theirs = peers.dpo_rows(SPEC), peers.dpo_rows(SPEC, tunix=True)
    assert len(ours) == len(theirs) == 2 * (3 + 2)
    prompt = 32 // 4
    for a, b in zip(ours, theirs, strict=True):
        assert b["prompt_ids"].shape == (prompt,) and b["prompt_mask"].all()
        for side in ("chosen", "rejected"):
            # the same forward tokens: Tunix concatenates prompt and answer
            assert (np.r_[b["prompt_ids"], b[f"{side}_ids"]] == a[f"{side}_token_ids"]).all()
            # kithara's supervised labels are exactly Tunix's completion tokens, in order
            assert (a[f"{side}_labels"][a[f"{side}_label_mask"]] == b[f"{side}_ids"]).all()
            assert b[f"{side}_mask"].all()


def _side(**changes):
    side = {"params": 100, "losses": [8.0, 7.0, 6.0], "step_s": 0.1, "tokens_per_s": 1000.0, "compile_s": 2.0,
            "peak_rss_mib": 800.0, "loss_is_finite": True, "trainable_params": 100, "framework": "x"}  # fmt: skip
    return {**side, **changes}


def test_compare_refuses_other_models_and_other_losses():
    spec = {**SPEC, "objective": "sft"}
    with pytest.raises(SystemExit, match="parameters"):
        peers.compare(spec, _side(), _side(params=101), "tunix")
    with pytest.raises(SystemExit, match="step-0 losses"):
        peers.compare(spec, _side(), _side(losses=[8.0 * (1 + 4e-6), 7.0, 6.0]), "tunix")  # Tunix's RoPE bug's size
    row = peers.compare(spec, _side(tokens_per_s=900.0, compile_s=1.0), _side(losses=[8.0 * (1 + 1e-7), 7.0, 6.5]),
                        "tunix")  # fmt: skip
    assert row["tokens_per_s_ratio"] == pytest.approx(0.9) and row["compile_ratio"] == pytest.approx(0.5)
    assert row["max_loss_abs_diff"] == pytest.approx(0.5) and row["step0_check"] == "losses"
    # DPO starts at log 2 whatever the model: its check is on the summed log-probabilities
    dpo = {**SPEC, "objective": "dpo"}
    same_loss = [0.6931, 0.69, 0.68]
    with pytest.raises(SystemExit, match="logps_chosen"):
        peers.compare(dpo, _side(losses=same_loss, logps_chosen=[-800.0]),
                      _side(losses=same_loss, logps_chosen=[-800.01]), "tunix")  # fmt: skip
    row = peers.compare(dpo, _side(losses=same_loss, logps_chosen=[-800.0]),
                        _side(losses=same_loss, logps_chosen=[-800.0]), "tunix")  # fmt: skip
    assert row["step0_check"] == "logps_chosen" and row["step0_rel_diff"] == 0.0
    # a peer on batches of its own (MaxText): kithara's score on that batch is the check, and the
    # later losses (other batches) are not compared
    own = peers.compare(spec, _side(score=8.5), _side(losses=[8.5, 1.0, 0.5]), "maxtext")
    assert own["step0_loss"] == [8.5, 8.5] and "max_loss_abs_diff" not in own
    with pytest.raises(SystemExit, match="MaxText"):
        peers.compare(spec, _side(score=8.5), _side(losses=[8.6]), "maxtext")
    table = markdown({"machine": {}, "command": "c", "peers": [row, own]})
    assert "Peers on the same backend" in table and "logps_chosen 0.0e+00" in table and "**1.00x**" in table
    assert "| sft | tiny | MaxText |" in table and "- (own batches)" in table


def test_token_rows_supervise_every_target_of_a_peer_batch():
    tokens = [[5, 6, 7, 8], [9, 10, 11, 12]]
    data = peers.token_rows(tokens)
    assert [r["token_ids"].tolist() for r in data] == [[5, 6, 7], [9, 10, 11]]
    assert [r["labels"].tolist() for r in data] == [[6, 7, 8], [10, 11, 12]]
    assert all(r["label_mask"].all() and r["padding_mask"].all() for r in data)


def test_missing_peer_environment_says_how_to_make_it(tmp_path, monkeypatch):
    absent = {**peers.PEERS, "maxtext": (tmp_path / "absent", *peers.PEERS["maxtext"][1:])}
    monkeypatch.setattr(peers, "PEERS", absent)
    with pytest.raises(SystemExit, match=r"maxtext .*absent.*peers-maxtext.txt.*make bench"):
        peers.bench_peers(["tiny"], steps=1, seq=8, batch=1, repeats=1)


def test_tunix_side_imports_no_kithara_code():
    # bench.peers_tunix runs in Tunix's environment, where kithara is not installed
    code = (
        "import sys, bench.peers_tunix, bench.peers_maxtext, bench.peers, bench.dpo; "
        "assert not [m for m in sys.modules if m.split('.')[0] in ('kithara', 'keras')], 'kithara imported'"
    )
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True)


def test_threads_and_trl_cores_tables():
    row = {"variant": "1 core", "size": "medium", "global_batch": 16, "seq_len": 256, "step_s": 2.0,
           "tokens_per_s": 2048.0, "speed_vs_default": 0.6, "compile_s": 9.0, "peak_rss_mib": 1500.0}  # fmt: skip
    table = markdown({"machine": {}, "command": "c", "threads": [row]})
    assert "| 1 core | medium | 16x256 | 2.0000 | 2,048 | **0.60x** | 9.0 | 1,500 |" in table
