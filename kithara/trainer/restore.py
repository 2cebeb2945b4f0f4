"""Where a run starts: a checkpoint to restore, chosen from the trainer's checkpointer and
``train(resume_from_checkpoint=...)``, or nothing (a fresh state)."""

from __future__ import annotations

import os

from etils import epath

from kithara.callbacks import Checkpointer


def checkpoint_to_restore(
    checkpointer: Checkpointer | None, resume_from_checkpoint: bool | str | os.PathLike | None
) -> tuple[Checkpointer | None, int | None]:
    """``(checkpointer to restore from, step)`` (step None: its latest), or ``(None, None)``
    to start fresh. ``resume_from_checkpoint``: None resumes from ``checkpointer`` when it
    holds a checkpoint and its ``resume`` is set; True requires one; False refuses a
    directory that holds checkpoints (the new saves would mix with them); a path names a
    step directory or a directory of steps."""
    latest = checkpointer.latest_step() if checkpointer is not None else None
    if isinstance(resume_from_checkpoint, str | os.PathLike):
        return checkpoint_location(os.fspath(resume_from_checkpoint))
    if resume_from_checkpoint is True:
        if checkpointer is None or latest is None:
            where = f"in {checkpointer.save_dir!r}" if checkpointer is not None else "(no output_dir or checkpointer)"
            raise FileNotFoundError(f"resume_from_checkpoint=True, but there is no checkpoint {where}.")
        return checkpointer, None
    if resume_from_checkpoint is False:
        if checkpointer is not None and latest is not None:
            raise ValueError(
                f"resume_from_checkpoint=False, but {checkpointer.save_dir!r} holds checkpoints (latest step "
                f"{latest}) that this run's saves would mix with: use another output_dir / save_dir, or resume."
            )
        return None, None
    if checkpointer is not None and checkpointer.resume and latest is not None:
        return checkpointer, None
    return None, None


def checkpoint_location(path: str) -> tuple[Checkpointer, int | None]:
    """A read-only checkpointer over ``path`` (nothing there is cleaned up or deleted) and the
    step to restore: ``path`` is one step's directory (``.../checkpoints/200``: that step)
    or a directory of steps (the latest)."""
    where = epath.Path(path)
    if not where.exists():
        raise FileNotFoundError(f"resume_from_checkpoint={path!r} does not exist.")
    if where.name.isdigit() and (where / "state").exists():
        return Checkpointer(os.fspath(where.parent), read_only=True), int(where.name)
    checkpointer = Checkpointer(path, read_only=True)
    if checkpointer.latest_step() is None:
        raise FileNotFoundError(
            f"resume_from_checkpoint={path!r} holds no complete checkpoint: give a checkpoint step directory "
            "(e.g. output_dir/checkpoints/200) or the directory holding them."
        )
    return checkpointer, None
