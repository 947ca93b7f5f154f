"""ModelConfig: one validated description of a GPT assembled from registered components.

Field names follow nanoGPT's. One field per family takes a registered name or a mapping with
``name`` plus options (``attention: {name: gqa, n_kv_head: 2, backend: sdpa}``). Validation
resolves every component (unknown names get the closest match), type-checks options, fills in
defaults, and rejects incompatible combinations by name — before anything is built or trained.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.accounting import active_params, count_params, matmul_flops_per_token
from models.registry import ComponentError, get, list_components, resolve

COMPONENT_FIELDS = ("attention", "positional", "norm", "mlp", "moe", "quantization")


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

    @field_validator(*COMPONENT_FIELDS, mode="before")
    @classmethod
    def _resolve_component(cls, value: Any, info) -> dict | None:
        if value is None and info.field_name in ("moe", "quantization"):
            return None
        return resolve(info.field_name, value)

    @model_validator(mode="after")
    def _check_combination(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        for family in COMPONENT_FIELDS:
            spec = getattr(self, family)
            if spec is None:
                continue
            component = get(family, spec["name"])
            check = getattr(component.factory, "check", None)
            reason = check(self, {**spec, **component.fixed}) if check else None
            if reason:
                raise ValueError(f"{family} '{spec['name']}': {reason}")
        _check_backend(self)
        return self

    # -- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field with every option resolved: the canonical form that runs are hashed by."""
        return self.model_dump()

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

    # -- accounting ---------------------------------------------------------------------------

    def shapes_only(self):
        """The GPT this config builds, on the meta device: its layers' shapes, no memory (cached)."""
        return _meta_model(self._key())

    def param_counts(self) -> dict[str, int]:
        """total; non_embedding (without token and position tables); active (per token, MoE-aware)."""
        return dict(_param_counts(self._key()))

    def flops_per_token(self, causal: bool = False, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3 × forward) at seq_len (default block_size).

        Every matmul is counted, the LM head and attention's q·kᵀ and probs·v included.
        causal=False counts the full score matrix (the PaLM/nanoGPT convention, and what
        torch's FlopCounterMode sees); causal=True counts only the keys each query sees.
        """
        return 3 * _forward_flops(self._key(), causal, seq_len or self.block_size)

    def _key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _check_backend(config: ModelConfig) -> None:
    """Reject an attention backend that lacks a capability the rest of the config needs."""
    attention = {**config.attention, **get("attention", config.attention["name"]).fixed}
    backend = attention.get("backend")
    if backend is None:  # a plugin attention without a kernel backend
        return
    needs: dict[str, str] = {}
    requires = getattr(get("attention", attention["name"]).factory, "requires", None)
    for need in requires(attention) if requires else ():
        needs[need] = f"attention '{attention['name']}' with {need}={attention.get(need)}"
    for need in getattr(get("positional", config.positional["name"]).factory, "requires", ()):
        needs[need] = f"positional '{config.positional['name']}'"
    if config.dropout > 0:
        needs["dropout"] = f"dropout={config.dropout}"
    have = _capabilities(backend)
    missing = [n for n in needs if n not in have]
    if missing:
        can = [b for b in list_components("attention_backend") if set(needs) <= _capabilities({"name": b})]
        label = backend["name"] + "".join(f" {k}={v}" for k, v in backend.items() if k != "name")
        raise ValueError(
            f"attention backend '{label}' cannot do {missing[0]}, needed by {needs[missing[0]]}; "
            f"backends that can do everything this config needs: {', '.join(can) or 'none'}"
        )


def _capabilities(backend: dict) -> set[str]:
    spec = resolve("attention_backend", backend)
    return set(get("attention_backend", spec["name"]).factory.capabilities(spec))


@functools.lru_cache(maxsize=256)
def _meta_model(key: str):
    from models.gpt import GPT

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return GPT(ModelConfig.model_construct(**json.loads(key)), seed=0)  # the key is a validated config's


@functools.lru_cache(maxsize=256)
def _param_counts(key: str) -> tuple[tuple[str, int], ...]:
    model = _meta_model(key)
    total = count_params(model)
    embedding = model.wte.weight.numel() + count_params(model.positional)
    return (("total", total), ("non_embedding", total - embedding), ("active", active_params(model)))


def _forward_flops(key: str, causal: bool, seq_len: int) -> float:
    return matmul_flops_per_token(_meta_model(key), seq_len, causal)


__all__ = ["ModelConfig", "ComponentError"]
