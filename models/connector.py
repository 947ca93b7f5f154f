"""Connectors (family "connector"): an image encoder's patch features -> image tokens in the language
model's space. Context: (in_dim, grid, config): the encoder's width, its (rows, cols) patch grid and
the language model's ModelConfig. (B, N = rows·cols, in_dim) -> (B, M, config.n_embd).

    linear         one linear layer (LLaVA, Liu et al. 2023)                              M = N
    mlp            linear → GELU → linear (LLaVA-1.5's projector)                         M = N
    pixel_shuffle  space-to-depth ×factor, then linear (nanoVLM; Idefics3)                M = N / factor²
    resampler      learned queries cross-attend to the patches (Perceiver resampler,      M = queries
                   Flamingo; Q-Former, BLIP-2)

A connector's FLOPs are counted per image (``flops_per_image``) by the model's accounting; its
``flops_per_token`` is 0 so the language model's per-token walk does not count it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.norm import LayerNorm
from models.registry import register
from models.vision import with_defaults


def _linear_flops(layer: nn.Linear, rows: int) -> float:
    return 2 * layer.in_features * layer.out_features * rows


@register("connector", "linear", description="one linear layer into the text's width (LLaVA, Liu et al. 2023)")
class LinearConnector(nn.Module):
    """Each patch feature projected into the language model's width by one nn.Linear: M = N tokens."""

    def __init__(self, in_dim: int, grid: tuple[int, int], config):
        super().__init__()
        self.n_patches = grid[0] * grid[1]
        self.proj = nn.Linear(in_dim, config.n_embd, bias=config.bias)

    @staticmethod
    def tokens(grid: tuple[int, int], options: dict) -> int:
        return grid[0] * grid[1]

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, in_dim) -> (B, N, n_embd)."""
        return self.proj(x)

    def flops_per_image(self) -> float:
        return _linear_flops(self.proj, self.n_patches)

    def flops_per_token(self, seq_len: int, causal: bool) -> float:
        """0: counted per image (``flops_per_image``) by the model's accounting, not per text token."""
        return 0.0


@register("connector", "mlp", description="linear → GELU → linear (LLaVA-1.5's 2-layer MLP projector)")
class MLPConnector(nn.Module):
    """LLaVA-1.5's projector: Linear(in_dim, n_embd) → GELU → Linear(n_embd, n_embd); M = N tokens.
    The second layer is ``proj``, not ``c_proj``: it does not write into a residual stream, so the
    GPT's 1/sqrt(2·n_layer) residual scaling does not apply."""

    def __init__(self, in_dim: int, grid: tuple[int, int], config):
        super().__init__()
        self.n_patches = grid[0] * grid[1]
        self.fc = nn.Linear(in_dim, config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    @staticmethod
    def tokens(grid: tuple[int, int], options: dict) -> int:
        return grid[0] * grid[1]

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, in_dim) -> (B, N, n_embd)."""
        return self.proj(F.gelu(self.fc(x)))

    def flops_per_image(self) -> float:
        return _linear_flops(self.fc, self.n_patches) + _linear_flops(self.proj, self.n_patches)

    def flops_per_token(self, seq_len: int, causal: bool) -> float:
        """0: counted per image (``flops_per_image``) by the model's accounting, not per text token."""
        return 0.0


