"""Run the `litattn` command line with a fault injected at one phase of a run, from inside the process:
a real signal sent to the process itself, or a file-size limit that makes the next checkpoint write fail
the way a full disk does.

    python tests/fault_driver.py PHASE FAULT litattn-arguments...

PHASE: train (during step 2), initial_validation, validation (the first periodic one), final_validation,
       checkpoint (while the first checkpoint is written; with write_fails: the second), sample
FAULT: SIGINT, SIGTERM or write_fails
"""

import os
import resource
import signal
import sys


def main() -> None:
    phase, fault, *args = sys.argv[1:]
    from litattn import checkpoint, generate, loop, model
    from litattn.__main__ import main as litattn

    def fire() -> None:
        print(f"[fault] {fault} during {phase}", file=sys.stderr, flush=True)
        if fault == "write_fails":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        else:
            os.kill(os.getpid(), getattr(signal, fault))

    def inject(owner, name: str, when) -> None:
        original, calls = getattr(owner, name), []

        def wrapper(*a, **k):
            calls.append(1)
            if when(len(calls), a):
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
        "sample": (generate, "generate", lambda n, a: n == 1),
    }
    inject(*where[phase])
    litattn(args)


if __name__ == "__main__":
    main()
