"""Attention kernels: interchangeable implementations of softmax(q·kᵀ/√d + bias)·v under a mask.

Every backend takes q and k (B, Hq or Hkv, T, D), v (B, Hkv, Tk, Dv) with Hkv dividing Hq (grouped-query
attention), a ``Mask`` and a dropout probability, and returns (B, Hq, Tq, Dv). v's head dim may differ
from q's and k's (multi-head latent and differential attention); kernels that need one head dim
(flash) get zero-padded inputs from their backend (``one_head_dim``). ``math`` is the
reference that every other backend is tested against. Each declares what it supports, so a model
config that needs something a backend lacks is rejected when it is built.

Capabilities: causal, window (sliding window), bias (ALiBi-style additive score bias), dropout,
decode (queries that start after cached keys), ragged (rows at their own positions: a batched mask,
q_pos (B, Tq) and k_pos (B, Tk), as decoding a merged cache of sequences of different lengths gives).

``auto`` picks, per call shape, dtype, direction and device, the backend its chooser names: the
model is built with one (``build_model(config, kernels=...)``); bench's (bench.autotune.KernelChoices)
measures the fastest that passes the correctness gate against ``math``, or replays a run's recorded
choices. Model code stays free of timing; a model built without a chooser runs sdpa, and says so.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from models.registry import register

ALL = frozenset({"causal", "window", "bias", "dropout", "decode", "ragged"})

# the key position of a merged cache's left padding: after every query's position, so that causality
# hides it from every query (and no real position can reach it)
PADDING_POSITION = 2**62


@functools.lru_cache(maxsize=8)
def _arange(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device)


@dataclass(eq=False)
class Mask:
    """Which keys each query sees, and the score bias, from absolute token positions.

    Invariant kept by the KV cache: the keys are the most recent Tk positions ending at the last
    query, so a single new query with Tk ≤ window sees every key.

    Positions are shared by every row of the batch, (Tq,) and (Tk,), or batched, (B, Tq) and (B, Tk):
    each row at its own positions (decoding a merged cache, models.gpt.Cache.merge), its keys
    right-aligned and left-padded with PADDING_POSITION. A batched mask is always 'general' and needs
    the 'ragged' capability.
    """

    q_pos: Tensor  # (Tq,) or (B, Tq)
    k_pos: Tensor  # (Tk,) or (B, Tk)
    window: int | None = None  # a query sees itself and window − 1 earlier tokens
    slopes: Tensor | None = None  # (Hq,): score − slope·(i − j)
    bidirectional: bool = False  # every query sees keys on both sides (an encoder's): |i − j| < window

    # computed once per mask (every layer of a forward shares it), memoised in plain fields:
    # functools.cached_property takes a lock that torch.compile cannot trace (a graph break per layer)
    _distance: Tensor | None = field(default=None, init=False, repr=False)
    _allowed: Tensor | None = field(default=None, init=False, repr=False)

    @property
    def batched(self) -> bool:
        """Whether each row has its own positions (B, T)."""
        return self.q_pos.dim() == 2

    @property
    def kind(self) -> Literal["causal", "none", "general"]:
        """'causal': plain causal over the same tokens; 'none': every key visible; else 'general'."""
        if self.slopes is not None or self.batched:
            return "general"
        if self.bidirectional:
            return "none" if self.window is None else "general"
        tq, tk = self.q_pos.shape[0], self.k_pos.shape[0]
        if self.q_pos is self.k_pos and (self.window is None or self.window >= tq):
            return "causal"
        if tq == 1 and (self.window is None or tk <= self.window):
            return "none"
        return "general"

    @property
    def distance(self) -> Tensor:
        """(Tq, Tk), or (B, Tq, Tk) when batched: query position minus key position."""
        if self._distance is None:
            self._distance = self.q_pos[..., :, None] - self.k_pos[..., None, :]
            if self.bidirectional:  # the bias and the window then fall off with distance either way
                self._distance = self._distance.abs()
        return self._distance

    @property
    def allowed(self) -> Tensor:
        """(Tq, Tk), or (B, Tq, Tk) when batched, bool: key visible to query."""
        if self._allowed is None:
            visible = self.distance >= 0  # always, when bidirectional (a distance there is |i − j|)
            if self.window is not None:
                visible &= self.distance < self.window
            self._allowed = visible
        return self._allowed

    def bias(self, dtype: torch.dtype) -> Tensor:
        """(Hq or 1, Tq, Tk) additive mask, (B, Hq or 1, Tq, Tk) when batched: −inf where hidden,
        −slope·distance where visible."""
        if self.batched:
            return self._batched_bias(dtype)
        hidden = torch.zeros(self.allowed.shape, dtype=dtype, device=self.q_pos.device)
        hidden.masked_fill_(~self.allowed, float("-inf"))
        if self.slopes is None:
            return hidden[None]
        return hidden[None] - self.slopes.to(dtype)[:, None, None] * self.distance.to(dtype)[None]

    def _batched_bias(self, dtype: torch.dtype) -> Tensor:
        """(B, Hq or 1, Tq, Tk). Hidden scores are filled with −inf last: padding's distance is huge
        (−inf in half precision), and −inf − slope·distance could make a NaN."""
        hidden = ~self.allowed[:, None]  # (B, 1, Tq, Tk)
        if self.slopes is None:
            return torch.zeros(hidden.shape, dtype=dtype, device=self.q_pos.device).masked_fill_(hidden, float("-inf"))
        scaled = self.slopes.to(dtype)[None, :, None, None] * self.distance.to(dtype)[:, None]  # (B, Hq, Tq, Tk)
        return (-scaled).masked_fill_(hidden, float("-inf"))

    @staticmethod
    def causal(seq_len: int, device: torch.device | str = "cpu", **kwargs) -> Mask:
        """The training-time mask over seq_len tokens at positions 0..seq_len−1."""
        pos = _arange(seq_len, torch.device(device))
        return Mask(pos, pos, **kwargs)


def refuse_batched(mask: Mask, backend: str) -> None:
    """Raise for a batched mask in a backend without the 'ragged' capability: it would read one row's
    positions for all (wrong, silently), so it says so instead."""
    if mask.batched:
        raise ValueError(f"attention backend '{backend}' cannot attend with rows at different positions "
                         "(ragged); use math, baddbmm or sdpa")


def one_head_dim(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
    """q, k and v zero-padded to one head dim, for kernels that need q, k and v to share it (flash
    attention), and the softmax scale of the unpadded scores, 1/√(q's head dim).

    Zeros appended to q and k leave q·kᵀ unchanged; zeros appended to v add output channels that the
    caller slices off (out[..., :v's head dim]). Equal head dims pass through untouched.
    """
    d_qk, d_v = q.shape[-1], v.shape[-1]
    width = max(d_qk, d_v)
    if d_qk < width:
        q, k = F.pad(q, (0, width - d_qk)), F.pad(k, (0, width - d_qk))
    if d_v < width:
        v = F.pad(v, (0, width - d_v))
    return q, k, v, 1.0 / math.sqrt(d_qk)


def repeat_kv(k: Tensor, v: Tensor, n_head: int) -> tuple[Tensor, Tensor]:
    """Expand Hkv key/value heads to n_head (each kv head serves n_head/Hkv query heads)."""
    groups = n_head // k.shape[1]
    if groups == 1:
        return k, v
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


@register("attention_backend", "math")
class MathAttention:
    """Explicit softmax(q·kᵀ/√d)·v in PyTorch ops: the reference implementation."""

    name = "math"

    @staticmethod
    def capabilities(options: dict) -> frozenset[str]:
        return ALL

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, dropout_p: float = 0.0) -> Tensor:
        k, v = repeat_kv(k, v, q.shape[1])
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, Tq, Tk)
        if mask.kind == "causal":
            scores = scores.masked_fill(~mask.allowed, float("-inf"))
        elif mask.kind == "general":
            scores = scores + mask.bias(scores.dtype)
        probs = F.dropout(F.softmax(scores, dim=-1), dropout_p)
        return probs @ v


@register("attention_backend", "baddbmm")
class BaddbmmAttention(MathAttention):
    """``math`` with the 1/√d scale and the additive mask folded into one batched matmul
    (torch.baddbmm: scores = bias + scale·q·kᵀ). Two passes over the (B, H, Tq, Tk) scores fewer than
    math's matmul, scale and mask; on CPU at short sequences often the fastest training kernel."""

    name = "baddbmm"

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, dropout_p: float = 0.0) -> Tensor:
        k, v = repeat_kv(k, v, q.shape[1])
        B, H, Tq, D = q.shape
        Tk, Dv = k.shape[2], v.shape[-1]  # v's head dim may differ from q's (MLA, differential attention)
        if mask.kind == "none":
            bias = q.new_zeros(1, 1, Tk)
        else:  # (1 or H, Tq, Tk), to one bias per batch·head matrix only when it differs per head (or row)
            bias = mask.bias(q.dtype)
            if bias.dim() == 4 or bias.shape[0] != 1:
                bias = bias.expand(B, H, Tq, Tk).reshape(B * H, Tq, Tk)
        scores = torch.baddbmm(bias, q.reshape(B * H, Tq, D), k.reshape(B * H, Tk, D).transpose(1, 2),
                               alpha=1.0 / math.sqrt(D))  # (B·H, Tq, Tk)
        probs = F.dropout(F.softmax(scores, dim=-1), dropout_p)
        return torch.bmm(probs, v.reshape(B * H, Tk, Dv)).view(B, H, Tq, Dv)


_SDPA_KERNELS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


@register("attention_backend", "sdpa")
class SDPAttention:
    """torch scaled_dot_product_attention; on CUDA its flash/efficient/cudnn/math kernels selectable."""

    def __init__(self, *, kernel: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"):
        self.kernel = kernel
        self.name = f"sdpa.{kernel}"
        self.ran: str | None = None  # the sub-backend that ran, found on first call

    @staticmethod
    def capabilities(options: dict) -> frozenset[str]:
        # SDPA's flash kernel takes no mask tensor: only plain causal (and unmasked decode); the others
        # take a mask per row (ragged)
        return frozenset({"causal", "dropout"}) if options.get("kernel") == "flash" else ALL

    @staticmethod
    def device_limitation(options: dict, device: torch.device) -> str | None:
        """Why the selected kernel cannot run on `device`: off CUDA only flash (a CPU port) and math exist."""
        kernel = options.get("kernel", "auto")
        if device.type != "cuda" and kernel in ("efficient", "cudnn"):
            return f"sdpa kernel '{kernel}' needs CUDA (on {device.type}: auto, flash or math)"
        return None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, dropout_p: float = 0.0) -> Tensor:
        kwargs = {"dropout_p": dropout_p, "enable_gqa": k.shape[1] != q.shape[1]}
        if mask.kind == "causal":
            kwargs["is_causal"] = True
        elif mask.kind == "general":
            # boolean masks when no bias: cheaper; cuDNN needs the bias in q's dtype
            if mask.slopes is not None:
                kwargs["attn_mask"] = mask.bias(q.dtype)
            else:  # a batched mask (B, Tq, Tk) gets its head dim: (B, 1, Tq, Tk)
                kwargs["attn_mask"] = mask.allowed[:, None] if mask.batched else mask.allowed
        if self.ran is None:
            self.ran = self._which(q, k, v, kwargs)
        if self.kernel == "auto":  # the dispatcher passes over flash when v's head dim differs from q's
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        d_v = v.shape[-1]
        if self.kernel == "flash" and d_v != q.shape[-1]:  # flash needs one head dim for q, k and v
            q, k, v, kwargs["scale"] = one_head_dim(q, k, v)
        with sdpa_kernel(getattr(SDPBackend, _SDPA_KERNELS[self.kernel])):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)[..., :d_v]

    def _which(self, q: Tensor, k: Tensor, v: Tensor, kwargs: dict) -> str:
        if self.kernel != "auto":
            return self.kernel
        try:  # private but stable since torch 2.0: the kernel SDPA's dispatcher picks
            from torch.nn.attention import SDPBackend

            choice = torch._fused_sdp_choice(
                q, k, v, kwargs.get("attn_mask"), kwargs["dropout_p"], kwargs.get("is_causal", False),
                enable_gqa=kwargs["enable_gqa"],
            )
            return SDPBackend(choice).name.lower()
        except Exception:  # noqa: BLE001 - recording is best effort, never a failure
            return "auto"


def needed_capabilities(q: Tensor, k: Tensor, mask: Mask, dropout_p: float) -> frozenset[str]:
    """What a backend must be able to do for this call."""
    needs = {"causal"} if mask.kind != "none" else set()
    if mask.window is not None and mask.kind == "general":
        needs.add("window")
    if mask.slopes is not None:
        needs.add("bias")
    if q.shape[2] < k.shape[2]:  # queries after cached keys
        needs.add("decode")
    if dropout_p:
        needs.add("dropout")
    if mask.batched:  # rows at their own positions
        needs.add("ragged")
    return frozenset(needs)


KernelChooser = Callable[[Tensor, Tensor, Tensor, Mask, float, str], tuple[dict, dict]]
"""(q, k, v, mask, dropout_p, direction) -> the chosen backend's spec and the record of the choice
(``backend``: its label, ``spec``, ``reason``, and whatever the measurement behind it was)."""


def sdpa_choice(q: Tensor, k: Tensor, v: Tensor, mask: Mask, dropout_p: float, direction: str) -> tuple[dict, dict]:
    """The chooser of a model built without one: torch's SDPA, and the record says so."""
    spec = {"name": "sdpa"}
    return spec, {"backend": "sdpa", "spec": spec, "direction": direction,
                  "reason": "no kernel chooser was given when the model was built: torch's SDPA"}


def call_key(q: Tensor, k: Tensor, v: Tensor, mask: Mask, dropout_p: float, direction: str) -> tuple:
    """What a kernel choice depends on: device, dtype, shapes, mask, dropout and direction. Decode
    steps grow the cache by one key per call: their key count is bucketed to a power of two."""
    tk = k.shape[2] if q.shape[2] > 1 else 1 << (k.shape[2] - 1).bit_length()
    return (q.device.type, q.dtype, q.shape[0], q.shape[1], k.shape[1], q.shape[2], tk,
            q.shape[3], v.shape[3], mask.kind, mask.batched, mask.window, mask.slopes is not None, dropout_p > 0,
            direction)


def call_label(key: tuple) -> str:
    """A call key as the text a run records its choice under ("cpu:float32:4:2:2:16:16:8:8:causal:...")."""
    return ":".join(str(part).removeprefix("torch.") for part in key)


@register("attention_backend", "auto")
class AutoAttention:
    """The fastest backend that passes the correctness gate, chosen per call shape, dtype, direction
    and device by the chooser the model was built with (``use_kernels``; bench's
    measures once per machine and caches). Without one: sdpa, recorded as such."""

    def __init__(self):
        self.name = "auto"
        self.use(sdpa_choice)

    def use(self, chooser: KernelChooser) -> None:
        """Choose kernels with `chooser` from now on (choices made before are forgotten)."""
        self.chooser = chooser
        self.ran: str | None = None  # the training choice (else the first), for the run's record
        self.choices: dict[str, dict] = {}  # call label -> the chooser's record
        self._backends: dict[tuple, object] = {}
        self._trained = False  # whether `ran` is a training choice

    @staticmethod
    def capabilities(options: dict) -> frozenset[str]:
        return ALL  # math, always a candidate, does everything

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, dropout_p: float = 0.0) -> Tensor:
        direction = "forward_backward" if torch.is_grad_enabled() and q.requires_grad else "forward"
        key = call_key(q, k, v, mask, dropout_p, direction)
        backend = self._backends.get(key)
        if backend is None:
            backend = self._choose(key, q, k, v, mask, dropout_p, direction)
        return backend(q, k, v, mask, dropout_p)

    @torch.compiler.disable  # measuring is eager work: a compiled model breaks its graph here once
    def _choose(self, key: tuple, q: Tensor, k: Tensor, v: Tensor, mask: Mask, dropout_p: float, direction: str):
        from models.registry import build_spec

        spec, record = self.chooser(q, k, v, mask, dropout_p, direction)
        self._backends[key] = backend = build_spec("attention_backend", spec)
        self.choices[call_label(key)] = {**record, "call": call_label(key)}
        if self.ran is None or direction == "forward_backward" and not self._trained:
            self.ran, self._trained = record["backend"], direction == "forward_backward"
        return backend


