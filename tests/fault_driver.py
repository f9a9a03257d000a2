"""Run the `litattn` command line with a fault injected at one phase of a run, from inside the process:
a real signal sent to the process (or to its process group), or a file-size limit that makes the next write
fail the way a full disk does.

    python tests/fault_driver.py PHASE FAULT litattn-arguments...
    python tests/fault_driver.py PHASE@RUN FAULT ablate --config ...

PHASE: train (during step 2), initial_validation, validation (the first periodic one), final_validation,
       checkpoint (while the first checkpoint is written; with write_fails: the second), sample,
       summary (final/ saved, summary.json not yet written), metrics (the 5th metrics row: step 4's in the
       debug recipe; with write_fails it is cut part way), results (ablate, while results.md is written)
PHASE@RUN: under `litattn ablate`, the fault goes into the run whose directory is RUN/ (variant/seed-N), at
       PHASE: ablate starts that run through this driver
FAULT: SIGINT, SIGTERM, SIGKILL, write_fails; SIGINT_group, SIGKILL_group signal the process group (ablate and
       its runs, as Ctrl-C in a terminal or a kill of the whole job does)
"""

import os
import resource
import signal
import subprocess
import sys


def main() -> None:
    phase, fault, *args = sys.argv[1:]
    from litattn import ablate, checkpoint, csv_log, loop, model, sampling, utils
    from litattn.cli import main as litattn

    if "@" in phase:
        phase, run = phase.split("@")
        run_through_driver(run, phase, fault)
        litattn(args)
        return

    def fire(limit: int = 4096) -> None:
        print(f"[fault] {fault} during {phase}", file=sys.stderr, flush=True)
        if fault == "write_fails":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        elif fault.endswith("_group"):
            os.killpg(os.getpgrp(), getattr(signal, fault.removesuffix("_group")))
        else:
            os.kill(os.getpid(), getattr(signal, fault))

    def inject(owner, name: str, when) -> None:
        original, calls = getattr(owner, name), []

        def wrapper(*a, **k):
            calls.append(1)
            if when(len(calls), a):
                if phase == "metrics":  # a limit 10 bytes past the file's end: the row is written in part
                    fire(a[0].path.stat().st_size + 10)
                elif phase == "results":  # killed with results.md written to its temp file, not yet renamed
                    return utils.atomic_write(a[0], lambda tmp: (tmp.write_text(a[1]), fire()))
                else:
                    fire()
            return original(*a, **k)

        setattr(owner, name, wrapper)

    periodic = lambda n, a: a[4] is not None  # validation_loss(fabric, model, data, micro, max_iters)
    where = {
        "train": (model.GPT, "loss", lambda n, a: n == 3),  # 2 micro-steps per step: step 2's first
        "initial_validation": (loop, "validation_loss", lambda n, a: n == 1),
        "validation": (loop, "validation_loss", periodic),
        "final_validation": (loop, "validation_loss", lambda n, a: not periodic(n, a)),
        "checkpoint": (checkpoint, "save_state_dict", lambda n, a: n == (2 if fault == "write_fails" else 1)),
        "sample": (sampling, "generate", lambda n, a: n == 1),
        "summary": (loop, "write_summary", lambda n, a: n == 1),
        "metrics": (csv_log.CSVLogger, "log_metrics", lambda n, a: n == 5),
        "results": (ablate, "atomic_write_text", lambda n, a: a[0].name == "results.md"),
    }
    inject(*where[phase])
    litattn(args)


def run_through_driver(run: str, phase: str, fault: str) -> None:
    """Make `litattn ablate` start the run in directory `run` through this driver, with the fault at `phase`."""
    popen = subprocess.Popen

    def start(command, *a, **k):
        if command[1:3] == ["-m", "litattn"] and f"/{run}/" in command[command.index("--config") + 1]:
            command = [command[0], __file__, phase, fault, *command[3:]]
        return popen(command, *a, **k)

    subprocess.Popen = start


if __name__ == "__main__":
    main()
