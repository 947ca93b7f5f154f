"""Kernel timing: components timed as kernels on this machine, rows stored with its fingerprint.

    from bench.kernels import KernelSpec, run_kernels
    rows = run_kernels(KernelSpec(attention={"seq_lens": [256, 512]}))

Also ``python -m bench.kernels`` (a terminal table) and a spec's ``kernels:`` section (stored by the
runner in the results database). Importing this package does not import torch (a spec parse imports
``bench.kernels.config``): ``run_kernels`` and ``SECTIONS`` load ``bench.kernels.timer`` when first used.
"""

from __future__ import annotations

from typing import Any

from bench.kernels.config import KernelSpec

_LAZY = {"run_kernels", "SECTIONS"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from bench.kernels import timer

        return getattr(timer, name)
    raise AttributeError(f"module 'bench.kernels' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["SECTIONS", "KernelSpec", "run_kernels"]
