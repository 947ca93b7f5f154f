"""The kernels archbench times, each checked against its reference before it is timed.

Every function returns rows (dicts): what was run (component, name, backend, direction, shape,
dtype, device), its status (ok, mismatch, unavailable, unsupported, failed, oom) with a reason, and
for timed rows the median and IQR latency, achieved FLOP/s (attention counted as FlashAttention's
benchmarks count it), bytes/s for memory-bound ops, the fractions of this machine's measured peaks,
and peak memory. A row that cannot be timed says why; the sweep goes on.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench import hardware
from bench.kernels.config import (
    AttentionKernels, DecodeKernels, Direction, MLPKernels, MoEKernels, NormKernels, QuantizationKernels,
)
from bench.timing import max_error, time_interleaved, tolerance
from models import ModelConfig, build, build_model, quantize
from models.accounting import ATTENTION_BACKWARD, attention_flops, matmul_flops_per_token
from models.attention import visible_keys
from models.attention_backends import Mask
from models.positional import alibi_slopes
from models.registry import ComponentError, get

Row = dict


class Context:
    """Device, dtype, measured peaks and timing settings shared by every case."""

    def __init__(self, device: torch.device, dtype: torch.dtype, min_time: float, noisy_threshold: float):
        self.device, self.dtype, self.min_time, self.noisy = device, dtype, min_time, noisy_threshold
        self.peak_flops = hardware.peak_matmul_flops(device, dtype)
        self.peak_bandwidth = hardware.peak_copy_bandwidth(device)
        self.cache = "cold (L2 flushed)" if device.type == "cuda" else "warm"

    def base(self, **fields) -> Row:
        return {"device": self.device.type, "dtype": str(self.dtype).removeprefix("torch."),
                "threads": torch.get_num_threads(), "cache": self.cache, "status": "ok", **fields}

    def time(self, candidates: dict[str, Callable]) -> dict:
        return time_interleaved(candidates, self.device, min_time=self.min_time, noisy_threshold=self.noisy)

    def finish(self, row: Row, timing, flops: float | None = None, nbytes: float | None = None) -> Row:
        row.update(median_s=timing.median, iqr_s=timing.iqr, noisy=timing.noisy, samples=timing.samples)
        if flops:
            row.update(flops=flops, flops_per_s=flops / timing.median,
                       pct_peak_flops=100 * flops / timing.median / self.peak_flops)
        if nbytes:
            row.update(bytes=nbytes, bytes_per_s=nbytes / timing.median,
                       pct_peak_bandwidth=100 * nbytes / timing.median / self.peak_bandwidth)
        return row


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[int | None, str]:
    """Peak bytes allocated while fn runs: the CUDA allocator's count, or on CPU the profiler's."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, "cuda allocator"
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak, "profiler (CPU)"


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: the profiler's C++ side prints a line at every start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _failure(row: Row, error: Exception) -> Row:
    oom = isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
    return {**row, "status": "oom" if oom else "failed", "reason": f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"}


def _gate(got, expected, dtype: torch.dtype) -> tuple[bool, float]:
    """Correctness first: the candidate's output (or gradients) must match the reference's."""
    error = max_error(got, expected)
    scale = max(1.0, max_error(expected, torch.zeros(())) if isinstance(expected, torch.Tensor) else
                max(max_error(e, torch.zeros(())) for e in expected))
    return error <= tolerance(dtype) * scale, error


def _directions(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor,
                direction: Direction) -> Callable:
    """The callable to time for a direction; backward alone re-runs one retained graph."""
    if direction == "forward":  # inference forward: no graph is recorded
        def no_grad_forward():
            with torch.no_grad():
                return forward()

        return no_grad_forward
    if direction == "backward":
        out = forward()
        return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), inputs, grad)


def _flops_factor(direction: Direction, backward: float) -> float:
    return {"forward": 1.0, "backward": backward, "forward_backward": 1.0 + backward}[direction]


# -- attention ------------------------------------------------------------------------------------


def _backend_choices(names: list[str], device: torch.device) -> list[tuple[str, dict]]:
    """(label, spec) per backend; sdpa expands to its explicit kernels on CUDA."""
    choices = []
    for name in names:
        if name == "sdpa" and device.type == "cuda":
            choices += [(f"sdpa.{k}", {"name": "sdpa", "kernel": k}) for k in ("flash", "efficient", "cudnn", "math")]
        elif name == "flex":
            choices.append(("flex", {"name": "flex", "compile": True}))
        else:
            choices.append((name, {"name": name}))
    return choices


