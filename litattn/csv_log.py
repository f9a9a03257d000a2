"""The run's metrics.csv, written so that a kill or a full disk never leaves half of it.

    <out_dir>/logs/csv/version_<N>/metrics.csv     one directory per session (N counts up on resume)

`CSVLogger` is a Fabric logger (`fabric.log_dict` writes through it). Each row is appended whole, at once:
the line is built in memory and written with one write; a write that stops part way (disk full, a file-size
limit) is cut back to the last whole row before the error is raised, as a `WriteError` naming the file. A row
with a key the header lacks rewrites the file under the wider header through a temp file renamed over it
(Lightning's CSV logger rewrites it in place, which a kill or a full disk at that moment empties).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from lightning_fabric.loggers.logger import Logger
from lightning_fabric.utilities.rank_zero import rank_zero_only

from litattn.utils import WriteError, atomic_write_text, version_number, write_failure

METRICS_FILE = "metrics.csv"


class CSVLogger(Logger):
    """Rows of `{step, metric: value}` in `<root_dir>/<name>/version_<N>/metrics.csv`, N one above the
    highest there (a resumed run logs into a new version)."""

    def __init__(self, root_dir: Path, name: str = "csv") -> None:
        super().__init__()
        self._root_dir = Path(root_dir)
        self._name = name
        self._version: int | None = None
        self._header: list[str] = []

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> int:
        if self._version is None:
            versions = [version_number(d) for d in (self._root_dir / self._name).glob("version_*") if d.is_dir()]
            self._version = max([v for v in versions if v is not None], default=-1) + 1
        return self._version

    @property
    def root_dir(self) -> str:
        return str(self._root_dir)

    @property
    def log_dir(self) -> str:
        return str(self._root_dir / self._name / f"version_{self.version}")

    @property
    def path(self) -> Path:
        return Path(self.log_dir) / METRICS_FILE

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Nothing: every checkpoint holds the run's hyperparameters (hyperparameters.yaml)."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {key: _plain(value) for key, value in metrics.items()}
        row["step"] = step
        path = self.path
        try:
            new = [key for key in row if key not in self._header]
            if new or not path.is_file():
                self._rewrite(path, [*self._header, *new], row)
            else:
                append_whole(path, _line(self._header, row))
        except WriteError:
            raise
        except OSError as e:
            raise WriteError(f"Could not write {path}: {write_failure(path, e)}") from e

    def _rewrite(self, path: Path, header: list[str], row: dict[str, Any]) -> None:
        rows = []
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        path.parent.mkdir(parents=True, exist_ok=True)
        text = _line(header, dict(zip(header, header, strict=True))) + "".join(_line(header, r) for r in [*rows, row])
        atomic_write_text(path, text)
        self._header = header

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Nothing to flush: every row is on disk when `log_metrics` returns."""


def append_whole(path: Path, text: str) -> None:
    """Append `text` to `path` in one write; if the write stops part way (disk full), cut the file back to its
    size before, so it never ends in a partial line, and raise the error."""
    data = text.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            while written < len(data):  # only a short write (a limit reached) gets here: the next one fails
                written += os.write(fd, data[written:])
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def _line(header: list[str], row: dict[str, Any]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(["" if row.get(k) is None else row[k] for k in header])
    return out.getvalue()


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
