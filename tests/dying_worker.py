"""``torchrun ... tests/dying_worker.py STEP RUN_DIR``: bench.worker whose rank 0 dies once STEP's record is written.

Stands in for a node lost mid-run at a known step: the process exits at once, without cleanup, as a
SIGKILL would, so a test waits on the state (the step reached), not on how long training takes.
"""

import os
import sys
from pathlib import Path

from bench.train import train
from bench.worker import read_config


def main() -> None:
    at_step, run_dir = int(sys.argv[1]), Path(sys.argv[2])
    run = read_config(run_dir)

    def die(record: dict) -> None:
        if record["step"] == at_step:
            os._exit(17)

    train(run, run_dir, on_step=die)  # on_step runs on rank 0; torchrun then stops the other ranks


if __name__ == "__main__":
    main()
