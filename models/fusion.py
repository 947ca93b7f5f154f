"""Fusion: how a GPT reads the image tokens a vision encoder and connector made. Context: (config, n_image_tokens).

    prefix           image tokens placed before the text, loss on the text only (LLaVA; nanoVLM)
    cross_attention  gated cross-attention layers every `every` blocks, tanh(α) from α = 0, so the
                     model starts as the text-only one (Flamingo, Alayrac et al. 2022)

The GPT calls ``start`` on the text embeddings, ``after_block`` after each block and ``text`` on the
final stream. A prefix lengthens the sequence, and so the KV cache, by the image tokens; cross-attention
keeps the cache text-only and reads the image tokens (held by the cache while decoding) in its layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.flops import matmul_flops_per_token
from models.registry import build_spec, register


@register("fusion", "prefix", description="image tokens before the text, loss on the text only (LLaVA; nanoVLM)")
class PrefixFusion(nn.Module):
    def __init__(self, config, n_image_tokens: int):
        super().__init__()
        self.prefix_tokens = n_image_tokens  # positions the blocks run over before the text

    @staticmethod
    def positions(n_image_tokens: int, options: dict) -> int:
        """Positions the image takes before the text: all its tokens."""
        return n_image_tokens

    def start(self, x: Tensor, image: Tensor) -> tuple[Tensor, int]:
        """(B, T, C) text and (B, M, C) image tokens -> ((B, M + T, C), M positions of prefix)."""
        return torch.cat([image.to(x.dtype), x], dim=1), image.shape[1]

    def after_block(self, i: int, x: Tensor, image: Tensor | None, cache=None) -> Tensor:
        return x  # the image tokens are in the sequence (and the KV cache) already

    def text(self, x: Tensor, prefix: int) -> Tensor:
        return x[:, prefix:]

    def image_cache_bytes(self, bytes_per_element: int) -> int:
        """What a decoding cache holds for one row's image beside the KV cache: nothing (it is in it)."""
        return 0

    def flops_per_token(self, seq_len: int, causal: bool) -> float:
        return 0.0  # no weights: the image tokens' cost is the blocks' own, over M more positions


class CrossAttention(nn.Module):
    """Text queries attend to every image token (no mask): q from the text, k and v from the image."""

    def __init__(self, config, n_image_tokens: int, n_head: int):
        super().__init__()
        self.n_head, self.head_dim = n_head, config.n_embd // n_head
        self.n_image_tokens = n_image_tokens
        self.q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def keys_values(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """(B, M, C) image tokens -> their keys and values (B, H, M, D): once per image, cached for decoding."""
        B, M, C = image.shape
        k, v = self.kv(image).split(C, dim=2)
        return (k.view(B, M, self.n_head, self.head_dim).transpose(1, 2),
                v.view(B, M, self.n_head, self.head_dim).transpose(1, 2))

    def forward(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, T, C) text, the image's keys and values (B, H, M, D) -> (B, T, C)."""
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k, v = k.to(q.dtype), v.to(q.dtype)
        scores = (q @ k.transpose(-2, -1)) / self.head_dim**0.5  # explicit matmuls: the FLOP counter sees them
        y = F.softmax(scores.float(), dim=-1).to(v.dtype) @ v  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))

    def extra_flops_per_token(self, seq_len: int, causal: bool) -> float:
        """Per text token: q·kᵀ and probs·v over the M image tokens."""
        return 2 * self.n_head * self.n_image_tokens * 2 * self.head_dim


class GatedCrossAttentionLayer(nn.Module):
    """Flamingo's GATED XATTN-DENSE: x + tanh(α_attn)·xattn(norm(x)), then x + tanh(α_mlp)·mlp(norm(x)).
    Both gates start at 0, so at initialisation the layer is the identity, exactly."""

    def __init__(self, config, n_image_tokens: int, n_head: int):
        super().__init__()
        self.norm_1 = build_spec("norm", config.norm, config.n_embd, config)
        self.attn = CrossAttention(config, n_image_tokens, n_head)
        self.norm_2 = build_spec("norm", config.norm, config.n_embd, config)
        self.mlp = build_spec("mlp", config.mlp, config)
        self.gates = nn.Parameter(torch.zeros(2))  # α_attn, α_mlp

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.gates)

    def forward(self, x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """x (B, T, C); the image's keys and values (B, H, M, D) -> (B, T, C)."""
        gate_attn, gate_mlp = torch.tanh(self.gates).to(x.dtype)
        x = x + gate_attn * self.attn(self.norm_1(x), k, v)
        return x + gate_mlp * self.mlp(self.norm_2(x))


@register("fusion", "cross_attention",
          description="gated cross-attention layers every `every` blocks, tanh(α) gates from 0 (Flamingo)")
class CrossAttentionFusion(nn.Module):
    def __init__(self, config, n_image_tokens: int, *, every: int = 1, n_head: int | None = None):
        """every: a layer after blocks every−1, 2·every−1, …; n_head: its heads (default the model's)."""
        super().__init__()
        self.every = every
        self.prefix_tokens = 0
        self.layers = nn.ModuleDict({str(i): GatedCrossAttentionLayer(config, n_image_tokens, n_head or config.n_head)
                                     for i in range(every - 1, config.n_layer, every)})

    @staticmethod
    def positions(n_image_tokens: int, options: dict) -> int:
        """Positions the image takes before the text: none, it is read beside them."""
        return 0

    @staticmethod
    def check(config, options: dict) -> str | None:
        if options["every"] < 1 or options["every"] > config.n_layer:
            return f"every={options['every']} must be between 1 and n_layer={config.n_layer}"
        heads = options.get("n_head") or config.n_head
        if heads < 1 or config.n_embd % heads:
            return f"n_head={heads} must divide n_embd={config.n_embd}"
        return None

    def start(self, x: Tensor, image: Tensor) -> tuple[Tensor, int]:
        return x, 0  # the text alone is the sequence; the image is read in the layers

    def after_block(self, i: int, x: Tensor, image: Tensor | None, cache=None) -> Tensor:
        """A gated layer after block i reads the image's keys and values: projected from `image`
        (and kept in the cache), or, while decoding, those the cache kept at the prefill."""
        layer = self.layers[str(i)] if str(i) in self.layers else None
        if layer is None:
            return x
        if image is not None:
            kv = layer.attn.keys_values(image.to(x.dtype))
            if cache is not None:
                cache.image_kv[i] = kv
        else:
            kv = cache.image_kv.get(i) if cache is not None else None
        return x if kv is None else layer(x, *kv)  # no image: the text-only model

    def text(self, x: Tensor, prefix: int) -> Tensor:
        return x

    def image_cache_bytes(self, bytes_per_element: int) -> int:
        """What a decoding cache holds for one row's image: each layer's image keys and values."""
        return sum(2 * layer.attn.n_image_tokens * layer.attn.kv.in_features * bytes_per_element
                   for layer in self.layers.values())

    def flops_per_token(self, seq_len: int, causal: bool) -> float:
        """Per text token: each layer's q, output and MLP matmuls and its attention over the image
        tokens; the k/v projection of the image tokens is per image (``flops_per_image``)."""
        total = 0.0
        for layer in self.layers.values():
            kv = 2 * layer.attn.kv.in_features * layer.attn.kv.out_features
            total += matmul_flops_per_token(layer, seq_len, causal) - kv
        return total

    def flops_per_image(self) -> float:
        """The k/v projections of the image tokens, once per image and layer."""
        return sum(2 * l.attn.kv.in_features * l.attn.kv.out_features * l.attn.n_image_tokens
                   for l in self.layers.values())
