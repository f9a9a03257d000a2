"""One run per out_dir: a training run claims its output directory before any work starts.

A second run into a used out_dir would overwrite the first run's checkpoints or sit beside them
(and `--resume auto` would then continue the wrong one), so `claim` refuses it unless the run
resumes what is there, or `overwrite` clears it first. A lock held for the whole run (released by
the kernel however the process ends, SIGKILL included) keeps two live runs apart; holding it also
means every temp file in the directory is a killed save's leftover, which is removed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from litattn import checkpoint as ckpt
from litattn.utils import remove_stale_temps

try:
    import fcntl  # POSIX only: the out_dir lock
except ImportError:
    fcntl = None

LOCK_FILE = ".litattn.lock"
RUN_OUTPUTS = ("logs", "summary.json")
"""What a run writes besides its checkpoint directories (cleared by `overwrite` too)."""


@dataclass
class RunClaim:
    """The claimed directory: its lock (held until `release`) and the checkpoint the run resumes, if any."""

    out_dir: Path
    resume_dir: Path | None
    lock: IO | None = None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()  # closing the descriptor releases the flock
            self.lock = None


def claim(out_dir: Path, resume: bool | str | Path | None, overwrite: bool = False) -> RunClaim:
    """Lock out_dir for this run and check that the run may write there; returns where it resumes from.

    Raises ValueError (with what to do) for: out_dir not a writable directory, another live run in it,
    checkpoints of another run there (fresh run without `overwrite`, or resuming a checkpoint from
    elsewhere), checkpoints newer than the one resumed (they would be mixed with the new ones)."""
    out_dir = Path(out_dir)
    if overwrite and resume not in (False, None):
        raise ValueError("overwrite=true deletes the run in out_dir, resume continues it: give one of them")
    lock = _lock(out_dir)
    try:
        remove_stale_temps(out_dir, everything=True)  # no other run writes here while we hold the lock
        existing = checkpoint_dirs(out_dir)
        if overwrite and (existing or any((out_dir / name).exists() for name in RUN_OUTPUTS)):
            _clear(out_dir, existing)
            print(f"overwrite=true: deleted the previous run in {out_dir} ({_names(existing) or 'logs only'})")
            existing = []
        resume_dir = resume_checkpoint(resume, out_dir)
        _check_no_mixing(out_dir, existing, resume_dir)
    except BaseException:
        lock.close()
        raise
    return RunClaim(out_dir, resume_dir, lock)


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """The run's checkpoint directories in out_dir (`step-XXXXXXXX/`, `final/`), complete or not."""
    if not out_dir.is_dir():
        return []
    return sorted(
        d for d in out_dir.iterdir() if d.is_dir() and (d.name == "final" or ckpt.step_of_dir_name(d.name) is not None)
    )


def resume_checkpoint(resume: bool | str | Path | None, out_dir: Path) -> Path | None:
    """The checkpoint directory `resume` names: None (fresh run), the newest in out_dir (`auto`, or
    True which also requires one), or a given resumable checkpoint."""
    if resume is False or resume is None:
        return None
    if resume is True or resume == "auto":
        found = ckpt.latest_checkpoint(out_dir)
        if found is None and resume is True:
            raise FileNotFoundError(f"--resume: no checkpoint found in {out_dir}")
        return found
    path = Path(resume)
    if not (path / ckpt.STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {path}: not a resumable checkpoint (no {ckpt.STATE_FILE})")
    return path


def _lock(out_dir: Path) -> IO:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} is a file, not a directory: choose another --out_dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / LOCK_FILE, "a+")  # noqa: SIM115 (held open for the whole run)
    except OSError as e:
        raise ValueError(
            f"Cannot write to out_dir {str(out_dir)!r} ({e.strerror or e}): choose a writable --out_dir"
        ) from None
    if fcntl is None:  # not POSIX: no lock, the checkpoint checks below still apply
        return lock
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "unknown"
        lock.close()
        raise ValueError(
            f"out_dir {str(out_dir)!r} is in use by another litattn run (process {owner}): wait for it to end "
            "or choose another --out_dir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _check_no_mixing(out_dir: Path, existing: list[Path], resume_dir: Path | None) -> None:
    if not existing:
        return
    if resume_dir is None:
        raise ValueError(
            f"out_dir {str(out_dir)!r} already holds a run ({_names(existing)}); continue it with --resume auto, "
            "choose another --out_dir, or pass --overwrite true to delete it first"
        )
    if resume_dir.resolve().parent != out_dir.resolve():
        raise ValueError(
            f"Resuming {str(resume_dir)!r} into out_dir {str(out_dir)!r}, which holds another run's checkpoints "
            f"({_names(existing)}): resume into an --out_dir that holds no other run"
        )
    resumed_step = ckpt.checkpoint_step(resume_dir)
    newer = [d for d in existing if d.resolve() != resume_dir.resolve() and ckpt.checkpoint_step(d) > resumed_step]
    if newer:
        raise ValueError(
            f"out_dir {str(out_dir)!r} holds checkpoints newer than {resume_dir.name} (step {resumed_step}): "
            f"{_names(newer)}; a resumed run would mix its checkpoints with them. Resume the newest "
            "(--resume auto), or copy the checkpoint to another --out_dir and resume it there"
        )


def _clear(out_dir: Path, existing: list[Path]) -> None:
    for d in existing:
        shutil.rmtree(d)
    for name in RUN_OUTPUTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _names(dirs: list[Path]) -> str:
    names = [f"{d.name}/" for d in dirs]
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
