"""H3, a gated long convolution whose filter is a diagonal state-space model (Fu et al. 2023,
"Hungry Hungry Hippos", arXiv 2212.14052): it stands in for Hyena here because its long filter has
a recurrent form with a constant-size state, so it trains with an FFT convolution and decodes one
token at a time (Hyena's implicit filters have no such state).

Per channel c (head dimension 1: every product below is elementwise over the C = n_embd channels)::

    q, k, v = x·W_qkv                      k̄ = shift(k)   (a short causal convolution: the shift SSM)
    u_t = k̄_t ⊙ v_t
    s_t = exp(Δ·A) ⊙ s_{t−1} + Δ·B·u_t     s: (C, N), A = −exp(A_log) < 0, Δ = exp(log_dt)
    y_t = Σ_n C·s_t + D·u_t
    out = (q ⊙ y)·W_proj

Unrolled, y = K ∗ u + D·u with the kernel K_c[t] = Σ_n C·Δ·B·exp(t·Δ·A): the FFT form computes that
convolution (training and prefill), the recurrence takes one step per decoded token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.mixers import RecurrentMixer
from models.recurrent import ShortConv
from models.registry import register


def powers(dtA: Tensor, T: int) -> Tensor:
    """exp(t·Δ·A) for t = 0 .. T − 1: dtA (Ch, N) -> (T, Ch, N)."""
    t = torch.arange(T, device=dtA.device, dtype=dtA.dtype)
    return torch.exp(t[:, None, None] * dtA)


def ssm_kernel(decay: Tensor, dtB: Tensor, C: Tensor) -> Tensor:
    """The impulse response K[t] = Σ_n C·Δ·B·exp(t·Δ·A): decay = powers(Δ·A, T), dtB, C (Ch, N) -> (T, Ch).

    Multiply and sum rather than einsum: the kernel is built once per call, not per row, so as a
    matmul its FLOPs per token would depend on the batch size."""
    return (decay * (C * dtB)).sum(-1)


def fft_conv(u: Tensor, kernel: Tensor) -> Tensor:
    """Causal convolution y_t = Σ_{s≤t} K[t − s]·u_s along dim 1: u (B, T, Ch), kernel (T, Ch) -> (B, T, Ch).
    Zero-padded to 2T, so the FFT's circular convolution does not wrap the end onto the start."""
    T = u.shape[1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * T, dim=1) * torch.fft.rfft(kernel, n=2 * T, dim=0), n=2 * T, dim=1)
    return y[:, :T]