def attention_rows(cfg: AttentionKernels, ctx: Context) -> list[Row]:
    rows = []
    H, D, B = cfg.n_head, cfg.head_dim, cfg.batch
    for n in cfg.seq_lens:
        for variant in cfg.variants:
            n_kv = {"gqa": cfg.n_kv_head, "mqa": 1}.get(variant, H)
            window = cfg.window if variant == "window" else None
            needs = {"window"} if window else ({"bias"} if variant == "alibi" else set())
            shape = {"batch": B, "n_head": H, "n_kv_head": n_kv, "seq_len": n, "head_dim": D, "window": window}
            try:
                gen = torch.Generator(device="cpu").manual_seed(n)
                q, k, v = (torch.randn(B, h, n, D, generator=gen).to(ctx.device, ctx.dtype).requires_grad_()
                           for h in (H, n_kv, n_kv))
                grad = torch.randn(B, H, n, D, generator=gen).to(ctx.device, ctx.dtype)
                slopes = alibi_slopes(H).to(ctx.device) if variant == "alibi" else None
                pos = torch.arange(n, device=ctx.device)
                mask = Mask(pos, pos, window, slopes)  # causal over one sequence of n tokens
                reference = build("attention_backend", "math")  # in fp32: the reference for every dtype
                ref32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
                ref_out = reference(*ref32, mask)
                ref_grads = torch.autograd.grad(ref_out, ref32, grad.float())
            except Exception as e:  # noqa: BLE001 - a shape the reference cannot take, OOM: rows, not crashes
                rows += [_failure(ctx.base(component="attention", name=variant, backend=label, direction=direction,
                                           **shape), e)
                         for direction in cfg.directions for label, _ in _backend_choices(cfg.backends, ctx.device)]
                continue
            fwd_flops = attention_flops(B, H, n, visible_keys(n, window, causal=True), D, D)
            for direction in cfg.directions:
                candidates, pending = {}, {}
                for label, spec in _backend_choices(cfg.backends, ctx.device):
                    row = ctx.base(component="attention", name=variant, backend=label, direction=direction, **shape)
                    try:
                        component = get("attention_backend", spec["name"])
                    except ComponentError as e:
                        rows.append({**row, "status": "unavailable", "reason": str(e)})
                        continue
                    reason = component.unavailable_reason()
                    if reason is None and direction != "forward" and ctx.device.type == "cpu" and component.limitation():
                        reason = component.limitation()
                    if reason:
                        rows.append({**row, "status": "unavailable", "reason": reason})
                        continue
                    missing = needs - set(component.factory.capabilities(spec))
                    if missing:
                        rows.append({**row, "status": "unsupported", "reason": f"{label} cannot do {', '.join(missing)}"})
                        continue
                    try:
                        kernel = component.build(**{k: v for k, v in spec.items() if k != "name"})
                        # forward alone is inference: inputs without grad (FlexAttention on CPU insists)
                        args = [t.detach() for t in (q, k, v)] if direction == "forward" else [q, k, v]
                        if direction == "forward":
                            with torch.no_grad():
                                got = kernel(*args, mask)
                        else:
                            got = torch.autograd.grad(kernel(*args, mask), args, grad)
                        ok, error = _gate(got, ref_out if direction == "forward" else ref_grads, ctx.dtype)
                        row["max_error"] = error
                        row["kernel"] = getattr(kernel, "ran", None) or getattr(kernel, "name", label)
                        if not ok:
                            rows.append({**row, "status": "mismatch", "reason": f"max error {error:.3g} against math"})
                            continue
                        forward = (lambda kernel=kernel, args=args: kernel(*args, mask))
                        fn = _directions(forward, args, grad, direction)
                        row["peak_memory_bytes"], row["peak_memory_method"] = peak_memory(fn, ctx.device)
                    except Exception as e:  # noqa: BLE001 - unsupported shapes, OOM: rows, not crashes
                        rows.append(_failure(row, e))
                        continue
                    candidates[label], pending[label] = fn, row
                if candidates:
                    timings = ctx.time(candidates)
                    flops = fwd_flops * _flops_factor(direction, ATTENTION_BACKWARD)
                    rows += [ctx.finish(pending[label], timings[label], flops) for label in candidates]
    return rows


