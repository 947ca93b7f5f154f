"""What to time: the ``kernels:`` section of a spec, and the flags of ``python -m bench.kernels``.

Components are named as a spec names them in a model: a registered name, or a mapping with ``name``
plus options. An attention variant may also carry the positional encoding it runs with::

    attention: {variants: [mha, {name: gqa, n_kv_head: 2}, {name: mha, positional: alibi}], ...}

A list left out means every registered member of the family (plugins included), each with the
options it *requires* (no default) taken from the section's settings: ``n_kv_head``, ``window`` and
``kv_rank``, or any other option by name under ``options``. Names are not checked here — parsing a spec imports
this module, and the registry imports torch — but by ``KernelSpec.component_errors()`` (for a planner
to call before anything trains) and when timing, where one that does not resolve is a 'failed' row
carrying the registry's message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Direction = Literal["forward", "backward", "forward_backward"]

# a registered component: a name, or {name: ..., **options}
ComponentSpec = str | dict[str, Any]


def _spec_shape(value: Any, what: str) -> Any:
    """The shape of a component spec (the registry checks the rest when timing is planned)."""
    if isinstance(value, str) or (isinstance(value, Mapping) and isinstance(value.get("name"), str)):
        return value
    raise ValueError(f"{what} is a registered name or a mapping with 'name' and options, got {value!r}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Members(_Section):
    """Settings that fill the options a member requires (those without a default)."""

    options: dict[str, Any] = Field(
        default_factory=dict, description="values for options a member requires (no default), by option name")

    def required_fills(self) -> dict[str, Any]:
        return dict(self.options)


class _AttentionMembers(_Members):
    variants: list[ComponentSpec] | None = Field(
        None, description="attention specs (a name, or {name, **options, positional?}); default: every registered")
    n_kv_head: int = Field(2, ge=1, description="for members that require n_kv_head (gqa)")
    window: int = Field(64, ge=1, description="for members that require window")
    kv_rank: int = Field(64, ge=1, description="for members that require kv_rank (mla's cached latent)")

    @field_validator("variants")
    @classmethod
    def _variant_shapes(cls, value):
        for variant in value or ():
            _spec_shape(variant, "an attention variant")
            if isinstance(variant, Mapping) and "positional" in variant:
                _spec_shape(variant["positional"], "a positional encoding")
        return value

    @field_validator("positional", check_fields=False)
    @classmethod
    def _positional_shape(cls, value):
        return _spec_shape(value, "a positional encoding")

    def required_fills(self) -> dict[str, Any]:
        return {"n_kv_head": self.n_kv_head, "window": self.window, "kv_rank": self.kv_rank, **self.options}


class AttentionKernels(_AttentionMembers):
    """Each attention module timed with each backend it can take, on x (B, T, n_head·head_dim)."""

    backends: list[str] | None = Field(
        None, description="attention_backend names for members with a backend option (default: every "
                          "registered; sdpa expands to its kernels on CUDA); members without one are timed as they are")
    positional: ComponentSpec = Field("none", description="the positional encoding of variants that name none")
    seq_lens: list[int] = Field(default_factory=lambda: [128, 256, 512])
    batch: int = 4
    n_head: int = 8
    head_dim: int = 64
    directions: list[Direction] = Field(default_factory=lambda: ["forward"])


class DecodeKernels(_AttentionMembers):
    """Prefill and per-token decode with a KV cache, for a small GPT per attention variant."""

    positional: ComponentSpec = Field("rope", description="the positional encoding of variants that name none")
    prompt: int = 128
    new_tokens: int = 32
    batch: int = 1
    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 256


class MLPKernels(_Members):
    names: list[str] | None = Field(None, description="mlp names (default: every registered)")
    tokens: int = 4096
    n_embd: int = 256
    directions: list[Direction] = Field(default_factory=lambda: ["forward", "forward_backward"])


class NormKernels(_Members):
    names: list[str] | None = Field(None, description="norm names (default: every registered)")
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


SECTION_NAMES = ("attention", "decode", "mlp", "norm", "moe", "quantization")


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

    def component_errors(self) -> list[tuple[tuple[str | int, ...], str]]:
        """(key path, the registry's message) for each component the sections name that does not
        resolve: unknown names or options, a required option no setting fills. Imports the registry
        (and so torch): call it when the study is planned, not when the spec is parsed."""
        from models.registry import ComponentError, get, resolve

        errors: list[tuple[tuple[str | int, ...], str]] = []

        def check(path: tuple, family: str, spec: Any, fills: Mapping[str, Any] | None = None) -> None:
            try:
                resolve(family, with_required(family, spec, fills or {}) if fills is not None else spec)
            except ComponentError as e:
                errors.append((path, str(e)))

        for section in ("attention", "decode"):
            cfg = getattr(self, section)
            if cfg is None:
                continue
            check(("kernels", section, "positional"), "positional", cfg.positional)
            for i, variant in enumerate(cfg.variants or ()):
                attention, positional = split_variant(variant)
                check(("kernels", section, "variants", i), "attention", attention, cfg.required_fills())
                if positional is not None:
                    check(("kernels", section, "variants", i, "positional"), "positional", positional)
        lists = {("attention", "backends"): "attention_backend", ("mlp", "names"): "mlp", ("norm", "names"): "norm",
                 ("quantization", "names"): "quantization"}
        for (section, key), family in lists.items():
            for i, name in enumerate(getattr(getattr(self, section), key, None) or ()):
                try:
                    get(family, name)
                except ComponentError as e:
                    errors.append((("kernels", section, key, i), str(e)))
        return errors


def split_variant(variant: ComponentSpec) -> tuple[ComponentSpec, ComponentSpec | None]:
    """An attention variant -> (its attention spec, its positional encoding or None)."""
    if isinstance(variant, Mapping) and "positional" in variant:
        return {k: v for k, v in variant.items() if k != "positional"}, variant["positional"]
    return variant, None


def with_required(family: str, spec: ComponentSpec, fills: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as a mapping, each option it requires and leaves unset taken from ``fills`` (registry)."""
    from models.registry import REQUIRED, get

    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    component = get(family, spec["name"])
    for name, option in component.options.items():
        if option.default is REQUIRED and name not in spec and name in fills:
            spec[name] = fills[name]
    return spec


def variant_label(variant: ComponentSpec) -> str:
    """A row's name for a variant: its name, the options it sets, '+' its positional encoding (the
    backend, which a row names in its own column, left out)."""
    if isinstance(variant, str):
        return variant
    attention, positional = split_variant(variant)
    options = {k: v for k, v in attention.items() if k not in ("name", "backend")}
    label = attention["name"] + (f"({', '.join(f'{k}={_short(v)}' for k, v in options.items())})" if options else "")
    return label + (f"+{_short(positional)}" if positional is not None else "")


def _short(value: Any) -> str:
    if isinstance(value, Mapping) and "name" in value:
        rest = {k: v for k, v in value.items() if k != "name"}
        return value["name"] + (f"({', '.join(f'{k}={_short(v)}' for k, v in rest.items())})" if rest else "")
    return str(value)
