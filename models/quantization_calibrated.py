"""Calibrated post-training quantization: GPTQ (Frantar et al. 2022) and AWQ (Lin et al. 2023).

Both choose low-bit weights from the activations that calibration sequences (token windows of the
run's training split) produce, and store them exactly as round-to-nearest does on the device: the
same grid (``Grid``), the same torchao tensor, the same kernel. So a GPTQ or AWQ model's bytes and
latency compare like for like with ``int4_weight_only``; only which integers are stored differs.

- GPTQ: each layer's Hessian H = XᵀX/N of its inputs X; columns quantized one at a time (optionally in
  order of decreasing H diagonal), each one's rounding error fed back into the columns not yet
  quantized through the Cholesky factor of H⁻¹, so the layer's output XWᵀ moves as little as
  possible. Layers are quantized block by block in module order, each calibrated on the inputs the
  already-quantized layers before it produce (as the paper does).
- AWQ: per input channel j a scale s_j = mean|x_j|^α (α searched on a grid, minimising the layer's
  output error on the calibration tokens); the weights W·diag(s) are rounded and the inputs divided
  by s. Where a layer's input is the output of a norm whose gain is applied last (LayerNorm,
  RMSNorm) and only linear layers read it, 1/s is folded into that norm's gain and bias and s into
  every layer reading it; elsewhere the layer divides its input by s at run time. Then, as the
  authors' code does, each row and group's range is clipped to the fraction of its max |w| whose
  rounding moves that group's output least (not in the layers that produce q and k).

A layer no calibration token reaches (an expert the router never chose) is rounded to nearest.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import pydantic
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from models.quantization import INT4_MAPPING, Int4WeightOnly, Quantizer, _torchao_probe, quantizable, run_in_dtype
from models.registry import register


class Calibration(pydantic.BaseModel):
    """Calibration windows: `sequences` of `seq_len` tokens (None: the run's) from the training split."""

    model_config = pydantic.ConfigDict(extra="forbid")
    sequences: pydantic.PositiveInt = 128
    seq_len: pydantic.PositiveInt | None = None


# -- the grid weights are rounded onto --------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """The integers a weight is rounded onto, one (scale, zero point) per row and group of `group_size`
    input channels: the mapping ``int4_weight_only`` uses on `device` (``INT4_MAPPING``).

    cpu: symmetric, q in [-2^(b-1), 2^(b-1) - 1], w ≈ q·scale (torchao IntxWeightOnlyConfig); any b ≤ 8.
    cuda: asymmetric with a float zero point, q in [0, 15], w ≈ q·scale + zero − 8·scale, scales in
    bf16 (tinygemm's packed int4); 4 bits only.
    """

    bits: int
    group_size: int
    device: Literal["cpu", "cuda"] = "cpu"

    @property
    def bounds(self) -> tuple[int, int]:
        if self.device == "cuda":
            return 0, 2**self.bits - 1
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    def params(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(scale, zero point) of w (rows, k) per row and group: two (rows, k // group_size) tensors."""
        from torchao.quantization import MappingType
        from torchao.quantization.quant_primitives import _choose_qparams_affine_tinygemm, choose_qparams_affine

        qmin, qmax = self.bounds
        block = (1, self.group_size)
        if self.device == "cuda":  # tinygemm computes them on the bf16 weights, in bf16
            scale, zero = _choose_qparams_affine_tinygemm(w.to(torch.bfloat16), MappingType.ASYMMETRIC, block, torch.int32,
                                                          qmin, qmax, scale_dtype=torch.bfloat16,
                                                          zero_point_dtype=torch.bfloat16)
            return scale.view(w.shape[0], -1).float(), zero.view(w.shape[0], -1).float()
        return choose_qparams_affine(w, MappingType.SYMMETRIC, block, torch.int8, qmin, qmax,
                                     zero_point_dtype=torch.int8, keepdim=True)

    def quantize(self, w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """The integers (int8 tensor shaped like w) of w (rows, k) under per-group (rows, k // g) qparams;
        a single column (rows, 1) takes its group's (rows, 1) qparams."""
        from torchao.quantization.quant_primitives import _quantize_affine_tinygemm, quantize_affine

        qmin, qmax = self.bounds
        block = (1, w.shape[1] // scale.shape[1])
        if self.device == "cuda":
            return _quantize_affine_tinygemm(w, block, scale, zero, torch.int32, qmin, qmax).to(torch.int8)
        return quantize_affine(w, block, scale, zero, torch.int8, qmin, qmax)

    def dequantize(self, q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """The float weights (fp32) the integers q stand for."""
        from torchao.quantization.quant_primitives import _dequantize_affine_tinygemm, dequantize_affine

        qmin, qmax = self.bounds
        block = (1, q.shape[1] // scale.shape[1])
        if self.device == "cuda":
            return _dequantize_affine_tinygemm(q.to(torch.int32), block, scale, zero, torch.int32, qmin, qmax,
                                               output_dtype=torch.float32)
        return dequantize_affine(q, block, scale, zero, torch.int8, qmin, qmax, output_dtype=torch.float32)

    def round_to_nearest(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(q, scale, zero) of plain round-to-nearest, as ``int4_weight_only`` computes them."""
        scale, zero = self.params(w)
        return self.quantize(w, scale, zero), scale, zero

    def pack(self, q: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
        """The torchao weight tensor ``int4_weight_only`` would hold for these integers and qparams."""
        if self.device == "cuda":
            return _tinygemm_tensor(q, scale, zero, self.group_size)
        from torchao.quantization import IntxUnpackedToInt8Tensor

        target = getattr(torch, f"int{self.bits}")
        return IntxUnpackedToInt8Tensor(q.to(torch.int8), scale.to(dtype), zero.to(torch.int8), target,
                                        (1, self.group_size), dtype, None)


def _tinygemm_tensor(q: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """torchao's Int4TilePackedTo4dTensor for given integers (0..15) and qparams: padded and packed
    as its from_hp does (in_features to a multiple of 1024, out_features to 8; padded groups of zeros)."""
    from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import Int4TilePackedTo4dTensor
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    rows, k = q.shape
    pad_k, pad_rows = -k % 1024, -rows % 8
    grid = Grid(4, group_size, "cuda")
    padding_scale, padding_zero = grid.params(torch.zeros(1, group_size, device=q.device))
    q = F.pad(q.to(torch.int32), (0, pad_k, 0, pad_rows), value=int(grid.quantize(
        torch.zeros(1, group_size, device=q.device), padding_scale, padding_zero)[0, 0]))
    scale = F.pad(scale, (0, pad_k // group_size, 0, pad_rows), value=float(padding_scale))
    zero = F.pad(zero, (0, pad_k // group_size, 0, pad_rows), value=float(padding_zero))
    packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).contiguous(), 8)
    scale_and_zero = pack_tinygemm_scales_and_zeros(scale.to(torch.bfloat16), zero.to(torch.bfloat16), torch.bfloat16)
    return Int4TilePackedTo4dTensor(qdata=packed, scale_and_zero=scale_and_zero, block_size=[1, group_size],
                                    shape=torch.Size((rows, k)), act_pre_scale=None)


# -- GPTQ ----------------------------------------------------------------------------------------------


@torch.no_grad()
def gptq(w: Tensor, hessian: Tensor, grid: Grid, *, damp: float = 0.01, act_order: bool = True,
         block: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of one weight matrix w (rows, k) given the Hessian XᵀX/N (k, k) of its inputs.

    Returns (q, scale, zero) on ``grid``. Columns are quantized left to right (in order of decreasing
    H diagonal with act_order), each one's error (w − ŵ)/[H⁻¹]_ii subtracted from the columns still to
    come as err·[U]_i,j, U the upper Cholesky factor of H⁻¹ (the paper's Algorithm 1, updates applied
    lazily per block of columns). Group qparams: with act_order computed from the original weights of
    each group up front (so groups stay contiguous in the input channels, the layout the int4 kernels
    read); without it from the error-updated weights when the group's first column comes.
    """
    rows, k = w.shape
    g = grid.group_size
    block = max(g, block // g * g)  # a group never straddles two blocks
    W = w.detach().float().clone()
    H = hessian.detach().double().clone()
    dead = H.diagonal() == 0  # inputs that were always zero: their weights do not matter
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(k, device=w.device)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * H.diagonal().mean() * torch.eye(k, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()

    q = torch.zeros(rows, k, dtype=torch.int8, device=w.device)
    if act_order:
        scale, zero = grid.params(W[:, torch.argsort(perm)])  # original column order, natural groups
    else:  # filled group by group below, in the dtypes the grid gives
        scale, zero = (torch.zeros(rows, k // g, dtype=t.dtype, device=w.device) for t in grid.params(W[:, :g]))
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        errors = torch.zeros_like(W1)
        for i in range(i2 - i1):
            column = int(perm[i1 + i])
            group = column // g
            if not act_order and column % g == 0:
                s, z = grid.params(W1[:, i : i + g])
                scale[:, group], zero[:, group] = s[:, 0].to(scale.dtype), z[:, 0].to(zero.dtype)
            s, z = scale[:, group : group + 1], zero[:, group : group + 1]
            qi = grid.quantize(W1[:, i : i + 1], s, z)
            q[:, column] = qi[:, 0]
            errors[:, i] = (W1[:, i] - grid.dequantize(qi, s, z)[:, 0]) / U1[i, i]
            W1[:, i:] -= errors[:, i : i + 1] * U1[i : i + 1, i:]
        W[:, i2:] -= errors @ U[i1:i2, i2:]
    return q, scale, zero


# -- running calibration data through a model -------------------------------------------------------


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward pass is not needed."""


def _batches(tokens: Tensor, size: int = 16):
    for i in range(0, len(tokens), size):
        yield tokens[i : i + size]


_METADATA = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "size", "dim", "numel", "__len__"}


def _metadata(func) -> bool:
    """Whether a torch function only reads a tensor's metadata (x.shape, x.size()), not its values."""
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property: x.shape, x.dtype (but x.T reads values)
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name in _METADATA


class _Consumers(TorchFunctionMode):
    """Records which torch functions read the watched tensors: a tensor read only by F.linear (as
    its input) can have a per-channel scale folded into the layers reading it."""

    def __init__(self):
        super().__init__()
        self.watched: dict[int, Tensor] = {}  # id -> tensor, kept alive so that ids stay unique
        self.readers: dict[int, list[Tensor | None]] = {}  # id -> the weight of each F.linear reading it; None: another function

    def watch(self, t: Tensor) -> None:
        self.watched[id(t)] = t
        self.readers.setdefault(id(t), [])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _metadata(func):
            return func(*args, **kwargs)
        for position, a in enumerate([*args, *kwargs.values()]):
            if isinstance(a, Tensor) and id(a) in self.watched:
                self.readers[id(a)].append(args[1] if func is F.linear and position == 0 else None)
        return func(*args, **kwargs)


@dataclass
class _Group:
    """Quantizable linear layers that read one input tensor, and where that tensor came from."""

    names: list[str]
    producer: str | None = None  # the norm (gain applied last) whose output the input is
    readers: list[str] | None = None  # every linear layer reading that output, when only linear layers do
    inputs: list[Tensor] = field(default_factory=list)  # (tokens, k) per calibration batch


def _affine_output(module: nn.Module) -> bool:
    """Whether a module's output is gain ⊙ f(x) + bias with a 1-D gain: a per-channel scale folds in."""
    return bool(getattr(type(module), "affine_output", False)) and isinstance(getattr(module, "weight", None), Tensor)


@torch.no_grad()
def _groups(model: nn.Module, tokens: Tensor, keep_inputs: bool = False) -> list[_Group]:
    """The quantizable layers the calibration tokens reach, grouped by the input tensor they read, in
    module order (the order the blocks run). For each group: whether a foldable norm produced that
    input and only linear layers read it (which); with keep_inputs, the input over every token.
    A layer no calibration token reaches (an expert the router never chose) is in no group."""
    linear_names = {id(m.weight): fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)}
    modules = dict(model.named_modules())
    order = {fqn: i for i, fqn in enumerate(modules)}
    found: dict[str, _Group] = {}  # first layer -> its group
    for batch in _batches(tokens):
        mode = _Consumers()
        produced: dict[int, str] = {}  # id(output) -> the foldable norm that produced it
        read: dict[int, tuple[Tensor, list[str]]] = {}  # id(input) -> (input, the layers reading it)

        def norm_hook(module, args, out, fqn):
            produced[id(out)] = fqn
            mode.watch(out)

        def linear_hook(module, args, fqn):
            read.setdefault(id(args[0]), (args[0], []))[1].append(fqn)
            mode.watch(args[0])

        handles = [m.register_forward_hook(lambda mod, a, out, fqn=fqn: norm_hook(mod, a, out, fqn))
                   for fqn, m in modules.items() if _affine_output(m)]
        handles += [m.register_forward_pre_hook(lambda mod, a, fqn=fqn: linear_hook(mod, a, fqn))
                    for fqn, m in modules.items() if quantizable(m, fqn)]
        try:
            with mode:
                model(batch)
        finally:
            for h in handles:
                h.remove()
        for key, (x, names) in read.items():
            group = found.get(names[0])
            if group is None:
                group = found[names[0]] = _Group(names, produced.get(key))
                weights = mode.readers[key]
                if group.producer and all(w is not None and id(w) in linear_names for w in weights):
                    group.readers = sorted({linear_names[id(w)] for w in weights})
            if keep_inputs:
                group.inputs.append(x.detach().reshape(-1, x.shape[-1]).float())
    return sorted(found.values(), key=lambda g: order[g.names[0]])


@torch.no_grad()
def _hessians(model: nn.Module, names: list[str], tokens: Tensor) -> dict[str, tuple[Tensor, int]]:
    """XᵀX (float64) and the token count N of the inputs of the named layers over the calibration
    tokens; the forward pass stops once the last of them has run."""
    modules = dict(model.named_modules())
    sums: dict[str, Tensor] = {}
    count = [0]

    def hook(fqn):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[fqn] = sums.get(fqn, 0) + x.T @ x
            if fqn == names[0]:
                count[0] += x.shape[0]
            if fqn == names[-1]:
                raise _Stop
        return accumulate

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        for batch in _batches(tokens):
            with contextlib.suppress(_Stop):
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n], count[0]) for n in names}


def _grid_for(model: nn.Module, bits: int, group_size: int) -> Grid:
    return Grid(bits, group_size, "cuda" if next(model.parameters()).is_cuda else "cpu")


def _set_weight(module: nn.Linear, grid: Grid, q: Tensor, scale: Tensor, zero: Tensor) -> None:
    """Replace a linear layer's float weight by the packed integers, as int4_weight_only leaves it."""
    if grid.device == "cuda":  # tinygemm runs the quantized layers in bf16 (see Int4WeightOnly.apply)
        run_in_dtype(module, torch.bfloat16)
    weight = grid.pack(q, scale, zero, module.weight.dtype)
    module.weight = nn.Parameter(weight, requires_grad=False)


@dataclass
class LayerReport:
    """How one layer was quantized: its output error on its calibration inputs, relative to the
    output's size (‖XWᵀ − XŴᵀ‖² / ‖XWᵀ‖²), for this method and for round-to-nearest."""

    error: float
    error_rtn: float
    detail: dict = field(default_factory=dict)


def output_error(x: Tensor, w: Tensor, w_hat: Tensor) -> float:
    """‖xwᵀ − xŵᵀ‖² / ‖xwᵀ‖² over rows of x (tokens, k)."""
    reference = x @ w.T
    return float((reference - x @ w_hat.T).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))


def _hessian_error(hessian: Tensor, w: Tensor, w_hat: Tensor) -> float:
    """output_error from XᵀX alone: tr(ΔW XᵀX ΔWᵀ) / tr(W XᵀX Wᵀ)."""
    d, w = (w - w_hat).double(), w.double()
    return float((d @ hessian * d).sum() / (w @ hessian * w).sum().clamp_min(1e-30))


class _Calibrated(Quantizer):
    """Shared by GPTQ and AWQ: options, the calibration size, the int4 checks, the report."""

    def __init__(self, bits: int, group_size: int, calibration: dict | Calibration):
        self.bits, self.group_size = bits, group_size
        self.calibration = Calibration.model_validate(calibration)
        self.layers: dict[str, LayerReport] = {}
        self.uncalibrated: list[str] = []
        self.format = ""

    check = staticmethod(Int4WeightOnly.check)

    def calibration_size(self) -> tuple[int, int | None]:
        return self.calibration.sequences, self.calibration.seq_len

    @torch.no_grad()
    def apply(self, model: nn.Module, calibration: Tensor | None = None) -> nn.Module:
        """Quantize every quantizable layer of `model` in place, calibrating on `calibration` (N, T)."""
        name = type(self).__name__.lower()
        if calibration is None:
            raise ValueError(f"{name} needs calibration token windows (apply(model, calibration=tokens))")
        grid = _grid_for(model, self.bits, self.group_size)
        if grid.device == "cuda" and self.bits != 4:
            raise ValueError(f"{name} on CUDA stores tinygemm's packed int4: bits must be 4")
        method = self._quantize(model, calibration, grid)
        self._round_the_rest(model, grid)
        self._describe(model, method)
        return model

    def _quantize(self, model: nn.Module, calibration: Tensor, grid: Grid) -> str:
        """Quantize the layers calibration reaches; return the method's description."""
        raise NotImplementedError

    def _round_the_rest(self, model: nn.Module, grid: Grid) -> None:
        """Round to nearest the quantizable layers no calibration token reached (an expert never routed
        to): they hold no information to calibrate on, and are stored like the others."""
        for fqn, m in model.named_modules():
            if quantizable(m, fqn) and fqn not in self.layers:
                _set_weight(m, grid, *grid.round_to_nearest(m.weight.detach().float()))
                self.uncalibrated.append(fqn)

    def _describe(self, model: nn.Module, method: str) -> None:
        device = "cuda" if next(model.parameters()).is_cuda else "cpu"
        storage = ("int4 packed (tinygemm)" if device == "cuda"
                   else f"int{self.bits} values in int8 storage")
        rest = f"; {len(self.uncalibrated)} layers no calibration token reached rounded to nearest" if self.uncalibrated else ""
        self.format = f"{method}: {storage}, group {self.group_size}, {INT4_MAPPING[device]}{rest}"


@register("quantization", "gptq", probe=_torchao_probe)
class GPTQ(_Calibrated):
    """GPTQ (Frantar et al. 2022): weights rounded column by column with Hessian-based error feedback."""

    def __init__(self, *, bits: Literal[4, 8] = 4, group_size: int = 128, damp: float = 0.01, act_order: bool = True,
                 calibration: Calibration = Calibration()):
        super().__init__(bits, group_size, calibration)
        self.damp, self.act_order = damp, act_order

    def _quantize(self, model: nn.Module, calibration: Tensor, grid: Grid) -> str:
        modules = dict(model.named_modules())
        packed = []
        for group in _groups(model, calibration):
            for fqn, (xtx, n) in _hessians(model, group.names, calibration).items():
                layer = modules[fqn]
                w = layer.weight.detach().float()
                q, scale, zero = gptq(w, xtx / n, grid, damp=self.damp, act_order=self.act_order)
                w_hat = grid.dequantize(q, scale, zero)
                self.layers[fqn] = LayerReport(_hessian_error(xtx, w, w_hat),
                                               _hessian_error(xtx, w, grid.dequantize(*grid.round_to_nearest(w))))
                layer.weight.data.copy_(w_hat)  # later layers calibrate on what this one will compute
                packed.append((layer, q, scale, zero))
        for layer, q, scale, zero in packed:
            _set_weight(layer, grid, q, scale, zero)
        return f"GPTQ (damp {self.damp}{', act order' if self.act_order else ''})"


# -- AWQ -----------------------------------------------------------------------------------------------


def awq_scales(x_mean: Tensor, alpha: float) -> Tensor:
    """AWQ's per-channel scales s = x_mean^α, normalised so that max(s)·min(s) = 1."""
    s = x_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def awq_search(x: Tensor, weights: list[Tensor], grid: Grid, n_grid: int = 20) -> tuple[float, Tensor, list[float]]:
    """AWQ's scale search for layers reading x (tokens, k): α over {0, 1/n, …, (n−1)/n}, each giving
    s = awq_scales(mean|x|, α); the error of α is Σ over layers of ‖xWᵀ − (x/s)·Q(W·diag(s))ᵀ‖², Q
    round-to-nearest on `grid`. Returns (best α, its s, the error of each α). α = 0 (s = 1) is plain
    round-to-nearest, so the best error is never above it."""
    x_mean = x.abs().mean(dim=0)
    references = [x @ w.T for w in weights]
    errors, best = [], None
    for i in range(n_grid):
        alpha = i / n_grid
        s = awq_scales(x_mean, alpha)
        error = 0.0
        for w, reference in zip(weights, references):
            w_hat = grid.dequantize(*grid.round_to_nearest(w * s)) / s
            error += float((reference - x @ w_hat.T).pow(2).sum())
        errors.append(error)
        if best is None or error < errors[best]:
            best = i
    alpha = best / n_grid
    return alpha, awq_scales(x_mean, alpha), errors


@torch.no_grad()
def awq_clip(x: Tensor, w: Tensor, grid: Grid, n_grid: int = 20, max_shrink: float = 0.5, tokens: int = 512) -> Tensor:
    """AWQ's weight clipping: for each row and group, the range ±r·max|w| (r = 1, 1 − 1/n, … while
    above 1 − max_shrink) whose round-to-nearest changes that group's share of the output, Σ_t (x_t·(w − ŵ))²
    over (up to `tokens` evenly spaced) calibration tokens x (tokens, k), least. Returns w clamped to
    the chosen ranges: round-to-nearest of it is the clipped quantization (r = 1 is plain RTN)."""
    x = x[:: max(1, len(x) // tokens)][:tokens]
    rows, k = w.shape
    g = grid.group_size
    xg, wg = x.view(-1, k // g, g), w.view(rows, k // g, g)
    limit = wg.abs().amax(dim=-1, keepdim=True)  # (rows, groups, 1)
    best, best_error = wg.clone(), torch.full((rows, k // g), float("inf"), device=w.device)
    for i in range(int(max_shrink * n_grid)):
        r = 1 - i / n_grid
        clipped = torch.maximum(torch.minimum(wg, r * limit), -r * limit)
        w_hat = grid.dequantize(*grid.round_to_nearest(clipped.reshape(rows, k))).view(rows, k // g, g)
        error = torch.einsum("tGj,rGj->trG", xg, wg - w_hat).pow(2).sum(0)  # (rows, groups)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better[..., None], clipped, best)
    return best.reshape(rows, k)


def _score_layers(model: nn.Module) -> set[str]:
    """The layers of each block's attention (``attn``) other than its output projection ``c_proj``:
    they produce q and k (and v). AWQ does not clip them: clipping moves attention scores, which a
    layer's own output error does not see (the authors' code skips q and k, and fused qkv, too)."""
    return {fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)
            and (".attn." in f".{fqn}") and not fqn.endswith("c_proj")}


def _divide_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a layer AWQ scaled whose input it could not fold elsewhere: x / s."""
    return (args[0] * module.awq_input_scale.to(args[0].dtype), *args[1:])


@register("quantization", "awq", probe=_torchao_probe)
class AWQ(_Calibrated):
    """AWQ (Lin et al. 2023): per-channel scales from activation magnitudes protect the salient weights.

    clip: also search each row and group's clipping range (the authors' auto_clip), except in the
    layers that produce attention scores."""

    def __init__(self, *, bits: Literal[4, 8] = 4, group_size: int = 128, n_grid: int = 20, clip: bool = True,
                 calibration: Calibration = Calibration()):
        super().__init__(bits, group_size, calibration)
        self.n_grid, self.clip = n_grid, clip
        self.scales: dict[str, Tensor] = {}  # layer -> its input channels' s (the layer computes (x/s)·Q(W·s)ᵀ)
        self.folded: list[str] = []  # layers whose 1/s went into the norm before them
        self.runtime: list[str] = []  # layers that divide their input by s when they run

    def _quantize(self, model: nn.Module, calibration: Tensor, grid: Grid) -> str:
        modules = dict(model.named_modules())
        scores = _score_layers(model)
        for group in _groups(model, calibration, keep_inputs=True):
            x = torch.cat(group.inputs)
            weights = [modules[n].weight.detach().float().clone() for n in group.names]  # W before scaling
            alpha, s, errors = awq_search(x, weights, grid, self.n_grid)
            for name in group.names:
                self.scales[name] = s
            if alpha == 0:  # round-to-nearest was best: nothing to scale
                pass
            elif group.readers is not None:  # fold 1/s into the norm, s into every layer reading it
                norm = modules[group.producer]
                norm.weight.div_(s.to(norm.weight.dtype))
                if getattr(norm, "bias", None) is not None:
                    norm.bias.div_(s.to(norm.bias.dtype))
                for name in group.readers:
                    modules[name].weight.mul_(s.to(modules[name].weight.dtype))
                self.folded += group.names
            else:  # divide the input at run time
                for name in group.names:
                    modules[name].weight.mul_(s.to(modules[name].weight.dtype))
                    modules[name].register_buffer("awq_input_scale", (1 / s).to(modules[name].weight.dtype))
                    modules[name].register_forward_pre_hook(_divide_input)
                self.runtime += group.names
            for name, w in zip(group.names, weights):  # W·s now; its inputs are x/s
                scaled = modules[name].weight.detach().float()
                if self.clip and name not in scores:
                    scaled = awq_clip(x / s, scaled, grid, self.n_grid)
                q, scale, zero = grid.round_to_nearest(scaled)
                self.layers[name] = LayerReport(output_error(x, w, grid.dequantize(q, scale, zero) / s),
                                                output_error(x, w, grid.dequantize(*grid.round_to_nearest(w))),
                                                {"alpha": alpha})
                _set_weight(modules[name], grid, q, scale, zero)
        return f"AWQ ({len(self.folded)} layers' scales folded into their norm, {len(self.runtime)} scaled at run time)"