def use_kernels(module, chooser: KernelChooser) -> None:
    """Give every ``backend: auto`` kernel inside module (an nn.Module: a model, or one attention)
    the chooser that picks its kernels: how a model is built with explicit kernel choices."""
    for m in module.modules():
        kernel = getattr(m, "kernel", None)  # an attention's ``Attend`` holds its kernel
        if isinstance(kernel, AutoAttention):
            kernel.use(chooser)


def _flex_probe() -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return f"this torch ({torch.__version__}) has no FlexAttention (needs 2.5+)"
    return None


@functools.cache
def _flex_cpu_backward_missing() -> str | None:
    """Why FlexAttention cannot backpropagate on CPU in this torch, or None when it can."""
    if _flex_probe():
        return _flex_probe()
    from torch.nn.attention.flex_attention import flex_attention

    q = torch.zeros(1, 1, 16, 8, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flex_attention(q, q, q).sum().backward()
    except Exception as e:  # noqa: BLE001 - the failure is the answer
        return f"forward only on CPU: torch {torch.__version__} has no FlexAttention backward there ({type(e).__name__})"
    return None


def _flex_note() -> str | None:
    return None if torch.cuda.is_available() else _flex_cpu_backward_missing()


@register("attention_backend", "flex", probe=_flex_probe, note=_flex_note)
class FlexAttention:
    """torch FlexAttention: mask and bias as Python functions, compiled into a fused kernel."""

    name = "flex"

    @staticmethod
    def capabilities(options: dict) -> frozenset[str]:
        # FlexAttention has no attention dropout; its mask functions here read one row of positions
        return ALL - {"dropout", "ragged"}

    def __init__(self, *, compile: bool = True):
        self.compile = compile
        self._kernel = None  # made on first call: a config naming flex builds on any torch
        self._block_masks: dict[tuple, object] = {}

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, dropout_p: float = 0.0) -> Tensor:
        from torch.nn.attention import flex_attention as fa

        if dropout_p:
            raise ValueError("flex attention has no dropout; set dropout: 0 or use sdpa/math")
        refuse_batched(mask, self.name)
        if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad and _flex_cpu_backward_missing():
            raise RuntimeError(f"flex: {_flex_cpu_backward_missing()}; train with backend sdpa or math")
        if self._kernel is None:
            self._kernel = torch.compile(fa.flex_attention, dynamic=False) if self.compile else fa.flex_attention
        q_pos, k_pos, window, slopes = mask.q_pos, mask.k_pos, mask.window, mask.slopes

        def visible(b, h, qi, ki):
            distance = q_pos[qi] - k_pos[ki]
            return (distance >= 0) & (distance < window) if window else distance >= 0

        def alibi(score, b, h, qi, ki):
            return score - slopes[h] * (q_pos[qi] - k_pos[ki])

        block_mask = None
        if mask.kind != "none":
            key = (q_pos.shape[0], k_pos.shape[0], window, q.device) if mask.q_pos is mask.k_pos else None
            block_mask = self._block_masks.get(key) if key else None
            if block_mask is None:
                block_mask = fa.create_block_mask(
                    visible, None, None, q_pos.shape[0], k_pos.shape[0], device=q.device
                )
                if key:
                    self._block_masks[key] = block_mask
        with warnings.catch_warnings():
            # compile=False is a choice, not a mistake: silence the "unfused implementation" advice
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return self._kernel(
                q, k, v, block_mask=block_mask, score_mod=alibi if slopes is not None else None,
                enable_gqa=k.shape[1] != q.shape[1],
            )


