"""Choices made by measurement on this machine: the attention kernel behind ``backend: auto`` and
whether ``train.compile: auto`` compiles the model (``--workers auto``: bench.workers).

Each choice is measured once per machine (bench.hardware's cache: machine id, torch version, thread
count) and kept with the numbers behind it, so every run on a machine makes the same choice and its
record says why. Correctness first: a candidate is timed only after its output (and, for training,
its gradients) matched the ``math`` backend in float32 within the dtype's tolerance.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from bench import hardware
from bench.timing import agrees, time_interleaved
from models.attention_backends import KernelChooser, Mask, MathAttention, call_key, call_label, needed_capabilities
from models.registry import build_spec, get, list_components

CHOICE_MIN_TIME = 0.05  # seconds of calls per candidate: enough to order kernels that differ by >10%
COMPILE_MIN_SPEEDUP = 1.1  # compile only where clearly faster: its numerics differ from eager's in the last bits
COMPILE_MIN_TIME = 0.5  # seconds of training steps per side


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


def _inputs(q, k, v, dropout_p: float, direction: str) -> dict[str, torch.Tensor]:
    """Random q, k, v (and an output gradient) of the call's shapes and dtype, from a private generator."""
    gen = torch.Generator().manual_seed(0)

    def draw(shape):
        return torch.randn(shape, generator=gen).to(q.device, q.dtype).requires_grad_(direction != "forward")

    out_shape = (*q.shape[:-1], v.shape[-1])  # v's head dim may differ from q's (MLA, differential attention)
    return {"q": draw(q.shape), "k": draw(k.shape), "v": draw(v.shape),
            "grad": torch.randn(out_shape, generator=gen).to(q.device, q.dtype)}


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
    Hkv, Tk, Dv = k.shape[1], k.shape[2], v.shape[3]
    # a batched mask (rows at their own positions) needs 'ragged': a choice of its own
    mask_label = (f"{mask.kind}{':ragged' if mask.batched else ''}:w{mask.window}:"
                  f"{'bias' if mask.slopes is not None else 'nobias'}")
    key = (f"attention:{hardware.device_key(device, dtype)}:B{B}:H{H}/{Hkv}:T{Tq}x{Tk}:"
           f"D{D}{f'v{Dv}' if Dv != D else ''}:{mask_label}:dropout{dropout_p > 0}:{direction}")
    needs = needed_capabilities(q, k, mask, dropout_p)
    candidates, skipped = attention_candidates(device)
    key += ":" + ",".join(label for label, _ in candidates)  # a newly registered backend is considered

    def measure() -> dict:
        rejected = dict(skipped)
        x = _inputs(q, k, v, dropout_p, direction)
        x32 = {n: t.detach().float().requires_grad_(t.requires_grad) for n, t in x.items()}
        reference = _run(MathAttention(), x32, mask, 0.0, direction)  # the gate runs without dropout
        timed = {}
        for label, spec in candidates:
            component = get("attention_backend", spec["name"])
            missing = needs - component.factory.capabilities(spec)
            reason = f"cannot {', '.join(sorted(missing))}" if missing else component.device_reason(spec, device)
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
        ranked = sorted(timings, key=lambda label: timings[label].median)
        measured = ", ".join(f"{label} {timings[label].median * 1e3:.3g} ms" for label in ranked)
        return {"backend": ranked[0], "spec": timed[ranked[0]][0], "direction": direction,
                "median_s": {label: t.median for label, t in timings.items()}, "rejected": rejected,
                "reason": f"fastest that passed the correctness gate, per call of B{B}×H{H}×T{Tq}×D{D} "
                          f"{str(dtype).removeprefix('torch.')} {direction.replace('_', '+')}: {measured}"}

    with torch.autocast(device.type, enabled=False):  # measure the kernels as called, not re-cast
        record = hardware.cached(key, measure, device)
    return record["spec"], record


def _step(model: nn.Module, x: torch.Tensor, autocast: Callable) -> None:
    """One forward and backward of a training step (the optimizer's work is the same either way)."""
    with autocast():
        loss = model(x, x).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None


