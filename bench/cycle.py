"""Cycle training: two models versus one model with two adapters (memory and step time).

Not measured yet: cycle training has not landed in kithara. When it does, this suite runs
each arrangement in its own child (``bench.common.run_configs``) like bench/dpo.py, and
reports step time and peak memory of one-model-two-adapters relative to two models.
"""

from __future__ import annotations

from typing import Any


def bench_cycle() -> dict[str, Any]:
    import kithara

    landed = hasattr(kithara, "CycleTrainer")
    note = (
        "Skipped: kithara.CycleTrainer exists but bench/cycle.py does not measure it yet."
        if landed
        else "Skipped: cycle training has not landed in kithara yet (bench/cycle.py is where it goes)."
    )
    return {"skipped": True, "note": note}
