"""Runs one benchmark configuration in this (fresh) process and prints its result.

    python -m bench.child KIND '[JSON spec, ...]'

Used by ``bench.common.run_child``; the last line of output holds the results, with this
process's peak resident memory.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")


def main() -> None:
    kind, specs = sys.argv[1], json.loads(sys.argv[2])
    if kind.startswith("trl"):
        import torch  # noqa: F401  (imported before measuring the baseline)
        import transformers  # noqa: F401
        import trl  # noqa: F401

        import bench.trl_compare as module
    else:
        import jax  # noqa: F401  (imported before measuring the baseline)
        import keras  # noqa: F401

        import kithara  # noqa: F401
    from bench.common import finish_child, rss_now_mib

    after_import = rss_now_mib()
    if kind == "sft":
        from bench.sft import train_once
    elif kind == "dpo":
        from bench.dpo import train_once
    elif kind == "overhead":
        from bench.overhead import train_once
    elif kind == "trl_sft":
        train_once = module.trl_sft
    elif kind == "trl_dpo":
        train_once = module.trl_dpo
    else:
        raise SystemExit(f"unknown benchmark kind {kind!r}")
    finish_child([train_once(spec) for spec in specs], after_import)


if __name__ == "__main__":
    main()