def make_choices(model: nn.Module, x: torch.Tensor, autocast: Callable) -> None:
    """One eager forward and backward on x, its gradients discarded and the random stream restored:
    `backend: auto` layers choose their kernels now, so that a compiled model traces the chosen
    kernel rather than breaking its graph at the choice (and recompiling after it)."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        _step(model, x, autocast)


def compile_speed(model: nn.Module, micro_batch: int, seq_len: int, dtype: torch.dtype, autocast: Callable) -> dict:
    """A training step (forward + backward of one micro-batch) eager and compiled (torch.compile,
    dynamic=False) timed interleaved, and the time the first compiled step took to compile; once per
    machine, model config, batch shape and dtype. A model that fails to compile: the error."""
    device = next(model.parameters()).device
    key = (f"compile-speed:{hardware.device_key(device, dtype)}:B{micro_batch}:T{seq_len}:"
           f"{hardware.config_hash(model.config.to_dict())}")

    def measure() -> dict:
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, model.config.vocab_size, (micro_batch, seq_len), generator=gen).to(device)
        eager = copy.deepcopy(model)  # the run's own model keeps its state
        make_choices(eager, x, autocast)
        compiled = torch.compile(copy.deepcopy(eager), dynamic=False)
        start = time.perf_counter()
        try:
            _step(compiled, x, autocast)  # compiles: outside the timing
        except Exception as e:  # noqa: BLE001 - no compiler, an op inductor lacks: eager, with the reason
            return {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"}
        compile_s = time.perf_counter() - start
        timings = time_interleaved({"eager": lambda: _step(eager, x, autocast), "compiled": lambda: _step(compiled, x, autocast)},
                                   device, min_time=COMPILE_MIN_TIME)
        return {"eager_s": timings["eager"].median, "compiled_s": timings["compiled"].median, "compile_s": compile_s}

    return hardware.cached(key, measure, device)


def compile_decision(speed: dict, micro_steps: int | None) -> dict:
    """Whether to compile a run of `micro_steps` forward/backward passes (None: a time budget, long
    enough) given compile_speed's measurement: only where a step is ≥ COMPILE_MIN_SPEEDUP× faster
    compiled and the run saves more time than compiling costs."""
    if "error" in speed:
        return {"compile": False, "reason": f"does not compile here: {speed['error']}", **speed}
    eager_s, compiled_s, compile_s = speed["eager_s"], speed["compiled_s"], speed["compile_s"]
    speedup = eager_s / compiled_s
    measured = (f"a training step (forward + backward of a micro-batch) takes {eager_s * 1e3:.3g} ms eager, "
                f"{compiled_s * 1e3:.3g} ms compiled ({speedup:.2f}×), after {compile_s:.3g} s compiling")
    saved = None if micro_steps is None else micro_steps * (eager_s - compiled_s)
    if speedup < COMPILE_MIN_SPEEDUP:
        verdict = f"eager: {measured}; below the {COMPILE_MIN_SPEEDUP:g}× threshold"
    elif saved is not None and saved < compile_s:
        verdict = f"eager: {measured}; the run's {micro_steps} steps would save {saved:.3g} s, less than compiling costs"
    else:
        verdict = f"compiled: {measured}"
    return {"compile": verdict.startswith("compiled"), "reason": verdict, "speedup": speedup, **speed}


class KernelChoices:
    """The kernel choices of one model (a ``KernelChooser``): a run's recorded choice where a call
    matches one and its backend runs here, else `measure`'s (by default measured on this machine,
    ``choose_attention``); every choice is kept, so a run records what its ``backend: auto`` layers ran
    and serving, post-training quantization and kernel timing run what it ran."""

    def __init__(self, recorded: Iterable[dict] | None = None, measure: KernelChooser | None = None):
        self.measure = measure or choose_attention
        self.table: dict[str, dict] = {}
        self.remember(recorded or ())

    def remember(self, recorded: Iterable[dict]) -> bool:
        """Replay these recorded choices (a run's, a checkpoint's) for the calls they were made for;
        whether one of them replaces a different choice already made here."""
        recorded = {r["call"]: r for r in recorded if "call" in r}
        replaced = any(call in self.table and self.table[call]["spec"] != r["spec"] for call, r in recorded.items())
        self.table.update(recorded)
        return replaced

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, dropout_p: float,
                 direction: str) -> tuple[dict, dict]:
        call = call_label(call_key(q, k, v, mask, dropout_p, direction))
        record = self.table.get(call)
        # a choice recorded on a machine with other kernels is made again here
        if record is None or get("attention_backend", record["spec"]["name"]).device_reason(record["spec"], q.device):
            spec, record = self.measure(q, k, v, mask, dropout_p, direction)
            record = self.table[call] = {**record, "spec": spec, "call": call}
        return record["spec"], record

    def records(self) -> list[dict]:
        """Every choice made or replayed, in the order first asked."""
        return list(self.table.values())

