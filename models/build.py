"""Building a model from its config: which class it is, its seeded weights, its kernels, training-time quantization."""

from __future__ import annotations

from typing import Any

from models.attention_backends import KernelChooser
from models.config import ModelConfig
from models.dual_encoder import DualEncoder
from models.gpt import GPT
from models.registry import build_spec


def model_class(config: ModelConfig) -> type[GPT]:
    """A GPT, or its dual-encoder form when the config trains image and text embeddings contrastively."""
    return DualEncoder if config.contrastive is not None else GPT


def build_model(config: ModelConfig | dict[str, Any], seed: int | None = None,
                kernels: KernelChooser | None = None) -> GPT:
    """Build a model from a config (or a dict of one), its weights initialised from `seed` (default:
    drawn from torch's global generator), its ``backend: auto`` kernels chosen by `kernels` (default:
    sdpa, recorded as such); training-time quantization (QAT) is applied here."""
    if not isinstance(config, ModelConfig):
        config = ModelConfig.from_dict(config)
    model = model_class(config)(config, seed, kernels)
    if config.quantization is not None:
        quantizer = build_spec("quantization", config.quantization)
        if quantizer.stage == "train":
            quantizer.apply(model)
    return model
