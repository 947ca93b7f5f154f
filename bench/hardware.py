"""The machine: its fingerprint, the device and dtype to train with, and its measured peaks.

Peaks are *measured* here, not looked up: the best of a sweep of large matmuls (FLOP/s) and of a
large copy (bytes/s), cached per machine so MFU and bandwidth fractions are cheap to report.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path

import torch

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


def _cached(key: str, measure, device: torch.device | None = None) -> float:
    path = cache_dir("hardware") / f"{machine_id()}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if key not in data:
        # measured on a forked RNG: the first run on a machine must draw the same numbers as the rest
        on_gpu = device is not None and device.type == "cuda"  # fork only that GPU's RNG: no context on the others
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if on_gpu else []
        with torch.random.fork_rng(devices=cuda):
            data[key] = measure()
        fresh = json.loads(path.read_text()) if path.exists() else {}  # another process may have written
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

    threads = f":{torch.get_num_threads()}t" if device.type == "cpu" else ""  # a CPU peak depends on the threads
    return _cached(f"matmul:{device.type}:{str(dtype).removeprefix('torch.')}{threads}", measure, device)


def peak_copy_bandwidth(device: torch.device) -> float:
    """Best bytes/s of copying a 256 MiB buffer (read + write counted), measured once per machine."""

    def measure() -> float:
        src = torch.empty(64 * 2**20, dtype=torch.float32, device=device).fill_(1.0)
        dst = torch.empty_like(src)
        return 2 * src.numel() * 4 / _timed(lambda: dst.copy_(src), 5, device)

    threads = f":{torch.get_num_threads()}t" if device.type == "cpu" else ""
    return _cached(f"copy:{device.type}{threads}", measure, device)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 matmuls are at least half as fast as fp32 here (not on CPUs without bf16 units)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()

    def measure() -> float:
        a32 = torch.randn(256, 256)
        a16 = a32.to(torch.bfloat16)
        return _timed(lambda: a16 @ a16, 3, device) / _timed(lambda: a32 @ a32, 3, device)

    return _cached("bf16_over_fp32_time:cpu", measure) < 2.0


def training_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """bf16 autocast where bf16 is fast (CUDA, CPUs with bf16 units), otherwise fp32; or as requested."""
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if bf16_is_fast(device) else torch.float32


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
