"""archbench's component factory: registered architecture components and the GPT built from them.

    from models import ModelConfig, build_model, available, register

Importing ``models`` registers every built-in component; third-party ones register the same way
from a module named in a spec's ``plugins:`` (see ``load_plugins``).
"""

from models import attention, attention_backends, attention_modern, contract, contrastive, connector, fusion, mixer_based, mixer_delta, mixer_h3, mixers, mlp, moe, norm, optimizers, positional, quantization, quantization_calibrated, vision  # noqa: F401  (registers)
from models.accounting import check_flops, flops_per_token, param_counts, shapes_only
from models.config import ModelConfig
from models.build import build_model
from models.gpt import GPT
from models.quantization import model_bytes, quantize
from models.registry import (
    FAMILIES,
    REQUIRED,
    ComponentError,
    available,
    build,
    build_spec,
    list_components,
    load_plugins,
    ref,
    register,
)

__all__ = [
    "FAMILIES", "GPT", "REQUIRED", "ComponentError", "ModelConfig", "available", "build", "build_model",
    "build_spec", "check_flops", "contract", "flops_per_token", "list_components", "load_plugins", "model_bytes",
    "param_counts", "quantize", "ref", "register", "shapes_only",
]
