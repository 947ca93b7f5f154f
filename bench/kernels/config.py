"""What to time: the ``kernels:`` section of a spec, and the flags of ``python -m bench.kernels``.

Components are named as a spec names them in a model: a registered name, or a mapping with ``name``
plus options. An attention variant may also carry the positional encoding it runs with::

    attention: {variants: [mha, {name: gqa, n_kv_head: 2}, {name: mha, positional: alibi}], ...}

A list left out means every registered member of the family (plugins included), each with the
options it *requires* (no default) taken from the section's settings: ``n_kv_head``, ``window`` and
``kv_rank``, or any other option by name under ``options``. The image sections (``vision``,
``connector``, ``image_decode``) instead share their settings with every member that *takes* the
option and leaves it unset (``image_size``, ``channels``, ``patch_size``, or any under ``options``)::

    vision: {variants: [vit, {name: conv, stages: 3}], image_size: 64, options: {n_embd: 128}} Names are not checked here — parsing a spec imports
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
    """Prefill and per-token decode with the model's cache (a KV cache, or a recurrent mixer's state of
    constant size), for a small GPT per attention variant; at one prompt length, or at each of
    ``contexts`` (the cost of a token against the context it decodes after)::

        decode: {variants: [mha, gla], contexts: [256, 1024, 4096, 8192], new_tokens: 32}

    The model's block_size covers the longest context plus the tokens decoded (``block_size``): a
    variant's positional encoding must reach that far (a learned one has block_size positions)."""

    positional: ComponentSpec = Field("rope", description="the positional encoding of variants that name none")
    prompt: int = Field(128, ge=1, description="tokens prefilled before decoding (when contexts is not given)")
    contexts: list[int] | None = Field(
        None, min_length=1, description="prompt lengths to prefill before decoding, each timed (replaces prompt); "
                                        "e.g. [256, 1024, 4096, 8192]")
    new_tokens: int = Field(32, ge=1, description="tokens decoded after the prompt, one at a time")
    batch: int = 1
    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 256

    @field_validator("contexts")
    @classmethod
    def _positive_contexts(cls, value):
        if value is not None and min(value) < 1:
            raise ValueError(f"contexts {value} must each be at least 1 token")
        return sorted(set(value)) if value is not None else None

    def lengths(self) -> list[int]:
        """The prompt lengths timed, shortest first: ``contexts``, or the one ``prompt``."""
        return list(self.contexts) if self.contexts is not None else [self.prompt]

    @property
    def block_size(self) -> int:
        """Positions the model must reach: the longest prompt and the tokens decoded after it."""
        return max(self.lengths()) + self.new_tokens


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


class _SharedMembers(_Section):
    """Settings every member that takes the option (and leaves it unset) gets: vision and connectors."""

    variants: list[ComponentSpec] | None = Field(
        None, description="specs (a name, or {name, **options}); default: every registered")
    options: dict[str, Any] = Field(
        default_factory=dict, description="values for any option by name, given to each member that takes it "
                                          "and leaves it unset")

    @field_validator("variants")
    @classmethod
    def _variant_shapes(cls, value):
        for variant in value or ():
            _spec_shape(variant, "a variant")
        return value

    def shared_fills(self) -> dict[str, Any]:
        return dict(self.options)


class VisionKernels(_SharedMembers):
    """Each image encoder on a batch of images (batch, channels, image_size, image_size) in [0, 1]; FLOPs
    from its flops_per_image() × batch (× 3 forward+backward)."""

    variants: list[ComponentSpec] | None = Field(
        None, description="vision specs (a name, or {name, **options}); default: every registered (vit, conv)")
    batch: int = Field(8, ge=1, description="images per batch")
    image_size: int = Field(64, ge=1, description="for members that take image_size (every built-in)")
    channels: int = Field(3, ge=1, description="for members that take channels (every built-in)")
    patch_size: int = Field(8, ge=1, description="for members that take patch_size (vit)")
    directions: list[Direction] = Field(default_factory=lambda: ["forward", "forward_backward"])

    def shared_fills(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "channels": self.channels, "patch_size": self.patch_size,
                **self.options}


class ConnectorKernels(_SharedMembers):
    """Each connector on patch features (batch, rows·cols, in_dim) of a (rows, cols) patch grid, into a
    language model n_embd wide; rows carry the image tokens each hands the language model."""

    variants: list[ComponentSpec] | None = Field(
        None, description="connector specs (a name, or {name, **options}); default: every registered "
                          "(linear, mlp, pixel_shuffle, resampler)")
    batch: int = Field(8, ge=1, description="images per batch")
    grid: list[int] = Field(default_factory=lambda: [16, 16], min_length=2, max_length=2,
                            description="[rows, cols] of the encoder's patch grid")
    in_dim: int = Field(192, ge=1, description="features per patch (the encoder's width)")
    n_embd: int = Field(256, ge=1, description="the language model's width: the image tokens' features")
    directions: list[Direction] = Field(default_factory=lambda: ["forward", "forward_backward"])

    @field_validator("grid")
    @classmethod
    def _positive_grid(cls, value):
        if min(value) < 1:
            raise ValueError(f"grid {value} must have at least one row and one column")
        return value


