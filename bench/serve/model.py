"""A finished run's trained model and its tokenizer, loaded for serving."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from bench.autotune import KernelChoices
from bench.checkpoint import load_checkpoint
from bench.config import RunConfig
from bench.data.tokenizers import Tokenizer
from models import GPT, build_model


class RunNotServable(ValueError):
    """A run folder that holds no servable model (no config, no checkpoint, a quantize run)."""


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer | None, RunConfig]:
    """The run's model (its final checkpoint, in eval mode on `device`), the tokenizer of its text data
    (None for Markov chains, tasks and token files: prompts are then token ids) and its config."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise RunNotServable(f"{run_dir}: no config.yaml (a run folder is results/<study>/runs/<run id>)")
    run = RunConfig.model_validate(yaml.safe_load(config_path.read_text()))
    state = load_checkpoint(run_dir / "checkpoint.pt")
    if state is None:
        raise RunNotServable(f"{run_dir}: no checkpoint.pt (a post-training quantized variant keeps none; "
                             "serve its float run, or a run that finished training)")
    # `backend: auto` runs what the run trained with where a call matches, else what this machine measures
    model = build_model(run.model, kernels=KernelChoices(state.get("kernels")))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer_of(run), run


def tokenizer_of(run: RunConfig) -> Tokenizer | None:
    """The tokenizer a run's text data was encoded with (cached on disk when it was trained), or None."""
    return run.data.fitted_tokenizer() if hasattr(run.data, "fitted_tokenizer") else None
