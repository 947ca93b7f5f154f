"""ModelConfig: one validated description of a GPT assembled from registered components.

Field names follow nanoGPT's. One field per family takes a registered name or a mapping with
``name`` plus options (``attention: {name: gqa, n_kv_head: 2, backend: sdpa}``). Validation
resolves every component (unknown names get the closest match), type-checks options, fills in
defaults, and rejects incompatible combinations by name — before anything is built or trained.
It is data: what a config builds and costs is computed elsewhere (``models.gpt``, ``models.accounting``).
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.contract import FEATURES
from models.registry import ComponentError, get, list_components, resolve

COMPONENT_FIELDS = ("attention", "positional", "norm", "mlp", "moe", "quantization",
                    "vision", "connector", "fusion", "contrastive")
OPTIONAL_FIELDS = ("moe", "quantization", "vision", "connector", "fusion", "contrastive")  # None: absent
LATER_FIELDS = {"value_residual": False, "logit_softcap": None,  # field -> its default
                "vision": None, "connector": None, "fusion": None, "contrastive": None, "hybrid": None}


class ModelConfig(BaseModel):
    """A GPT-style model: sizes as in nanoGPT plus one registered component per family."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    vocab_size: int = Field(50304, ge=1)
    block_size: int = Field(1024, ge=1, description="training context length")
    n_layer: int = Field(12, ge=1)
    n_head: int = Field(12, ge=1)
    n_embd: int = Field(768, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = Field(True, description="biases in Linear layers and LayerNorm (GPT-2 style)")
    tie_embeddings: bool = True

    attention: Any = "mha"
    positional: Any = "learned"
    norm: Any = "layernorm"
    mlp: Any = "gelu"
    moe: Any = None  # a moe spec replaces the MLP in every block
    quantization: Any = None

    # options of the modern recipes, off by default (exact no-ops when off)
    value_residual: bool = Field(False, description="mix the first layer's attention values into every later "
                                 "layer's, v = a·v + b·v₁ with learnable (a, b) per layer from (0.5, 0.5) (Zhou et al. 2024)")
    logit_softcap: float | None = Field(None, gt=0, description="cap the LM head's logits: c·tanh(logits / c) "
                                        "(Gemma 2; modded-nanoGPT uses 15–30)")

    # a hybrid: another attention in some layers (Zoology's sparse attention hybrids, Jamba, Samba)
    hybrid: Any = Field(None, description="{attention: spec, every: k} or {attention: spec, layers: [i, ...]}: "
                        "that attention in every k-th layer (k−1, 2k−1, ...) or the listed layers (from 0), "
                        "model.attention in the others")

    # vision-language models: an image encoder, then either a connector and a fusion into this GPT,
    # or (contrastive) a joint embedding space with this GPT as the text encoder
    vision: Any = None  # e.g. {name: vit, image_size: 16, patch_size: 4}
    connector: Any = None  # default linear when vision is set (and contrastive is not)
    fusion: Any = None  # default prefix when vision is set (and contrastive is not)
    contrastive: Any = None  # clip | siglip: train image and text encoders to match pairs instead

    @model_validator(mode="before")
    @classmethod
    def _vision_defaults(cls, data: Any) -> Any:
        """Where an image encoder feeds the GPT, a linear connector and prefix fusion unless named;
        a connector, fusion or contrastive loss without an image encoder is refused by name."""
        if not isinstance(data, dict):
            return data
        if data.get("vision") is None:
            given = [key for key in ("connector", "fusion", "contrastive") if data.get(key) is not None]
            if given:
                raise ValueError(f"model.{given[0]} is set but model.vision is not: a {given[0]} needs an image "
                                 "encoder's patches; add model.vision (e.g. {name: vit}) or remove model."
                                 f"{given[0]}")
            return data
        if data.get("contrastive") is not None:
            given = [key for key in ("connector", "fusion") if data.get(key) is not None]
            if given:
                raise ValueError(f"model.{given[0]} is set with model.contrastive: a contrastive model embeds "
                                 "images and text apart and fuses nothing; remove one of them")
            return data
        return {**data, "connector": data.get("connector") or "linear", "fusion": data.get("fusion") or "prefix"}

    @field_validator(*COMPONENT_FIELDS, mode="before")
    @classmethod
    def _resolve_component(cls, value: Any, info) -> dict | None:
        if value is None and info.field_name in OPTIONAL_FIELDS:
            return None
        return resolve(info.field_name, value)

    @field_validator("hybrid", mode="before")
    @classmethod
    def _hybrid_form(cls, value: Any) -> dict | None:
        if value is None:
            return None
        if not isinstance(value, dict) or "attention" not in value or len(set(value) & {"every", "layers"}) != 1 \
                or set(value) - {"attention", "every", "layers"}:
            raise ValueError(f"model.hybrid: expected {{attention: <spec>, every: k}} or {{attention: <spec>, layers: "
                             f"[i, ...]}}, got {value!r}")
        every, layers = value.get("every"), value.get("layers")
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise ValueError(f"model.hybrid.every: expected a whole number ≥ 1, got {every!r}")
        if layers is not None and (not isinstance(layers, list) or not layers
                                   or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
            raise ValueError(f"model.hybrid.layers: expected a non-empty list of layer indices, got {layers!r}")
        return {**value, "attention": resolve("attention", value["attention"])}

    @model_validator(mode="after")
    def _check_combination(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.hybrid is not None:
            outside = [i for i in hybrid_layers(self) if not 0 <= i < self.n_layer]
            if outside or not hybrid_layers(self):
                raise ValueError(f"model.hybrid places attention '{self.hybrid['attention']['name']}' in layers "
                                 f"{outside or 'none'}, but the model's layers are 0..{self.n_layer - 1}")
        for family in COMPONENT_FIELDS:
            found = _component(self, family)
            check = getattr(found[0], "check", None) if found else None
            reason = check(self, found[1]) if check else None
            if reason:
                raise ValueError(f"{family} '{getattr(self, family)['name']}': {reason}")
        if self.hybrid is not None:
            spec = self.hybrid["attention"]
            component = get("attention", spec["name"])
            check = getattr(component.factory, "check", None)
            reason = check(self, {**spec, **component.fixed}) if check else None
            if reason:
                raise ValueError(f"model.hybrid.attention '{spec['name']}': {reason}")
        _check_features(self)
        _check_vision(self)
        return self

    # -- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field with every option resolved: the canonical form that runs are hashed by. Fields
        added since runs were first hashed are left out at their defaults, so those runs keep their ids."""
        return {k: v for k, v in self.model_dump().items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return cls.model_validate(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> ModelConfig:
        return cls.from_dict(yaml.safe_load(text) or {})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def hybrid_layers(config: ModelConfig) -> list[int]:
    """The layers that take the hybrid's attention (none without a hybrid)."""
    if config.hybrid is None:
        return []
    if config.hybrid.get("layers") is not None:
        return sorted(set(config.hybrid["layers"]))
    every = config.hybrid["every"]
    return list(range(every - 1, config.n_layer, every))


def layer_attention(config: ModelConfig, layer: int) -> dict:
    """The attention spec of one layer: the hybrid's where it places it, else model.attention."""
    return config.hybrid["attention"] if layer in hybrid_layers(config) else config.attention


def _attentions(config: ModelConfig) -> list[tuple[Any, dict]]:
    """The registered factory and options (fixed ones included) of every attention the layers use."""
    specs = [config.attention] if len(hybrid_layers(config)) < config.n_layer else []
    specs += [config.hybrid["attention"]] if config.hybrid is not None else []
    return [(get("attention", s["name"]).factory, {**s, **get("attention", s["name"]).fixed}) for s in specs]


def _component(config: ModelConfig, family: str) -> tuple[Any, dict] | None:
    """The registered factory of a config's component and its options (fixed ones included)."""
    spec = getattr(config, family)
    if spec is None:
        return None
    component = get(family, spec["name"])
    return component.factory, {**spec, **component.fixed}


def patch_grid(config: ModelConfig) -> tuple[int, int]:
    """(rows, cols) of the image encoder's patch grid, from its options alone."""
    factory, options = _component(config, "vision")
    return tuple(factory.grid(options))


def image_tokens(config: ModelConfig) -> int:
    """How many image tokens the connector hands the GPT (0 without a connector), from the options alone."""
    if config.connector is None:
        return 0
    factory, options = _component(config, "connector")
    return int(factory.tokens(patch_grid(config), options))


def prefix_positions(config: ModelConfig) -> int:
    """Positions the image tokens take before the text (a prefix fusion's), from the options alone."""
    if config.fusion is None:
        return 0
    factory, options = _component(config, "fusion")
    return int(factory.positions(image_tokens(config), options))


def _check_vision(config: ModelConfig) -> None:
    """A connector that cannot tile the encoder's patch grid (pixel shuffle) is refused by name."""
    if config.connector is None:
        return
    factory, options = _component(config, "connector")
    check = getattr(factory, "check_grid", None)
    reason = check(patch_grid(config), options) if check else None
    if reason:
        raise ValueError(f"connector '{config.connector['name']}' on vision '{config.vision['name']}' "
                         f"(a {'×'.join(map(str, patch_grid(config)))} patch grid): {reason}")


def attention_features(config: ModelConfig) -> frozenset[str]:
    """The attention features (models.contract.FEATURES) the config's attention handles (a hybrid's:
    what every layer's attention handles)."""
    return frozenset.intersection(*(frozenset(factory.handles(config, options)) for factory, options in _attentions(config)))


def backends_handling(config: ModelConfig, features: set[str]) -> list[str]:
    """The attention backends with which the config's attention would handle every one of `features`."""
    factory, options = _component(config, "attention")
    return [b for b in list_components("attention_backend")
            if features <= factory.handles(config, {**options, "backend": resolve("attention_backend", b)})]


def needed_features(config: ModelConfig) -> dict[str, str]:
    """feature -> what in the config needs it of the attention (the first component that asks)."""
    needs: dict[str, str] = {}
    for family in COMPONENT_FIELDS:
        found = _attentions(config) if family == "attention" else [_component(config, family)]
        for factory, options in filter(None, found):
            requires = getattr(factory, "requires", None)
            for feature in requires(config, options) if requires else ():
                label = options["name"]
                needs.setdefault(feature, f"{family} '{label}'" + (" (its own options)" if family == "attention" else ""))
    if config.dropout > 0:
        needs.setdefault("dropout", f"dropout={config.dropout}")
    if config.value_residual:
        needs.setdefault("value_residual", "value_residual: true")
    return needs


def missing_features(config: ModelConfig) -> dict[str, str]:
    """feature -> what needs it, for each attention feature the config needs that its attention
    (with its kernel backend) does not handle: the contract's requires against handles. An
    attention's own needs (a window) are its own: in a hybrid they ask nothing of the other layers."""
    handles = attention_features(config)
    own = {f"attention '{options['name']}' (its own options)": frozenset(factory.handles(config, options))
           for factory, options in _attentions(config)}
    return {feature: needed_by for feature, needed_by in needed_features(config).items()
            if feature not in own.get(needed_by, handles)}


def _check_features(config: ModelConfig) -> None:
    """Refuse a config that needs an attention feature (rotation, score bias, dropout, window) its
    attention does not handle; with a kernel backend, name the backends that would do."""
    missing = missing_features(config)
    if not missing:
        return
    needs = needed_features(config)
    feature = next(iter(missing))
    # the layers' attention that lacks it (a hybrid has two)
    factory, options = next((f, o) for f, o in _attentions(config) if feature not in f.handles(config, o)
                            and missing[feature] in (f"attention '{o['name']}' (its own options)", needs[feature]))
    name, backend = options["name"], options.get("backend")
    if isinstance(backend, dict):  # the attention delegates to a kernel: say which kernels can do it all
        label = backend["name"] + "".join(f" {k}={v}" for k, v in backend.items() if k != "name")
        can = [b for b in list_components("attention_backend")
               if set(needs) <= factory.handles(config, {**options, "backend": resolve("attention_backend", b)})]
        if can:  # else no kernel would do: the attention itself does not, said below
            raise ValueError(f"attention '{name}' with backend '{label}' cannot {FEATURES[feature]} ({feature}), "
                             f"needed by {needs[feature]}; backends that can do everything this config needs: "
                             f"{', '.join(can)}")
    handled = factory.handles(config, options)
    raise ValueError(f"attention '{name}' does not {FEATURES[feature]} ({feature}), needed by {needs[feature]}: "
                     f"'{name}' handles {', '.join(sorted(handled)) or 'none of the attention features'}; "
                     "choose a positional encoding or settings it handles, or another attention")


__all__ = ["ModelConfig", "ComponentError"]