# -- MLP, norm, MoE ------------------------------------------------------------------------------


def _mlp_reference(module, x: torch.Tensor) -> torch.Tensor:
    """The same MLP written out in plain PyTorch from its weights."""
    h = F.linear(x, module.c_fc.weight, module.c_fc.bias)
    act = module.act
    if type(module).__name__ == "GatedMLP":
        gate, value = h.chunk(2, dim=-1)
        h = act(gate) * value
    else:
        h = act(h)
    return F.linear(h, module.c_proj.weight, module.c_proj.bias)


def _case_failed(component: str, name: str, directions: list[Direction], ctx: Context, shape: dict,
                  error: Exception) -> list[Row]:
    return [_failure(ctx.base(component=component, name=name, backend="torch", direction=d, **shape), error)
            for d in directions]


@dataclass
class ModuleCase:
    """One module to time: its input, a written-out reference, and its work for FLOP/s or GB/s."""

    name: str
    module: torch.nn.Module
    x: torch.Tensor
    reference: Callable
    flops: float | None
    nbytes: float | None
    shape: dict


def _module_rows(component: str, cases: list[ModuleCase], directions: list[Direction], ctx: Context) -> list[Row]:
    """Gate every case against its reference, then time those that pass, interleaved, per direction."""
    rows, ready = [], []
    for case in cases:
        try:
            ready.append((case, torch.randn_like(case.module(case.x)), case.reference(case.x)))
        except Exception as e:  # noqa: BLE001 - e.g. OOM or a shape the module rejects
            rows += _case_failed(component, case.name, directions, ctx, case.shape, e)
    for direction in directions:
        candidates, pending = {}, {}
        for case, grad, ref_out in ready:
            row = ctx.base(component=component, name=case.name, backend="torch", direction=direction, **case.shape)
            try:
                module, x = case.module, case.x
                inputs = [x, *module.parameters()]
                got = module(x) if direction == "forward" else torch.autograd.grad(module(x), inputs, grad)
                expected = ref_out if direction == "forward" else torch.autograd.grad(case.reference(x), inputs, grad)
                ok, error = _gate(got, expected, ctx.dtype)
                row["max_error"] = error
                if not ok:
                    rows.append({**row, "status": "mismatch", "reason": f"max error {error:.3g} against the reference"})
                    continue
                fn = _directions(lambda module=module, x=x: module(x), inputs, grad, direction)
                row["peak_memory_bytes"], row["peak_memory_method"] = peak_memory(fn, ctx.device)
            except Exception as e:  # noqa: BLE001
                rows.append(_failure(row, e))
                continue
            candidates[case.name], pending[case.name] = fn, (row, case)
        if not candidates:
            continue
        timings = ctx.time(candidates)
        factor = _flops_factor(direction, 2.0)  # backward: two matmuls per forward matmul
        for name, (row, case) in pending.items():
            rows.append(ctx.finish(row, timings[name], case.flops * factor if case.flops else None,
                                   case.nbytes * factor if case.nbytes else None))
    return rows


