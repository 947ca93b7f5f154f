"""A finished run's trained model and its tokenizer, loaded for serving."""

from __future__ import annotations

from pathlib import Path

import torch

from bench.autotune import KernelChoices
from bench.checkpoint import load_checkpoint
from bench.config import RunConfig
from bench.data.tokenizers import Tokenizer
from bench.worker import CONFIG, read_config
from models import GPT, build_model
from models.attention_backends import sdpa_choice


class RunNotServable(ValueError):
    """A run folder that holds no servable model (no config, no checkpoint, a quantize run)."""


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer | None, RunConfig]:
    """The run's model (its final checkpoint, in eval mode on `device`), the tokenizer of its text data
    (None for Markov chains, tasks and token files: prompts are then token ids) and its config."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).exists():
        raise RunNotServable(f"{run_dir}: no {CONFIG} (a run folder is results/<study>/runs/<run id>)")
    run = read_config(run_dir)
    if run.model.contrastive is not None:
        raise RunNotServable(f"{run_dir}: a contrastive dual encoder embeds images and captions; it generates no "
                             "text to serve")
    state = load_checkpoint(run_dir / "checkpoint.pt")
    if state is None:
        raise RunNotServable(f"{run_dir}: no checkpoint.pt (a post-training quantized variant keeps none; "
                             "serve its float run, or a run that finished training)")
    # `backend: auto` runs what the run trained with where a call matches, else sdpa: nothing is timed under load
    model = build_model(run.model, kernels=KernelChoices(state.get("kernels"), measure=unrecorded_call))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer_of(run), run


def unrecorded_call(q, k, v, mask, dropout_p: float, direction: str) -> tuple[dict, dict]:
    """The kernel of a call the trained run never made (decoding shapes, other batch sizes): sdpa,
    since measuring candidates while requests wait would time the measurement; recorded as such."""
    spec, record = sdpa_choice(q, k, v, mask, dropout_p, direction)
    return spec, {**record, "reason": "a call the trained run never made: sdpa (serving times no kernel under load)"}


def tokenizer_of(run: RunConfig) -> Tokenizer | None:
    """The tokenizer a run's text data was encoded with (cached on disk when it was trained), or None."""
    return run.data.fitted_tokenizer() if hasattr(run.data, "fitted_tokenizer") else None
