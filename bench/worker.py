"""One run's process under torchrun: ``torchrun --nproc_per_node N -m bench.worker RUN_DIR``.

Every rank trains the run its folder records (RUN_DIR/config.yaml: the resolved RunConfig, written
once per attempt by the executor that claimed the run, and read by the server too); rank 0 writes
RUN_DIR/final.json, which the runner reads. Only rank 0 writes metrics, checkpoints' full copies and
the final metrics; the runner alone writes the store.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from bench import parallel
from bench.config import RunConfig
from bench.train import train

CONFIG = "config.yaml"  # a run folder's record of what it trains


def write_config(run_dir: Path, config: RunConfig) -> None:
    """Record the run's resolved configuration in its folder (YAML, in the config's own field order)."""
    (run_dir / CONFIG).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def read_config(run_dir: Path) -> RunConfig:
    """The configuration a run folder records, validated: validation imports the run's plugins, and
    refuses one whose source changed since the run was planned."""
    return RunConfig.model_validate(yaml.safe_load((run_dir / CONFIG).read_text()))


def main(argv: list[str] | None = None) -> int:
    run_dir = Path((argv or sys.argv[1:])[0])
    result = train(read_config(run_dir), run_dir)
    if parallel.world().main:
        (run_dir / "final.json").write_text(json.dumps(result, default=str))
    parallel.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
