"""The kernels archbench times, each checked against its reference before it is timed.

Every function returns rows (dicts): what was run (component, name, backend, direction, shape,
dtype, device), its status (ok, mismatch, unavailable, unsupported, failed, oom) with a reason, and
for timed rows the median and IQR latency, achieved FLOP/s (matmuls as ``models.accounting`` counts
them; attention's q·kᵀ and probs·v as FlashAttention's benchmarks count them), bytes/s for
memory-bound ops, the fractions of this machine's measured peaks, and peak memory. A row that cannot
be timed says why; the sweep goes on.

Which components are timed comes from the registry (plugins included), what each needs of an
attention backend from the component contract (``models.contract``), and the reference every
candidate is checked against is the same module run in fp32 — with the ``math`` backend, for an
attention that takes a backend.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from bench import hardware
from bench.formatting import significant
from bench.kernels.config import (
    AttentionKernels, ConnectorKernels, DecodeKernels, Direction, ImageDecodeKernels, MLPKernels, MoEKernels,
    NormKernels, QuantizationKernels, VisionKernels, split_variant, variant_label, with_required, with_shared,
)
from bench.timing import agrees, max_error, time_interleaved
from models import ModelConfig, build_model, quantize
from models.accounting import ATTENTION_BACKWARD, cache_bytes, matmul_flops_per_token, sequence_flops
from models.attention_backends import KernelChooser, sdpa_choice, use_kernels
from models.config import attention_features, image_tokens, missing_features, prefix_positions
from models.contract import FEATURES
from models.fusion import GatedCrossAttentionLayer
from models.registry import Component, ComponentError, build_spec, get, list_components, resolve

Row = dict


class Context:
    """Device, dtype, measured peaks and timing settings shared by every case."""

    def __init__(self, device: torch.device, dtype: torch.dtype, min_time: float, noisy_threshold: float,
                 kernels: KernelChooser = sdpa_choice):
        self.device, self.dtype, self.min_time, self.noisy = device, dtype, min_time, noisy_threshold
        self.kernels = kernels  # what picks the kernel of `backend: auto` in every case (bench: KernelChoices)
        self.cache = "cold (L2 flushed)" if device.type == "cuda" else "warm"

    @functools.cached_property
    def peak_flops(self) -> float:
        """This machine's measured matmul FLOP/s in the dtype (measured once per machine, when first needed)."""
        return hardware.peak_matmul_flops(self.device, self.dtype)

    @functools.cached_property
    def peak_bandwidth(self) -> float:
        return hardware.peak_copy_bandwidth(self.device)

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


def _check(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor, direction: Direction,
           ref_out, ref_grads, dtype: torch.dtype) -> tuple[bool, float]:
    """Gate a candidate before timing: its output (forward, run without a graph — FlexAttention on CPU
    insists) or its gradients against the reference's."""
    if direction == "forward":
        with torch.no_grad():
            return agrees(forward(), ref_out, dtype)
    return agrees(_grads(forward(), inputs, grad), ref_grads, dtype)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], grad: torch.Tensor, retain_graph: bool = False) -> list:
    """Gradients of out·grad with respect to inputs; zeros for an input the output does not use."""
    found = torch.autograd.grad(out, inputs, grad, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for g, i in zip(found, inputs)]


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
        return lambda: _grads(out, inputs, grad, retain_graph=True)
    return lambda: _grads(forward(), inputs, grad)


