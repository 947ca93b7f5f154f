"""The results store: one SQLite database per results folder, its schema, its writer and its reader
side by side.

- ``schema``: the tables and the columns older stores gain when opened;
- ``writer``: ``Store``, a runner's connection (claims, heartbeats, outcomes, kernel and serving rows);
  several runners, on one machine or several sharing the folder, claim runs through it, so each run
  is trained once;
- ``reader``: ``load(folder)``, the tables as DataFrames, and ``read_spec``, a study's spec as stored,
  validated again into the typed ``Spec`` (``bench.results`` is the reader under its documented name).

SQL lives in this package only.
"""

from bench.store.reader import Results, load, read_spec
from bench.store.writer import DONE, STALE_SECONDS, Store, owner_id

__all__ = ["DONE", "STALE_SECONDS", "Results", "Store", "load", "owner_id", "read_spec"]
