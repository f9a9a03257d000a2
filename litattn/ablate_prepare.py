"""The preparation stage of `litattn ablate`: litattn commands that make what the runs need (a scorer checkpoint,
a truncation dictionary built from it), so that one command runs an experiment from its first step.

    prepare:                       # in order, before any run; a step whose `creates` exists is skipped
      - command: finetune --config config_hub/finetune/pydoc-scorer.yaml --seed {seed} --out_dir out/scorer/seed-{seed}
        creates: out/scorer/seed-{seed}/final
      - command: [truncate, build, --checkpoint_dir, out/scorer/seed-{seed}/final, --out, out/dict-{seed}.json]
        creates: out/dict-{seed}.json

A step whose command or `creates` holds `{seed}` runs once per seed of the ablation (the runs then name their
seed's file with the same placeholder). Every command is parsed (`--print_config`) before any work, so a
misspelt option fails at once; each runs as `python -m litattn <command>`, its output in
`<out_dir>/prepare/<step>[-seed-<s>].log`. A step is done when `creates` exists, which its command writes last
(a checkpoint's final/ and a dictionary are written atomically): a step killed halfway runs again on the rerun.
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litattn.cli import check_command

PLACEHOLDER = "{seed}"


@dataclass
class Step:
    """One command of the preparation stage, for one seed (or for all, where it names none)."""

    index: int
    argv: list[str]
    creates: Path
    seed: int | None

    @property
    def name(self) -> str:
        return f"prepare {self.index}" + (f" seed {self.seed}" if self.seed is not None else "")

    @property
    def done(self) -> bool:
        return self.creates.exists()

    def log_file(self, out_dir: Path) -> Path:
        seed = f"-seed-{self.seed}" if self.seed is not None else ""
        return out_dir / "prepare" / f"{self.index}{seed}.log"


def plan(spec: Any, seeds: list[int]) -> list[Step]:
    """The steps of a `prepare` list, expanded over seeds and checked (keys, each command's arguments)."""
    if not isinstance(spec, list) or not spec:
        raise ValueError(f"prepare must be a non-empty list of {{command, creates}} steps, got {spec!r}")
    steps = []
    for i, step in enumerate(spec, 1):
        if not isinstance(step, dict) or set(step) != {"command", "creates"}:
            got = sorted(step) if isinstance(step, dict) else repr(step)
            raise ValueError(f"prepare step {i} must have exactly the keys command and creates, got {got}")
        command, creates = step["command"], step["creates"]
        argv = shlex.split(command) if isinstance(command, str) else command
        if not isinstance(argv, list) or not argv or not all(isinstance(a, (str, int, float)) for a in argv):
            raise ValueError(f"prepare step {i}: command must be a litattn command line (a string or a list)")
        if not isinstance(creates, str) or not creates:
            raise ValueError(f"prepare step {i}: creates must be the path the command makes, got {creates!r}")
        argv = [str(a) for a in argv]
        if argv[0] == "litattn":
            argv = argv[1:]
        per_seed = any(PLACEHOLDER in a for a in [*argv, creates])
        for seed in seeds if per_seed else [None]:  # without a placeholder, replacing it changes nothing
            filled = [a.replace(PLACEHOLDER, str(seed)) for a in argv]
            steps.append(Step(i, filled, Path(creates.replace(PLACEHOLDER, str(seed))), seed))
    for step in steps:
        if step.seed is None or step.seed == seeds[0]:  # each command line once
            _check(step)
    return steps


def _check(step: Step) -> None:
    """Parse the command as `litattn` would, with --print_config: nothing runs."""
    try:
        check_command(step.argv)
    except ValueError as e:
        raise ValueError(f"prepare step {step.index} is not a valid litattn command: {e}") from None


def execute(steps: list[Step], out_dir: Path) -> None:
    """Run the steps not yet done, in order; a failure stops the ablation with the log's tail. Ctrl-C (which the
    command, in the same process group, receives too) waits for it to stop as it does on its own."""
    for step in steps:
        if step.done:
            continue
        log_path = step.log_file(out_dir)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{time.strftime('%H:%M:%S')}] {step.name}: litattn {shlex.join(step.argv)}", flush=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "litattn", *step.argv], stdout=log, stderr=subprocess.STDOUT)
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                with contextlib.suppress(KeyboardInterrupt):
                    proc.wait()
                raise
        if code != 0 or not step.done:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            why = f"exit {code}" if code != 0 else f"it did not create {step.creates}"
            raise RuntimeError(f"{step.name} failed ({why}); see {log_path}: " + " | ".join(tail))
