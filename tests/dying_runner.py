"""``python tests/dying_runner.py STEP SPEC [bench.run options]``: bench.run (one process) that dies once
its second run has written STEP's record, its first run finished.

Stands in for a runner SIGKILLed mid-sweep at a known state: the process exits at once, without
cleanup, so a test waits on that state, not on how long training takes on a busy or an idle machine.
"""

import os
import sys

from bench import executor
from bench.run import main

started = []  # run folders, in the order they started


def dying_train(config, run_dir, on_step=None):
    started.append(run_dir)

    def step(record: dict) -> None:
        if on_step:
            on_step(record)
        if len(started) == 2 and record["step"] == int(sys.argv[1]):
            os._exit(9)

    return real_train(config, run_dir, on_step=step)


if __name__ == "__main__":
    real_train, executor.train = executor.train, dying_train
    sys.exit(main(sys.argv[2:]))
