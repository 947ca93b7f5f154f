"""Normalisation layers. Context: (dim, config); used before attention and MLP, at the end of the
model, and on q and k when attention's ``qk_norm`` is on."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.registry import register


@register("norm", "layernorm")
class LayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016) with an optional bias (default: the model's `bias`)."""

    affine_output = True  # output = weight ⊙ n(x) (+ bias): AWQ folds per-channel scales into them

    def __init__(self, dim: int, config=None, *, bias: bool | None = None, eps: float = 1e-5):
        super().__init__()
        bias = getattr(config, "bias", True) if bias is None else bias
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


@register("norm", "rmsnorm")
class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): rescale by the root mean square, no centring, no bias."""

    affine_output = True  # output = weight ⊙ n(x) (+ bias): AWQ folds per-channel scales into them

    def __init__(self, dim: int, config=None, *, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)

