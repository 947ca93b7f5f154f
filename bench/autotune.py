"""Choices made by measurement on this machine: the attention kernel behind ``backend: auto``.

Each choice is measured once per machine (bench.hardware's cache: machine id, torch version, thread
count) and kept with the numbers behind it, so every run on a machine makes the same choice and its
record says why. Correctness first: a candidate is timed only after its output (and, for training,
its gradients) matched the ``math`` backend in float32 within the dtype's tolerance.
"""

from __future__ import annotations

import torch

from bench import hardware
from bench.timing import agrees, time_interleaved
from models.attention_backends import AutoAttention, Mask, MathAttention, needed_capabilities
from models.registry import build_spec, get, list_components

CHOICE_MIN_TIME = 0.05  # seconds of calls per candidate: enough to order kernels that differ by >10%


def attention_candidates(device: torch.device) -> tuple[list[tuple[str, dict]], dict[str, str]]:
    """(label, backend spec) of every registered backend worth measuring on `device`, and the
    reason each left-out one is not a candidate. sdpa counts once per kernel that runs there."""
    candidates, skipped = [], {}
    for name in list_components("attention_backend"):
        if name == "auto":
            continue
        component = get("attention_backend", name)
        reason = component.unavailable_reason()
        if reason:
            skipped[name] = reason
        elif name == "sdpa":
            kernels = ("flash", "efficient", "cudnn", "math") if device.type == "cuda" else ("auto", "math")
            candidates += [(f"sdpa.{k}" if k != "auto" else "sdpa", {"name": "sdpa", "kernel": k}) for k in kernels]
        elif name == "flex" and device.type != "cuda":
            skipped[name] = "compiles per shape (slow at first use on CPU): measured on CUDA only"
        else:
            candidates.append((name, {"name": name}))
    return candidates, skipped


def _inputs(q, k, dropout_p: float, direction: str) -> dict[str, torch.Tensor]:
    """Random q, k, v (and an output gradient) of the call's shapes and dtype, from a private generator."""
    gen = torch.Generator().manual_seed(0)

    def draw(shape):
        return torch.randn(shape, generator=gen).to(q.device, q.dtype).requires_grad_(direction != "forward")

    return {"q": draw(q.shape), "k": draw(k.shape), "v": draw(k.shape), "grad": torch.randn(q.shape, generator=gen).to(q.device, q.dtype)}


def _run(backend, x: dict, mask: Mask, dropout_p: float, direction: str):
    """The measured work: the forward pass, or forward and backward (gradients of q, k, v)."""
    if direction == "forward":
        with torch.no_grad():
            return backend(x["q"], x["k"], x["v"], mask, dropout_p)
    out = backend(x["q"], x["k"], x["v"], mask, dropout_p)
    return torch.autograd.grad(out, (x["q"], x["k"], x["v"]), x["grad"])


def choose_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, dropout_p: float,
                     direction: str) -> tuple[dict, dict]:
    """The fastest correct backend for this call: (its spec, the record of the choice). Cached per machine."""
    device, dtype = q.device, q.dtype
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    mask_label = f"{mask.kind}:w{mask.window}:{'bias' if mask.slopes is not None else 'nobias'}"
    threads = f":{torch.get_num_threads()}t" if device.type == "cpu" else ""
    key = (f"attention:{device.type}:{str(dtype).removeprefix('torch.')}{threads}:B{B}:H{H}/{Hkv}:T{Tq}x{Tk}:"
           f"D{D}:{mask_label}:dropout{dropout_p > 0}:{direction}")
    needs = needed_capabilities(q, k, mask, dropout_p)
    candidates, skipped = attention_candidates(device)
    key += ":" + ",".join(label for label, _ in candidates)  # a newly registered backend is considered

    def measure() -> dict:
        rejected = dict(skipped)
        x = _inputs(q, k, dropout_p, direction)
        x32 = {n: t.detach().float().requires_grad_(t.requires_grad) for n, t in x.items()}
        reference = _run(MathAttention(), x32, mask, 0.0, direction)  # the gate runs without dropout
        timed = {}
        for label, spec in candidates:
            factory = get("attention_backend", spec["name"]).factory
            missing = needs - factory.capabilities(spec)
            limitation = getattr(factory, "device_limitation", None)
            reason = (f"cannot {', '.join(sorted(missing))}" if missing
                      else limitation(spec, device) if limitation else None)
            if reason:
                rejected[label] = reason
                continue
            try:
                backend = build_spec("attention_backend", spec)
                ok, error = agrees(_run(backend, x, mask, 0.0, direction), reference, dtype)
            except Exception as e:  # noqa: BLE001 - a kernel that rejects the call is not a candidate
                rejected[label] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
                continue
            if not ok:
                rejected[label] = f"failed the correctness gate: max error {error:.3g} against math in float32"
                continue
            timed[label] = (spec, backend)
        timings = time_interleaved({label: (lambda b=b: _run(b, x, mask, dropout_p, direction))
                                    for label, (_, b) in timed.items()}, device, min_time=CHOICE_MIN_TIME)
        best = min(timings, key=lambda label: timings[label].median)
        return {"backend": best, "spec": timed[best][0], "direction": direction,
                "median_s": {label: t.median for label, t in timings.items()}, "rejected": rejected}

    with torch.autocast(device.type, enabled=False):  # measure the kernels as called, not re-cast
        record = hardware.cached(key, measure, device)
    return record["spec"], record


def install() -> None:
    """Let ``backend: auto`` measure: called by the trainer and the kernel timer before they build models."""
    AutoAttention.chooser = staticmethod(choose_attention)
