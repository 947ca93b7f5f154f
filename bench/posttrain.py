"""Post-training quantization of a trained run: quality change, model bytes, inference latency.

The float run's final checkpoint is loaded once, evaluated on the fixed validation batches, then
quantized and evaluated again on the same batches; both are timed on the same device.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.checkpoint import load_checkpoint
from bench.data import load_dataset
from bench.hardware import resolve_device
from bench.config import RunConfig
from bench.train import evaluate
from models import build_model, flops_per_token, model_bytes, param_counts, quantize
from models.quantization import linear_weight_bytes


@torch.no_grad()
def forward_latency(model: torch.nn.Module, x: torch.Tensor, repeats: int = 7) -> float:
    """Median seconds of one forward pass over batch x (after a warm-up)."""
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


def evaluate_quantized(run: RunConfig, float_run_dir: Path) -> dict[str, Any]:
    """Quantize the float run's trained model as `run.model.quantization` says; compare with float."""
    state = load_checkpoint(Path(float_run_dir) / "checkpoint.pt")
    if state is None and (Path(float_run_dir) / "checkpoint.deepspeed").exists():
        raise FileNotFoundError("the float run was trained with DeepSpeed, whose checkpoints are sharded per rank: "
                                "train the float run with ddp or fsdp to quantize it after training")
    if state is None:
        raise FileNotFoundError(f"no checkpoint in {float_run_dir}: the float run did not finish")
    device = resolve_device(run.train.device)
    float_model = build_model(run.model.model_copy(update={"quantization": None}))
    float_model.load_state_dict(state["model"])
    float_model.to(device).eval()
    data = load_dataset(run.data)
    micro = run.train.micro_batch_size or run.train.batch_size
    val = data.val_batches(run.train.val_sequences, run.seq_len, micro)
    before = evaluate(float_model, val, device, torch.float32, data.token_bytes)
    quantized = copy.deepcopy(float_model)
    quantizer = quantize(quantized, run.model.quantization)
    after = evaluate(quantized, val, device, torch.float32, data.token_bytes)
    x = val[0][0].to(device)
    result = {
        "status": "finished",
        "steps": state["step"],
        "val_loss": after["loss"],
        "val_loss_float": before["loss"],
        "val_loss_change": (after["loss"] - before["loss"]) / before["loss"],
        "model_bytes": model_bytes(quantized),
        "model_bytes_float": model_bytes(float_model),
        "linear_weight_bytes": linear_weight_bytes(quantized),
        "linear_weight_bytes_float": linear_weight_bytes(float_model),
        "latency_ms": 1e3 * forward_latency(quantized, x),
        "latency_ms_float": 1e3 * forward_latency(float_model, x),
        "latency_batch": list(x.shape),
        "quantization_format": quantizer.format,
        "params": param_counts(run.model),
        "flops_per_token": flops_per_token(run.model, seq_len=run.seq_len),
        "device": device.type,
        "data": data.fingerprint,
    }
    if run.data.source == "task":
        result.update(val_accuracy=after["accuracy"], val_accuracy_float=before["accuracy"])
    if "bpb" in after:
        result.update(val_bpb=after["bpb"], val_bpb_float=before["bpb"])
    return result
