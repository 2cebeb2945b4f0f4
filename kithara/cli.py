"""Command line: ``kithara train CONFIG.yaml [--set key=value ...]``, ``kithara demo``,
``kithara config [CONFIG.yaml]`` and ``kithara serve MODEL_DIR`` (see docs/cli.md, docs/serve.md)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from kithara.logs import set_verbosity


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kithara", description="Post-train language models with JAX and Keras.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("train", "train from a YAML config"),
        ("demo", "train the demo (kithara/configs/demo.yaml): a small Llama on the bundled string-operation task"),
        ("config", "print the resolved configuration (the demo's without CONFIG) and exit"),
    ):
        p = sub.add_parser(name, help=help_text)
        if name != "demo":
            p.add_argument("config", nargs="?" if name == "config" else None, help="YAML config file")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set args.max_steps=100 (repeatable); relative paths are "
            "relative to the working directory",
        )
        p.add_argument("--log-level", default="INFO")
    _add_serve_parser(sub)
    return parser


def _add_serve_parser(sub: Any) -> None:
    from kithara.serve.config import ServeConfig

    default = ServeConfig("")
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (see docs/serve.md)")
    p.add_argument(
        "model_dir", help="a Hugging Face or keras-hub model directory, or a training checkpoint (with --base)"
    )
    p.add_argument(
        "--base", help="for a training checkpoint: the model directory it was trained from, or the run's YAML config"
    )
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer directory (default: MODEL_DIR's, else --base's)")
    p.add_argument("--model-name", help="the model id clients pass (default: MODEL_DIR's directory name)")
    p.add_argument("--host", default=default.host)
    p.add_argument("--port", type=int, default=default.port)
    p.add_argument("--max-batch-size", type=int, default=default.max_batch_size, help="rows per generate call")
    p.add_argument("--max-model-len", type=int, help="prompt + completion tokens at most")
    p.add_argument("--default-max-tokens", type=int, default=default.default_max_tokens)
    p.add_argument("--batch-wait-ms", type=float, default=default.batch_wait_ms)
    p.add_argument(
        "--stream-segment-tokens",
        type=int,
        default=default.stream_segment_tokens,
        help="a streamed completion is generated this many tokens at a time",
    )
    p.add_argument("--precision", help="compute precision (default float32; a YAML --base uses the run's)")
    p.add_argument("--sharding", help="sharding strategy of the model's mesh (dp, fsdp, fsdp_tp)")
    p.add_argument("--log-requests", action="store_true", help="log each request's prompt")
    p.add_argument("--log-level", default="INFO")


def _serve(args: argparse.Namespace) -> int:
    """``kithara serve``: plain log lines (a server's log is read as a file, not a terminal)."""
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    set_verbosity(args.log_level)
    for noisy in ("jax._src.xla_bridge", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from kithara.serve import ServeConfig, serve

    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig) if f.name != "model_dir"}
    try:
        serve(ServeConfig(args.model_dir, **fields))
    except (ValueError, FileNotFoundError, TypeError, ImportError) as error:
        logging.getLogger(__name__).debug("Stopped by a configuration error.", exc_info=True)
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    # force: importing kithara (orbax, through absl) already gave the root logger a WARNING-level
    # handler, which would make this call a no-op and hide every INFO line.
    logging.basicConfig(
        level=args.log_level.upper(), format="%(message)s", handlers=[RichHandler(show_path=False)], force=True
    )
    set_verbosity(args.log_level)  # kithara's logger has its own level (kithara/logs.py)
    for noisy in ("jax._src.xla_bridge", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # transformers (tokenizers only here) advises at import that PyTorch is absent; kithara never needs it.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    console = Console()
    try:
        from kithara.config import DEMO_CONFIG, load_config, to_yaml

        path = getattr(args, "config", None)
        if path is None:  # kithara demo, or kithara config without a file: the demo, paths from the working dir
            config = load_config(DEMO_CONFIG, args.overrides, relative_to=Path.cwd())
        else:
            config = load_config(path, args.overrides)
        if args.command == "config":
            console.print(to_yaml(config), markup=False, highlight=False, soft_wrap=True)
            return 0
        from kithara.run import run

        result = run(config)
    except (ValueError, FileNotFoundError, TypeError, NotImplementedError) as error:
        logging.getLogger(__name__).debug("Stopped by a configuration or data error.", exc_info=True)
        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        return 2
    import jax

    if jax.process_index() == 0:  # one report per job, not one per host
        _report(console, result)
    return 0


def _report(console: Console, result: dict[str, Any]) -> None:
    table = Table("metric", "value", title=f"kithara run ({result.get('objective', 'sft')})")
    table.add_row("parameters (trainable)", f"{result['num_params']:,} ({result['trainable_params']:,})")
    if "first_loss" in result:
        table.add_row("train loss first -> last", f"{result['first_loss']:.4f} -> {result['final_loss']:.4f}")
        table.add_row("steps run", f"{result['steps_run']:,}")
        table.add_row("tokens/s (steady state)", f"{result['tokens_per_second']:,.0f}")
    if "eval" in result:
        e = dict(result["eval"])
        if "perplexity" in e:
            table.add_row(
                "eval loss / perplexity / token acc",
                f"{e['loss']:.4f} / {e['perplexity']:.3f} / {e['token_accuracy']:.3f}",
            )
        elif "rewards/accuracies" in e:
            table.add_row("eval loss", f"{e['loss']:.4f}")
            table.add_row(
                "eval reward accuracy / margin", f"{e['rewards/accuracies']:.3f} / {e['rewards/margins']:.4f}"
            )
        else:  # the objective's own metrics (cycle: per direction)
            for name, value in sorted(e.items()):
                table.add_row(f"eval {name}", f"{value:.4f}")
    if "exact_match_after" in result:
        table.add_row(
            "held-out exact match before -> after",
            f"{result['exact_match_before']:.1%} -> {result['exact_match_after']:.1%}",
        )
    console.print(table)
    for prompt, generated, reference in result.get("samples", []):
        mark = "[green]ok[/]" if generated == reference else "[red]x[/]"
        console.print(
            f"  {mark} {escape(repr(prompt))} -> {escape(repr(generated))} (expected {escape(repr(reference))})",
            highlight=False,
        )
    if result.get("tensorboard_dir"):
        console.print(f"TensorBoard logs: tensorboard --logdir {result['tensorboard_dir']}", highlight=False)


if __name__ == "__main__":
    sys.exit(main())
