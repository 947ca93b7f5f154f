"""What the sub-quadratic sequence mixers share: a decayed linear recurrence in two forms, a short
causal convolution, and a decoding state of constant size.

Linear attention, RetNet, GLA and Mamba-2 are one recurrence with different decays (Yang et al.
2024, "Gated Linear Attention"; Dao & Gu 2024, "Transformers are SSMs")::

    S_t = diag(exp(g_t)) · S_{t-1} + k_tᵀ v_t        S: (Dk, Dv) per head, g_t ≤ 0 the log decay
    o_t = q_t · S_t

``recurrent`` runs it token by token (decoding: one step per token); ``chunked`` runs it in chunks
of C tokens, as matmuls within a chunk and the recurrence between chunks (training), and both return
the final state, so a prefill hands decoding what the step-by-step form would have. The log decay
is one scalar per head and token (RetNet, Mamba-2; zero for linear attention) or one per key
channel (GLA). A per-channel decay is applied as q·exp(b) and k·exp(−b) with b the cumulative log
decay within the chunk, which stays finite only while b does: such decays must be at least
``CHANNEL_DECAY_FLOOR`` per token (the member clamps its gate, in every form alike) and chunks
at most ``CHANNEL_CHUNK`` tokens long, so that |b| ≤ 64 and exp(±b) fits in fp32 and bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHANNEL_DECAY_FLOOR = -4.0  # log decay per token and key channel: decays of at least e^-4 ≈ 0.018
CHANNEL_CHUNK = 16  # 16 tokens × 4 = 64: exp(64) ≈ 6e27 fits fp32 and bf16 (not fp16)


def recurrent(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
              state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence token by token: q, k (B, H, T, Dk), v (B, H, T, Dv), log_decay (B, H, T) or
    (B, H, T, Dk), state (B, H, Dk, Dv) or None (zeros) -> (o (B, H, T, Dv), the final state)."""
    B, H, T, Dk = k.shape
    S = state if state is not None else k.new_zeros(B, H, Dk, v.shape[-1])
    decay = _per_channel(log_decay).exp()  # (B, H, T, Dk or 1)
    out = []
    for t in range(T):
        S = decay[:, :, t, :, None] * S + k[:, :, t, :, None] * v[:, :, t, None, :]  # (B, H, Dk, Dv)
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(out, 2), S


def chunked(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor | None = None,
            chunk: int = 64) -> tuple[Tensor, Tensor]:
    """The recurrence in chunks of `chunk` tokens (the same arguments and result as ``recurrent``).

    Within a chunk with cumulative log decay b_t (from its start, inclusive):
      o_t = (q_t·e^{b_t}) S_0 + Σ_{s≤t} (q_t·e^{b_t − b_s})·k_s v_s     (S_0: the state before the chunk)
      S_C = e^{b_C} S_0 + Σ_s (k_s·e^{b_C − b_s})ᵀ v_s
    The sequence is zero-padded to whole chunks (k = v = 0 and no decay: the state is unchanged).
    """
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    if T == 0:
        return v.new_zeros(B, H, 0, Dv), state if state is not None else k.new_zeros(B, H, Dk, Dv)
    per_channel = log_decay.dim() == 4
    if per_channel:
        chunk = min(chunk, CHANNEL_CHUNK)
    pad = -T % chunk
    g = _per_channel(log_decay)  # (B, H, T, Dk or 1)
    if pad:
        q, k, v, g = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, g))
    N = (T + pad) // chunk
    q, k, v, g = (t.reshape(B, H, N, chunk, t.shape[-1]) for t in (q, k, v, g))
    b = g.cumsum(3)  # (B, H, N, C, Dk or 1): log decay from the chunk's start to each token
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    if per_channel:  # e^{b_t − b_s} split over q and k, one factor each (|b| ≤ 64: finite)
        scores = (q * b.exp()) @ (k * (-b).exp()).transpose(-1, -2)  # (B, H, N, C, C)
    else:  # a scalar per token: the (C, C) decay matrix itself, masked before exp (no overflow)
        scores = (q @ k.transpose(-1, -2)) * segment_sums(g.squeeze(-1), causal).exp()
    intra = scores.masked_fill(~causal, 0.0) @ v  # (B, H, N, C, Dv)
    last = b[:, :, :, -1:]  # (B, H, N, 1, Dk or 1): the whole chunk's log decay
    # b_C − b_s summed over (s, C] directly: a difference of two large cumulative sums loses digits in fp32
    after = F.pad(g.flip(3).cumsum(3).flip(3)[:, :, :, 1:], (0, 0, 0, 1))
    updates = (k * after.exp()).transpose(-1, -2) @ v  # (B, H, N, Dk, Dv): each chunk's own kv
    chunk_decay = last.transpose(-1, -2).exp()  # (B, H, N, Dk or 1, 1)
    S = state if state is not None else k.new_zeros(B, H, Dk, Dv)
    before = []  # the state each chunk starts from: a recurrence over chunks, elementwise
    for n in range(N):
        before.append(S)
        S = chunk_decay[:, :, n] * S + updates[:, :, n]
    inter = (q * b.exp()) @ torch.stack(before, 2)  # (B, H, N, C, Dv)
    o = (intra + inter).reshape(B, H, N * chunk, Dv)[:, :, :T]
    return o, S


