"""Small helpers shared across the package."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

# `.<name>.<pid>.<8 random chars>.tmp`: the writer's pid tells a stale temp (its process is gone) from a live one
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp")
_UNOWNED_TEMP_AGE_S = 3600.0
"""A temp without a pid (written by an older litattn) counts as stale once untouched for this long."""


class WriteError(OSError):
    """A file of a run could not be written (disk full, no permission); the message names it, and nothing was
    left half-written. The entry points add which checkpoint is kept; the CLI prints it as one line."""


def write_failure(path: Path, error: BaseException) -> str:
    """Why a write failed, in a few words: the OS's reason, and the free space when the disk is the cause."""
    reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0][:200]
    path = Path(path)
    try:
        free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
    except (OSError, StopIteration):
        return reason
    full = getattr(error, "errno", None) == errno.ENOSPC or free < 64 * 2**20
    return f"{reason} ({free / 2**20:.0f} MiB free on that disk)" if full else reason


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temp file beside `path`, then rename it over `path`.

    A crash mid-write leaves the old file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def make_temp_dir(directory: Path, name: str) -> Path:
    """Create `directory/.<name>.<pid>.<random>.tmp/` to fill and rename into place; `remove_stale_temps`
    recognises it as this process's, so a run killed mid-write leaves nothing behind for long."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # mkdir (not mkdtemp) so the directory gets the usual umask permissions
    return tmp


def remove_stale_temps(directory: Path, everything: bool = False) -> list[Path]:
    """Delete the temp files and directories (`.*.tmp`) in `directory` that no live process is writing:
    those whose pid has exited (a SIGKILLed save or tokenization), or all of them with `everything`
    (the caller holds the directory's lock). Returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.glob(".*.tmp"):
        match = _TEMP.fullmatch(path.name)
        try:
            if match:
                stale = everything or not _pid_alive(int(match["pid"]))
            else:
                stale = everything or time.time() - path.lstat().st_mtime > _UNOWNED_TEMP_AGE_S
            if not stale:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # its owner finished and renamed it meanwhile
            continue
        removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def version_number(directory: Path) -> int | None:
    """N of a `version_N` log directory (one per session of a run); None for any other name."""
    name = Path(directory).name
    number = name.removeprefix("version_")
    return int(number) if name.startswith("version_") and number.isdigit() else None


def file_digest(path: Path) -> str:
    """A short key of a file's bytes (what a cache built from the file is keyed by)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def content_key(obj) -> str:
    """A short stable key of JSON-able data (cache directory and file names): equal data, equal key."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def progress_bar(total: int, desc: str, unit: str = "window"):
    return tqdm(total=total, desc=desc, unit=unit, delay=2.0, leave=False)  # shown only if it takes a while
