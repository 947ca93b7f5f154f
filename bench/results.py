"""Read a results folder's store as pandas DataFrames: ``bench.results.load(dir)``.

    results = load("results/attention")
    results.runs      # one row per run: run_id, variant, seed, status, val_loss, params, current, ...
    results.metrics   # one row per run and step: run_id, step, train_loss, val_loss, lr, mfu, ...
    results.kernels   # one row per kernel measurement, with the machine it ran on
    results.serving   # one row per run served under load and offered request rate (bench.serve bench)

The reader lives beside the store's schema, in ``bench.store.reader``; this is its documented name.
"""

from bench.store.reader import Results, load, read_spec

__all__ = ["Results", "load", "read_spec"]
