"""Positional encodings.

Two kinds: added to the token embeddings (learned, sinusoidal) or applied inside attention (RoPE
rotates q and k; ALiBi adds a per-head linear bias to the scores). Attention modules ask the
positional object what it does through ``rotate`` and ``bias_slopes``; none of them knows an
encoding by name. What an encoding needs of the attention is declared by ``requires`` (the contract:
models/contract.py).

Positions are (T,), shared by every row of the batch, or (B, T) when rows are at different positions
(decoding a merged cache: models.gpt.Cache.merge); every method takes either.
"""

from __future__ import annotations

import math

import torch
from typing import Any, NamedTuple

from torch import Tensor, nn

from models.registry import register


def position_angles(pos: Tensor, dim: int, base: float) -> Tensor:
    """(T,) or (B, T) positions -> (T, dim/2) or (B, T, dim/2) angles pos·base^(-2i/dim), in float64.

    In float32 the angle at position 5000 is off by ~3e-4 rad, enough to break RoPE's dependence on
    the offset alone when evaluating beyond the trained context; float64 keeps it to ~1e-12.
    """
    wide = torch.float32 if pos.device.type == "mps" else torch.float64  # MPS has no float64
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=wide, device=pos.device) / dim)
    return pos.to(wide)[..., None] * inv_freq


class Positions(NamedTuple):
    """An encoding bound to one forward pass's positions: what every layer's attention is handed, so
    that what rotating needs (RoPE's cos and sin) is computed once per forward pass, not per layer."""

    pos: Tensor  # (T,) or (B, T)
    encoding: Positional
    rotation: Any

    def rotate(self, x: Tensor, pos: Tensor | None = None) -> Tensor:
        """Rotate queries or keys x (B, H, T, D) at this forward pass's positions."""
        return self.encoding.rotate(x, self.rotation)

    def bias_slopes(self) -> Tensor | None:
        return self.encoding.bias_slopes()


class Positional(nn.Module):
    """Base class: by default an encoding does nothing (NoPE)."""

    # the number of positions it can encode; None when it works at any length
    max_positions: int | None = None

    @staticmethod
    def requires(config, options: dict) -> frozenset[str]:
        """Attention features this encoding needs: 'rotate' (q/k rotation), 'bias' (score bias)."""
        return frozenset()

    def at(self, pos: Tensor) -> Positions:
        """This encoding bound to the positions of one forward pass."""
        return Positions(pos, self, self.rotation(pos))

    def embed(self, pos: Tensor) -> Tensor | None:
        """(T,) or (B, T) positions -> (T, C) or (B, T, C) vectors added to the token embeddings, or None."""
        return None

    def rotation(self, pos: Tensor) -> Any:
        """What rotating q and k at positions pos (T,) or (B, T) needs, computed once per forward pass; None."""
        return None

    def rotate(self, x: Tensor, rotation: Any) -> Tensor:
        """Rotate queries or keys x (B, H, T, D) with ``rotation(pos)``; identity by default."""
        return x

    def bias_slopes(self) -> Tensor | None:
        """Per-head slopes m (H,) of a score bias -m·(i - j), or None."""
        return None


@register("positional", "none")
class NoPositional(Positional):
    """No positional information (NoPE); causal masking alone breaks permutation symmetry."""

    def __init__(self, config):
        super().__init__()


@register("positional", "learned")
class LearnedPositional(Positional):
    """Learned absolute position embeddings (GPT-2); limited to block_size positions."""

    def __init__(self, config):
        super().__init__()
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.max_positions = config.block_size

    def embed(self, pos: Tensor) -> Tensor:
        return self.wpe(pos)


@register("positional", "sinusoidal")
class SinusoidalPositional(Positional):
    """Fixed sine/cosine embeddings of absolute position (Vaswani et al. 2017), scaled to the token embeddings.

    Vaswani et al. multiply token embeddings by √d so that they outweigh unit sinusoids; a GPT
    initialises token embeddings with std 0.02 instead, so the sinusoids are scaled to that size
    (`scale`) — unscaled, they drown the tokens and a small model barely learns.
    """

    def __init__(self, config, *, base: float = 10000.0, scale: float = 0.02):
        super().__init__()
        self.dim, self.base, self.scale = config.n_embd, base, scale

    def embed(self, pos: Tensor) -> Tensor:
        angles = position_angles(pos, self.dim, self.base)  # (T, C/2) or (B, T, C/2)
        pe = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2).float()  # (T, C): sin, cos interleaved
        return self.scale * pe[..., : self.dim]


@register("positional", "rope")
class RotaryPositional(Positional):
    """Rotary embeddings (Su et al. 2021): q and k rotated so q·k depends on the relative offset."""

    def __init__(self, config, *, base: float = 10000.0):
        super().__init__()
        self.head_dim, self.base = config.n_embd // config.n_head, base

    @staticmethod
    def requires(config, options: dict) -> frozenset[str]:
        return frozenset({"rotate"})

    def rotation(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (T, D) in float32; (B, 1, T, D) for positions (B, T), one per row for every head."""
        angles = position_angles(pos, self.head_dim, self.base)  # (T, D/2) or (B, T, D/2)
        angles = torch.cat([angles, angles], dim=-1)  # (T, D) or (B, T, D)
        if pos.dim() == 2:
            angles = angles[:, None]  # (B, 1, T, D): broadcasts over the heads of x (B, H, T, D)
        return angles.cos().float(), angles.sin().float()

    def rotate(self, x: Tensor, rotation: tuple[Tensor, Tensor]) -> Tensor:
        cos, sin = rotation
        x1, x2 = x.chunk(2, dim=-1)  # rotate pairs (i, i + D/2), as GPT-NeoX and LLaMA do
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype)).type_as(x)


def alibi_slopes(n_head: int) -> Tensor:
    """ALiBi's head slopes (Press et al. 2022): geometric sequence starting at 2^(-8/n).

    For a head count that is not a power of two, the paper takes the slopes of the closest smaller
    power of two and fills up with every other slope of the next power of two.
    """

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_two(closest)
    if closest < n_head:
        slopes += power_of_two(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes, dtype=torch.float32)


@register("positional", "alibi")
class AlibiPositional(Positional):
    """Attention with linear biases (Press et al. 2022): score − m_h·(i − j); extrapolates to longer inputs."""

    def __init__(self, config):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(config.n_head), persistent=False)

    @staticmethod
    def requires(config, options: dict) -> frozenset[str]:
        return frozenset({"bias"})

    def bias_slopes(self) -> Tensor:
        return self.slopes
