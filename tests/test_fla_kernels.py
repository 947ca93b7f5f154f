"""models.fla_kernels against a fake fla: ops with fla 0.5.2's signatures and [B, T, H, K] layout,
computed by the pure forms (models.recurrent) and, for the gated delta rule, a transcription of fla's
naive per-token reference. The real fla's kernels need a GPU: these tests check the mapping (layout,
arguments, states, dtypes) and the gate, not fla."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from models import fla_kernels
from models.fla_kernels import (
    FlaMismatch,
    FlaUnavailable,
    decayed,
    delta,
    gated,
    unavailable_reason,
)
from models.recurrent import CHANNEL_DECAY_FLOOR, chunked, recurrent

B, H, T, DK, DV = 2, 3, 37, 8, 5  # all different: a transposed layout cannot pass unnoticed


# --- the fake fla --------------------------------------------------------------------------------

def _no_head_first(kwargs: dict) -> None:
    if "head_first" in kwargs:  # as fla 0.5
        raise DeprecationWarning("head_first has been removed. Inputs must be in `[B, T, H, ...]` format.")


def _decayed_bthd(q, k, v, g, scale, initial_state, output_final_state):
    """fla's decayed recurrence in its layout, through the token-by-token pure form, in fp32 (as
    fla's kernels accumulate): o in v's dtype, the final state in fp32 or None."""
    Bq, Tq, Hq, K = q.shape
    assert k.shape == q.shape and v.shape[:3] == q.shape[:3], "q, k, v must be [B, T, H, ...]"
    assert g.shape in ((Bq, Tq, Hq), (Bq, Tq, Hq, K)), f"g {tuple(g.shape)} is not [B, T, H(, K)]"
    if initial_state is not None:
        assert initial_state.shape == (Bq, Hq, K, v.shape[-1]), "initial_state must be [N, H, K, V]"
    scale = K ** -0.5 if scale is None else scale
    o, S = recurrent(*(x.transpose(1, 2).float() for x in (q * scale, k, v, g)),
                     initial_state.float() if initial_state is not None else None)
    return o.transpose(1, 2).to(v.dtype), S if output_final_state else None


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                     state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, **kwargs):
    _no_head_first(kwargs)
    CALLS.append(("chunk_simple_gla", {"scale": scale, "g": g, **kwargs}))
    if g is None:
        g = q.new_zeros(q.shape[:3]) if g_gamma is None else g_gamma.expand(q.shape[:3])
    assert g.dim() == 3, "simple_gla's g is [B, T, H]"
    return _decayed_bthd(q, k, v, g, scale, initial_state, output_final_state)


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
              cu_seqlens=None, cu_seqlens_cpu=None):
    CALLS.append(("chunk_gla", {"scale": scale, "g": g}))
    if initial_state is not None:
        assert initial_state.dtype == torch.float32, "initial_state must be in float32."
    assert q.shape == k.shape == g.shape, "q, k, g must have the same shape."
    return _decayed_bthd(q, k, v, g, scale, initial_state, output_final_state)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                           state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, chunk_indices=None,
                           cp_context=None, **kwargs):
    """fla's naive_recurrent_gated_delta_rule (fla/ops/gated_delta_rule/naive.py), transcribed."""
    _no_head_first(kwargs)
    CALLS.append(("chunk_gated_delta_rule", {"scale": scale, "g": g,
                                             "use_qk_l2norm_in_kernel": use_qk_l2norm_in_kernel}))
    assert g.shape == beta.shape == q.shape[:3], "g and beta must be [B, T, H]"
    if use_qk_l2norm_in_kernel:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    if use_beta_sigmoid_in_kernel:
        beta = beta.sigmoid()
    dtype = v.dtype
    q, k, v, beta, g = (x.transpose(1, 2).float() for x in (q, k, v, beta, g))
    Bq, Hq, Tq, K = k.shape
    h = initial_state.float() if initial_state is not None else torch.zeros(Bq, Hq, K, v.shape[-1])
    q = q * (K ** -0.5 if scale is None else scale)
    o = torch.zeros(Bq, Hq, Tq, v.shape[-1])
    for i in range(Tq):
        h = h * g[:, :, i].exp()[..., None, None]
        b_v = (v[:, :, i] - (h * k[:, :, i, :, None]).sum(-2)) * beta[:, :, i, None]
        h = h + k[:, :, i, :, None] * b_v[:, :, None, :]
        o[:, :, i] = torch.einsum("bhd,bhdm->bhm", q[:, :, i], h)
    return o.transpose(1, 2).to(dtype), h if output_final_state else None


