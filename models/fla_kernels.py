"""fla's Triton kernels (flash-linear-attention, fla-org/flash-linear-attention) as backends of the
recurrent mixers, gated against the pure-PyTorch forms like every other backend.

UNTESTED ON A GPU: this module has been run only against a fake ``fla`` (tests/test_fla_kernels.py,
on CPU, whose ops follow fla's documented signatures and layout by calling the pure forms), never
against the real fla on a GPU in this project so far. The argument mapping below follows fla's
source as read, not a run; the gate (``gated``) is what stands between it and a wrong answer.

Mapped to fla 0.5.2 (tag v0.5.2, commit 9c8e42e762fce087c27b673af4922795d9edb85e, 2026-07-28) and
checked unchanged in these signatures at main bc3b101dcb713ddc5bd8924b66754eb68b5ccf89 (2026-08-22):
  fla/ops/simple_gla/chunk.py       chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None,
                                        initial_state=None, output_final_state=False, ...)
  fla/ops/gla/chunk.py              chunk_gla(q, k, v, g, scale=None, initial_state=None,
                                        output_final_state=False, ...)   (asserts initial_state is fp32)
  fla/ops/gated_delta_rule/chunk.py chunk_gated_delta_rule(q, k, v, g, beta, scale=None,
                                        initial_state=None, output_final_state=False,
                                        use_qk_l2norm_in_kernel=False, ...)   (g before beta)
All take q, k [B, T, H, K], v [B, T, H, V], g [B, T, H] (simple_gla, gated_delta_rule) or
[B, T, H, K] (gla), beta [B, T, H], states [B, H, K, V], and return (o [B, T, H, V], the final state
in fp32, or None unless output_final_state). ``scale`` defaults to K^-0.5: it is passed as 1.0 here
(q arrives scaled). fla 0.5 removed ``head_first`` (passing it raises); 0.2–0.4 had it with default
False and 0.1 with default True ([B, H, T, K]): it is passed as False only where an op's signature
still has it, and the layout is always made [B, T, H, ...] by explicit transposes.

Semantics, as models.recurrent.chunked (S_t = diag(e^{g_t}) S_{t−1} + k_tᵀ v_t, o_t = q_t S_t) and
the gated delta rule (S_t = e^{g_t} (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ, o_t = S_tᵀ q_t), with
fla's naive references (fla/ops/simple_gla/naive.py, fla/ops/gated_delta_rule/naive.py) read against
both. A zero decay (linear attention) runs simple_gla with g = 0.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from models.recurrent import CHANNEL_DECAY_FLOOR

PACKAGE = "flash-linear-attention"  # fla's pip package
MODULES = ("fla.ops.simple_gla", "fla.ops.gla", "fla.ops.gated_delta_rule")

# The gate's absolute tolerance, relative to the expected values' magnitude (at least 1), as
# bench.timing.agrees. Half precision as the suite's (2e-2). fp32 is looser than the suite's 1e-4:
# fla's chunk kernels leave tl.dot's precision at Triton's default, TF32 on Ampere and later (a 10-bit
# mantissa), and fla's own tests accept a 0.5% error ratio in fp32 (tests/ops/test_simple_gla.py).
# A wrong layout, scale, state or decay mapping errs by O(1), far above either.
TOLERANCE = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 2e-2}

ARGUMENTS = {"decayed": ("q", "k", "v", "log_decay", "state"), "delta": ("q", "k", "v", "beta", "log_decay", "state")}
KINDS = tuple(ARGUMENTS)


class FlaMismatch(RuntimeError):
    """fla's kernel disagreed with the pure-PyTorch form on the gate's input."""

    def __init__(self, kind: str, device: torch.device, dtype: torch.dtype, error: float, bound: float,
                 detail: str):
        self.kind, self.device, self.dtype, self.error, self.bound = kind, device, dtype, error, bound
        super().__init__(f"fla kernel '{kind}' disagrees with the pure-PyTorch form on {device} in "
                         f"{str(dtype).removeprefix('torch.')}: max error {error:.3g} > {bound:.3g} "
                         f"({detail})")


class FlaUnavailable(RuntimeError):
    """fla's kernels cannot run here (see ``unavailable_reason``)."""


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why fla's kernels cannot run here (on `device`, when given), or None when they can."""
    for module in MODULES:
        try:
            __import__(module)
        except ImportError as e:
            return f"{PACKAGE} not installed (pip install {PACKAGE}): {e}"
        except Exception as e:  # noqa: BLE001 - a broken install is a reason, not a crash
            return f"{PACKAGE} fails to import: {type(e).__name__}: {e}"
    return _device_reason(device)


