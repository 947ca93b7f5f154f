"""H3 (models.mixer_h3): the FFT long convolution against a direct sum and the recurrence, the kernel
against the recurrence's impulse response, FLOP accounting, decoding against the full forward, and
causality."""

from __future__ import annotations

import pytest
import torch

import models.mixer_h3  # noqa: F401  (registers h3)
from models import ModelConfig, build_model, check_flops
from models.mixer_h3 import H3, diagonal_ssm, diagonal_ssm_step, powers, ssm_kernel
from tests.conftest import tiny

Ch, N = 3, 4


def ssm_params(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(Δ·A, Δ·B, C, D) with Δ·A in [−1, −0.05]: decays and kernel terms large enough that a wrong
    exponent or a dropped term shows."""
    g = torch.Generator().manual_seed(1)
    dtA = -(0.05 + 0.95 * torch.rand(Ch, N, generator=g, dtype=dtype))
    dtB = 0.2 + torch.rand(Ch, N, generator=g, dtype=dtype)
    C = torch.randn(Ch, N, generator=g, dtype=dtype)
    D = torch.randn(Ch, generator=g, dtype=dtype)
    return dtA, dtB, C, D


def direct(u, dtA, dtB, C, D, s0):
    """The O(T²) sum, term by term: y_t = Σ_{j≤t} Σ_n C·Δ·B·exp((t − j)·Δ·A)·u_j + D·u_t
    + Σ_n C·exp((t + 1)·Δ·A)·s0, and s_T = Σ_j exp((T − 1 − j)·Δ·A)·Δ·B·u_j + exp(T·Δ·A)·s0."""
    T = u.shape[1]
    y = torch.zeros_like(u)
    for t in range(T):
        for j in range(t + 1):
            y[:, t] += (C * dtB * torch.exp((t - j) * dtA) * u[:, j, :, None]).sum(-1)
        y[:, t] += D * u[:, t] + (C * torch.exp((t + 1) * dtA) * s0).sum(-1)
    s = sum(torch.exp((T - 1 - j) * dtA) * dtB * u[:, j, :, None] for j in range(T)) + torch.exp(T * dtA) * s0
    return y, s


def stepwise(u, dtA, dtB, C, D, s):
    """The recurrence, one token at a time: s_t = exp(Δ·A)·s_{t−1} + Δ·B·u_t, y_t = Σ_n C·s_t + D·u_t."""
    ys = []
    for t in range(u.shape[1]):
        s = torch.exp(dtA) * s + dtB * u[:, t, :, None]
        ys.append((C * s).sum(-1) + D * u[:, t])
    return torch.stack(ys, 1), s


@pytest.mark.parametrize("with_state", [False, True])
def test_fft_form_equals_direct_sum_and_recurrence(with_state):
    T = 13  # not a power of two
    for dtype, check, tol in ((torch.float64, direct, 1e-10), (torch.float32, stepwise, 1e-5)):
        params = ssm_params(dtype)
        u = torch.randn(2, T, Ch, dtype=dtype)
        s0 = torch.randn(2, Ch, N, dtype=dtype) if with_state else torch.zeros(2, Ch, N, dtype=dtype)
        y, s = diagonal_ssm(u, *params, s0 if with_state else None)
        y_ref, s_ref = check(u, *params, s0)
        assert (y - y_ref).abs().max() <= tol, (dtype, (y - y_ref).abs().max())
        assert (s - s_ref).abs().max() <= tol, (dtype, (s - s_ref).abs().max())
    # the decoding step is the recurrence's step
    y1, s1 = diagonal_ssm_step(u[:, 0], *params, s0)
    y_ref, s_ref = stepwise(u[:, :1], *params, s0)
    assert torch.allclose(y1, y_ref[:, 0]) and torch.allclose(s1, s_ref)


def test_kernel_is_the_recurrences_impulse_response():
    T = 11
    dtA, dtB, C, D = ssm_params(torch.float64)
    impulse = torch.zeros(1, T, Ch, dtype=torch.float64)
    impulse[:, 0] = 1.0
    response, _ = stepwise(impulse, dtA, dtB, C, torch.zeros_like(D), torch.zeros(1, Ch, N, dtype=torch.float64))
    kernel = ssm_kernel(powers(dtA, T), dtB, C)  # (T, Ch)
    assert (kernel - response[0]).abs().max() <= 1e-12
    through_fft, _ = diagonal_ssm(impulse, dtA, dtB, C, torch.zeros_like(D))  # the forward's own kernel
    assert (through_fft - response).abs().max() <= 1e-12
    assert kernel[-1].abs().min() > 1e-6  # the response has not died out: the comparison sees every tap


def test_flops_match_torch_counter():
    assert check_flops("attention", "h3") is None
    assert check_flops("attention", "h3", {"d_state": 5, "shift": 2}) is None


@pytest.mark.parametrize("pos", ["none", "rope"])
def test_decode_equals_full_forward(pos):
    m = build_model(ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=40,
                                attention="h3", positional=pos), seed=0).eval()
    idx = torch.randint(0, 50, (2, 40))
    with torch.no_grad():
        full = m(idx).logits
        cache = m.new_cache()
        steps = [m(idx[:, :23], cache=cache).logits] + [m(idx[:, t:t + 1], cache=cache).logits for t in range(23, 40)]
        assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5
        # prefill in two parts: the second starts from the first's state (the FFT form's initial state)
        cache = m.new_cache()
        steps = [m(idx[:, :10], cache=cache).logits, m(idx[:, 10:23], cache=cache).logits]
        steps += [m(idx[:, t:t + 1], cache=cache).logits for t in range(23, 40)]
        assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5
    layer = cache.layers[0]
    assert layer.nbytes() == 2 * m.blocks[0].attn.state_bytes(4)  # 2 rows, fp32: constant in T


def test_future_tokens_do_not_change_the_past():
    m = H3(tiny(), d_state=4, shift=3).double()
    with torch.no_grad():
        m.log_dt.fill_(-0.5)  # long-lived decays, so a leak would be large
        x = torch.randn(1, 12, 32, dtype=torch.float64)
        x2 = x.clone()
        x2[:, 7] += 1.0
        y, y2 = m(x, None, torch.arange(12)), m(x2, None, torch.arange(12))
    assert (y[:, :7] - y2[:, :7]).abs().max() <= 1e-12
    assert (y[:, 7:] - y2[:, 7:]).abs().min() > 1e-6
