"""Runs benchmark configurations in this (fresh) process and prints their results.

    python -m bench.child '[{"kind": "sft", ...}, ...]'

Used by ``bench.common.run_child``; the last line of output holds the results, with this
process's peak resident memory.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")


def runner(kind: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    if kind == "sft":
        from bench.sft import train_once
    elif kind == "dpo":
        from bench.dpo import train_once
    elif kind == "overhead":
        from bench.overhead import train_once
    elif kind == "cycle":
        from bench.cycle import train_once
    elif kind == "trl_sft":
        from bench.trl_compare import trl_sft as train_once
    elif kind == "trl_dpo":
        from bench.trl_compare import trl_dpo as train_once
    elif kind == "grpo":
        from bench.rl import kithara_grpo as train_once
    elif kind == "peers_weights":
        from bench.peers import write_weights as train_once
    elif kind == "peers_kithara":
        from bench.peers import kithara_once as train_once
    elif kind == "trl_grpo":
        from bench.rl import trl_grpo as train_once
    else:
        raise SystemExit(f"unknown benchmark kind {kind!r}")
    return train_once


def main() -> None:
    specs = json.loads(sys.argv[1])
    cores = {s.get("cores") for s in specs} - {None}
    if cores:  # before any framework starts its thread pools (XLA and torch size them from the affinity)
        (n,) = cores
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
    flags = {s.get("xla_flags") for s in specs} - {None, ""}
    if flags:  # XLA reads them when its backend starts
        (extra,) = flags
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {extra}".strip()
    # Import each framework before reading the baseline memory.
    if any(s["kind"].startswith("trl") for s in specs):
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401
    if any(not s["kind"].startswith("trl") for s in specs):
        import jax  # noqa: F401
        import keras  # noqa: F401

        import kithara  # noqa: F401
    from bench.common import finish_child, rss_now_mib

    after_import = rss_now_mib()
    finish_child([runner(spec["kind"])(spec) for spec in specs], after_import)


if __name__ == "__main__":
    main()