def diagonal_ssm(u: Tensor, dtA: Tensor, dtB: Tensor, C: Tensor, D: Tensor,
                 state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The diagonal SSM over a whole sequence: u (B, T, Ch), dtA, dtB, C (Ch, N), D (Ch,), state
    (B, Ch, N) or None (zeros) -> (y (B, T, Ch), the state after the last token).

        y_t = (K ∗ u)_t + D·u_t + Σ_n C·exp((t + 1)·Δ·A)·s_0
        s_T = Σ_t exp((T − 1 − t)·Δ·A)·Δ·B·u_t + exp(T·Δ·A)·s_0
    """
    T = u.shape[1]
    decay = powers(dtA, T + 1)  # (T + 1, Ch, N): exp(t·Δ·A) for t = 0 .. T
    y = fft_conv(u, ssm_kernel(decay[:T], dtB, C)) + D * u
    new = torch.einsum("btc,tcn->bcn", u, decay[:T].flip(0) * dtB)  # (B, Ch, N)
    if state is not None:  # what the tokens before this call left: it decays, read out by C
        y = y + torch.einsum("bcn,tcn->btc", state * C, decay[1:])
        new = new + decay[T] * state
    return y, new


def diagonal_ssm_step(u: Tensor, dtA: Tensor, dtB: Tensor, C: Tensor, D: Tensor,
                      state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the recurrence: u (B, Ch), state (B, Ch, N) -> (y (B, Ch), the new state)."""
    state = torch.exp(dtA) * state + dtB * u[..., None]
    return (C * state).sum(-1) + D * u, state


class H3(RecurrentMixer):
    """H3 (Fu et al. 2023) with head dimension 1: q, k, v from one projection; k through the shift
    SSM, a causal convolution of `shift` taps (``ShortConv``, no bias, as the reference's shift
    kernel has none); u = k̄ ⊙ v through a diagonal SSM of `d_state` real modes per channel; the
    output gated by q. Position comes from the two convolutions, so a rotating encoding is accepted
    and q, k left alone (``rotates``).

    Initialisation: S4D-Real (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal
    State Space Models"), A_n = −(n + 1) and B = 1, as the reference's ``diag-real`` measure; the
    reference's default S4D-Lin, −1/2 + iπn, is complex, and its real part alone would give every mode
    one decay rate. C ~ N(0, 1), D = 1, Δ log-uniform in [0.001, 0.1]. Input discretised as Δ·B (the
    reference uses zero-order hold, (exp(Δ·A) − 1)/A·B; the two agree to first order in Δ·A).

    The SSM runs in fp32 (fp64 for fp64 inputs), autocast or not: cuFFT has no bf16 transform, and
    exp(t·Δ·A) wants more than bf16's 8 bits. Its output and state are cast back to the projections'
    dtype, which the state is kept in, as the other members keep theirs (``state_bytes`` counts it so).
    The FFT form is causal up to rounding: a later token moves earlier outputs by the transform's
    roundoff (~1e-7 relative in fp32), never more.
    """

    rotates = False  # order comes from the shift and long convolutions

    def __init__(self, config, *, d_state: int = 16, shift: int = 4):
        super().__init__()
        Ch = config.n_embd
        self.d_state = d_state
        self.c_attn = nn.Linear(Ch, 3 * Ch, bias=config.bias)  # q, k, v
        self.shift = ShortConv(Ch, shift, bias=False)
        # (C·N,), viewed as (C, N): flat, because the optimisers take ≥ 2-D tensors for weight
        # matrices (weight decay; Muon orthogonalises them), which these per-channel values are not
        self.A_log = nn.Parameter(torch.empty(Ch * d_state))
        self.B = nn.Parameter(torch.empty(Ch * d_state))
        self.C = nn.Parameter(torch.empty(Ch * d_state))
        self.D = nn.Parameter(torch.empty(Ch))
        self.log_dt = nn.Parameter(torch.empty(Ch))
        self.c_proj = nn.Linear(Ch, Ch, bias=config.bias)
        self.reset_parameters()  # usable when built alone; the GPT resets them again from its keyed stream

    @staticmethod
    def check(config, options: dict) -> str | None:
        if options["d_state"] < 1 or options["shift"] < 1:
            return f"d_state={options['d_state']} and shift={options['shift']} must be at least 1"
        return None

    def reset_parameters(self) -> None:
        Ch, N = self.D.numel(), self.d_state
        with torch.no_grad():
            self.A_log.copy_(torch.arange(1, N + 1, dtype=torch.float32).log().repeat(Ch))  # A_{c,n} = −(n + 1)
            self.B.fill_(1.0)
            self.C.copy_(torch.randn(Ch * N))
            self.D.fill_(1.0)
            self.log_dt.copy_(torch.empty(Ch).uniform_(math.log(1e-3), math.log(0.1)))

    def discretised(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(Δ·A, Δ·B, C, D) in dtype: (Ch, N) each, D (Ch,)."""
        A_log, B, C = (p.to(dtype).view(-1, self.d_state) for p in (self.A_log, self.B, self.C))
        dt = torch.exp(self.log_dt.to(dtype))[:, None]  # (Ch, 1)
        return -torch.exp(A_log) * dt, B * dt, C, self.D.to(dtype)

    def mix(self, x: Tensor, positional, state: dict) -> tuple[Tensor, dict]:
        q, k, v = self.c_attn(x).chunk(3, dim=-1)  # (B, T, C) each
        k, conv = self.shift(k, state.get("conv"))
        dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 at least
        u, s = (k * v).to(dtype), state.get("ssm")  # u (B, T, C)
        s = s.to(dtype) if s is not None else None
        with torch.autocast(x.device.type, enabled=False):  # fp32 under autocast too: its einsums, the decays
            if x.shape[1] == 1 and s is not None:  # decoding: one step of the recurrence
                y, s = diagonal_ssm_step(u[:, 0], *self.discretised(dtype), s)
                y = y[:, None]
            else:
                y, s = diagonal_ssm(u, *self.discretised(dtype), s)
        return self.c_proj(q * y.to(q.dtype)), {"conv": conv, "ssm": s.to(q.dtype)}

    def extra_flops_per_token(self, seq_len: int, causal: bool) -> float:
        """The final state's einsum, Δ·B·u weighted by its decay: 2·C·N per token (run on every call:
        a training call and a cache's first prefill both start from an empty state, so the mixer cannot
        tell them apart). Not matmuls, so not counted: the FFT convolution, O(C·log T) per token, and
        the kernel's build, O(C·N·T) per call whatever the batch. A prefill after earlier tokens also
        reads the carried state (another 2·C·N per token); training never has one."""
        return 2.0 * self.C.numel()

    def state_elements(self) -> int:
        """The SSM's C·N plus the shift's last shift − 1 inputs per channel."""
        return self.C.numel() + self.shift.state_elements()


register("attention", "h3", description="H3: shift conv, then a diagonal-SSM long conv gated by q (Fu et al. 2023)")(H3)
