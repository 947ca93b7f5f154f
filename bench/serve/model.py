"""A finished run's trained model, loaded for serving as the run trained it.

Served as trained: on the run's device, under autocast to the run's dtype (both recorded in its
checkpoint), its ``backend: auto`` layers replaying the run's recorded kernel choices. A
post-training quantized variant keeps no checkpoint of its own: its float run's checkpoint is loaded
and quantized as its evaluation quantized it (the same method, the same calibration windows).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bench import hardware
from bench.autotune import KernelChoices, choose_attention
from bench.checkpoint import load_checkpoint
from bench.config import RunConfig
from bench.data.tokenizers import Tokenizer
from bench.worker import CONFIG, read_config
from models import GPT, build_model
from models.attention_backends import AutoAttention
from models.quantization import post_training


class RunNotServable(ValueError):
    """A run folder that holds no servable model (no config, no checkpoint, a contrastive run)."""


@dataclass
class ServedRun:
    """What the service serves: the model and how it runs."""

    model: GPT
    tokenizer: Tokenizer | None  # None for Markov chains, tasks and token files: prompts are token ids
    config: RunConfig
    device: torch.device
    dtype: torch.dtype  # the autocast dtype
    kernels: ServingKernels
    quantization: str | None  # the post-training quantization applied, by name

    def describe(self) -> dict[str, str | None]:
        """Device, dtype, kernel and quantization as /health and the serving rows state them."""
        return {"device": self.device.type, "dtype": str(self.dtype).removeprefix("torch."),
                "kernel": kernel_summary(self.model), "quantization": self.quantization}


def load_run(run_dir: str | Path, device: str | None = None, dtype: str | None = None) -> ServedRun:
    """The run's model (its final checkpoint, in eval mode) as it trained: on `device` and under `dtype`
    (default: the run's own), and the tokenizer of its text data."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).exists():
        raise RunNotServable(f"{run_dir}: no {CONFIG} (a run folder is results/<study>/runs/<run id>)")
    run = read_config(run_dir)
    if run.model.contrastive is not None:
        raise RunNotServable(f"{run_dir}: a contrastive dual encoder embeds images and captions; it generates no "
                             "text to serve")
    quantization = _post_training(run)
    checkpoint_dir = _float_run_dir(run_dir, run) if quantization else run_dir
    state = load_checkpoint(checkpoint_dir / "checkpoint.pt")
    if state is None:
        raise RunNotServable(f"{checkpoint_dir}: no checkpoint.pt (the run did not finish training"
                             f"{'; it is the float run this quantized variant quantizes' if quantization else ''})")
    served_device = _device(run_dir, device or state.get("device") or run.train.device)
    served_dtype = _dtype(run_dir, dtype or state.get("dtype") or run.train.dtype, served_device)
    kernels = ServingKernels(state.get("kernels"))
    float_config = run.model.model_copy(update={"quantization": None}) if quantization else run.model
    model = build_model(float_config, kernels=kernels)
    model.load_state_dict(state["model"])
    model = model.to(served_device).eval()
    if quantization:
        from bench.posttrain import quantize_as_evaluated

        quantize_as_evaluated(model, run, served_device)
    return ServedRun(model, tokenizer_of(run), run, served_device, served_dtype, kernels, quantization)


def _post_training(run: RunConfig) -> str | None:
    """The name of the run's post-training quantization, or None (float, or quantized while training)."""
    model = run.model.to_dict()
    return model["quantization"]["name"] if post_training(model) else None


def _float_run_dir(run_dir: Path, run: RunConfig) -> Path:
    """The folder of the float run a post-training quantized run quantizes: its sibling, named by the
    float configuration's run id (as the plan names it)."""
    from bench.plan import run_id  # only here: the plan's imports cost every service start seconds

    float_run = run.model_copy(update={"model": run.model.model_copy(update={"quantization": None})})
    return run_dir.parent / run_id(float_run)


def _device(run_dir: Path, name: str) -> torch.device:
    try:
        return hardware.resolve_device(name)
    except RuntimeError as e:
        raise RunNotServable(f"{run_dir}: the run trained on {name}, which this machine lacks ({e}); "
                             "serve it here with --device cpu") from None


def _dtype(run_dir: Path, name: str, device: torch.device) -> torch.dtype:
    dtype = hardware.training_dtype(device, name)  # "auto": what training would choose on this machine
    if dtype == torch.float16 and device.type == "cpu":
        raise RunNotServable(f"{run_dir}: float16 autocast does not run on CPU; serve with --dtype float32 or bfloat16")
    return dtype


class ServingKernels(KernelChoices):
    """The kernel chooser of a served model: the run's recorded choice where a call matches one; else
    one measured choice per kind of call (prefill or decode step, rows at shared or own positions, per
    dtype and head dims), made on the first call of its kind (the engine's warm-up, before the first
    request) and replayed for every shape of that kind, so no request waits on a measurement."""

    def __init__(self, recorded=None):
        super().__init__(recorded, measure=self._by_kind)
        self.kinds: dict[tuple, tuple[dict, dict]] = {}

    def _by_kind(self, q, k, v, mask, dropout_p: float, direction: str) -> tuple[dict, dict]:
        kind = (q.device.type, q.dtype, phase(q.shape[2], mask.batched), mask.kind, mask.window,
                mask.slopes is not None, q.shape[3], v.shape[3], dropout_p > 0, direction)
        if kind not in self.kinds:
            spec, record = choose_attention(q, k, v, mask, dropout_p, direction)
            self.kinds[kind] = spec, {**record, "reason": f"measured for every {phase(q.shape[2], mask.batched)} "
                                                          f"call: {record['reason']}"}
        return self.kinds[kind]


def phase(queries: int, ragged: bool) -> str:
    """What a call of an engine is: a prefill, a decode step, over rows at their own positions or not."""
    return ("decode" if queries == 1 else "prefill") + (" (ragged)" if ragged else "")


def kernel_summary(model: GPT) -> str:
    """The attention kernels the model has run, in words: a fixed backend by name; ``auto`` as the
    backends each kind of call chose ("auto: sdpa (decode), math (decode (ragged)), baddbmm/sdpa (prefill)")."""
    kernels = [kernel for m in model.modules() if hasattr(kernel := getattr(m, "kernel", None), "name")]
    fixed = sorted({k.name for k in kernels if not isinstance(k, AutoAttention)})
    chosen: dict[str, set[str]] = {}
    for k in kernels:
        for record in getattr(k, "choices", {}).values():  # the call label's fields: models.attention_backends.call_key
            fields = record["call"].split(":")
            chosen.setdefault(phase(int(fields[5]), fields[10] == "True"), set()).add(record["backend"])
    auto = "auto: " + ", ".join(f"{'/'.join(sorted(b))} ({p})" for p, b in sorted(chosen.items())) if chosen else None
    return ", ".join([*fixed, *([auto] if auto else [])]) or "none (no attention kernel)"


def tokenizer_of(run: RunConfig) -> Tokenizer | None:
    """The tokenizer a run's text data was encoded with (cached on disk when it was trained), or None."""
    return run.data.fitted_tokenizer() if hasattr(run.data, "fitted_tokenizer") else None
