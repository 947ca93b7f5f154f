"""Post-training quantization of a trained run: quality change, model bytes, inference latency.

The float run's final checkpoint is loaded once, evaluated on the fixed validation batches, then
quantized and evaluated again on the same batches; both are timed on the same device. Both are
evaluated and timed the same way, in the dtype the training run evaluates in (its autocast dtype,
``hardware.training_dtype``): the change is a paired difference on one checkpoint, one precision.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.autotune import KernelChoices
from bench.checkpoint import load_checkpoint
from bench.data import load_dataset
from bench.hardware import resolve_device, training_dtype
from bench.config import RunConfig
from bench.train import _autocast, evaluate  # the training run's eval setting
from models import build_model, build_spec, flops_per_token, model_bytes, param_counts, quantize
from models.quantization import linear_weight_bytes


@torch.no_grad()
def forward_latency(model: torch.nn.Module, x: torch.Tensor, repeats: int = 7,
                    dtype: torch.dtype = torch.float32) -> float:
    """Median seconds of one forward pass over batch x (after a warm-up), autocast to dtype."""
    with _autocast(x.device, dtype):
        model(x)
        times = []
        for _ in range(repeats):
            if x.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def decode_latency(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int = 32,
                   dtype: torch.dtype = torch.float32) -> float | None:
    """Median seconds per generated token of greedy decoding over the KV cache from prompt (1, T),
    after one warm-up generation; None when the model cannot decode incrementally."""
    limit = model.positional.max_positions
    new_tokens = min(new_tokens, limit - prompt.shape[1]) if limit else new_tokens
    if model.new_cache() is None or new_tokens < 1:
        return None
    with _autocast(prompt.device, dtype):
        model.generate(prompt, 2, temperature=0)
        cache = model.new_cache()
        model(prompt, cache=cache)  # prefill, not timed
        idx, times = prompt[:, -1:], []
        for _ in range(new_tokens):
            if prompt.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            idx = model(idx, cache=cache).logits[:, -1:].argmax(-1)
            if prompt.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _calibration(run: RunConfig, data, quantizer) -> dict[str, Any] | None:
    """The training-split windows a calibrated quantizer asks for (fixed by the run's seed), or None."""
    if not hasattr(quantizer, "calibration_size"):
        return None
    sequences, seq_len = quantizer.calibration_size()
    seq_len = seq_len or run.seq_len
    return {"tokens": data.calibration_batch(run.seed, sequences, seq_len), "sequences": sequences, "seq_len": seq_len}


def quantize_as_evaluated(model: torch.nn.Module, run: RunConfig, device: torch.device, data=None):
    """Quantize the float model in place as `run.model.quantization` says, with the calibration
    windows its evaluation uses (fixed by the run's seed): (the quantizer, the calibration or None).
    Serving a quantized variant quantizes this way too."""
    data = data if data is not None else load_dataset(run.data)
    calibration = _calibration(run, data, build_spec("quantization", run.model.quantization))
    quantizer = quantize(model, run.model.quantization, calibration and calibration["tokens"].to(device))
    return quantizer, calibration


def evaluate_quantized(run: RunConfig, float_run_dir: Path) -> dict[str, Any]:
    """Quantize the float run's trained model as `run.model.quantization` says; compare with float."""
    state = load_checkpoint(Path(float_run_dir) / "checkpoint.pt")
    if state is None and (Path(float_run_dir) / "checkpoint.deepspeed").exists():
        raise FileNotFoundError("the float run was trained with DeepSpeed, whose checkpoints are sharded per rank: "
                                "train the float run with ddp or fsdp to quantize it after training")
    if state is None:
        raise FileNotFoundError(f"no checkpoint in {float_run_dir}: the float run did not finish")
    device = resolve_device(run.train.device)
    # `backend: auto` runs what the float run trained with where a call matches, else what this machine measures
    kernels = KernelChoices(state.get("kernels"))
    float_model = build_model(run.model.model_copy(update={"quantization": None}), kernels=kernels)
    float_model.load_state_dict(state["model"])
    float_model.to(device).eval()
    data = load_dataset(run.data)
    micro = run.train.micro_batch_size or run.train.batch_size
    val = data.val_batches(run.train.val_sequences, run.seq_len, micro)
    # the float model and its quantized copy: the same batches, the same dtype (the training run's)
    dtype = training_dtype(device, run.train.dtype)
    before = evaluate(float_model, val, device, dtype, data.token_bytes)
    quantized = copy.deepcopy(float_model)
    start = time.perf_counter()
    quantizer, calibration = quantize_as_evaluated(quantized, run, device, data)
    quantize_seconds = time.perf_counter() - start
    after = evaluate(quantized, val, device, dtype, data.token_bytes)
    x = val[0][0].to(device)
    prompt = x[:1, : max(1, run.seq_len // 2)]
    decode, decode_float = decode_latency(quantized, prompt, dtype=dtype), decode_latency(float_model, prompt, dtype=dtype)
    result = {
        "status": "finished",
        "steps": state["step"],
        "eval_dtype": str(dtype).removeprefix("torch."),
        "val_loss": after["loss"],
        "val_loss_float": before["loss"],  # the float checkpoint, evaluated here as the quantized one is
        "val_loss_delta": after["loss"] - before["loss"],  # nats, paired on this checkpoint
        "val_loss_change": (after["loss"] - before["loss"]) / before["loss"],  # relative (the report's %)
        "model_bytes": model_bytes(quantized),
        "model_bytes_float": model_bytes(float_model),
        "linear_weight_bytes": linear_weight_bytes(quantized),
        "linear_weight_bytes_float": linear_weight_bytes(float_model),
        "latency_ms": 1e3 * forward_latency(quantized, x, dtype=dtype),
        "latency_ms_float": 1e3 * forward_latency(float_model, x, dtype=dtype),
        "latency_batch": list(x.shape),
        "decode_ms_per_token": None if decode is None else 1e3 * decode,  # greedy, KV cache, batch 1
        "decode_ms_per_token_float": None if decode_float is None else 1e3 * decode_float,
        "quantize_seconds": quantize_seconds,  # the method's own time (calibration included)
        "quantization_format": quantizer.format,
        "params": param_counts(run.model),
        "flops_per_token": flops_per_token(run.model, seq_len=run.seq_len),
        "device": device.type,
        "attention_choices": kernels.records() or None,  # the float run's, replayed, and any made here
        "data": data.fingerprint,
    }
    if calibration:
        result.update(calibration_sequences=calibration["sequences"], calibration_seq_len=calibration["seq_len"],
                      calibration_seed=run.seed, calibration_split="train")
    if getattr(quantizer, "layers", None):  # per layer: output error on calibration inputs, method vs round-to-nearest
        result["layer_errors"] = {name: {"error": r.error, "error_rtn": r.error_rtn, **r.detail}
                                  for name, r in quantizer.layers.items()}
    if run.data.source == "task":
        result.update(val_accuracy=after["accuracy"], val_accuracy_float=before["accuracy"],
                      val_accuracy_delta=after["accuracy"] - before["accuracy"])
    if "bpb" in after:
        result.update(val_bpb=after["bpb"], val_bpb_float=before["bpb"], val_bpb_delta=after["bpb"] - before["bpb"])
    return result
