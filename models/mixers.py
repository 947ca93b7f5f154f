"""Sub-quadratic sequence mixers with a linear recurrence: linear attention, RetNet, GLA, Mamba-2.

Each is a member of the ``attention`` family (the same contract: (B, T, C) -> (B, T, C), a cache to
decode with, FLOPs, features it handles) built on ``models.recurrent``: the chunked form trains and
prefills, the step-by-step form decodes one token at a time, and the cache holds a state whose size
does not grow with the context (``state_bytes``, where softmax attention has
``kv_cache_bytes_per_token``).

Positions: a model whose encoding rotates q and k (RoPE) may use them. linear and retnet rotate
their q and k, as RetNet does (xPos); gla and mamba2 order tokens by their decays alone and leave
q and k as they are, as the recurrent layers of hybrid models do (Jamba, Samba): ``rotates`` says
which. Rows at different positions decode together (each carries its own state).

``kernel: fla`` runs the chunked form with flash-linear-attention's Triton kernels (CUDA only; gated
against the pure form on first use, models.fla_kernels); decoding steps stay in PyTorch. Untested on
a GPU in this project so far.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import fla_kernels
from models.recurrent import CHANNEL_DECAY_FLOOR, StateCache, ShortConv, chunked, chunked_flops, recurrent
from models.registry import build_spec, register

Kernel = Literal["torch", "fla"]  # the chunked form's implementation: this file's, or fla's Triton kernels
FLA_DECAYED = fla_kernels.gated("decayed", fla_kernels.decayed, chunked)  # checked against chunked once per device, dtype


class RecurrentMixer(nn.Module):
    """What the recurrent mixers share: the cache, the choice of form, the features they handle.

    A member defines ``mix(x, positional, state) -> (y, new state)``, with state the dict of tensors
    its cache held (empty at the start), and ``state_elements`` (its short convolution's, if any, is
    counted here).
    """

    rotates = False  # whether it rotates q and k with a rotating encoding (else: order from its decays)
    chunk = 64  # tokens per chunk of the parallel form
    kernel = "torch"  # the chunked form's implementation (a member with a `kernel` option sets it)
    eps = 1e-6  # the normaliser's guard (``normalised``)

    @staticmethod
    def handles(config, options: dict) -> frozenset[str]:
        """Accepts a rotating encoding (see ``rotates``), decodes with a constant-size state, and
        decodes rows at different positions; no softmax, so no score bias, window or attention dropout."""
        return frozenset({"rotate", "cache", "ragged"})

    def forward(self, x: Tensor, positional, pos: Tensor, cache: StateCache | None = None) -> Tensor:
        """x (B, T, C) at positions pos (T,) or (B, T) -> (B, T, C); the cache's state is read and replaced."""
        y, state = self.mix(x, positional, cache.tensors if cache is not None else {})
        if cache is not None:
            cache.set(**state)
        return y

    def scan(self, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        """The recurrence: one step for a decoded token, chunks for a sequence."""
        if q.shape[2] == 1 and state is not None:
            return recurrent(q, k, v, log_decay, state)
        if self.kernel == "fla":
            return FLA_DECAYED(q, k, v, log_decay, state)
        return chunked(q, k, v, log_decay, state, self.chunk)

    def normalised(self, q: Tensor, k: Tensor, v: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        """Linear attention normalised by its features' sum, q·S_t / q·z_t with z_t = Σ k (no decay): the
        normaliser carried as an extra value column of ones -> (o (B, H, T, Dv), the new state)."""
        ones = v.new_ones(*v.shape[:-1], 1)
        o, S = self.scan(q, k, torch.cat([v, ones], -1), v.new_zeros(v.shape[:-1]), state)
        return o[..., :-1] / (o[..., -1:] + self.eps), S

    def new_cache(self) -> StateCache:
        return StateCache()

    def state_bytes(self, bytes_per_element: int = 2) -> int:
        """Bytes one sequence's decoding state costs in this layer, at any context length: the
        recurrence's state and a short convolution's last inputs."""
        conv = getattr(self, "conv", None)  # a ShortConv, where the member has one
        return (self.state_elements() + (conv.state_elements() if conv is not None else 0)) * bytes_per_element

    def state_elements(self) -> int:
        """Elements of the recurrence's state per sequence (the short convolution's aside)."""
        raise NotImplementedError


def init_ssm_decay(dt_bias: Tensor, A_log: Tensor) -> None:
    """Mamba-2's initialisation of a per-head decay: softplus(dt_bias) log-uniform in [0.001, 0.1],
    A = exp(A_log) uniform in [1, 16]."""
    dt = torch.exp(torch.empty(dt_bias.shape).uniform_(math.log(1e-3), math.log(0.1)))
    with torch.no_grad():
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        A_log.copy_(torch.empty(A_log.shape).uniform_(1, 16).log())


def ssm_decay(dt: Tensor, dt_bias: Tensor, A_log: Tensor) -> tuple[Tensor, Tensor]:
    """Raw steps (B, T, H) -> (dt = softplus(raw + dt_bias), the log decay dt·A with A = −exp(A_log)),
    each (B, H, T): Mamba-2's scalar-times-identity decay."""
    dt = F.softplus(dt + dt_bias).transpose(1, 2)
    return dt, dt * -torch.exp(A_log.float()).to(dt.dtype)[:, None]


def _heads(x: Tensor, n_head: int) -> Tensor:
    """(B, T, H·D) -> (B, H, T, D)."""
    B, T, _ = x.shape
    return x.view(B, T, n_head, -1).transpose(1, 2)


def _merge_heads(y: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, T, H·D)."""
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)


def qkv_blocks(n_head: int, head_dim: int, *after: tuple[str, int]) -> list[tuple[str, int]]:
    """Row blocks of a fused q, k, v projection laid out as multi-head attention's (q, then each k and
    v head), each keyed on its own at init: with the same seed a mixer then starts from MHA's q, k
    and v weights, and paired differences measure the mixer, not the draw. `after`: further blocks."""
    heads = [(f"{kind}{h}", head_dim) for kind in "kv" for h in range(n_head)]
    return [("q", n_head * head_dim), *heads, *after]


def check_options(options: dict) -> str | None:
    """Why a mixer's short convolution or kernel options cannot work here, or None."""
    conv = options.get("conv", 0)
    if conv == 1 or conv < 0:
        return f"conv={conv} must be 0 (none) or at least 2 taps"
    if options.get("kernel") == "fla":
        reason = fla_kernels.unavailable_reason()
        return f"kernel=fla: {reason}; kernel=torch runs anywhere" if reason else None
    return None


class LinearAttention(RecurrentMixer):
    """Linear attention (Katharopoulos et al. 2020): softmax(q·kᵀ) replaced by φ(q)·φ(k)ᵀ with
    φ = elu + 1, normalised by φ(q)·Σφ(k), so that o_t = φ(q_t)·S_t / φ(q_t)·z_t with S_t = Σ φ(k)ᵀv
    and z_t = Σ φ(k): one recurrence with no decay, the normaliser carried as an extra value column.
    conv > 0 adds a short causal convolution on q, k and v (as Zoology's baselines do)."""

    rotates = True

    def __init__(self, config, *, conv: int = 0, kernel: Kernel = "torch"):
        super().__init__()
        self.n_head, self.head_dim, self.kernel = config.n_head, config.head_dim, kernel
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.conv = ShortConv(3 * config.n_embd, conv, config.bias) if conv else None
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    @staticmethod
    def check(config, options: dict) -> str | None:
        return check_options(options)

    def mix(self, x: Tensor, positional, state: dict) -> tuple[Tensor, dict]:
        qkv, new = self.c_attn(x), {}
        if self.conv is not None:
            qkv, new["conv"] = self.conv(qkv, state.get("conv"))
        q, k, v = (_heads(t, self.n_head) for t in qkv.chunk(3, dim=-1))  # (B, H, T, D) each
        # rotate before φ: φ's outputs stay positive, so the normaliser cannot reach zero
        q, k = F.elu(positional.rotate(q)) + 1, F.elu(positional.rotate(k)) + 1
        y, new["S"] = self.normalised(q, k, v, state.get("S"))  # (B, H, T, D)
        return self.c_proj(_merge_heads(y)), new

    def init_blocks(self) -> dict[str, list[tuple[str, int]]]:
        return {"c_attn.weight": qkv_blocks(self.n_head, self.head_dim)}

    def extra_flops_per_token(self, seq_len: int, causal: bool) -> float:
        return self.n_head * chunked_flops(seq_len, self.head_dim, self.head_dim + 1, self.chunk)

    def state_elements(self) -> int:
        return self.n_head * self.head_dim * (self.head_dim + 1)


class Retention(RecurrentMixer):
    """Multi-scale retention (RetNet, Sun et al. 2023): a fixed decay γ_h = 1 − 2^(−5−h) per head,
    keys scaled by 1/√d, each head's output RMS-normalised (without gain), then gated by swish(x·W_G).
    RetNet's parallel form also divides each row of decayed scores by its absolute sum (a numerical
    guard for long sequences); the recurrent form it is trained to match, used here, does not."""

    rotates = True

    def __init__(self, config, *, kernel: Kernel = "torch"):
        super().__init__()
        self.n_head, self.head_dim, self.kernel = config.n_head, config.head_dim, kernel
        self.c_attn = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)  # q, k, v, gate
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        heads = torch.arange(config.n_head, dtype=torch.float32)
        self.register_buffer("log_decay", torch.log1p(-(2.0 ** (-5.0 - heads))), persistent=False)  # (H,)

    @staticmethod
    def check(config, options: dict) -> str | None:
        return check_options(options)

    def mix(self, x: Tensor, positional, state: dict) -> tuple[Tensor, dict]:
        B, T, C = x.shape
        q, k, v, gate = self.c_attn(x).chunk(4, dim=-1)
        q, k, v = (_heads(t, self.n_head) for t in (q, k, v))  # (B, H, T, D)
        q, k = positional.rotate(q), positional.rotate(k) / math.sqrt(self.head_dim)
        log_decay = self.log_decay.to(q.dtype)[None, :, None].expand(B, -1, T)  # (B, H, T)
        o, S = self.scan(q, k, v, log_decay, state.get("S"))
        y = F.rms_norm(o, (self.head_dim,), eps=1e-6)  # each head apart (RetNet's GroupNorm)
        return self.c_proj(F.silu(gate) * _merge_heads(y)), {"S": S}

    def init_blocks(self) -> dict[str, list[tuple[str, int]]]:
        return {"c_attn.weight": qkv_blocks(self.n_head, self.head_dim, ("gate", self.n_head * self.head_dim))}

    def extra_flops_per_token(self, seq_len: int, causal: bool) -> float:
        return self.n_head * chunked_flops(seq_len, self.head_dim, self.head_dim, self.chunk)

    def state_elements(self) -> int:
        return self.n_head * self.head_dim * self.head_dim