def space_to_depth(x: Tensor, grid: tuple[int, int], factor: int) -> Tensor:
    """(B, rows·cols, D) raster-order patches -> (B, rows/f · cols/f, f²·D), nanoVLM's pixel shuffle.

    Output token (R, C) (raster order over the coarse grid) concatenates its f×f neighbourhood of
    patches (f·R + i, f·C + j) in raster order within it: i major, j minor, each patch's D features
    contiguous. With a 4×4 grid and f = 2, token 0 holds patches 0, 1, 4, 5; token 1 holds 2, 3, 6, 7.
    """
    B, _, D = x.shape
    rows, cols = grid
    f = factor
    x = x.view(B, rows // f, f, cols // f, f, D)  # (B, R, i, C, j, D)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, R, C, i, j, D)
    return x.reshape(B, (rows // f) * (cols // f), f * f * D)


@register("connector", "pixel_shuffle", description="space-to-depth ×factor then linear: factor² fewer tokens (nanoVLM; Idefics3)")
class PixelShuffleConnector(nn.Module):
    """Pixel shuffle (space-to-depth, as nanoVLM and Idefics3): each f×f neighbourhood of patches
    becomes one token of f²·in_dim features (``space_to_depth``), then Linear(f²·in_dim, n_embd):
    M = N / f² tokens, so the language model reads f² times fewer image positions."""

    def __init__(self, in_dim: int, grid: tuple[int, int], config, *, factor: int = 2):
        super().__init__()
        reason = PixelShuffleConnector.check_grid(grid, {"factor": factor})
        if reason:
            raise ValueError(f"connector 'pixel_shuffle': {reason}")
        self.grid, self.factor = tuple(grid), factor
        self.proj = nn.Linear(in_dim * factor * factor, config.n_embd, bias=config.bias)

    @staticmethod
    def tokens(grid: tuple[int, int], options: dict) -> int:
        f = with_defaults(PixelShuffleConnector, options)["factor"]
        return (grid[0] // f) * (grid[1] // f)

    @staticmethod
    def check(config, options: dict) -> str | None:
        factor = with_defaults(PixelShuffleConnector, options)["factor"]
        return f"factor={factor} must be at least 1" if factor < 1 else None

    @staticmethod
    def check_grid(grid: tuple[int, int], options: dict) -> str | None:
        """Why this factor cannot tile a (rows, cols) patch grid, or None (the config's validator
        calls it with the encoder's grid; ``check`` cannot see the grid)."""
        factor = with_defaults(PixelShuffleConnector, options)["factor"]
        if factor < 1:
            return f"factor={factor} must be at least 1"
        rows, cols = grid
        if rows % factor or cols % factor:
            return f"factor={factor} does not divide the {rows}×{cols} patch grid"
        return None

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, in_dim) -> (B, N / f², n_embd)."""
        return self.proj(space_to_depth(x, self.grid, self.factor))

    def flops_per_image(self) -> float:
        return _linear_flops(self.proj, self.tokens(self.grid, {"factor": self.factor}))

    def flops_per_token(self, seq_len: int, causal: bool) -> float:
        """0: counted per image (``flops_per_image``) by the model's accounting, not per text token."""
        return 0.0


@register("connector", "resampler", description="learned queries cross-attend to the patches, then an MLP (Perceiver resampler; Q-Former)")
class Resampler(nn.Module):
    """One Perceiver-resampler layer (Flamingo, Alayrac et al. 2022; BLIP-2's Q-Former in spirit):
    ``queries`` learned latents attend to every patch, then a residual MLP. M = queries tokens,
    however many patches; no positions, so the output does not depend on the patches' order.

        latents = queries + attn_proj(MHA(q = q(norm_q(queries)), k, v = kv(norm_kv(patches))))
        latents = latents + mlp_proj(GELU(mlp_fc(norm_mlp(latents))))

    The attention is explicit q·kᵀ → softmax → ·v (a Q×N score matrix per head, no mask): small,
    and matmuls torch's FLOP counter sees on every device.
    """

    def __init__(self, in_dim: int, grid: tuple[int, int], config, *, queries: int = 8, n_head: int = 4):
        super().__init__()
        reason = Resampler.check(config, {"queries": queries, "n_head": n_head})
        if reason:
            raise ValueError(f"connector 'resampler': {reason}")
        C = config.n_embd
        self.n_patches, self.n_head, self.head_dim = grid[0] * grid[1], n_head, C // n_head
        self.queries = nn.Parameter(torch.empty(queries, C))  # (Q, C), set in reset_parameters
        self.norm_q = LayerNorm(C, config)
        self.norm_kv = LayerNorm(in_dim, config)
        self.q = nn.Linear(C, C, bias=config.bias)
        self.kv = nn.Linear(in_dim, 2 * C, bias=config.bias)
        self.attn_proj = nn.Linear(C, C, bias=config.bias)
        self.norm_mlp = LayerNorm(C, config)
        self.mlp_fc = nn.Linear(C, 4 * C, bias=config.bias)
        self.mlp_proj = nn.Linear(4 * C, C, bias=config.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The learned queries ~ N(0, 0.02), the scale of the text's token embeddings (the GPT calls
        this on a stream keyed by the module's name)."""
        nn.init.normal_(self.queries, 0.0, 0.02)

    @staticmethod
    def tokens(grid: tuple[int, int], options: dict) -> int:
        return with_defaults(Resampler, options)["queries"]

    @staticmethod
    def check(config, options: dict) -> str | None:
        options = with_defaults(Resampler, options)
        if options["queries"] < 1:
            return f"queries={options['queries']} must be at least 1"
        if options["n_head"] < 1 or config.n_embd % options["n_head"]:
            return f"n_head={options['n_head']} must divide the language model's n_embd={config.n_embd}"
        return None

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, in_dim) -> (B, queries, n_embd)."""
        B, N, _ = x.shape
        Q, C = self.queries.shape
        H, D = self.n_head, self.head_dim
        # a copy per row, not expand(): torch's module tracker (FlopCounterMode) fails on a view of a
        # parameter taken under no_grad
        latents = self.queries.repeat(B, 1, 1)  # (B, Q, C)
        q = self.q(self.norm_q(latents)).view(B, Q, H, D).transpose(1, 2)  # (B, H, Q, D)
        k, v = self.kv(self.norm_kv(x)).split(C, dim=2)
        k = k.view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
        v = v.view(B, N, H, D).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, Q, N): every query sees every patch
        y = F.softmax(scores.float(), dim=-1).to(v.dtype) @ v  # (B, H, Q, D)
        latents = latents + self.attn_proj(y.transpose(1, 2).reshape(B, Q, C))
        return latents + self.mlp_proj(F.gelu(self.mlp_fc(self.norm_mlp(latents))))

    def flops_per_image(self) -> float:
        """Linear layers at their row counts (Q rows for the queries' layers, N for kv) plus q·kᵀ and
        probs·v: 2·H·Q·N·(2·head_dim)."""
        Q, N = self.queries.shape[0], self.n_patches
        flops = sum(_linear_flops(layer, Q) for layer in (self.q, self.attn_proj, self.mlp_fc, self.mlp_proj))
        flops += _linear_flops(self.kv, N)
        return flops + 2 * self.n_head * Q * N * (2 * self.head_dim)

    def flops_per_token(self, seq_len: int, causal: bool) -> float:
        """0: counted per image (``flops_per_image``) by the model's accounting, not per text token."""
        return 0.0
