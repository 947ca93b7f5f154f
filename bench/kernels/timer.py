"""``run_kernels``: time every section a ``KernelSpec`` names, on this machine."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench import autotune, hardware
from bench.kernels import cases
from bench.kernels.config import SECTION_NAMES, KernelSpec
from bench.timing import cuda_settings

SECTIONS: dict[str, Callable] = {
    "attention": cases.attention_rows,
    "decode": cases.decode_rows,
    "mlp": cases.mlp_rows,
    "norm": cases.norm_rows,
    "moe": cases.moe_rows,
    "quantization": cases.quantization_rows,
    "vision": cases.vision_rows,
    "connector": cases.connector_rows,
    "image_decode": cases.image_decode_rows,
}
assert tuple(SECTIONS) == SECTION_NAMES


def run_kernels(spec: KernelSpec, on_row: Callable[[dict], None] | None = None,
                kernels: autotune.KernelChoices | None = None) -> list[dict]:
    """Time every section the spec names; each row carries this machine's label. A variant or backend
    list naming `auto` times what `kernels` chooses: a study's recorded choices where a call matches,
    else the choice measured on this machine (the one every run here makes)."""
    kernels = kernels or autotune.KernelChoices()
    device = hardware.resolve_device(spec.device)
    dtype = cases.machine_dtype(spec.dtype, device)
    previous_threads = torch.get_num_threads()
    if spec.threads and device.type == "cpu":
        torch.set_num_threads(spec.threads)
    try:
        ctx = cases.Context(device, dtype, spec.min_time, spec.noisy_threshold, kernels)
        machine = hardware.machine_label()
        rows = []
        with cuda_settings(allow_tf32=False), _compile_every_shape():
            for section, measure in SECTIONS.items():
                config = getattr(spec, section)
                if config is None:
                    continue
                for row in measure(config, ctx):
                    row["machine"] = machine
                    rows.append(row)
                    if on_row:
                        on_row(row)
        return rows
    finally:
        torch.set_num_threads(previous_threads)


def _compile_every_shape():
    """A sweep compiles FlexAttention once per shape and mask; past torch's default of 8 recompiles
    dynamo would silently fall back to the unfused kernel and time that instead."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    return config.patch({name: 1024})
