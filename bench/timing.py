"""The timing harness: numbers that can be trusted and compared across machines.

Rules (design notes §6): check correctness against a reference before timing; warm up (the first
call compiles or autotunes), then calibrated repetitions; report the median and the interquartile
range, flag IQR/median above a threshold as noisy; interleave the candidates of a comparison so
machine noise hits them alike. On CUDA: CUDA events, one synchronisation per measurement, the L2
cache flushed between repetitions by zeroing a 256 MB buffer (as triton's do_bench does), TF32 off.
On CPU: a fixed thread count, recorded.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

NOISY = 0.10  # IQR/median above this is flagged
L2_FLUSH_BYTES = 256 * 2**20


@dataclass
class Timing:
    """Seconds per call: median and interquartile range over the samples."""

    samples: list[float] = field(repr=False)
    noisy_threshold: float = NOISY

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def iqr(self) -> float:
        if len(self.samples) < 4:
            return max(self.samples) - min(self.samples)
        q = statistics.quantiles(self.samples, n=4)
        return q[2] - q[0]

    @property
    def noisy(self) -> bool:
        return self.iqr / self.median > self.noisy_threshold if self.median > 0 else False


class _Clock:
    """Times one call on a device: perf_counter on CPU, CUDA events (and an L2 flush) on GPU."""

    def __init__(self, device: torch.device, flush_l2: bool):
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if self.cuda and flush_l2 else None

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        if self.flush is not None:
            self.flush.zero_()  # evict the previous call's data from L2: cold-cache timing
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3


def time_interleaved(
    candidates: dict[str, Callable[[], object]],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 2,
    min_time: float = 0.2,
    max_reps: int = 1000,
    min_reps: int = 5,
    flush_l2: bool = True,
    noisy_threshold: float = NOISY,
) -> dict[str, Timing]:
    """Time each candidate, interleaved: repetition i runs every candidate once, in rotating order.

    Repetitions are calibrated so that each candidate accumulates about `min_time` seconds.
    """
    device = torch.device(device)
    clock = _Clock(device, flush_l2)
    names = list(candidates)
    estimate = {}
    for name in names:  # warm-up; the last call estimates the cost of one call
        for _ in range(max(1, warmup)):
            estimate[name] = clock(candidates[name])
    slowest = max(estimate.values()) or 1e-9
    reps = int(min(max_reps, max(min_reps, min_time / slowest)))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            samples[name].append(clock(candidates[name]))
    return {n: Timing(s, noisy_threshold) for n, s in samples.items()}


def time_one(fn: Callable[[], object], device: torch.device | str = "cpu", **kwargs) -> Timing:
    return time_interleaved({"fn": fn}, device, **kwargs)["fn"]


def max_error(got, expected) -> float:
    """Largest absolute difference between two tensors or matching sequences of tensors."""
    if isinstance(got, torch.Tensor):
        return float((got.detach().float() - expected.detach().float()).abs().max()) if got.numel() else 0.0
    return max((max_error(g, e) for g, e in zip(got, expected, strict=True)), default=0.0)


def tolerance(dtype: torch.dtype) -> float:
    """Absolute tolerance of the correctness gate: fp32 kernels agree to 1e-4; half precision to 2e-2."""
    return 1e-4 if dtype == torch.float32 else 2e-2


def agrees(got, expected, dtype: torch.dtype) -> tuple[bool, float]:
    """The correctness gate: (whether got matches expected within ``tolerance(dtype)`` relative to
    the expected values' magnitude (at least 1), the largest absolute error)."""
    error = max_error(got, expected)
    scale = max(1.0, max_error(expected, torch.zeros(())) if isinstance(expected, torch.Tensor) else
                max(max_error(e, torch.zeros(())) for e in expected))
    return error <= tolerance(dtype) * scale, error


class cuda_settings:
    """TF32 off for the duration (unless it is what is being measured)."""

    def __init__(self, allow_tf32: bool = False):
        self.allow = allow_tf32

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.allow
        return self

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
