"""What to time: the ``kernels:`` section of a spec, and the flags of ``python -m bench.kernels``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Direction = Literal["forward", "backward", "forward_backward"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttentionKernels(_Section):
    backends: list[str] = Field(default_factory=lambda: ["math", "sdpa", "flex", "flash_attn", "xformers"],
                                description="attention_backend names; sdpa expands to its kernels on CUDA")
    variants: list[Literal["mha", "gqa", "mqa", "window", "alibi"]] = Field(default_factory=lambda: ["mha"])
    seq_lens: list[int] = Field(default_factory=lambda: [128, 256, 512])
    batch: int = 4
    n_head: int = 8
    head_dim: int = 64
    n_kv_head: int = 2  # for gqa
    window: int = 64  # for window
    directions: list[Direction] = Field(default_factory=lambda: ["forward"])


class DecodeKernels(_Section):
    """Prefill and per-token decode with a KV cache, for a small GPT per attention variant."""

    variants: list[Literal["mha", "gqa", "mqa", "window"]] = Field(default_factory=lambda: ["mha", "gqa", "mqa", "window"])
    prompt: int = 128
    new_tokens: int = 32
    batch: int = 1
    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 256
    n_kv_head: int = 2
    window: int = 64


class MLPKernels(_Section):
    names: list[str] = Field(default_factory=lambda: ["gelu", "relu2", "swiglu", "geglu"])
    tokens: int = 4096
    n_embd: int = 256
    directions: list[Direction] = Field(default_factory=lambda: ["forward", "forward_backward"])


class NormKernels(_Section):
    names: list[str] = Field(default_factory=lambda: ["layernorm", "rmsnorm"])
    tokens: int = 8192
    dim: int = 1024
    directions: list[Direction] = Field(default_factory=lambda: ["forward"])


class MoEKernels(_Section):
    n_experts: list[int] = Field(default_factory=lambda: [4, 8])
    top_k: list[int] = Field(default_factory=lambda: [1, 2])
    tokens: int = 2048
    n_embd: int = 128
    expert_hidden: int = 256
    directions: list[Direction] = Field(default_factory=lambda: ["forward"])


class QuantizationKernels(_Section):
    names: list[str] = Field(default_factory=lambda: ["int8_dynamic", "int8_weight_only", "int4_weight_only"])
    tokens: int = 256
    in_features: int = 1024
    out_features: int = 1024


class KernelSpec(_Section):
    """Each section present is timed; absent sections are skipped."""

    attention: AttentionKernels | None = None
    decode: DecodeKernels | None = None
    mlp: MLPKernels | None = None
    norm: NormKernels | None = None
    moe: MoEKernels | None = None
    quantization: QuantizationKernels | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on CUDA")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    min_time: float = Field(0.1, gt=0, description="seconds of samples per candidate")
    noisy_threshold: float = Field(0.1, gt=0, description="flag IQR/median above this")
    threads: int | None = Field(None, ge=1, description="CPU threads, fixed for the timings (default torch's)")
