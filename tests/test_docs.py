"""Code blocks in docs/ marked ``<!-- runs -->`` run as written (from the repository root)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKED = re.compile(r"<!-- runs -->\n```python\n(.*?)```", re.S)


def marked_blocks() -> list[tuple[str, str]]:
    return [
        (f"{path.name}#{i}", code)
        for path in sorted((ROOT / "docs").glob("*.md"))
        for i, code in enumerate(MARKED.findall(path.read_text()))
    ]


RUNNER = """
import json, sys, traceback
blocks = json.loads(sys.stdin.read())
for name, code in blocks:
    try:
        exec(compile(code, name, "exec"), {"__name__": "__main__"})
    except BaseException:
        print(f"BLOCK FAILED: {name}")
        traceback.print_exc()
        sys.exit(1)
    print(f"block ok: {name}", flush=True)
"""


def test_the_marked_blocks_are_the_expected_ones():
    names = [name.split("#")[0] for name, _ in marked_blocks()]
    assert {"sft.md", "dpo.md", "iterative_sft.md", "cycle.md"} <= set(names)


@pytest.mark.slow
def test_marked_doc_blocks_run_as_written():
    import json

    blocks = marked_blocks()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # as a user runs them: JAX's default devices
    done = subprocess.run(
        [sys.executable, "-c", RUNNER], input=json.dumps(blocks), cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert done.stdout.count("block ok:") == len(blocks)
