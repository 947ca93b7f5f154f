"""The machine: its fingerprint, the device and dtype to train with, and its measured peaks.

Peaks are *measured* here, not looked up: the best of a sweep of large matmuls (FLOP/s) and of a
large copy (bytes/s), cached per machine so MFU and bandwidth fractions are cheap to report. So is
the CPU's `dtype: auto` decision, with the medians behind it (``cpu_dtype_decision``, ``dtype_reason``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.paths import atomic_write_bytes, cache_dir

# Datasheet dense bf16 peaks (FLOP/s) for known GPUs, reported beside the measured peak.
DATASHEET_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12}

_LIBRARIES = ("torch", "numpy", "triton", "flash-attn", "xformers", "torchao", "deepspeed", "ray")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_max_mhz() -> float | None:
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        return None


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


@functools.cache
def fingerprint() -> dict:
    """What a measurement depends on: CPU, cores, threads, GPU, driver/CUDA, library versions."""
    fp = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_max_mhz": _cpu_max_mhz(),
        "torch_threads": torch.get_num_threads(),
        "libraries": library_versions(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        fp["gpu"] = {
            "name": props.name,
            "memory_bytes": props.total_memory,
            "count": torch.cuda.device_count(),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            **_nvidia_smi(),
        }
    return fp


def _nvidia_smi() -> dict:
    """The driver version and SM clocks (current, max) of GPU 0, where nvidia-smi can tell; else {}."""
    import subprocess

    fields = ("driver_version", "clocks.sm", "clocks.max.sm")
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                              "--id=0"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    values = [v.strip() for v in out.stdout.strip().split(",")]
    if out.returncode != 0 or len(values) != len(fields):
        return {}
    driver, sm, sm_max = values
    return {"driver": driver, "sm_clock_mhz": sm, "sm_clock_max_mhz": sm_max}


def machine_id(fp: dict | None = None) -> str:
    """A short id for 'this machine with this software', for caches and side-by-side reports."""
    fp = fp or fingerprint()
    key = json.dumps([fp["cpu"], fp["cpu_cores"], fp["gpu"] and fp["gpu"]["name"], fp["libraries"].get("torch")])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def machine_label(fp: dict | None = None) -> str:
    fp = fp or fingerprint()
    if fp.get("gpu"):
        return fp["gpu"]["name"]
    return f"{fp['cpu']} ({fp['torch_threads']} threads)"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but this torch sees no CUDA device")
    return torch.device(name)


def _timed(fn, repeats: int, device: torch.device) -> float:
    """Best wall time of fn over repeats (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def cpu_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_key(device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The part of a cache key that says what a measurement ran on: "cpu:bfloat16:2t", "cuda:float32";
    on CPU the thread count, which every CPU timing depends on."""
    dtype_part = f":{str(dtype).removeprefix('torch.')}" if dtype is not None else ""
    threads = f":{torch.get_num_threads()}t" if device.type == "cpu" else ""
    return f"{device.type}{dtype_part}{threads}"


def config_hash(config: dict) -> str:
    """A short stable hash of what a measurement depends on (a model config, a batch shape), for its cache key."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(key: str, measure, device: torch.device | None = None) -> float | dict:
    """measure()'s result under key in this machine's cache, measuring it first if absent (on a forked
    RNG; when processes race, the first one written wins, so every process on a machine agrees)."""
    path = cache_dir("hardware") / f"{machine_id()}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if key not in data:
        # measured on a forked RNG: the first run on a machine must draw the same numbers as the rest
        on_gpu = device is not None and device.type == "cuda"  # fork only that GPU's RNG: no context on the others
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if on_gpu else []
        with torch.random.fork_rng(devices=cuda):
            data[key] = measure()
        fresh = json.loads(path.read_text()) if path.exists() else {}  # another process may have written
        if key in fresh:  # it measured first: keep its value, so every process on the machine agrees
            return fresh[key]
        atomic_write_bytes(path, json.dumps({**fresh, key: data[key]}, indent=1).encode())
    return data[key]


def peak_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Best FLOP/s of square matmuls (sizes 1024–4096 on CPU, to 8192 on GPU), measured once per machine."""

    def measure() -> float:
        sizes = (1024, 2048, 4096) if device.type == "cpu" else (2048, 4096, 8192)
        best = 0.0
        for n in sizes:
            a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
            best = max(best, 2 * n**3 / _timed(lambda: a @ b, 3, device))
        return best

    return cached(f"matmul:{device_key(device, dtype)}", measure, device)


def peak_copy_bandwidth(device: torch.device) -> float:
    """Best bytes/s of copying a 256 MiB buffer (read + write counted), measured once per machine."""

    def measure() -> float:
        src = torch.empty(64 * 2**20, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        return 2 * src.numel() * 4 / _timed(lambda: dst.copy_(src), 5, device)

    return cached(f"copy:{device_key(device)}", measure, device)


# `dtype: auto` on CPU: bf16 only where a bf16-autocast training step is clearly faster, decided once per
# machine. A bare matmul is the wrong probe: on CPUs with bf16 units it runs ~2.5× faster, yet small models'
# training steps don't, because autocast's casts and the elementwise work eat the matmul gain.
BF16_MIN_SPEEDUP = 2.0  # bf16 only when clearly faster: its numerics differ, and on a loaded CPU 1.2–1.7× comes and goes
DTYPE_PROBE_TOKENS = 2048  # the probe block: x (tokens × width) → Linear(width, hidden) → GELU → Linear(hidden,
DTYPE_PROBE_WIDTH = 256  # width) → mean-square loss, forward + backward (a small model's MLP block)
DTYPE_PROBE_HIDDEN = 1024
DTYPE_PROBE_REPEATS = 7  # interleaved fp32/bf16 pairs (after a warm-up of each); their medians are compared
DTYPE_PROBE_GIVE_UP = 4.0  # after 2 pairs, every bf16 ≥ 4× slower than every fp32: no bf16 units, stop


def _probe_block() -> dict[str, torch.Tensor]:
    """The probe's input, target and trainable weights (fp32), drawn from a private generator."""
    gen = torch.Generator().manual_seed(0)
    n, w, h = DTYPE_PROBE_TOKENS, DTYPE_PROBE_WIDTH, DTYPE_PROBE_HIDDEN

    def weight(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=gen) * cols**-0.5).requires_grad_()

    return {"x": torch.randn(n, w, generator=gen), "target": torch.randn(n, w, generator=gen),
            "w1": weight(h, w), "b1": torch.zeros(h, requires_grad=True),
            "w2": weight(w, h), "b2": torch.zeros(w, requires_grad=True)}


def _time_step(block: dict[str, torch.Tensor], dtype: torch.dtype) -> float:
    """Wall time of one forward + backward of the probe block, in fp32 or under bf16 autocast, in seconds
    (the dtype probe's only clock; tests replace it). Gradients are cleared first, as an optimizer would."""
    for name in ("w1", "b1", "w2", "b2"):
        block[name].grad = None
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()
    start = time.perf_counter()
    with cast:
        hidden = F.gelu(F.linear(block["x"], block["w1"], block["b1"]))
        loss = F.mse_loss(F.linear(hidden, block["w2"], block["b2"]).float(), block["target"])
    loss.backward()
    return time.perf_counter() - start


def _measure_cpu_dtype() -> dict:
    """Time fp32 against bf16-autocast training steps on this CPU and decide; every number behind it kept."""
    block = _probe_block()
    for dtype in (torch.float32, torch.bfloat16):
        _time_step(block, dtype)  # warm-up: first-call allocations, kernel selection
    times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    for i in range(DTYPE_PROBE_REPEATS):
        for dtype in (torch.float32, torch.bfloat16) if i % 2 == 0 else (torch.bfloat16, torch.float32):
            times[dtype].append(_time_step(block, dtype))  # neither always runs first (caches, clocks)
        if i >= 1 and min(times[torch.bfloat16]) >= DTYPE_PROBE_GIVE_UP * max(times[torch.float32]):
            break  # emulated bf16 (up to hundreds of times slower): more repetitions would change nothing
    return decide_cpu_dtype(statistics.median(times[torch.float32]), statistics.median(times[torch.bfloat16]),
                            repeats=len(times[torch.float32]))


def decide_cpu_dtype(fp32_median_s: float, bf16_median_s: float, *, repeats: int,
                     threshold: float = BF16_MIN_SPEEDUP) -> dict:
    """The decision from two median step times: bf16 iff fp32/bf16 ≥ threshold. Deterministic."""
    n, w, h = DTYPE_PROBE_TOKENS, DTYPE_PROBE_WIDTH, DTYPE_PROBE_HIDDEN
    speedup = fp32_median_s / bf16_median_s
    dtype = "bfloat16" if speedup >= threshold else "float32"
    speed = f"{speedup:.2f}× as fast" if speedup >= 1 else f"{1 / speedup:.3g}× slower"
    reason = (f"{dtype}: median fp32 vs bf16-autocast forward+backward of a {w}→{h}→{w} MLP on {n} tokens "
              f"over {repeats} interleaved repetitions: fp32 {fp32_median_s * 1e3:.4g} ms, bf16 "
              f"{bf16_median_s * 1e3:.4g} ms; bf16 {speed}, "
              f"{'at least' if dtype == 'bfloat16' else 'below'} the {threshold:g}× speed-up threshold for bf16")
    return {"dtype": dtype, "reason": reason, "fp32_median_s": fp32_median_s, "bf16_median_s": bf16_median_s,
            "speedup": speedup, "threshold": threshold, "probe": "mlp-step", "tokens": n, "width": w,
            "hidden": h, "repeats": repeats}


def cpu_dtype_decision() -> tuple[torch.dtype, str]:
    """The dtype `dtype: auto` trains with on this CPU and why: bf16 only if a bf16-autocast forward +
    backward of a small MLP block (``_probe_block``) is ≥ BF16_MIN_SPEEDUP (2×) faster than fp32's,
    by medians over DTYPE_PROBE_REPEATS interleaved repetitions. Measured once per machine (and torch
    thread count) and cached with the module's peaks, so every run on a machine trains in the same
    precision."""
    threads = torch.get_num_threads()
    record = cached(f"cpu_dtype:step:bf16>={BF16_MIN_SPEEDUP:g}x:{threads}t", _measure_cpu_dtype)
    return getattr(torch, record["dtype"]), record["reason"]


def bf16_is_fast(device: torch.device) -> bool:
    """Whether to train in bf16 here: CUDA devices that support it; CPUs per ``cpu_dtype_decision``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_dtype_decision()[0] == torch.bfloat16


def training_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """bf16 autocast where bf16 is fast (CUDA, CPUs with bf16 units), otherwise fp32; or as requested."""
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


def dtype_reason(device_str: str, requested_dtype: str) -> str | None:
    """Why ``training_dtype`` picks what it picks for this device on this machine, for the run table;
    None when the spec names its dtype (nothing was decided). On CPU this reads the cached decision
    (measuring it first if this machine has none)."""
    if requested_dtype != "auto":
        return None
    device = resolve_device(device_str)
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        return f"{'bfloat16' if supported else 'float32'}: {name} {'supports' if supported else 'lacks'} bf16"
    return cpu_dtype_decision()[1]


def datasheet_peak(fp: dict | None = None) -> float | None:
    fp = fp or fingerprint()
    if not fp.get("gpu"):
        return None
    return next((v for k, v in DATASHEET_BF16.items() if k in fp["gpu"]["name"]), None)


@functools.cache
def git_commit() -> str | None:
    """The commit of the archbench checkout running this ('+dirty' with uncommitted changes), if any."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment() -> dict:
    """What every stored result carries: machine id, hardware fingerprint, library versions, git commit."""
    fp = fingerprint()
    return {"machine_id": machine_id(fp), "hardware": fp, "libraries": fp["libraries"], "git_commit": git_commit()}
