"""Every ```python block of README.md and docs/*.md runs as written, on tiny models.

Each page runs in order, every block in a fresh namespace unless it follows the marker
``<!-- continues -->`` (then it runs in the previous block's namespace). Each page runs in
its own empty temporary directory, where ``kithara/assets`` points at the bundled assets,
so relative paths such as ``"kithara/assets/demo/train.jsonl"`` work and nothing is written
outside it. All pages share one subprocess (importing JAX and Keras once).

Two other markers:

- ``<!-- signature -->``: the block lists call signatures (``kithara.Trainer(model, *,
  ...)``); each must name a real callable whose parameters, in order, and defaults are
  those shown.
- ``<!-- needs: REASON -->``: the block is not run (it needs hardware or services a test
  machine lacks); the reason is listed, and there must be few.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- (?P<marker>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)
MAX_EXCLUDED = 4


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    code: str
    marker: str | None

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def kind(self) -> str:
        if self.marker is None or self.marker == "continues":
            return "run"
        if self.marker == "signature":
            return "signature"
        if self.marker.startswith("needs:"):
            return "excluded"
        raise ValueError(f"{self.name}: unknown marker <!-- {self.marker} -->")


def blocks() -> list[Block]:
    found = []
    for path in PAGES:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("code"))  # the ```python line, 1-based
            page = str(path.relative_to(ROOT))
            found.append(Block(page, line, match.group("code"), match.group("marker")))
    return found


def test_every_python_block_is_run_checked_or_excluded_with_a_reason():
    found = blocks()
    kinds = [block.kind for block in found]  # raises on an unknown marker
    excluded = [block for block in found if block.kind == "excluded"]
    reasons = {block.name: block.marker.removeprefix("needs:").strip() for block in excluded}
    print(f"{kinds.count('run')} blocks run, {kinds.count('signature')} signatures checked, excluded: {reasons}")
    assert all(len(reason) > 10 for reason in reasons.values()), reasons
    assert len(excluded) <= MAX_EXCLUDED, reasons
    assert kinds.count("run") >= 30
    for block in found:
        if block.marker == "continues":
            before = [b for b in found if b.page == block.page and b.line < block.line]
            assert before and before[-1].kind == "run", f"{block.name} continues no block"


# -- signatures ----------------------------------------------------------------------------


def signature_entries(code: str) -> list[tuple[str, str]]:
    """(dotted callable name, parameter text) for each ``name(...)`` starting a line."""
    entries = []
    for match in re.finditer(r"^([A-Za-z_][\w.]*)\(", code, re.M):
        depth, start = 1, match.end()
        for i in range(start, len(code)):
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            if depth == 0:
                entries.append((match.group(1), code[start:i]))
                break
    return entries


def resolve(dotted: str):
    import kithara

    target = {"kithara": kithara}[dotted.split(".")[0]]
    for part in dotted.split(".")[1:]:
        target = getattr(target, part)
    return target


def shown_parameters(params: str) -> list[tuple[str, str, str | None]]:
    """(name, kind, default source) of ``params`` written as a def's parameter list."""
    args = ast.parse(f"def f({params}): pass").body[0].args
    shown = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + args.defaults
    for arg, default in zip(positional, defaults, strict=True):
        shown.append((arg.arg, "positional", default and ast.unparse(default)))
    if args.vararg:
        shown.append((args.vararg.arg, "*args", None))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        shown.append((arg.arg, "keyword", default and ast.unparse(default)))
    if args.kwarg:
        shown.append((args.kwarg.arg, "**kwargs", None))
    return shown


KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: "positional",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
    inspect.Parameter.VAR_POSITIONAL: "*args",
    inspect.Parameter.KEYWORD_ONLY: "keyword",
    inspect.Parameter.VAR_KEYWORD: "**kwargs",
}


def test_signature_blocks_match_the_code():
    import kithara

    checked = 0
    for block in (b for b in blocks() if b.kind == "signature"):
        entries = signature_entries(block.code)
        assert entries, f"{block.name}: no signature found"
        for dotted, params in entries:
            target = resolve(dotted)
            if params.strip() == "...":  # "the same arguments": the name must exist
                continue
            actual = [
                (p.name, KINDS[p.kind], None if p.default is p.empty else p.default)
                for p in inspect.signature(target).parameters.values()
                if p.name != "self"
            ]
            shown = shown_parameters(params)
            where = f"{block.name}: {dotted}"
            assert [s[:2] for s in shown] == [a[:2] for a in actual], f"{where}: {shown} != {actual}"
            for (name, _, default_source), (_, _, default) in zip(shown, actual, strict=True):
                shown_default = None if default_source is None else eval(default_source, {"kithara": kithara})
                assert shown_default == default, f"{where}: {name}={default_source} but the code has {default!r}"
            checked += 1
    assert checked >= 8


# -- running -------------------------------------------------------------------------------

RUNNER = """
import json, os, sys, time, traceback
pages = json.loads(sys.stdin.read())
home = os.getcwd()
failed = 0
for page, page_blocks in pages.items():
    directory = os.path.join(home, page.replace("/", "_"))
    os.makedirs(os.path.join(directory, "kithara"))
    os.symlink(os.environ["KITHARA_ASSETS"], os.path.join(directory, "kithara", "assets"))
    os.chdir(directory)
    namespace = None
    for name, code, continues in page_blocks:
        if not continues or namespace is None:
            namespace = {"__name__": "__main__"}
        start, cpu = time.perf_counter(), time.process_time()
        try:
            exec(compile(code, name, "exec"), namespace)
        except BaseException:
            print(f"BLOCK FAILED: {name}", flush=True)
            traceback.print_exc(file=sys.stdout)
            failed += 1
            break  # the page's later blocks may continue this one
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        print(f"block ok: {name} ({wall:.1f} s, {cpu:.1f} s CPU)", flush=True)
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_python_blocks_run_as_written(tmp_path):
    pages: dict[str, list] = {}
    to_run = [block for block in blocks() if block.kind == "run"]
    for block in to_run:
        pages.setdefault(block.page, []).append((block.name, block.code, block.marker == "continues"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KITHARA_ASSETS": str(ROOT / "kithara" / "assets")}
    env["XLA_FLAGS"] = xla_flags()  # as a user runs them: JAX's default devices
    done = subprocess.run(
        [sys.executable, "-c", RUNNER], input=json.dumps(pages), cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-4000:]
    assert done.stdout.count("block ok:") == len(to_run)