def _trainable(module: nn.Module) -> list[torch.Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def _initialise(module: nn.Module) -> nn.Module:
    """Set raw parameters as the GPT would: each module that owns some and has ``reset_parameters()``
    (the contract) resets them; linear and embedding layers keep their constructed values."""
    for m in module.modules():
        if not isinstance(m, nn.Linear | nn.Embedding) and hasattr(m, "reset_parameters") \
                and any(True for _ in m.parameters(recurse=False)):
            m.reset_parameters()
    return module


def _flops_factor(direction: Direction, backward: float) -> float:
    return {"forward": 1.0, "backward": backward, "forward_backward": 1.0 + backward}[direction]




# -- attention: which variants, what they need -------------------------------------------------------


@dataclass
class Variant:
    """An attention variant resolved against the registry: its spec, with the options it requires
    filled from the section's settings, and the positional encoding it runs with."""

    label: str
    attention: dict  # resolved
    positional: dict  # resolved
    component: Component
    backend: dict | None = None  # the backend the variant names itself: then only that one is timed

    @property
    def takes_backend(self) -> bool:
        """Whether the attention delegates to a kernel of the attention_backend family (an option of it)."""
        option = self.component.options.get("backend")
        return option is not None and option.family == "attention_backend"

    @property
    def name(self) -> str:
        return self.attention["name"]


def _variants(cfg: AttentionKernels | DecodeKernels) -> list[tuple[str, Variant | Exception]]:
    """(row name, variant or why it does not resolve) for each listed variant, or every registered attention."""
    specs = cfg.variants if cfg.variants is not None else list_components("attention")
    found: list[tuple[str, Variant | Exception]] = []
    for spec in specs:
        label = variant_label(spec)
        try:
            attention, positional = split_variant(spec)
            names_backend = isinstance(attention, Mapping) and "backend" in attention
            attention = resolve("attention", with_required("attention", attention, cfg.required_fills()))
            positional = resolve("positional", cfg.positional if positional is None else positional)
            variant = Variant(label, attention, positional, get("attention", attention["name"]))
            if names_backend and variant.takes_backend:
                variant.backend = attention["backend"]
            found.append((label, variant))
        except Exception as e:  # noqa: BLE001 - an unknown name or option: a row, and the sweep goes on
            found.append((label, e))
    return found


def _unchecked_config(attention: dict, positional: dict, **sizes) -> ModelConfig:
    """A model config around one attention and positional encoding: every component resolved, the
    combination not yet checked, so that what is missing is asked of the contract and becomes a row."""
    defaults = {family: resolve(family, ModelConfig.model_fields[family].default) for family in ("norm", "mlp")}
    return ModelConfig.model_construct(**sizes, dropout=0.0, bias=False, attention=attention, positional=positional,
                                       moe=None, quantization=None, **defaults)


def _missing(config: ModelConfig) -> str | None:
    """The first attention feature (models.contract.FEATURES) the config needs that its attention,
    with its backend, does not handle (the contract's requires and handles hooks), or None."""
    missing = missing_features(config)
    feature = next(iter(missing), None)
    return f"cannot {FEATURES[feature]} ({feature}), needed by {missing[feature]}" if feature else None


def _checked(config: ModelConfig) -> ModelConfig:
    """The config validated whole: every component's check hook (e.g. n_kv_head must divide n_head)."""
    return ModelConfig.model_validate(config.model_dump())


def _spec_label(family: str, spec: dict) -> str:
    """A backend's row label: its name, and the options it sets away from their defaults."""
    defaults = resolve(family, spec["name"])
    changed = {k: v for k, v in spec.items() if k != "name" and defaults.get(k) != v}
    return spec["name"] + (f"({', '.join(f'{k}={v}' for k, v in changed.items())})" if changed else "")


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


def _attention_flops(module: nn.Module, seq_len: int) -> tuple[float, float]:
    """Forward FLOPs per token (causal): all matmuls (models.accounting), and of those the attention
    core (q·kᵀ and probs·v, declared by extra_flops_per_token), whose backward costs 2.5 forwards."""
    total = matmul_flops_per_token(module, seq_len, causal=True)
    core = sum(m.extra_flops_per_token(seq_len, True) for m in module.modules() if hasattr(m, "extra_flops_per_token"))
    return total, min(core, total)


@dataclass
class _Candidate:
    module: nn.Module | None = None
    note: str | None = None  # a caveat on this machine: forward only on CPU
    status: dict = field(default_factory=dict)  # a row that says why it cannot be timed
    error: Exception | None = None


def _candidate(variant: Variant, backend: dict | None, label: str, sizes: dict, reference: nn.Module,
               ctx: Context) -> _Candidate:
    """The module to time with one backend, its weights the reference's; or why there is none."""
    if backend is None:  # an attention without a backend option is timed as itself
        return _Candidate(copy.deepcopy(reference).to(ctx.dtype))
    try:
        component = get("attention_backend", backend["name"])
    except ComponentError as e:
        return _Candidate(status={"status": "unavailable", "reason": str(e)})
    reason = component.device_reason(backend, ctx.device)
    if reason:
        return _Candidate(status={"status": "unavailable", "reason": reason})
    try:
        config = _unchecked_config({**variant.attention, "backend": resolve("attention_backend", backend)},
                                   variant.positional, **sizes)
        missing = _missing(config)
        if missing:
            return _Candidate(status={"status": "unsupported", "reason": f"{label} {missing}"})
        config = _checked(config)
        module = build_spec("attention", config.attention, config)
        use_kernels(module, ctx.kernels)
        module.load_state_dict(reference.state_dict())
        return _Candidate(module.to(ctx.device, ctx.dtype).eval(), component.limitation())
    except Exception as e:  # noqa: BLE001 - a shape or option the backend rejects: a row
        return _Candidate(error=e)


def attention_rows(cfg: AttentionKernels, ctx: Context) -> list[Row]:
    rows = []
    names = cfg.backends if cfg.backends is not None else list_components("attention_backend")
    variants = _variants(cfg)
    for n in cfg.seq_lens:
        for label, variant in variants:
            if isinstance(variant, Exception):
                rows += [_failure(ctx.base(component="attention", name=label, backend="-", direction=d,
                                           batch=cfg.batch, n_head=cfg.n_head, seq_len=n, head_dim=cfg.head_dim), variant)
                         for d in cfg.directions]
                continue
            rows += _attention_variant(cfg, variant, n, names, ctx)
    return rows


def _attention_variant(cfg: AttentionKernels, variant: Variant, n: int, backends: list[str], ctx: Context) -> list[Row]:
    """Rows of one attention module at one sequence length: per direction, per backend it can take."""
    H, D, B = cfg.n_head, cfg.head_dim, cfg.batch
    C = H * D
    sizes = {"n_layer": 1, "n_head": H, "n_embd": C, "block_size": n, "vocab_size": 2}
    if variant.backend is not None:
        choices = [(_spec_label("attention_backend", variant.backend), variant.backend)]
    elif variant.takes_backend:
        choices = _backend_choices(backends, ctx.device)
    else:
        choices = [("own", None)]
    shape = {"batch": B, "n_head": H, "seq_len": n, "head_dim": D, "n_embd": C, "positional": variant.positional["name"]}

    def row(label: str, direction: str, **fields) -> Row:
        return ctx.base(component="attention", name=variant.label, backend=label, direction=direction, **shape, **fields)

    try:  # the reference: the same module in fp32, with the math backend when it takes one
        attention = {**variant.attention, "backend": resolve("attention_backend", "math")} if variant.takes_backend \
            else variant.attention
        config = _unchecked_config(attention, variant.positional, **sizes)
        missing = _missing(config)
        if missing:
            return [row(label, d, status="unsupported", reason=f"attention '{variant.name}' {missing}")
                    for d in cfg.directions for label, _ in choices]
        config = _checked(config)
        torch.manual_seed(0)
        reference = _initialise(build_spec("attention", config.attention, config)).to(ctx.device).eval()
        positional = build_spec("positional", config.positional, config).to(ctx.device)
        gen = torch.Generator(device="cpu").manual_seed(n)
        x = torch.randn(B, n, C, generator=gen).to(ctx.device, ctx.dtype).requires_grad_()
        grad = torch.randn(B, n, C, generator=gen).to(ctx.device, ctx.dtype)
        pos = torch.arange(n, device=ctx.device)
        positions = positional.at(pos)
        x32 = x.detach().float().requires_grad_()
        ref_out = reference(x32, positions, pos)
        ref_grads = _grads(ref_out, [x32, *_trainable(reference)], grad.float()) \
            if set(cfg.directions) - {"forward"} else None
        ref_out = ref_out.detach()
        shape.update(n_kv_head=getattr(reference, "n_kv_head", None), window=getattr(reference, "window", None))
        total, core = _attention_flops(reference, n)
    except Exception as e:  # noqa: BLE001 - a shape the module rejects, OOM: rows, not crashes
        return [_failure(row(label, d), e) for d in cfg.directions for label, _ in choices]
    against = "math in float32" if variant.takes_backend else "the same module in float32"
    prepared = {label: _candidate(variant, spec, label, sizes, reference, ctx) for label, spec in choices}
    rows = []
    for direction in cfg.directions:
        candidates, pending = {}, {}
        for label, candidate in prepared.items():
            r = row(label, direction)
            if candidate.status or candidate.error:
                rows.append({**r, **candidate.status} if candidate.status else _failure(r, candidate.error))
                continue
            if direction != "forward" and ctx.device.type == "cpu" and candidate.note:
                rows.append({**r, "status": "unavailable", "reason": candidate.note})
                continue
            module = candidate.module
            try:
                inputs = [x, *_trainable(module)]
                forward = (lambda module=module: module(x, positions, pos))
                ok, error = _check(forward, inputs, grad, direction, ref_out, ref_grads, ctx.dtype)
                r["max_error"] = error
                kernel = getattr(module, "kernel", None)
                if getattr(kernel, "ran", None) or getattr(kernel, "name", None):
                    r["kernel"] = getattr(kernel, "ran", None) or kernel.name
                if not ok:
                    rows.append({**r, "status": "mismatch", "reason": f"max error {significant(error)} against {against}"})
                    continue
                fn = _directions(forward, inputs, grad, direction)
                r["peak_memory_bytes"], r["peak_memory_method"] = peak_memory(fn, ctx.device)
            except Exception as e:  # noqa: BLE001 - unsupported shapes, OOM: rows, not crashes
                rows.append(_failure(r, e))
                continue
            candidates[label], pending[label] = fn, r
        if candidates:
            timings = ctx.time(candidates)
            flops = B * n * ((total - core) * _flops_factor(direction, 2.0)
                             + core * _flops_factor(direction, ATTENTION_BACKWARD))
            rows += [ctx.finish(pending[label], timings[label], flops) for label in candidates]
    return rows


# -- MLP, norm, MoE ------------------------------------------------------------------------------


def _case_failed(component: str, name: str, directions: list[Direction], ctx: Context, shape: dict,
                 error: Exception) -> list[Row]:
    return [_failure(ctx.base(component=component, name=name, backend="torch", direction=d, **shape), error)
            for d in directions]


def _call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


@dataclass
class ModuleCase:
    """One module to time: its input, its work for FLOP/s or GB/s, and what it is checked against."""

    name: str
    module: nn.Module  # in the machine's dtype
    x: torch.Tensor
    flops: float | None
    nbytes: float | None
    shape: dict
    call: Callable[[nn.Module, torch.Tensor], torch.Tensor] = _call  # (module, x) -> the output tensor
    # a written-out reference on the module's own inputs; None: the same module run in fp32
    reference: Callable[[torch.Tensor], torch.Tensor] | None = None


def _references(case: ModuleCase, grad: torch.Tensor, backward: bool) -> tuple[torch.Tensor, list | None]:
    """The reference output and gradients (input first, then each trainable parameter)."""
    if case.reference is None:  # the same module and input, upcast: its fp32 path
        module = copy.deepcopy(case.module).float()
        x = case.x.detach().float().requires_grad_()
        out = case.call(module, x)
        inputs = [x, *_trainable(module)]
    else:
        out = case.reference(case.x)
        inputs = [case.x, *_trainable(case.module)]
    grads = _grads(out, inputs, grad.to(out.dtype)) if backward else None
    return out.detach(), grads


def _module_rows(component: str, cases: list[ModuleCase], directions: list[Direction], ctx: Context) -> list[Row]:
    """Gate every case against its reference, then time those that pass, interleaved, per direction."""
    rows, ready = [], []
    backward = bool(set(directions) - {"forward"})
    for case in cases:
        try:
            grad = torch.randn_like(case.call(case.module, case.x))
            ready.append((case, grad, *_references(case, grad, backward)))
        except Exception as e:  # noqa: BLE001 - e.g. OOM or a shape the module rejects
            rows += _case_failed(component, case.name, directions, ctx, case.shape, e)
    for direction in directions:
        candidates, pending = {}, {}
        for case, grad, ref_out, ref_grads in ready:
            row = ctx.base(component=component, name=case.name, backend="torch", direction=direction, **case.shape)
            try:
                module, x = case.module, case.x
                inputs = [x, *_trainable(module)]
                forward = (lambda case=case: case.call(case.module, case.x))
                ok, error = _check(forward, inputs, grad, direction, ref_out, ref_grads, ctx.dtype)
                row["max_error"] = error
                if not ok:
                    against = "the reference" if case.reference else "the same module in float32"
                    rows.append({**row, "status": "mismatch", "reason": f"max error {significant(error)} against {against}"})
                    continue
                fn = _directions(forward, inputs, grad, direction)
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


def _members(family: str, names: list[str] | None) -> list[str]:
    return list(names) if names is not None else list_components(family)


def mlp_rows(cfg: MLPKernels, ctx: Context) -> list[Row]:
    model = ModelConfig(n_embd=cfg.n_embd, n_head=1, n_layer=1, vocab_size=2, bias=False)
    rows, cases = [], []
    shape = {"tokens": cfg.tokens, "n_embd": cfg.n_embd}
    for name in _members("mlp", cfg.names):
        torch.manual_seed(0)
        try:
            module = _initialise(build_spec("mlp", with_required("mlp", name, cfg.required_fills()), model))
            module = module.to(ctx.device, ctx.dtype)
        except Exception as e:  # noqa: BLE001 - an unknown name, an option it needs
            rows += _case_failed("mlp", name, cfg.directions, ctx, shape, e)
            continue
        x = torch.randn(cfg.tokens, cfg.n_embd, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
        flops = matmul_flops_per_token(module, 1, False) * cfg.tokens
        cases.append(ModuleCase(name, module, x, flops, None, shape))
    return rows + _module_rows("mlp", cases, cfg.directions, ctx)


def norm_rows(cfg: NormKernels, ctx: Context) -> list[Row]:
    model = ModelConfig(n_embd=cfg.dim, n_head=1, n_layer=1, vocab_size=2)
    rows, cases = [], []
    shape = {"tokens": cfg.tokens, "dim": cfg.dim}
    for name in _members("norm", cfg.names):
        torch.manual_seed(0)
        try:
            module = _initialise(build_spec("norm", with_required("norm", name, cfg.required_fills()), cfg.dim, model))
            module = module.to(ctx.device, ctx.dtype)
        except Exception as e:  # noqa: BLE001 - an unknown name, an option it needs
            rows += _case_failed("norm", name, cfg.directions, ctx, shape, e)
            continue
        x = torch.randn(cfg.tokens, cfg.dim, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
        nbytes = 2 * x.numel() * x.element_size()  # memory-bound: read x, write y
        cases.append(ModuleCase(name, module, x, None, nbytes, shape))
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


def _moe_output(moe: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A MoE returns (output, MoEAux): the output is what is checked and timed."""
    return moe(x)[0]


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
                moe = build_spec("moe", {"name": "topk", "n_experts": n_experts, "top_k": top_k, "capacity_factor": None,
                                         "expert": {"name": "gelu", "hidden": cfg.expert_hidden}}, model)
                moe = moe.to(ctx.device, ctx.dtype)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory for the experts
                rows += _case_failed("moe", name, cfg.directions, ctx, shape, e)
                continue
            x = torch.randn(1, cfg.tokens, cfg.n_embd, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
            cases.append(ModuleCase(name, moe, x, moe.flops_per_token(1, False) * cfg.tokens, None, shape,
                                    call=_moe_output, reference=lambda x, m=moe: _moe_reference(m, x)))
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
                row["format"] = quantize(quantized, name, calibration=x).format  # GPTQ/AWQ calibrate on x
                error = max_error(quantized(x), reference)
            relative = error / float(reference.abs().max())
            row["max_error"] = error
            if relative > (0.05 if "int8" in name else 0.25):  # quantization error bounds, not fp32 ones
                rows.append({**row, "status": "mismatch", "reason": f"relative error {significant(relative)}"})
                continue
        except Exception as e:  # noqa: BLE001 - e.g. no int4 kernel on this device
            rows.append(_failure(row, e))
            continue
        candidates[name], pending[name] = (lambda q=quantized: q(x)), row
    with torch.no_grad():
        timings = ctx.time(candidates)
    return rows + [ctx.finish(pending[n], timings[n], flops) for n in candidates]


# -- inference: prefill and per-token decode with a KV cache or a state ----------------------------------


@dataclass
class _DecodeCase:
    """One variant's model, checked and ready to time at each prompt length."""

    row: Row  # the fields its rows share
    model: nn.Module
    idx: torch.Tensor  # (batch, longest prompt + new_tokens) tokens: prompts are its prefixes


def decode_rows(cfg: DecodeKernels, ctx: Context) -> list[Row]:
    """Per attention variant, a small GPT: prefill of a prompt, then per-token decoding with its cache (the
    contract's 'cache' feature: a KV cache, or a recurrent mixer's state), at each prompt length of the
    section (``contexts``, else the one ``prompt``); an 'unsupported' row with the reason for the others.

    Each model is checked once, before anything is timed: cached decode after the *shortest* prompt must
    give the full forward's logits, else it is a 'mismatch' row and is not timed. Only there: a full
    forward at every length (8k tokens on a CPU) would cost more than the timings, and the cache's code
    path does not change with the length. At each length, every variant's prefill and decode are timed
    interleaved, so that their ratios at one length are side by side.

    Rows carry, besides the latencies (decode: per token): the bytes the cache holds after the prefill
    (``kv_cache_bytes``, cache.nbytes(): a KV cache's or a state's) and after decoding
    (``kv_cache_bytes_final``); what the layers declare at the timed dtype, ``kv_cache_bytes_per_token``
    and ``state_bytes`` (per sequence, whatever its length), each summed over the layers that have it
    (``models.accounting.cache_bytes``); the check's ``max_error`` and the prompt length it was made at
    (``checked_at``); with ``contexts``, the row's ``context`` (its prompt length, also ``prompt``). A
    variant that fails or runs out of memory at a length is a row with the reason at that length."""
    lengths = cfg.lengths()
    rows, cases = [], []
    for label, variant in _variants(cfg):
        backend = "-" if isinstance(variant, Exception) else \
            _spec_label("attention_backend", variant.attention["backend"]) if variant.takes_backend else "own"
        row = ctx.base(component="decode", name=label, backend=backend, direction="inference", batch=cfg.batch,
                       prompt=lengths[0], new_tokens=cfg.new_tokens, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_embd=cfg.n_embd)
        if isinstance(variant, Exception):
            rows.append(_failure(row, variant))
            continue
        row["positional"] = variant.positional["name"]
        try:
            found = _decode_case(cfg, variant, ctx, row)
        except Exception as e:  # noqa: BLE001 - an invalid shape or OOM: a row, and the sweep goes on
            rows.append(_failure(row, e))
            continue
        if isinstance(found, list):  # a row saying why it is not timed
            rows += found
        else:
            cases.append(found)
    for length in lengths:
        rows += _decode_at(cfg, cases, length, ctx)
    return rows


def _decode_case(cfg: DecodeKernels, variant: Variant, ctx: Context, row: Row) -> list[Row] | _DecodeCase:
    """One attention variant's model, checked at the shortest prompt; or [a row saying why it is not timed]."""
    config = _unchecked_config(variant.attention, variant.positional, n_layer=cfg.n_layer, n_head=cfg.n_head,
                               n_embd=cfg.n_embd, vocab_size=256, block_size=cfg.block_size)
    missing = _missing(config)
    if missing:
        return [{**row, "status": "unsupported", "reason": f"attention '{variant.name}' {missing}"}]
    handles = attention_features(config)
    if "cache" not in handles:
        return [{**row, "status": "unsupported",
                 "reason": f"attention '{variant.name}' does not {FEATURES['cache']} (cache): it handles "
                           f"{', '.join(sorted(handles)) or 'none of the attention features'}"}]
    config = _checked(config)
    model = build_model(config, seed=0, kernels=ctx.kernels).to(ctx.device, ctx.dtype).eval()
    idx = torch.randint(0, 256, (cfg.batch, cfg.block_size), device=ctx.device,
                        generator=torch.Generator(device=ctx.device).manual_seed(0))
    attn = model.blocks[0].attn
    per_token, state = cache_bytes(model, torch.finfo(ctx.dtype).bits // 8)
    shortest = cfg.lengths()[0]
    row = {**row, "n_kv_head": getattr(attn, "n_kv_head", None), "window": getattr(attn, "window", None),
           "kv_cache_bytes_per_token": per_token, "state_bytes": state, "checked_at": shortest}
    end = shortest + cfg.new_tokens
    with torch.no_grad():
        full = model(idx[:, :end]).logits
        cache = model.new_cache()
        steps = [model(idx[:, :shortest], cache=cache).logits]
        steps += [model(idx[:, t : t + 1], cache=cache).logits for t in range(shortest, end)]
        ok, error = agrees(torch.cat(steps, 1), full, ctx.dtype)
    row["max_error"] = error
    if not ok:  # decode with the cache must give the full forward's logits
        where = {"context": shortest} if cfg.contexts is not None else {}
        return [{**row, **where, "status": "mismatch",
                 "reason": f"cached decode differs from full recompute by {significant(error)} (after a "
                           f"{shortest}-token prompt)"}]
    return _DecodeCase(row, model, idx)


def _decode_at(cfg: DecodeKernels, cases: list[_DecodeCase], length: int, ctx: Context) -> list[Row]:
    """Every checked model's prefill and decode after a `length`-token prompt, timed interleaved."""
    rows, candidates, pending = [], {}, {}
    end = length + cfg.new_tokens
    for i, case in enumerate(cases):
        row = {**case.row, "prompt": length, **({"context": length} if cfg.contexts is not None else {})}
        model, idx = case.model, case.idx
        prompt = idx[:, :length]
        try:  # once untimed: what the cache holds, and an OOM here is a row at this length
            with torch.no_grad():
                prefilled = model.new_cache()
                model(prompt, cache=prefilled)
                cache = _copy_cache(prefilled)
                for t in range(length, end):
                    model(idx[:, t : t + 1], cache=cache)
            row.update(kv_cache_bytes=prefilled.nbytes(), kv_cache_bytes_final=cache.nbytes())
        except Exception as e:  # noqa: BLE001 - out of memory at this length: a row, the other lengths go on
            rows.append(_failure(row, e))
            continue

        def prefill(model=model, prompt=prompt):
            model(prompt, cache=model.new_cache())

        def decode(model=model, idx=idx, prefilled=prefilled):
            cache = _copy_cache(prefilled)
            for t in range(length, end):
                model(idx[:, t : t + 1], cache=cache)

        key = f"{i} {row['name']}"
        candidates[f"{key} prefill"], pending[f"{key} prefill"] = prefill, {**row, "phase": "prefill"}
        candidates[f"{key} decode"], pending[f"{key} decode"] = decode, {**row, "phase": "decode"}
    if not candidates:
        return rows
    try:
        with torch.no_grad():
            timings = ctx.time(candidates)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory mid-rounds: no timing of this length stands
        return rows + [_failure(r, e) for r in pending.values()]
    for key, r in pending.items():
        r = ctx.finish(r, timings[key])
        if r["phase"] == "decode":
            per_token = r["median_s"] / cfg.new_tokens
            r.update(per_token_s=per_token, tokens_per_s=cfg.batch / per_token)
        rows.append(r)
    return rows


# -- vision-language: image encoders, connectors, decoding with an image ---------------------------------


def _shared_specs(family: str, cfg: VisionKernels | ConnectorKernels) -> list[tuple[str, dict | Exception]]:
    """(row name, resolved spec or why it does not resolve) per listed variant, or every registered member,
    each with the section's shared settings for the options it takes and leaves unset."""
    specs = cfg.variants if cfg.variants is not None else list_components(family)
    found: list[tuple[str, dict | Exception]] = []
    for spec in specs:
        try:
            found.append((variant_label(spec), resolve(family, with_shared(family, spec, cfg.shared_fills()))))
        except Exception as e:  # noqa: BLE001 - an unknown name or option: a row, and the sweep goes on
            found.append((variant_label(spec), e))
    return found


def _grid_label(grid) -> str:
    return f"{grid[0]}x{grid[1]}"


def vision_rows(cfg: VisionKernels, ctx: Context) -> list[Row]:
    """Each image encoder on a batch of images in [0, 1]: FLOPs from its flops_per_image() × batch."""
    model = ModelConfig(n_embd=64, n_head=1, n_layer=1, vocab_size=2, bias=False)  # the context: bias, dropout
    rows, cases = [], []
    for label, spec in _shared_specs("vision", cfg):
        shape = {"batch": cfg.batch, "image_size": cfg.image_size, "channels": cfg.channels}
        torch.manual_seed(0)
        try:
            if isinstance(spec, Exception):
                raise spec
            module = _initialise(build_spec("vision", spec, model)).to(ctx.device, ctx.dtype)
            size, channels = spec.get("image_size", cfg.image_size), spec.get("channels", cfg.channels)
            grid = tuple(module.grid_size)
            per_image = float(module.flops_per_image())
            shape = {"batch": cfg.batch, "image_size": size, "channels": channels,
                     **({"patch_size": spec["patch_size"]} if "patch_size" in spec else {}),
                     "grid": _grid_label(grid), "patches": grid[0] * grid[1], "width": module.width,
                     "flops_per_image": per_image}
            x = torch.rand(cfg.batch, channels, size, size, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
        except Exception as e:  # noqa: BLE001 - an unknown name, options that do not tile the image, OOM
            rows += _case_failed("vision", label, cfg.directions, ctx, shape, e)
            continue
        cases.append(ModuleCase(label, module, x, per_image * cfg.batch, None, shape))
    return rows + _module_rows("vision", cases, cfg.directions, ctx)


def connector_rows(cfg: ConnectorKernels, ctx: Context) -> list[Row]:
    """Each connector on patch features (batch, rows·cols, in_dim): FLOPs from its flops_per_image() ×
    batch, and the image tokens it hands the language model (its ``tokens`` hook, checked against the
    output's length)."""
    model = ModelConfig(n_embd=cfg.n_embd, n_head=1, n_layer=1, vocab_size=2, bias=False)
    grid = tuple(cfg.grid)
    patches = grid[0] * grid[1]
    rows, cases = [], []
    for label, spec in _shared_specs("connector", cfg):
        shape = {"batch": cfg.batch, "grid": _grid_label(grid), "patches": patches, "in_dim": cfg.in_dim,
                 "n_embd": cfg.n_embd}
        torch.manual_seed(0)
        try:
            if isinstance(spec, Exception):
                raise spec
            component = get("connector", spec["name"])
            module = _initialise(build_spec("connector", spec, cfg.in_dim, grid, model)).to(ctx.device, ctx.dtype)
            x = torch.randn(cfg.batch, patches, cfg.in_dim, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
            with torch.no_grad():
                made = module(x).shape[1]
            tokens = int(component.factory.tokens(grid, {**spec, **component.fixed})) \
                if hasattr(component.factory, "tokens") else made
            per_image = float(module.flops_per_image())
            shape.update(image_tokens=tokens, flops_per_image=per_image)
        except Exception as e:  # noqa: BLE001 - an unknown name, a factor that does not tile the grid, OOM
            rows += _case_failed("connector", label, cfg.directions, ctx, shape, e)
            continue
        if made != tokens:
            rows += [ctx.base(component="connector", name=label, backend="torch", direction=d, **shape,
                              status="mismatch", reason=f"its tokens() says {tokens} image tokens, its forward made {made}")
                     for d in cfg.directions]
            continue
        cases.append(ModuleCase(label, module, x, per_image * cfg.batch, None, shape))
    return rows + _module_rows("connector", cases, cfg.directions, ctx)


def _copy_cache(cache):
    """A cache to decode into, leaving `cache` as it is (layer caches append new tensors, never in place)."""
    copied = copy.copy(cache)
    copied.layers = [copy.copy(layer) for layer in cache.layers]
    return copied


def image_decode_rows(cfg: ImageDecodeKernels, ctx: Context) -> list[Row]:
    """Per fusion, a small vision-language model (the same encoder, connector and language model sizes):
    prefill of a prompt with an image, then greedy decoding; every model's prefill and decode are timed
    interleaved. A model whose cached decode differs from the full forward is a mismatch row, not timed."""
    rows, candidates, pending = [], {}, {}
    for fusion in cfg.fusions:
        label = variant_label(fusion)
        row = ctx.base(component="image_decode", name=label, backend="-", direction="inference", batch=cfg.batch,
                       prompt=cfg.prompt, new_tokens=cfg.new_tokens, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_embd=cfg.n_embd, vision=variant_label(cfg.vision), connector=variant_label(cfg.connector),
                       fusion=label)
        try:
            found = _image_decode_case(cfg, fusion, ctx, row)
        except Exception as e:  # noqa: BLE001 - an invalid combination or OOM: a row, and the sweep goes on
            rows.append(_failure(row, e))
            continue
        if isinstance(found, list):  # a row saying why it cannot be timed
            rows += found
            continue
        for phase, (fn, phase_row) in found.items():
            candidates[f"{label} {phase}"], pending[f"{label} {phase}"] = fn, phase_row
    if candidates:
        with torch.no_grad():
            timings = ctx.time(candidates)
        for key, r in pending.items():
            r = ctx.finish(r, timings[key], r.pop("flops", None))
            if r["phase"] == "decode":
                r.update(per_token_s=r["median_s"] / cfg.new_tokens, tokens_per_s=cfg.batch * cfg.new_tokens / r["median_s"])
            rows.append(r)
    return rows


def _image_decode_case(cfg: ImageDecodeKernels, fusion, ctx: Context,
                       row: Row) -> list[Row] | dict[str, tuple[Callable, Row]]:
    """One model's prefill and decode callables with their rows ({phase: (fn, row)}), or [a row saying why not]."""
    spec = cfg.model(fusion)
    config = ModelConfig(**spec)
    prefix, tokens = prefix_positions(config), image_tokens(config)
    if prefix:  # a prefix's image tokens take positions before the text
        config = ModelConfig(**{**spec, "block_size": spec["block_size"] + prefix})
    row = {**row, "fusion": config.fusion["name"], "image_tokens": tokens, "prefix_positions": prefix}
    backend = config.attention.get("backend")
    row["backend"] = _spec_label("attention_backend", backend) if isinstance(backend, dict) else "own"
    model = build_model(config, seed=0, kernels=ctx.kernels).to(ctx.device, ctx.dtype).eval()
    with torch.no_grad():
        for layer in model.modules():  # Flamingo's gates start closed (tanh 0 = 0): open them, so that the
            if isinstance(layer, GatedCrossAttentionLayer):  # gate below checks the image is read while decoding
                layer.gates.fill_(1.0)
    if model.new_cache() is None:
        return [{**row, "status": "unsupported",
                 "reason": f"attention '{config.attention['name']}' does not {FEATURES['cache']} (cache)"}]
    vision = model.vision
    size, channels = getattr(vision, "image_size", cfg.image_size), getattr(vision, "channels", cfg.channels)
    grid = tuple(vision.grid_size)
    row.update(image_size=size, channels=channels, grid=_grid_label(grid), patches=grid[0] * grid[1],
               positional=config.positional["name"])
    gen = torch.Generator(device="cpu").manual_seed(0)
    images = torch.rand(cfg.batch, channels, size, size, generator=gen).to(ctx.device, ctx.dtype)
    prompt = torch.randint(0, config.vocab_size, (cfg.batch, cfg.prompt), generator=gen).to(ctx.device)
    with torch.no_grad():
        prefilled = model.new_cache()
        logits = model(prompt, cache=prefilled, images=images).logits
        first = logits[:, -1:].argmax(-1)  # (B, 1): greedy
        cache, steps, fed, held = _copy_cache(prefilled), [logits], [], [prefilled.nbytes()]
        token = first
        for _ in range(cfg.new_tokens):
            fed.append(token)
            logits = model(token, cache=cache).logits
            steps.append(logits)
            held.append(cache.nbytes())
            token = logits[:, -1:].argmax(-1)
        full = model(torch.cat([prompt, *fed], 1), images=images).logits  # the same tokens, recomputed whole
        ok, error = agrees(torch.cat(steps, 1), full, ctx.dtype)
    row["max_error"] = error
    if not ok:
        return [{**row, "status": "mismatch",
                 "reason": f"cached decode with the image differs from full recompute by {significant(error)}"}]
    # what the cache holds for the image: a prefix's positions in every layer, or cross-attention's
    # projected image keys and values (counted by Cache.nbytes too)
    cross_bytes = sum(t.numel() * t.element_size() for kv in prefilled.image_kv.values() for t in kv)
    row.update(kv_cache_bytes=held[0], kv_cache_bytes_final=held[-1], kv_cache_bytes_steps=held,
               image_kv_bytes=cross_bytes)
    if all(hasattr(b.attn, "kv_cache_bytes_per_token") for b in model.blocks):
        element = torch.finfo(ctx.dtype).bits // 8
        per_token = sum(b.attn.kv_cache_bytes_per_token(element) for b in model.blocks)
        row.update(kv_cache_bytes_per_token=per_token,
                   kv_cache_image_bytes=cfg.batch * prefix * per_token + cross_bytes)

    def prefill():
        with torch.no_grad():
            model(prompt, cache=model.new_cache(), images=images)

    def decode():
        with torch.no_grad():
            cache, token = _copy_cache(prefilled), first
            for _ in range(cfg.new_tokens):
                token = model(token, cache=cache).logits[:, -1:].argmax(-1)

    prefill_flops = cfg.batch * sequence_flops(model, cfg.prompt, causal=True)
    return {"prefill": (prefill, {**row, "phase": "prefill", "flops": prefill_flops}),
            "decode": (decode, {**row, "phase": "decode"})}


def machine_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