class ImageDecodeKernels(_Section):
    """Prefill a prompt with an image, then greedy per-token decoding with the KV cache, for small
    vision-language models alike but for their fusion: rows carry per-token latency, the cache's bytes
    after prefill and after each token, and the image tokens (a prefix holds them in the cache,
    cross-attention does not)."""

    fusions: list[ComponentSpec] = Field(default_factory=lambda: ["prefix", "cross_attention"],
                                         description="fusion specs, one model each")
    vision: ComponentSpec = Field("vit", description="the image encoder of every model")
    connector: ComponentSpec = Field("linear", description="the connector of every model")
    image_size: int = Field(32, ge=1, description="for a vision that takes image_size")
    channels: int = Field(3, ge=1, description="for a vision that takes channels")
    patch_size: int = Field(4, ge=1, description="for a vision that takes patch_size (vit)")
    options: dict[str, Any] = Field(
        default_factory=dict, description="values for any vision option by name (n_embd, n_layer, ...), for "
                                          "a vision that takes it and leaves it unset")
    attention: ComponentSpec = Field("mha", description="the language model's attention")
    positional: ComponentSpec = Field("rope", description="the language model's positional encoding")
    prompt: int = Field(32, ge=1, description="text tokens prefilled with the image")
    new_tokens: int = Field(32, ge=1, description="greedy decoding steps timed, one token each")
    batch: int = Field(1, ge=1)
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(8, ge=1)
    n_embd: int = Field(256, ge=1)

    @field_validator("fusions")
    @classmethod
    def _fusion_shapes(cls, value):
        for fusion in value:
            _spec_shape(fusion, "a fusion")
        return value

    @field_validator("vision", "connector", "attention", "positional")
    @classmethod
    def _component_shape(cls, value, info):
        return _spec_shape(value, f"image_decode.{info.field_name}")

    def vision_fills(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "channels": self.channels, "patch_size": self.patch_size,
                **self.options}

    def model(self, fusion: ComponentSpec) -> dict[str, Any]:
        """The model config (a dict, for ModelConfig) with this fusion; block_size covers the prompt and the
        tokens decoded, not a prefix's image positions (``bench.kernels.cases`` adds those)."""
        return {"n_layer": self.n_layer, "n_head": self.n_head, "n_embd": self.n_embd, "vocab_size": 256,
                "block_size": self.prompt + self.new_tokens, "dropout": 0.0, "bias": False,
                "attention": self.attention, "positional": self.positional,
                "vision": with_shared("vision", self.vision, self.vision_fills()), "connector": self.connector,
                "fusion": fusion}


SECTION_NAMES = ("attention", "decode", "mlp", "norm", "moe", "quantization", "vision", "connector", "image_decode")


class KernelSpec(_Section):
    """Each section present is timed; absent sections are skipped."""

    attention: AttentionKernels | None = None
    decode: DecodeKernels | None = None
    mlp: MLPKernels | None = None
    norm: NormKernels | None = None
    moe: MoEKernels | None = None
    quantization: QuantizationKernels | None = None
    vision: VisionKernels | None = None
    connector: ConnectorKernels | None = None
    image_decode: ImageDecodeKernels | None = None
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
        for section in ("vision", "connector"):
            cfg = getattr(self, section)
            for i, variant in enumerate(getattr(cfg, "variants", None) or ()):
                try:
                    resolve(section, with_shared(section, variant, cfg.shared_fills()))
                except ComponentError as e:
                    errors.append((("kernels", section, "variants", i), str(e)))
        if self.image_decode is not None:
            errors += _image_decode_errors(self.image_decode)
        lists = {("attention", "backends"): "attention_backend", ("mlp", "names"): "mlp", ("norm", "names"): "norm",
                 ("quantization", "names"): "quantization"}
        for (section, key), family in lists.items():
            for i, name in enumerate(getattr(getattr(self, section), key, None) or ()):
                try:
                    get(family, name)
                except ComponentError as e:
                    errors.append((("kernels", section, key, i), str(e)))
        return errors


def _image_decode_errors(cfg: ImageDecodeKernels) -> list[tuple[tuple[str | int, ...], str]]:
    """Each component of the image_decode section that does not resolve, then each model (one per fusion)
    that does not validate whole (e.g. a pixel shuffle that cannot tile the encoder's grid)."""
    from models.config import ModelConfig
    from models.registry import ComponentError, resolve

    errors: list[tuple[tuple[str | int, ...], str]] = []
    parts = [(("vision",), "vision", lambda: with_shared("vision", cfg.vision, cfg.vision_fills())),
             (("connector",), "connector", lambda: cfg.connector), (("attention",), "attention", lambda: cfg.attention),
             (("positional",), "positional", lambda: cfg.positional)]
    parts += [(("fusions", i), "fusion", lambda f=fusion: f) for i, fusion in enumerate(cfg.fusions)]
    for path, family, spec in parts:
        try:
            resolve(family, spec())
        except ComponentError as e:
            errors.append((("kernels", "image_decode", *path), str(e)))
    if errors:
        return errors
    for i, fusion in enumerate(cfg.fusions):
        try:
            ModelConfig(**cfg.model(fusion))
        except ValueError as e:  # pydantic's ValidationError is one
            found = getattr(e, "errors", None)
            text = found()[0]["msg"] if callable(found) else str(e)
            errors.append((("kernels", "image_decode", "fusions", i), text.removeprefix("Value error, ")))
    return errors


def with_shared(family: str, spec: ComponentSpec, fills: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as a mapping, each option its member takes and leaves unset taken from ``fills``
    (the image sections' shared settings: one image_size for every encoder that has one)."""
    from models.registry import get

    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    component = get(family, spec["name"])
    for name in component.options:
        if name not in spec and name in fills:
            spec[name] = fills[name]
    return spec


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