CALLS: list = []


def _install(monkeypatch, **ops) -> None:
    """A fake fla in sys.modules: fla, fla.ops and the three op modules, with `ops` replacing any."""
    CALLS.clear()
    found = {"chunk_simple_gla": chunk_simple_gla, "chunk_gla": chunk_gla,
             "chunk_gated_delta_rule": chunk_gated_delta_rule, **ops}
    fla, ops_module = types.ModuleType("fla"), types.ModuleType("fla.ops")
    fla.__version__, fla.ops = "0.5.2-fake", ops_module
    monkeypatch.setitem(sys.modules, "fla", fla)
    monkeypatch.setitem(sys.modules, "fla.ops", ops_module)
    for module, name in (("simple_gla", "chunk_simple_gla"), ("gla", "chunk_gla"),
                         ("gated_delta_rule", "chunk_gated_delta_rule")):
        m = types.ModuleType(f"fla.ops.{module}")
        setattr(m, name, found[name])
        setattr(ops_module, module, m)
        monkeypatch.setitem(sys.modules, f"fla.ops.{module}", m)


@pytest.fixture
def fake_fla(monkeypatch):
    """The fake fla, and CPU accepted as fla's device (only here)."""
    _install(monkeypatch)
    monkeypatch.setattr(fla_kernels, "_device_reason", lambda device: None)
    return monkeypatch


# --- references and inputs -----------------------------------------------------------------------