def _device_reason(device: torch.device | str | None) -> str | None:
    """fla's kernels are Triton's, for CUDA here (the one device check: tests patch it to allow CPU)."""
    if not torch.cuda.is_available():
        return "needs CUDA (no CUDA device here)"
    if device is not None and torch.device(device).type != "cuda":
        return f"needs CUDA (fla's Triton kernels do not run on {torch.device(device).type})"
    return None


def decayed(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor,
            state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """models.recurrent.chunked by fla: q, k (B, H, T, Dk), v (B, H, T, Dv), log_decay (B, H, T)
    (scalar per head: chunk_simple_gla) or (B, H, T, Dk) (per key channel: chunk_gla), state
    (B, H, Dk, Dv) or None -> (o (B, H, T, Dv), the final state (B, H, Dk, Dv)), q taken as scaled.
    The final state comes back in the dtype the pure form's would have (fla keeps it in fp32)."""
    if log_decay.dim() == 4:
        from fla.ops.gla import chunk_gla as op
    else:
        from fla.ops.simple_gla import chunk_simple_gla as op
    o, final = op(
        q=_bthd(q), k=_bthd(k), v=_bthd(v), g=_bthd(log_decay.float()), scale=1.0,
        initial_state=state.float() if state is not None else None,  # chunk_gla asserts fp32
        output_final_state=True, **_layout(op),
    )
    return o.transpose(1, 2).to(v.dtype), final.to(_state_dtype(k, state))


def delta(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_decay: Tensor,
          state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The gated delta rule by fla's chunk_gated_delta_rule: q, k (B, H, T, Dk) (k L2-normalised, q
    normalised and scaled by the caller), v (B, H, T, Dv), beta and log_decay (B, H, T), state
    (B, H, Dk, Dv) or None -> (o (B, H, T, Dv), the final state (B, H, Dk, Dv)). fla does not
    normalise q, k again (use_qk_l2norm_in_kernel=False: renormalising q would undo its scale) and
    takes beta as given (use_beta_sigmoid_in_kernel left False)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as op

    o, final = op(
        q=_bthd(q), k=_bthd(k), v=_bthd(v), g=_bthd(log_decay.float()), beta=_bthd(beta), scale=1.0,
        initial_state=state.float() if state is not None else None, output_final_state=True,
        use_qk_l2norm_in_kernel=False,  # a parameter since fla v0.1.0 (2025-01 commit 45788429)
        **_layout(op),
    )
    return o.transpose(1, 2).to(v.dtype), final.to(_state_dtype(k, state))


def _bthd(x: Tensor) -> Tensor:
    """(B, H, T, ...) -> fla's (B, T, H, ...)."""
    return x.transpose(1, 2)


def _state_dtype(k: Tensor, state: Tensor | None) -> torch.dtype:
    """The pure forms' final state's dtype: k's, promoted with the state given."""
    return k.dtype if state is None else torch.promote_types(k.dtype, state.dtype)


@functools.cache
def _layout(op: Callable) -> dict:
    """head_first=False where the op's signature still has the flag (fla 0.1–0.4); nothing on 0.5+."""
    try:
        parameters = inspect.signature(op).parameters
    except (TypeError, ValueError):
        return {}
    return {"head_first": False} if "head_first" in parameters else {}


class FlaGated:
    """fla_fn behind the gate: the first call per (kind, device, dtype) runs fla_fn and reference_fn
    on a small random input on that device (heads and head dims as the call's), in fp32 and in the
    call's dtype, each against the reference in fp32 on the same (rounded) values, and raises
    FlaMismatch when they disagree beyond TOLERANCE; the result, pass or mismatch, is kept, and later
    calls go straight to fla_fn. 'decayed' kinds are told apart by their decay: 'decayed.scalar',
    'decayed.channel'."""

    def __init__(self, kind: str, fla_fn: Callable, reference_fn: Callable):
        if kind not in KINDS:
            raise ValueError(f"unknown fla kernel kind '{kind}' (one of {', '.join(KINDS)})")
        self.kind, self.fla_fn, self.reference_fn = kind, fla_fn, reference_fn
        self.checked: dict[tuple, FlaMismatch | float] = {}  # (kind, device, dtype) -> max error, or the mismatch

    def label(self, args: tuple) -> str:
        if self.kind == "decayed":
            return f"decayed.{'channel' if args[3].dim() == 4 else 'scalar'}"
        return self.kind

    def __call__(self, *args: Tensor | None, **kwargs: Tensor | None) -> tuple[Tensor, Tensor]:
        names = ARGUMENTS[self.kind]
        args = (*args, *(kwargs.pop(n) for n in names[len(args):] if n in kwargs))  # all positional
        if kwargs:
            raise TypeError(f"fla kernel '{self.kind}' takes ({', '.join(names)}), not {', '.join(kwargs)}")
        q, v = args[0], args[2]
        label = self.label(args)
        if not isinstance(self.checked.get((label, q.device, q.dtype)), float):  # not yet passed
            self._gate(label, q.device, q.dtype, q.shape[1], q.shape[-1], v.shape[-1])
        return self.fla_fn(*args)

    @torch.compiler.disable  # the gate is eager work, once per key
    def _gate(self, label: str, device: torch.device, dtype: torch.dtype, H: int, Dk: int, Dv: int) -> None:
        for dt in dict.fromkeys((torch.float32, dtype)):  # fp32 first, then the call's dtype
            key = (label, device, dt)
            if key not in self.checked:
                reason = unavailable_reason(device)
                if reason:
                    raise FlaUnavailable(f"fla kernel '{label}': {reason}")
                self.checked[key] = self._check(label, device, dt, H, Dk, Dv)
            if isinstance(self.checked[key], FlaMismatch):
                raise self.checked[key]

    def _check(self, label: str, device: torch.device, dtype: torch.dtype, H: int, Dk: int,
               Dv: int) -> FlaMismatch | float:
        """The max error of fla_fn on the gate's input in dtype, or the FlaMismatch."""
        args = [t.to(device, dtype) for t in gate_inputs(label, H, Dk, Dv)]
        with torch.no_grad():
            got = self.fla_fn(*args)
            expected = self.reference_fn(*(t.float() for t in args))
        tol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])  # fp64: as fp32
        worst = 0.0
        for name, g, e in zip(("output", "final state"), got, expected, strict=True):
            if g is None or g.shape != e.shape:
                return FlaMismatch(label, device, dtype, float("inf"), tol,
                                   f"{name}: shape {None if g is None else tuple(g.shape)}, expected {tuple(e.shape)}")
            magnitude = max(1.0, float(e.abs().max()))
            error = float((g.float() - e).abs().max())
            if not error <= tol * magnitude:  # NaN fails too
                return FlaMismatch(label, device, dtype, error, tol * magnitude,
                                   f"{name}: tolerance {tol:g} × magnitude {magnitude:.3g}")
            worst = max(worst, error)
        return worst


