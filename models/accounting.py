"""Parameter and FLOP accounting by walking a module tree.

FLOPs count matmuls only (2 per multiply-add): every ``nn.Linear`` (the LM head included), plus what a
module declares beyond its linear layers (``extra_flops_per_token``: attention's q·kᵀ and probs·v).
A module that uses only part of itself per token (MoE) declares ``flops_per_token`` and
``inactive_params`` instead. Training costs 3× the forward pass (backward = 2× forward).
A config's counts come from a shapes-only model of it (on the meta device: no memory, no init).
``check_flops`` compares this accounting with torch's FlopCounterMode for any registered component.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import torch
from torch import nn

from models.build import model_class
from models.config import ModelConfig
from models.flops import (  # noqa: F401  (re-exported: the accounting's vocabulary)
    ATTENTION_BACKWARD,
    active_params,
    attention_flops,
    count_params,
    matmul_flops_per_token,
    palm_flops_per_token,
)
from models.gpt import GPT

# -- a config's accounting ----------------------------------------------------------------------------


def _key(config: ModelConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True)


def shapes_only(config: ModelConfig) -> GPT:
    """The GPT a config builds, on the meta device: its layers' shapes, no memory (cached)."""
    return _meta_model(_key(config))


@functools.lru_cache(maxsize=256)
def _meta_model(key: str) -> GPT:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        config = ModelConfig.model_construct(**json.loads(key))  # the key is a validated config's
        return model_class(config)(config, seed=0)


def param_counts(config: ModelConfig) -> dict[str, int]:
    """total; non_embedding (without token and position tables); active (per token, MoE-aware)."""
    return dict(_param_counts(_key(config)))


@functools.lru_cache(maxsize=256)
def _param_counts(key: str) -> tuple[tuple[str, int], ...]:
    model = _meta_model(key)
    total = count_params(model)
    embedding = model.wte.weight.numel() + count_params(model.positional)
    return (("total", total), ("non_embedding", total - embedding), ("active", active_params(model)))


def flops_per_token(config: ModelConfig, causal: bool = False, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward; a frozen image encoder's forward
    only) at seq_len (default block_size).

    Every matmul is counted, the LM head and attention's q·kᵀ and probs·v included. causal=False
    counts the full score matrix (the PaLM/nanoGPT convention, and what torch's FlopCounterMode
    sees); causal=True counts only the keys each query sees.
    """
    seq_len = seq_len or config.block_size
    model = shapes_only(config)
    vision = getattr(model, "vision", None)
    frozen = vision.flops_per_image() if vision is not None and not vision.trainable else 0.0  # no backward through it
    return (3 * sequence_flops(model, seq_len, causal) - 2 * frozen) / seq_len


def sequence_flops(model: nn.Module, seq_len: int, causal: bool) -> float:
    """Forward matmul FLOPs of one sequence of seq_len text tokens, with its image for a
    vision-language model: the blocks run over the prefix's image positions too (the LM head does
    not), and the encoder, connector and cross-attention's image projections run once per image."""
    fusion = getattr(model, "fusion", None)
    if fusion is None:  # a text model, or one that counts its image side itself (a dual encoder)
        return matmul_flops_per_token(model, seq_len, causal) * seq_len
    prefix = fusion.prefix_tokens
    head = 2 * model.lm_head.in_features * model.lm_head.out_features
    per_image = sum(m.flops_per_image() for m in (model.vision, model.connector, fusion) if hasattr(m, "flops_per_image"))
    positions = seq_len + prefix
    return matmul_flops_per_token(model, positions, causal) * positions - head * prefix + per_image


# -- decoding caches ------------------------------------------------------------------------------------


def cache_bytes(model: nn.Module, bytes_per_element: int = 2) -> tuple[int | None, int | None]:
    """What a model's layers declare their decoding cache costs: (KV-cache bytes per token, summed over
    the layers with ``kv_cache_bytes_per_token``; state bytes per sequence whatever its length, summed
    over the layers with ``state_bytes``). Every layer is read (a hybrid's differ). The KV sum is 0 where
    only states are kept, None where a layer declares neither (it does not say what it keeps); the state
    sum is None where no layer has one."""
    layers = [block.attn for block in model.blocks]
    kv = [a.kv_cache_bytes_per_token(bytes_per_element) for a in layers if hasattr(a, "kv_cache_bytes_per_token")]
    state = [a.state_bytes(bytes_per_element) for a in layers if hasattr(a, "state_bytes")]
    says = all(hasattr(a, "kv_cache_bytes_per_token") or hasattr(a, "state_bytes") for a in layers)
    return (sum(kv) if says else None), (sum(state) if state else None)


# -- checking the accounting against torch's FLOP counter ---------------------------------------------


def counted_flops(module: nn.Module, *inputs: Any) -> float:
    """Matmul FLOPs torch's FlopCounterMode sees in one forward call of module(*inputs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return float(counter.get_total_flops())


def check_flops(family: str, name: str, options: dict | None = None, config: ModelConfig | None = None,
                seq_len: int = 16, rel_tol: float = 0.02) -> str | None:
    """Why the accounting of a registered component disagrees with torch's FlopCounterMode, or None.

    Builds the component at a small size, counts one forward pass of seq_len tokens both ways
    (non-causal: FlopCounterMode counts the full score matrix) and compares. A component whose
    matmuls are not all nn.Linear must declare ``extra_flops_per_token`` or ``flops_per_token``
    (the contract), or this reports the gap. Plugins can call it in their own tests.
    """
    from models.positional import Positions
    from models.registry import build_spec, get

    options = dict(options or {})
    if family == "attention" and "backend" in get(family, name).options:
        options.setdefault("backend", "math")  # its matmuls are ones the counter sees (CPU SDPA's are not)
    config = config or ModelConfig(n_layer=1, n_head=4, n_embd=64, block_size=seq_len, vocab_size=32,
                                   **({family: {"name": name, **(options or {})}}
                                      if family in ("attention", "positional", "norm", "mlp", "moe") else {}))
    spec = {"name": name, **(options or {})}
    torch.manual_seed(0)
    x = torch.randn(2, seq_len, config.n_embd)
    pos = torch.arange(seq_len)
    if family == "attention":
        module = build_spec(family, spec, config)
        positional = build_spec("positional", config.positional, config)
        inputs: tuple = (x, Positions(pos, positional, positional.rotation(pos)), pos)
    elif family == "norm":
        module, inputs = build_spec(family, spec, config.n_embd, config), (x,)
    elif family in ("mlp", "moe"):
        module, inputs = build_spec(family, spec, config), (x,)
    elif family == "positional":  # per sequence: its embeddings (rotation and bias have no matmuls)
        module = build_spec(family, spec, config)
        expected = matmul_flops_per_token(module, seq_len, causal=False) * seq_len
        return _compare(family, name, expected, counted_flops(module.embed, pos), rel_tol)
    else:
        raise ValueError(f"check_flops covers module families, not '{family}'")
    module.eval()  # MoE: dropless, every token routed, as the accounting assumes
    expected = matmul_flops_per_token(module, seq_len, causal=False) * x.shape[0] * seq_len
    return _compare(family, name, expected, counted_flops(module, *inputs), rel_tol)


def _compare(family: str, name: str, expected: float, counted: float, rel_tol: float) -> str | None:
    if abs(expected - counted) <= rel_tol * max(counted, 1.0):
        return None
    return (f"{family} '{name}': the accounting says {expected:.4g} forward FLOPs, torch's FlopCounterMode "
            f"counts {counted:.4g}; declare extra_flops_per_token (or flops_per_token) in the component")