def delta_reference(q, k, v, beta, log_decay, state=None):
    """S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ, o_t = S_tᵀ q_t, literally, in (B, H, T, ...)."""
    Bq, Hq, Tq, K = k.shape
    S = state if state is not None else k.new_zeros(Bq, Hq, K, v.shape[-1])
    eye = torch.eye(K, dtype=k.dtype)
    out = []
    for t in range(Tq):
        kt, b = k[:, :, t], beta[:, :, t, None, None]
        transition = log_decay[:, :, t, None, None].exp() * (eye - b * kt[..., :, None] * kt[..., None, :])
        S = transition @ S + b * kt[..., :, None] * v[:, :, t, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(out, 2), S


def decayed_inputs(per_channel: bool, dtype=torch.float32):
    q, k = torch.randn(B, H, T, DK) * DK ** -0.5, torch.randn(B, H, T, DK) * DK ** -0.5
    v = torch.randn(B, H, T, DV)
    if per_channel:
        log_decay = F.logsigmoid(2 * torch.randn(B, H, T, DK)).clamp(min=CHANNEL_DECAY_FLOOR)
    else:
        log_decay = F.logsigmoid(torch.randn(B, H, T) + 2)
    state = torch.randn(B, H, DK, DV)
    return [x.to(dtype) for x in (q, k, v, log_decay, state)]


def delta_inputs():
    q = F.normalize(torch.randn(B, H, T, DK), dim=-1) * DK ** -0.5  # normalised, then scaled: not unit
    k = F.normalize(torch.randn(B, H, T, DK), dim=-1)
    beta, log_decay = torch.sigmoid(torch.randn(B, H, T)), F.logsigmoid(torch.randn(B, H, T) + 2)
    return q, k, torch.randn(B, H, T, DV), beta, log_decay, torch.randn(B, H, DK, DV)


def assert_same(got, expected, atol=1e-5):
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        torch.testing.assert_close(g, e, atol=atol, rtol=1e-5)


# --- the mapping ----------------------------------------------------------------------------------

@pytest.mark.parametrize("per_channel", [False, True], ids=["scalar", "channel"])
@pytest.mark.parametrize("with_state", [False, True], ids=["zeros", "state"])
def test_decayed_is_the_chunked_form(fake_fla, per_channel, with_state):
    q, k, v, log_decay, state = decayed_inputs(per_channel)
    state = state if with_state else None
    assert_same(decayed(q, k, v, log_decay, state), chunked(q, k, v, log_decay, state))
    op, kwargs = CALLS[-1]
    assert op == ("chunk_gla" if per_channel else "chunk_simple_gla")
    assert kwargs["scale"] == 1.0 and kwargs["g"].dtype == torch.float32


def test_zero_decay_runs_simple_gla(fake_fla):
    q, k, v, _, state = decayed_inputs(False)
    zero = torch.zeros(B, H, T)
    assert_same(decayed(q, k, v, zero, state), chunked(q, k, v, zero, state))
    assert CALLS[-1][0] == "chunk_simple_gla"


def test_decayed_keeps_the_pure_dtypes(fake_fla):
    """fla returns its final state in fp32: it comes back in the pure form's dtype (the cache's)."""
    q, k, v, log_decay, state = decayed_inputs(False, torch.bfloat16)
    o, S = decayed(q, k, v, log_decay, state)
    ref_o, ref_S = chunked(q, k, v, log_decay, state)
    assert (o.dtype, S.dtype) == (ref_o.dtype, ref_S.dtype) == (torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize("with_state", [False, True], ids=["zeros", "state"])
def test_delta_is_the_delta_rule(fake_fla, with_state):
    q, k, v, beta, log_decay, state = delta_inputs()
    state = state if with_state else None
    assert_same(delta(q, k, v, beta, log_decay, state), delta_reference(q, k, v, beta, log_decay, state))
    assert CALLS[-1][1]["scale"] == 1.0 and CALLS[-1][1]["use_qk_l2norm_in_kernel"] is False


def test_delta_matches_the_members_pure_form(fake_fla):
    """The project's own delta rule forms, where they exist (models.mixer_delta, in progress)."""
    try:
        from models.mixer_delta import delta_chunked, delta_recurrent
    except ModuleNotFoundError:
        pytest.skip("models.mixer_delta is not here")
    q, k, v, beta, log_decay, state = delta_inputs()
    got = delta(q, k, v, beta, log_decay, state)
    assert_same(got, delta_recurrent(q, k, v, beta, log_decay, state))
    assert_same(got, delta_chunked(q, k, v, beta, log_decay, state), atol=1e-4)
    kernel = gated("delta", delta, delta_chunked)  # as the member would gate it
    assert_same(kernel(q, k, v, beta=beta, log_decay=log_decay, state=state), got)
    assert isinstance(kernel.checked["delta", torch.device("cpu"), torch.float32], float)


def test_head_first_is_passed_false_where_an_op_still_has_it(fake_fla):
    """fla 0.1 defaulted head_first=True ([B, H, T, K]): the flag must be passed, as False."""
    def old_simple_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, head_first=True):
        if head_first:  # its layout was (B, H, T, ...): to (B, T, H, ...)
            q, k, v, g = (x.transpose(1, 2) for x in (q, k, v, g))
        o, S = _decayed_bthd(q, k, v, g, scale, initial_state, output_final_state)
        return (o.transpose(1, 2) if head_first else o), S

    _install(fake_fla, chunk_simple_gla=old_simple_gla)
    q, k, v, log_decay, state = decayed_inputs(False)
    assert_same(decayed(q, k, v, log_decay, state), chunked(q, k, v, log_decay, state))


# --- the gate -------------------------------------------------------------------------------------

def counting(fn):
    def counted(*args, **kwargs):
        counted.calls += 1
        return fn(*args, **kwargs)

    counted.calls = 0
    return counted


def test_gate_passes_and_runs_once_per_kind_device_dtype(fake_fla):
    fla_fn, reference = counting(decayed), counting(chunked)
    kernel = gated("decayed", fla_fn, reference)
    q, k, v, log_decay, state = decayed_inputs(False)
    for _ in range(3):
        assert_same(kernel(q, k, v, log_decay, state), chunked(q, k, v, log_decay, state))
    assert (reference.calls, fla_fn.calls) == (1, 1 + 3)  # the gate once, then fla for each call
    bf16 = [x.bfloat16() for x in (q, k, v, log_decay, state)]
    kernel(*bf16), kernel(*bf16)
    assert reference.calls == 2  # bf16 checked once; fp32's result kept
    channel = decayed_inputs(True)
    kernel(*channel), kernel(*channel)
    assert reference.calls == 3  # another kind: decayed.channel
    assert set(kernel.checked) == {("decayed.scalar", torch.device("cpu"), torch.float32),
                                   ("decayed.scalar", torch.device("cpu"), torch.bfloat16),
                                   ("decayed.channel", torch.device("cpu"), torch.float32)}
    assert all(isinstance(error, float) for error in kernel.checked.values())  # passed: their max errors
    assert kernel.checked["decayed.scalar", torch.device("cpu"), torch.float32] < 1e-4


def test_gate_passes_the_delta_rule(fake_fla):
    kernel = gated("delta", delta, delta_reference)
    args = delta_inputs()
    assert_same(kernel(*args), delta_reference(*args))
    assert isinstance(kernel.checked["delta", torch.device("cpu"), torch.float32], float)


def _default_scale(q, k, v, g=None, g_gamma=None, scale=None, **kwargs):
    return chunk_simple_gla(q, k, v, g, g_gamma, None, **kwargs)  # scale dropped: fla's default K^-0.5


def _no_initial_state(q, k, v, g, scale=None, initial_state=None, **kwargs):
    return chunk_gla(q, k, v, g, scale, None, **kwargs)


def _renormalised(*args, **kwargs):
    return chunk_gated_delta_rule(*args, **{**kwargs, "use_qk_l2norm_in_kernel": True})


@pytest.mark.parametrize(("kind", "op", "wrong", "inputs", "reference", "label"), [
    ("decayed", "chunk_simple_gla", _default_scale, lambda: decayed_inputs(False), chunked, "decayed.scalar"),
    ("decayed", "chunk_gla", _no_initial_state, lambda: decayed_inputs(True), chunked, "decayed.channel"),
    ("delta", "chunk_gated_delta_rule", _renormalised, delta_inputs, delta_reference, "delta"),
], ids=["scale", "initial-state", "l2norm"])
def test_gate_refuses_a_wrong_kernel(fake_fla, kind, op, wrong, inputs, reference, label):
    _install(fake_fla, **{op: wrong})
    reference = counting(reference)
    kernel = gated(kind, decayed if kind == "decayed" else delta, reference)
    args = inputs()
    with pytest.raises(FlaMismatch, match=rf"'{label}'.* on cpu in float32: max error") as caught:
        kernel(*args)
    assert caught.value.error > caught.value.bound and "tolerance 0.005" in str(caught.value)
    with pytest.raises(FlaMismatch):  # kept: raised again without running the gate again
        kernel(*args)
    assert reference.calls == 1


def test_gate_refuses_a_wrong_shape(fake_fla):
    def transposed_state(*args, **kwargs):
        o, S = chunk_simple_gla(*args, **kwargs)
        return o, S.transpose(-1, -2)  # [N, H, V, K]: state_v_first's layout

    _install(fake_fla, chunk_simple_gla=transposed_state)
    kernel = gated("decayed", decayed, chunked)
    with pytest.raises(FlaMismatch, match="final state: shape"):
        kernel(*decayed_inputs(False))


def test_gate_refuses_to_run_where_fla_cannot(monkeypatch):
    _install(monkeypatch)  # fla imports, but CPU is not CUDA
    kernel = gated("decayed", decayed, chunked)
    with pytest.raises(FlaUnavailable, match="needs CUDA"):
        kernel(*decayed_inputs(False))
    assert not kernel.checked


def test_gate_rejects_an_unknown_kind_or_argument(fake_fla):
    with pytest.raises(ValueError, match="unknown fla kernel kind"):
        gated("mamba", decayed, chunked)
    q, k, v, log_decay, state = decayed_inputs(False)
    with pytest.raises(TypeError, match="takes \\(q, k, v, log_decay, state\\), not beta"):
        gated("decayed", decayed, chunked)(q, k, v, log_decay, beta=state)


# --- availability ----------------------------------------------------------------------------------

def test_unavailable_without_fla(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla", None)  # import fla raises, whether or not it is installed
    reason = unavailable_reason()
    assert reason.startswith("flash-linear-attention not installed (pip install flash-linear-attention)")
    assert "fla" in reason.split(": ", 1)[1]  # the import error itself


class _BrokenImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds fla.ops.gla and fails to execute it, as a broken install (Triton's, say) does."""

    def find_spec(self, name, path, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "fla.ops.gla" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise RuntimeError("triton is broken")


def test_unavailable_when_fla_fails_to_import(monkeypatch):
    _install(monkeypatch)
    sys.modules["fla.ops"].__path__ = []  # a package: its submodules are looked for
    monkeypatch.delitem(sys.modules, "fla.ops.gla")
    monkeypatch.setattr(sys, "meta_path", [_BrokenImport(), *sys.meta_path])
    assert unavailable_reason() == "flash-linear-attention fails to import: RuntimeError: triton is broken"


def test_unavailable_without_cuda(monkeypatch):
    _install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert unavailable_reason() == "needs CUDA (no CUDA device here)"
    assert "CUDA" in unavailable_reason("cuda")


def test_unavailable_on_a_device_that_is_not_cuda(monkeypatch):
    _install(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert unavailable_reason() is None
    assert unavailable_reason("cuda:0") is None
    assert unavailable_reason(torch.device("cpu")) == "needs CUDA (fla's Triton kernels do not run on cpu)"
