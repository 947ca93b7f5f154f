"""A run's service: its model and tokenizer behind an engine, behind the HTTP app."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI

from bench.serve.app import create_app
from bench.serve.engine import Engine
from bench.serve.model import load_run


def build_service(run_dir: str | Path, *, device: str = "cpu", max_batch: int = 8,
                  kv_budget_bytes: int | None = None) -> FastAPI:
    """The FastAPI app serving a finished run (its engine starts and stops with the app)."""
    model, tokenizer, run = load_run(run_dir, device)
    engine = Engine(model, max_batch=max_batch, kv_budget_bytes=kv_budget_bytes)
    limit = model.positional.max_positions or run.model.block_size
    return create_app(engine, tokenizer, max_tokens=limit, name=Path(run_dir).name)
