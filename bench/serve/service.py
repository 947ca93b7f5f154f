"""A run's service: its model and tokenizer behind an engine, behind the HTTP app."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from bench.serve.app import create_app
from bench.serve.engine import Engine
from bench.serve.model import load_run


def build_service(run_dir: str | Path, *, device: str | None = None, dtype: str | None = None, max_batch: int = 8,
                  kv_budget_bytes: int | None = None, max_queue: int | None = None) -> FastAPI:
    """The FastAPI app serving a finished run as it trained (its device and dtype unless given; its
    engine warms up, starts and stops with the app)."""
    served = load_run(run_dir, device, dtype)
    engine = Engine(served.model, max_batch=max_batch, kv_budget_bytes=kv_budget_bytes, max_queue=max_queue,
                    dtype=served.dtype)
    limit = served.model.positional.max_positions or served.config.model.block_size
    return create_app(engine, served.tokenizer, max_tokens=limit, name=Path(run_dir).name,
                      describe=served.describe)