def gated(kind: str, fla_fn: Callable, reference_fn: Callable) -> FlaGated:
    """fla_fn (``decayed`` or ``delta``) gated against reference_fn (the pure form of the same
    arguments: models.recurrent.chunked for 'decayed', the delta rule's chunked form for 'delta')."""
    return FlaGated(kind, fla_fn, reference_fn)


def gate_inputs(label: str, H: int, Dk: int, Dv: int, batch: int = 2, tokens: int = 100) -> list[Tensor]:
    """The gate's random input in fp32 on CPU, from a private generator: two rows of 100 tokens (not a
    whole number of chunks), an initial state, decays near the floors the members allow.
    decayed: (q, k, v, log_decay, state); delta: (q, k, v, beta, log_decay, state)."""
    gen = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=gen)

    B, T = batch, tokens
    v, state = draw(B, H, T, Dv), 0.5 * draw(B, H, Dk, Dv)
    if label == "delta":  # k unit-norm, q normalised then scaled (by 2: not unit, a kernel that
        # normalises q again errs by O(1)), β ∈ (0, 1); v doubled, so that outputs are of order 1
        q = F.normalize(draw(B, H, T, Dk), dim=-1) * 2
        k = F.normalize(draw(B, H, T, Dk), dim=-1)
        v = 2 * v
        beta, log_decay = torch.sigmoid(draw(B, H, T)), F.logsigmoid(draw(B, H, T) + 2)
        return [q, k, v, beta, log_decay, state]
    q, k = draw(B, H, T, Dk) * Dk ** -0.5, draw(B, H, T, Dk) * Dk ** -0.5
    if label == "decayed.channel":  # per key channel, at least the per-channel floor (models.recurrent)
        log_decay = F.logsigmoid(2 * draw(B, H, T, Dk)).clamp(min=CHANNEL_DECAY_FLOOR)
    else:  # per head, from −0.02 a token on average (long memories) to about −1; none in head 0 (linear)
        rate = torch.rand(B, H, 1, generator=gen).mul(4).exp()
        if H > 1:
            rate[:, 0] = 0.0
        log_decay = F.logsigmoid(draw(B, H, T) + 4) * rate
    return [q, k, v, log_decay, state]
