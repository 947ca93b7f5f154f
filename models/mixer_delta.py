"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks"): the delta rule with a
Mamba-2 decay, a recurrent mixer of the ``attention`` family beside those of ``models.mixers``.

Where linear attention adds k_t v_tᵀ to its state, the delta rule first removes what the state
recalls for k_t, by a step β_t, so that writing a key again overwrites its value instead of summing
both (a step of online regression of v on k); a decay α_t = exp(g_t) ≤ 1 per head and token forgets::

    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ        S: (Dk, Dv) per head
    o_t = S_tᵀ q_t

The transition is no longer diagonal, so ``models.recurrent``'s forms do not apply: ``delta_recurrent``
runs it token by token (decoding), ``delta_chunked`` in chunks with the WY (UT) representation
(training and prefill), and both return the final state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import fla_kernels
from models.mixers import (Kernel, RecurrentMixer, _heads, _merge_heads, check_options, init_ssm_decay, qkv_blocks,
                           ssm_decay)
from models.recurrent import ShortConv
from models.registry import build_spec, register


def delta_recurrent(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor,
                    state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The gated delta rule token by token: q, k (B, H, T, Dk), v (B, H, T, Dv), beta and log_decay
    (B, H, T), state (B, H, Dk, Dv) or None (zeros) -> (o (B, H, T, Dv), the final state).

    α(I − βkkᵀ)S + βkvᵀ is computed as S' = αS, then S' + βk(v − S'ᵀk)ᵀ: a rank-one correction by
    the error of what the decayed state recalls for k (no (Dk, Dk) matrix is formed)."""
    B, H, T, Dk = k.shape
    S = state if state is not None else k.new_zeros(B, H, Dk, v.shape[-1])
    decay = log_decay.exp()
    out = []
    for t in range(T):
        S = decay[:, :, t, None, None] * S
        error = v[:, :, t] - torch.einsum("bhk,bhkv->bhv", k[:, :, t], S)  # (B, H, Dv)
        S = S + beta[:, :, t, None, None] * k[:, :, t, :, None] * error[:, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(out, 2), S


def delta_chunked(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor,
                  state: Tensor | None = None, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """The gated delta rule in chunks of `chunk` tokens (the same arguments and result as
    ``delta_recurrent``).

    Written as S_t = α_t S_{t−1} + k_t u_tᵀ with u_t = β_t (v_t − α_t S_{t−1}ᵀ k_t), a chunk that
    starts from S_0, with b_t its cumulative log decay (inclusive), has
      S_t = e^{b_t} S_0 + Σ_{s≤t} e^{b_t − b_s} k_s u_sᵀ
    so the chunk's u satisfy (I + A) u = βv − βe^{b} k S_0, A strictly lower, A_ts = β_t e^{b_t − b_s} k_t·k_s:
    u = T(βv) − T(βe^{b}k)·S_0 = ũ − w·S_0, with T = (I + A)⁻¹ (the UT transform) and ũ, w the
    chunk's own, in parallel. Only w·S_0 and the state's update wait for the chunk before; then
      o_t = e^{b_t} q_t S_0 + Σ_{s≤t} e^{b_t − b_s} (q_t·k_s) u_s,  S_C = e^{b_C} S_0 + Σ_s e^{b_C − b_s} k_s u_sᵀ.
    The sequence is zero-padded to whole chunks (β = 0 and no decay: the state is unchanged).
    """
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    pad = -T % chunk
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        beta, log_decay = F.pad(beta, (0, pad)), F.pad(log_decay, (0, pad))
    N = (T + pad) // chunk
    q, k, v = (t.reshape(B, H, N, chunk, t.shape[-1]) for t in (q, k, v))
    beta = beta.reshape(B, H, N, chunk, 1)
    g = log_decay.reshape(B, H, N, chunk, 1)
    b = g.cumsum(3)  # (B, H, N, C, 1): log decay from the chunk's start
    # b_t − b_s for s ≤ t as the sum of g over (s, t] itself, not a difference of two cumulative sums
    # (which loses digits when both are large: fp32 has ~3e-5 of 480), −inf above the diagonal,
    # where b_t − b_s > 0 could overflow: masked before exp
    strict = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril(-1)
    spans = g.expand(B, H, N, chunk, chunk).masked_fill(~strict, 0.0).cumsum(3)  # [t, s] = Σ_{s<r≤t} g_r
    between = spans.masked_fill(strict.T, -math.inf).exp()  # (B, H, N, C, C): e^{b_t − b_s}, 0 above
    kb = k * beta
    A = ((kb @ k.transpose(-1, -2)) * between).tril(-1)  # (B, H, N, C, C), strictly lower
    # (I + A)⁻¹ by a triangular solve (at least fp32: a half-precision solve is not offered, nor accurate)
    work = torch.promote_types(A.dtype, torch.float32)
    eye = torch.eye(chunk, dtype=work, device=q.device)
    T_inv = torch.linalg.solve_triangular(A.to(work) + eye, eye, upper=False, unitriangular=True).to(q.dtype)
    u, w = (T_inv @ torch.cat([v * beta, kb * b.exp()], -1)).split([Dv, Dk], -1)  # (B, H, N, C, Dv), (.., Dk)
    scores = (q @ k.transpose(-1, -2)) * between  # (B, H, N, C, C), zero above the diagonal
    last = b[:, :, :, -1:]  # (B, H, N, 1, 1): the whole chunk's log decay
    k_out = k * between[:, :, :, -1, :, None]  # (B, H, N, C, Dk): each key decayed to the chunk's end
    S = state if state is not None else k.new_zeros(B, H, Dk, Dv)
    before, corrected = [], []  # the state each chunk starts from, and its u given that state
    for n in range(N):
        before.append(S)
        u_n = u[:, :, n] - w[:, :, n] @ S  # (B, H, C, Dv)
        corrected.append(u_n)
        S = last[:, :, n].exp() * S + k_out[:, :, n].transpose(-1, -2) @ u_n
    inter = (q * b.exp()) @ torch.stack(before, 2)  # (B, H, N, C, Dv)
    o = (inter + scores @ torch.stack(corrected, 2)).reshape(B, H, N * chunk, Dv)[:, :, :T]
    return o, S


def delta_chunked_flops(seq_len: int, d_k: int, d_v: int, chunk: int) -> float:
    """Matmul FLOPs per token and head of ``delta_chunked`` at seq_len (padded to whole chunks):
    βk·kᵀ 2·C·Dk, q·kᵀ 2·C·Dk, T·[βv, βe^b k] 2·C·(Dv + Dk), scores·u 2·C·Dv, and w·S_0, the carried
    state's read and the state's update 2·Dk·Dv each. The triangular solve for (I + A)⁻¹ is not counted
    (FlopCounterMode does not see it): up to C²/2 multiply-adds per token, a few % of the rest."""
    padded = -(-seq_len // chunk) * chunk
    return (2 * chunk * (3 * d_k + 2 * d_v) + 6 * d_k * d_v) * padded / seq_len


FLA_DELTA = fla_kernels.gated("delta", fla_kernels.delta, delta_chunked)  # checked against delta_chunked once per device, dtype


class GatedDeltaNet(RecurrentMixer):
    """Gated DeltaNet (Yang et al. 2024), as fla's layer: q, k, v from one projection, a short causal
    convolution and SiLU on them (SiLU alone with conv=0); q and k L2-normalised per head (the delta
    rule needs ‖k‖ = 1 for I − βkkᵀ to be a contraction), q scaled by 1/√Dk; β = σ(x·W_β) and
    g = −exp(A_log)·softplus(x·W_a + dt_bias) per head (Mamba-2's decay, initialised as ``Mamba2``);
    each head's output RMS-normalised with a gain, gated by SiLU(x·W_g). A rotating encoding rotates
    q and k before the L2 norm (a rotation keeps the norm)."""

    rotates = True

    def __init__(self, config, *, conv: int = 4, kernel: Kernel = "torch"):
        super().__init__()
        C, H = config.n_embd, config.n_head
        self.n_head, self.head_dim, self.kernel = H, config.head_dim, kernel
        self.c_attn = nn.Linear(C, 3 * C, bias=config.bias)  # q, k, v
        self.conv = ShortConv(3 * C, conv, bias=False) if conv else None  # fla's conv_bias=False
        self.b_proj = nn.Linear(C, H, bias=False)  # β
        self.a_proj = nn.Linear(C, H, bias=False)  # the step dt, before dt_bias and softplus
        self.g_proj = nn.Linear(C, C, bias=config.bias)  # the output gate
        self.A_log = nn.Parameter(torch.zeros(H))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.head_norm = build_spec("norm", "rmsnorm", self.head_dim, config)
        self.c_proj = nn.Linear(C, C, bias=config.bias)

    @staticmethod
    def check(config, options: dict) -> str | None:
        return check_options(options)

    def reset_parameters(self) -> None:
        init_ssm_decay(self.dt_bias, self.A_log)

    def init_blocks(self) -> dict[str, list[tuple[str, int]]]:
        """q and each k and v head drawn as softmax attention's (models.attention): with the same seed
        deltanet starts from mha's q, k and v weights, and a paired comparison measures the mixer."""
        return {"c_attn.weight": qkv_blocks(self.n_head, self.head_dim)}

    def scan(self, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor,
             state: Tensor | None) -> tuple[Tensor, Tensor]:
        """The delta rule (β besides the base's arguments): one step for a decoded token, chunks for a sequence."""
        if q.shape[2] == 1 and state is not None:
            return delta_recurrent(q, k, v, beta, log_decay, state)
        if self.kernel == "fla":
            return FLA_DELTA(q, k, v, beta, log_decay, state)
        return delta_chunked(q, k, v, beta, log_decay, state, self.chunk)

    def mix(self, x: Tensor, positional, state: dict) -> tuple[Tensor, dict]:
        qkv, new = self.c_attn(x), {}
        if self.conv is not None:
            qkv, new["conv"] = self.conv(qkv, state.get("conv"))
        q, k, v = (_heads(t, self.n_head) for t in F.silu(qkv).chunk(3, dim=-1))  # (B, H, T, D) each
        q = F.normalize(positional.rotate(q), dim=-1, eps=1e-6) / math.sqrt(self.head_dim)
        k = F.normalize(positional.rotate(k), dim=-1, eps=1e-6)
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)  # (B, H, T)
        _, log_decay = ssm_decay(self.a_proj(x), self.dt_bias, self.A_log)  # (B, H, T): g ≤ 0
        o, new["S"] = self.scan(q, k, v, beta, log_decay, state.get("S"))
        y = _merge_heads(self.head_norm(o)) * F.silu(self.g_proj(x))  # (B, T, C)
        return self.c_proj(y), new

    def extra_flops_per_token(self, seq_len: int, causal: bool) -> float:
        return self.n_head * delta_chunked_flops(seq_len, self.head_dim, self.head_dim, self.chunk)

    def state_elements(self) -> int:
        return self.n_head * self.head_dim * self.head_dim


register("attention", "deltanet", description="gated delta rule with a Mamba-2 decay (Gated DeltaNet, Yang et al. 2024)")(GatedDeltaNet)
