"""One run's process under torchrun: ``torchrun --nproc_per_node N -m bench.worker RUN_DIR``.

The runner writes RUN_DIR/run.json (the resolved RunConfig), launches this on every rank, and reads
RUN_DIR/final.json, which rank 0 writes. Only rank 0 writes metrics, checkpoints' full copies and the
final metrics; the runner alone writes the store.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import parallel
from bench.config import RunConfig
from bench.train import train


def main(argv: list[str] | None = None) -> int:
    run_dir = Path((argv or sys.argv[1:])[0])
    run = RunConfig.model_validate_json((run_dir / "run.json").read_text())  # imports the run's plugins
    result = train(run, run_dir)
    if parallel.world().main:
        (run_dir / "final.json").write_text(json.dumps(result, default=str))
    parallel.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