class GatedLinearAttention(RecurrentMixer):
    """Gated linear attention (Yang et al. 2024): a data-dependent decay per key channel,
    α_t = σ(x·W_α1·W_α2 + b)^(1/16) (a rank-16 gate; the 1/16 keeps decays near 1, as the paper's
    normaliser does), clamped at e^(CHANNEL_DECAY_FLOOR); keys half the model width (the paper's
    expand_k = 0.5), queries scaled by 1/√d_k; each head's output RMS-normalised and gated by
    swish(x·W_r). Chunks of 16 tokens (models.recurrent's per-channel bound)."""

    chunk = 16
    gate_rank, gate_temperature = 16, 16.0

    def __init__(self, config, *, conv: int = 0, kernel: Kernel = "torch"):
        super().__init__()
        C, self.kernel = config.n_embd, kernel
        self.n_head, self.head_dim, self.key_dim = config.n_head, config.head_dim, C // 2 // config.n_head
        self.c_attn = nn.Linear(C, C // 2 + C // 2 + C, bias=config.bias)  # q, k (C/2 each), v (C)
        self.conv = ShortConv(2 * C, conv, config.bias) if conv else None
        self.gate_down = nn.Linear(C, self.gate_rank, bias=False)
        self.gate_up = nn.Linear(self.gate_rank, C // 2, bias=True)
        self.out_gate = nn.Linear(C, C, bias=config.bias)
        self.head_norm = build_spec("norm", "rmsnorm", self.head_dim, config)
        self.c_proj = nn.Linear(C, C, bias=config.bias)

    @staticmethod
    def check(config, options: dict) -> str | None:
        if (config.n_embd // 2) % config.n_head:
            return f"n_embd/2 = {config.n_embd // 2} (the key width) must be divisible by n_head={config.n_head}"
        return check_options(options)

    def mix(self, x: Tensor, positional, state: dict) -> tuple[Tensor, dict]:
        C = x.shape[-1]
        qkv, new = self.c_attn(x), {}
        if self.conv is not None:
            qkv, new["conv"] = self.conv(qkv, state.get("conv"))
        q, k, v = qkv.split([C // 2, C // 2, C], dim=-1)
        q, k, v = _heads(q, self.n_head) / math.sqrt(self.key_dim), _heads(k, self.n_head), _heads(v, self.n_head)
        gate = F.logsigmoid(self.gate_up(self.gate_down(x))) / self.gate_temperature
        log_decay = _heads(gate.clamp(min=CHANNEL_DECAY_FLOOR), self.n_head)  # (B, H, T, d_k)
        o, new["S"] = self.scan(q, k, v, log_decay, state.get("S"))
        y = _merge_heads(self.head_norm(o))
        return self.c_proj(F.silu(self.out_gate(x)) * y), new

    def extra_flops_per_token(self, seq_len: int, causal: bool) -> float:
        return self.n_head * chunked_flops(seq_len, self.key_dim, self.head_dim, self.chunk)

    def state_elements(self) -> int:
        return self.n_head * self.key_dim * self.head_dim


class Mamba2(RecurrentMixer):
    """Mamba-2's SSD layer (Dao & Gu 2024): x projected to a gate z, the SSM input x, B and C
    (d_state each, shared by the heads) and a step dt per head; a short causal convolution and SiLU
    on (x, B, C); per head, decay exp(dt·A) with A = −exp(A_log) (scalar times identity) and input
    dt·x, read out by C, plus D·x; then RMSNorm(y ⊙ SiLU(z)) and the output projection. The SSD
    recurrence is the decayed linear one with q = C, k = B, v = dt·x. Initialisation as Mamba-2's:
    dt from log-uniform [0.001, 0.1] (through softplus's inverse), A from uniform [1, 16], D = 1."""

    def __init__(self, config, *, d_state: int = 16, expand: int = 2, conv: int = 4, kernel: Kernel = "torch"):
        super().__init__()
        self.n_head, self.d_state, self.kernel = config.n_head, d_state, kernel
        self.d_inner = expand * config.n_embd
        self.head_dim = self.d_inner // config.n_head  # P
        self.in_proj = nn.Linear(config.n_embd, 2 * self.d_inner + 2 * d_state + config.n_head, bias=config.bias)
        self.conv = ShortConv(self.d_inner + 2 * d_state, conv, bias=True) if conv else None
        self.dt_bias = nn.Parameter(torch.zeros(config.n_head))
        self.A_log = nn.Parameter(torch.zeros(config.n_head))
        self.D = nn.Parameter(torch.ones(config.n_head))
        self.norm = build_spec("norm", "rmsnorm", self.d_inner, config)
        self.c_proj = nn.Linear(self.d_inner, config.n_embd, bias=config.bias)

    @staticmethod
    def check(config, options: dict) -> str | None:
        if options["d_state"] < 1 or options["expand"] < 1:
            return f"d_state={options['d_state']} and expand={options['expand']} must be at least 1"
        if options["expand"] * config.n_embd % config.n_head:
            return f"expand·n_embd = {options['expand'] * config.n_embd} must be divisible by n_head={config.n_head}"
        return check_options(options)

    def reset_parameters(self) -> None:
        init_ssm_decay(self.dt_bias, self.A_log)
        with torch.no_grad():
            self.D.fill_(1.0)

    def mix(self, x: Tensor, positional, state: dict) -> tuple[Tensor, dict]:
        B, T, _ = x.shape
        H, N = self.n_head, self.d_state
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.d_inner + 2 * N, H], dim=-1)
        new = {}
        if self.conv is not None:
            xBC, new["conv"] = self.conv(xBC, state.get("conv"))
        xs, Bm, Cm = F.silu(xBC).split([self.d_inner, N, N], dim=-1)
        dt, log_decay = ssm_decay(dt, self.dt_bias, self.A_log)  # (B, H, T) each
        xs = _heads(xs, H)  # (B, H, T, P)
        q, k = Cm[:, None].expand(B, H, T, N), Bm[:, None].expand(B, H, T, N)
        y, new["S"] = self.scan(q, k, xs * dt[..., None], log_decay, state.get("S"))
        y = y + self.D.to(y.dtype)[:, None, None] * xs
        return self.c_proj(self.norm(_merge_heads(y) * F.silu(z))), new

    def extra_flops_per_token(self, seq_len: int, causal: bool) -> float:
        return self.n_head * chunked_flops(seq_len, self.d_state, self.head_dim, self.chunk)

    def state_elements(self) -> int:
        return self.n_head * self.d_state * self.head_dim


register("attention", "linear", description="linear attention, elu+1 features (Katharopoulos et al. 2020)")(LinearAttention)
register("attention", "retnet", description="retention with a fixed decay per head (RetNet, Sun et al. 2023)")(Retention)
register("attention", "gla", description="gated linear attention, data-dependent decays (Yang et al. 2024)")(GatedLinearAttention)
register("attention", "mamba2", description="Mamba-2's SSD: scalar-times-identity decay (Dao & Gu 2024)")(Mamba2)