def segment_sums(g: Tensor, causal: Tensor) -> Tensor:
    """g (..., C) -> (..., C, C): Σ_{r ∈ (s, t]} g_r at [t, s] for s ≤ t, −inf above the diagonal
    (Mamba-2's segsum: summed directly, not as b_t − b_s, which loses digits when both are large)."""
    C = g.shape[-1]
    x = g[..., None, :].expand(*g.shape, C).transpose(-1, -2)  # [t, s] = g_t
    strict = torch.ones(C, C, dtype=torch.bool, device=g.device).tril(-1)
    return x.masked_fill(~strict, 0).cumsum(-2).masked_fill(~causal, -math.inf)


def chunked_flops(seq_len: int, d_k: int, d_v: int, chunk: int) -> float:
    """Matmul FLOPs per token and head of ``chunked`` at seq_len (padded to whole chunks): scores
    2·C·Dk, scores·v 2·C·Dv, the chunk's kv 2·Dk·Dv, the carried state's read 2·Dk·Dv."""
    padded = -(-seq_len // chunk) * chunk
    return (2 * chunk * (d_k + d_v) + 4 * d_k * d_v) * padded / seq_len


def _per_channel(log_decay: Tensor) -> Tensor:
    """(B, H, T) -> (B, H, T, 1); (B, H, T, Dk) as it is."""
    return log_decay if log_decay.dim() == 4 else log_decay.unsqueeze(-1)


class ShortConv(nn.Module):
    """A depthwise causal convolution over time of `kernel` taps (Mamba's conv1d, the short
    convolutions of GLA/DeltaNet/Based): each channel mixes its last `kernel` inputs. Decoding keeps
    those last kernel − 1 inputs: a state of constant size."""

    def __init__(self, channels: int, kernel: int, bias: bool):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(channels, channels, kernel, groups=channels, bias=bias)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T, D), state (B, kernel − 1, D) or None (zeros: the sequence's start) ->
        (y (B, T, D), the last kernel − 1 inputs)."""
        B, T, D = x.shape
        past = state if state is not None else x.new_zeros(B, self.kernel - 1, D)
        xp = torch.cat([past, x], 1)  # (B, kernel − 1 + T, D)
        y = self.conv(xp.transpose(1, 2)).transpose(1, 2)  # (B, T, D)
        return y, xp[:, xp.shape[1] - (self.kernel - 1):]

    def extra_flops_per_token(self, seq_len: int, causal: bool) -> float:
        """The convolution: kernel multiply-adds per channel and token (what FlopCounterMode counts)."""
        return 2.0 * self.kernel * self.conv.in_channels

    def state_elements(self) -> int:
        return (self.kernel - 1) * self.conv.in_channels


class StateCache:
    """A recurrent mixer's decoding state: named tensors, rows first, of a size that does not grow
    with the tokens decoded. Rows at different positions need nothing special (each row carries its
    own state): ``merge`` stacks rows, ``select`` keeps some. Updates assign new tensors, never in
    place, so a shallow copy of the cache stays valid."""

    def __init__(self):
        self.tensors: dict[str, Tensor] = {}

    def set(self, **tensors: Tensor) -> None:
        self.tensors = {**self.tensors, **tensors}

    def nbytes(self) -> int:
        """Bytes of the state held."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @classmethod
    def merge(cls, caches: list[StateCache]) -> StateCache:
        """The rows of several filled caches (of one model's layer) in one."""
        merged = cls()
        merged.tensors = {name: torch.cat([c.tensors[name] for c in caches]) for name in caches[0].tensors}
        return merged

    def select(self, rows: Tensor) -> None:
        """Keep only these rows (indices (B',))."""
        self.tensors = {name: t[rows.to(t.device)] for name, t in self.tensors.items()}
