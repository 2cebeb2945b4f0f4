"""Unknown names as errors that name the closest known spelling.

kithara spells each concept one way (TRL's name where TRL has one). A keyword argument or
config field it does not know is refused with the nearest known name: first from
``ALIASES``, other spellings users bring from TRL, transformers or older kithara, then by
string similarity.

Example:
    >>> check_names(["max_seq_length"], ["max_length", "packing"], "SFTConfig")
    TypeError: SFTConfig: unknown argument 'max_seq_length'; did you mean 'max_length'?
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

# Other spelling -> kithara's names for it, most likely first. A name is suggested only if
# the caller knows it, so one table serves configs, trainers and model builders.
ALIASES: Mapping[str, tuple[str, ...]] = {
    "max_seq_len": ("max_length",),
    "max_seq_length": ("max_length",),
    "max_len": ("max_length",),
    "seq_len": ("max_length",),
    "truncation": ("truncation_mode",),
    "truncation_side": ("truncation_mode",),
    "per_device_batch_size": ("per_device_train_batch_size",),
    "train_batch_size": ("per_device_train_batch_size",),
    "batch_size": ("batch_size_per_side", "per_device_train_batch_size"),
    "eval_batch_size": ("per_device_eval_batch_size",),
    "steps": ("max_steps",),
    "num_steps": ("max_steps",),
    "train_steps": ("max_steps",),
    "total_steps": ("max_steps",),
    "epochs": ("num_train_epochs",),
    "num_epochs": ("num_train_epochs",),
    "log_steps_interval": ("logging_steps",),
    "log_steps": ("logging_steps",),
    "log_every": ("logging_steps",),
    "eval_steps_interval": ("eval_steps",),
    "eval_interval": ("eval_steps",),
    "eval_every": ("eval_steps",),
    "eval_epochs_interval": ("eval_epochs",),
    "evaluation_strategy": ("eval_strategy",),  # transformers' name before 4.46
    "tokenizer": ("processing_class",),
    "lr": ("learning_rate",),
    "scheduler": ("lr_scheduler_type",),
    "lr_scheduler": ("lr_scheduler_type",),
    "warmup": ("warmup_steps",),
    "grad_accum": ("gradient_accumulation_steps",),
    "gradient_accumulation": ("gradient_accumulation_steps",),
    "accumulation_steps": ("gradient_accumulation_steps",),
    "grad_clip": ("max_grad_norm",),
    "clip_grad_norm": ("max_grad_norm",),
    "gradient_clipping": ("max_grad_norm",),
    "optimizer": ("optim",),
    "beta1": ("adam_beta1",),
    "beta2": ("adam_beta2",),
    "eps": ("adam_epsilon",),
    "tensorboard_dir": ("logging_dir",),
    "log_dir": ("logging_dir",),
    "checkpoint_dir": ("output_dir",),
    "save_dir": ("output_dir",),
    "checkpoint_interval": ("save_steps",),
    "save_interval": ("save_steps",),
    "max_checkpoints": ("save_total_limit",),
    "max_to_keep": ("save_total_limit",),
    "progress_bar": ("disable_tqdm",),
    "dtype": ("precision",),
    "torch_dtype": ("precision",),
}

_MAX_LISTED = 30  # known names listed when an unknown one has no close match


def suggest(name: str, known: Iterable[str]) -> str | None:
    """The known name ``name`` most likely stands for, or ``None`` (also when ``name`` is
    itself known): an ``ALIASES`` entry, the same name up to case and underscores
    (``learningRate``), or the closest match by ``difflib``."""
    candidates = sorted(set(known))
    if name in candidates:
        return None
    for target in ALIASES.get(name, ()):
        if target in candidates:
            return target
    squashed = {_squash(k): k for k in candidates}
    if _squash(name) in squashed:
        return squashed[_squash(name)]
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


def check_names(
    given: Iterable[str],
    known: Iterable[str],
    where: str,
    *,
    what: str = "argument",
    unsupported: Mapping[str, str] | None = None,
    docs: str | None = None,
    error: type[Exception] = TypeError,
) -> None:
    """Raises ``error`` (``TypeError``) naming every name of ``given`` not in ``known``, each with its
    closest known spelling when there is one.

    Args:
        given: the names to check (keyword arguments, mapping keys).
        known: the valid names.
        where: what the names were given to, e.g. ``"SFTConfig"``; starts the message.
        what: what a name is, for the message (``"argument"``, ``"loss type"``).
        unsupported: names that are known elsewhere (TRL, transformers) but not here, with
            the reason or the way to do it in kithara.
        docs: where the valid names are documented; without it, they are listed when an
            unknown name has no close match.
        error: the exception class (``ValueError`` for values, such as a loss type).
    """
    known_set = set(known)
    unsupported = unsupported or {}
    unknown = list(dict.fromkeys(n for n in given if n not in known_set))
    if not unknown:
        return
    lines, unmatched = [], False
    for name in unknown:
        if name in unsupported:
            lines.append(f"{what} {name!r} is not supported: {unsupported[name]}")
            continue
        match = suggest(name, known_set)
        if match is None:
            unmatched = True
            lines.append(f"unknown {what} {name!r}")
        else:
            lines.append(f"unknown {what} {name!r}; did you mean {match!r}?")
    hint = ""
    if unmatched:
        if docs is not None:
            hint = f" (see {docs})"
        else:
            listed = ", ".join(repr(n) for n in sorted(known_set)[:_MAX_LISTED])
            more = f", ... ({len(known_set)} in all)" if len(known_set) > _MAX_LISTED else ""
            hint = f" (known: {listed}{more})" if known_set else " (none are accepted)"
    if len(lines) == 1:
        raise error(f"{where}: {lines[0]}{hint}")
    raise error(f"{where}:\n  " + "\n  ".join(lines) + (f"\n {hint}" if hint else ""))


def _squash(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")