def _cuda_package_probe(module: str, package: str) -> str | None:
    try:
        __import__(module)
    except ImportError:
        return f"{package} not installed (pip install 'archbench[gpu]')"
    except Exception as e:  # noqa: BLE001 - a broken install is a reason, not a crash
        return f"{package} fails to import: {e}"
    if not torch.cuda.is_available():
        return "needs CUDA"
    return None


@register("attention_backend", "flash_attn", probe=lambda: _cuda_package_probe("flash_attn", "flash-attn"))
class FlashAttn:
    """Dao's flash-attn 2 kernels (CUDA, fp16/bf16): causal, sliding window, ALiBi, GQA native."""

    name = "flash_attn"

    @staticmethod
    def capabilities(options: dict) -> frozenset[str]:
        return ALL - {"ragged"}  # one bottom-right causal alignment for every row: no per-row positions

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, dropout_p: float = 0.0) -> Tensor:
        from flash_attn import flash_attn_func  # imported here: a config naming it builds anywhere

        refuse_batched(mask, self.name)
        dtype, d_v = q.dtype, v.shape[-1]
        scale = {}
        if d_v != q.shape[-1]:  # flash-attn 2 needs one head dim for q, k and v: zero-pad, keep q's scale
            q, k, v, scale["softmax_scale"] = one_head_dim(q, k, v)
        if {q.dtype, k.dtype, v.dtype} - {torch.float16, torch.bfloat16}:
            # fp16/bf16 kernels only: an fp32 evaluation runs in bf16, and its output returns in fp32
            q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
        # flash-attn aligns the causal mask bottom-right when Tq < Tk: the Mask invariant
        window = (mask.window - 1, 0) if mask.window else (-1, -1)
        slopes = mask.slopes.float() if mask.slopes is not None else None
        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, T, H, D) layout
            dropout_p=dropout_p, causal=mask.kind != "none", window_size=window, alibi_slopes=slopes, **scale,
        )
        return out.transpose(1, 2)[..., :d_v].to(dtype)