def mlp_rows(cfg: MLPKernels, ctx: Context) -> list[Row]:
    model = ModelConfig(n_embd=cfg.n_embd, n_head=1, n_layer=1, vocab_size=2, bias=False)
    rows, cases = [], []
    shape = {"tokens": cfg.tokens, "n_embd": cfg.n_embd}
    for name in cfg.names:
        torch.manual_seed(0)
        try:
            module = build("mlp", name, model).to(ctx.device, ctx.dtype)
        except Exception as e:  # noqa: BLE001
            rows += _case_failed("mlp", name, cfg.directions, ctx, shape, e)
            continue
        x = torch.randn(cfg.tokens, cfg.n_embd, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
        flops = matmul_flops_per_token(module, 1, False) * cfg.tokens
        cases.append(ModuleCase(name, module, x, lambda x, m=module: _mlp_reference(m, x), flops, None, shape))
    return rows + _module_rows("mlp", cases, cfg.directions, ctx)


def _norm_reference(name: str, module):
    def layernorm(x):
        mean = x.float().mean(-1, keepdim=True)
        var = (x.float() - mean).pow(2).mean(-1, keepdim=True)
        y = (x.float() - mean) / torch.sqrt(var + module.eps) * module.weight.float()
        return (y + module.bias.float() if module.bias is not None else y).to(x.dtype)

    def rmsnorm(x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + module.eps)
        return (y * module.weight.float()).to(x.dtype)

    references = {"layernorm": layernorm, "rmsnorm": rmsnorm}
    if name not in references:
        raise ValueError(f"no reference to check norm '{name}' against (have: {', '.join(references)})")
    return references[name]


def norm_rows(cfg: NormKernels, ctx: Context) -> list[Row]:
    rows, cases = [], []
    shape = {"tokens": cfg.tokens, "dim": cfg.dim}
    for name in cfg.names:
        try:
            module = build("norm", name, cfg.dim, None).to(ctx.device, ctx.dtype)
            reference = _norm_reference(name, module)
        except Exception as e:  # noqa: BLE001 - an unknown norm, or one without a written-out reference
            rows += _case_failed("norm", name, cfg.directions, ctx, shape, e)
            continue
        x = torch.randn(cfg.tokens, cfg.dim, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
        nbytes = 2 * x.numel() * x.element_size()  # memory-bound: read x, write y
        cases.append(ModuleCase(name, module, x, reference, None, nbytes, shape))
    return rows + _module_rows("norm", cases, cfg.directions, ctx)


def _moe_reference(moe, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, combined with the top-k gates: the dense equivalent (no capacity)."""
    tokens = x.reshape(-1, x.shape[-1])
    probs = moe.router(tokens).float().softmax(-1)
    gate, chosen = probs.topk(moe.top_k, dim=-1)
    if moe.top_k > 1:
        gate = gate / gate.sum(-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(1, chosen, gate)  # (N, E)
    outputs = torch.stack([e(tokens) for e in moe.experts], dim=1)  # (N, E, C)
    return (weights.to(x.dtype)[..., None] * outputs).sum(1).view_as(x)


def moe_rows(cfg: MoEKernels, ctx: Context) -> list[Row]:
    model = ModelConfig(n_embd=cfg.n_embd, n_head=1, n_layer=1, vocab_size=2, bias=False)
    rows, cases = [], []
    for n_experts in cfg.n_experts:
        for top_k in cfg.top_k:
            if top_k > n_experts:
                continue
            name = f"{n_experts} experts, top-{top_k}"
            shape = {"tokens": cfg.tokens, "n_embd": cfg.n_embd, "n_experts": n_experts, "top_k": top_k}
            torch.manual_seed(0)
            try:
                moe = build("moe", "topk", model, n_experts=n_experts, top_k=top_k, capacity_factor=None,
                            expert={"name": "gelu", "hidden": cfg.expert_hidden}).to(ctx.device, ctx.dtype)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory for the experts
                rows += _case_failed("moe", name, cfg.directions, ctx, shape, e)
                continue
            x = torch.randn(1, cfg.tokens, cfg.n_embd, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
            cases.append(ModuleCase(name, moe, x, lambda x, m=moe: _moe_reference(m, x),
                                    moe.flops_per_token(1, False) * cfg.tokens, None, shape))
    return rows + _module_rows("moe", cases, cfg.directions, ctx)


# -- quantized vs float linear layers -----------------------------------------------------------------


def quantization_rows(cfg: QuantizationKernels, ctx: Context) -> list[Row]:
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(cfg.in_features, cfg.out_features, bias=False)).to(ctx.device).eval()
    x = torch.randn(cfg.tokens, cfg.in_features, device=ctx.device)
    shape = {"tokens": cfg.tokens, "in_features": cfg.in_features, "out_features": cfg.out_features}
    flops = 2 * cfg.tokens * cfg.in_features * cfg.out_features
    with torch.no_grad():
        reference = layer(x)
    candidates, pending, rows = {"float": lambda: layer(x)}, {}, []
    pending["float"] = ctx.base(component="quantization", name="float", backend="torch", direction="forward",
                               dtype="float32", max_error=0.0, **shape)
    for name in cfg.names:
        row = ctx.base(component="quantization", name=name, backend="torchao", direction="forward", dtype="float32", **shape)
        try:
            component = get("quantization", name)
        except ComponentError as e:
            rows.append({**row, "status": "unavailable", "reason": str(e)})
            continue
        if component.unavailable_reason():
            rows.append({**row, "status": "unavailable", "reason": component.unavailable_reason()})
            continue
        try:
            quantized = copy.deepcopy(layer)
            with torch.no_grad():
                row["format"] = quantize(quantized, name).format
                error = max_error(quantized(x), reference)
            relative = error / float(reference.abs().max())
            row["max_error"] = error
            if relative > (0.05 if "int8" in name else 0.25):  # quantization error bounds, not fp32 ones
                rows.append({**row, "status": "mismatch", "reason": f"relative error {relative:.3g}"})
                continue
        except Exception as e:  # noqa: BLE001 - e.g. no int4 kernel on this device
            rows.append(_failure(row, e))
            continue
        candidates[name], pending[name] = (lambda q=quantized: q(x)), row
    with torch.no_grad():
        timings = ctx.time(candidates)
    return rows + [ctx.finish(pending[n], timings[n], flops) for n in candidates]


# -- inference: prefill and per-token decode with a KV cache ---------------------------------------------


def decode_rows(cfg: DecodeKernels, ctx: Context) -> list[Row]:
    rows = []
    for variant in cfg.variants:
        row = ctx.base(component="decode", name=variant, backend="sdpa", direction="inference", batch=cfg.batch,
                       prompt=cfg.prompt, new_tokens=cfg.new_tokens, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_embd=cfg.n_embd)
        try:
            rows += _decode_variant(cfg, variant, ctx, row)
        except Exception as e:  # noqa: BLE001 - an invalid shape or OOM: a row, and the sweep goes on
            rows.append(_failure(row, e))
    return rows


def _decode_variant(cfg: DecodeKernels, variant: str, ctx: Context, row: Row) -> list[Row]:
    """Prefill and decode rows of one attention variant (or a mismatch row when the cache is wrong)."""
    attention = {"mha": "mha", "gqa": {"name": "gqa", "n_kv_head": cfg.n_kv_head}, "mqa": "mqa",
                 "window": {"name": "window", "window": cfg.window}}
    config = ModelConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=256,
                         block_size=cfg.prompt + cfg.new_tokens, positional="rope", attention=attention[variant])
    torch.manual_seed(0)
    model = build_model(config).to(ctx.device, ctx.dtype).eval()
    idx = torch.randint(0, 256, (cfg.batch, cfg.prompt + cfg.new_tokens), device=ctx.device)
    prompt = idx[:, : cfg.prompt]
    row = {**row, "n_kv_head": model.blocks[0].attn.n_kv_head, "window": config.attention["window"]}
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache()
        steps = [model(prompt, cache=cache)[0]]
        steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(cfg.prompt, idx.shape[1])]
        ok, error = _gate(torch.cat(steps, 1), full, ctx.dtype)
        row["max_error"] = error
        if not ok:  # decode with the cache must give the full forward's logits
            return [{**row, "status": "mismatch", "reason": f"cached decode differs from full recompute by {error:.3g}"}]
        prefilled = model.new_cache()
        model(prompt, cache=prefilled)
        row["kv_cache_bytes"] = prefilled.nbytes()
        element = torch.finfo(ctx.dtype).bits // 8
        row["kv_cache_bytes_per_token"] = cfg.n_layer * model.blocks[0].attn.kv_cache_bytes_per_token(element)

        def prefill():
            model(prompt, cache=model.new_cache())

        def decode():
            cache = copy.copy(prefilled)  # layer caches are shallow-copied: appends make new tensors
            cache.layers = [copy.copy(layer) for layer in prefilled.layers]
            for t in range(cfg.prompt, idx.shape[1]):
                model(idx[:, t : t + 1], cache=cache)

        timings = ctx.time({"prefill": prefill, "decode": decode})
    per_token = timings["decode"].median / cfg.new_tokens
    decode_row = ctx.finish(dict(row), timings["decode"])
    decode_row.update(phase="decode", per_token_s=per_token, tokens_per_s=cfg.batch / per_token)
    return [{**ctx.finish(dict(row), timings["prefill"]), "phase": "prefill"}, decode_row]


def machine_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