@register(
    "attention_backend", "xformers",
    probe=lambda: _cuda_package_probe("xformers.ops", "xformers"),
)
class XFormersAttention:
    """xformers memory_efficient_attention (CUDA; it has no CPU kernel)."""

    name = "xformers"

    @staticmethod
    def capabilities(options: dict) -> frozenset[str]:
        return ALL - {"ragged"}  # its masks are bottom-right aligned on one position for every row

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Mask, dropout_p: float = 0.0) -> Tensor:
        import xformers.ops as xops  # imported here: a config naming it builds anywhere

        refuse_batched(mask, self.name)
        fmha = xops.fmha.attn_bias
        k, v = repeat_kv(k, v, q.shape[1])
        if mask.kind == "none":
            bias = None
        elif mask.slopes is None and mask.window:
            bias = fmha.LowerTriangularFromBottomRightLocalAttentionMask(mask.window)
        elif mask.slopes is None:
            bias = fmha.LowerTriangularFromBottomRightMask()
        else:  # materialised bias; xformers wants the last dim padded to a multiple of 8
            full = mask.bias(q.dtype).expand(q.shape[0], -1, -1, -1)
            pad = -full.shape[-1] % 8
            bias = F.pad(full, (0, pad))[..., : full.shape[-1]]
        out = xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p
        )
        return out.transpose(1, 2)
