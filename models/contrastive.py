"""Contrastive image–text losses. Context: none, options only. Inputs: image and text embeddings
(B, D), each L2-normalised, row i of one matching row i of the other; output: a scalar loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.registry import register


def _check_pair(image: Tensor, text: Tensor) -> None:
    if image.ndim != 2 or image.shape != text.shape:
        raise ValueError(f"image and text must both be (B, D) of the same shape, got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")


@register("contrastive", "clip", description="CLIP's symmetric softmax InfoNCE with a learnable temperature")
class ClipLoss(nn.Module):
    """CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
    Supervision"): logits = exp(t)·I·Tᵀ, loss = (CE(logits, i) + CE(logitsᵀ, i)) / 2.

    ``t`` (``logit_scale``) is learnable, initialised to log(1/init_temperature) (the paper's 0.07);
    exp(t) is clamped at ``max_scale`` (the paper's 100) so the logits cannot blow up; past the
    clamp ``t`` gets no gradient, as with CLIP's in-place clamp of the parameter.
    """

    def __init__(self, *, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        if init_temperature <= 0 or max_scale <= 0:
            raise ValueError("init_temperature and max_scale must be positive")
        self.init_temperature = init_temperature
        self.max_scale = max_scale
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1.0 / self.init_temperature))

    def scale(self) -> Tensor:
        """exp(t), clamped at max_scale."""
        return self.logit_scale.exp().clamp(max=self.max_scale)

    def logits(self, image: Tensor, text: Tensor) -> Tensor:
        _check_pair(image, text)
        return self.scale() * image @ text.T

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        logits = self.logits(image, text)
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def extra_repr(self) -> str:
        return f"scale={self.scale().item():.4g}, max_scale={self.max_scale:g}"


@register("contrastive", "siglip", description="SigLIP's pairwise sigmoid loss with a learnable scale and bias")
class SigLipLoss(nn.Module):
    """SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"): every pair is a
    binary problem, logits = exp(t')·I·Tᵀ + b, z = +1 on the diagonal and −1 off it,
    loss = −(1/B)·Σ_ij log σ(z_ij·logits_ij) (the paper's normalisation: all B² pairs over B).

    ``t'`` (``logit_scale``) starts at log(init_scale) = log 10 and ``b`` (``logit_bias``) at −10, as
    in the paper, so the B²−B negatives do not swamp the start of training.
    """

    def __init__(self, *, init_scale: float = 10.0, init_bias: float = -10.0):
        super().__init__()
        if init_scale <= 0:
            raise ValueError("init_scale must be positive")
        self.init_scale = init_scale
        self.init_bias = init_bias
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.logit_bias = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.logit_scale.fill_(math.log(self.init_scale))
            self.logit_bias.fill_(self.init_bias)

    def logits(self, image: Tensor, text: Tensor) -> Tensor:
        _check_pair(image, text)
        return self.logit_scale.exp() * image @ text.T + self.logit_bias

    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        logits = self.logits(image, text)
        n = logits.shape[0]
        z = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
        return -F.logsigmoid(z * logits).sum() / n

    def extra_repr(self) -> str:
        return f"scale={self.logit_scale.exp().item():.4g}, bias={self.logit_bias.item():.4g}"


def recall_at_1(scores: Tensor) -> tuple[float, float]:
    """(image→text, text→image) recall@1 of a (B, B) score matrix whose diagonal holds the true pairs
    (row i: image i against every text; column j: text j against every image).

    Strict on ties: a row (column) counts as a hit only when its true pair scores strictly above
    every other entry, i.e. is the unique argmax; a tie for the top is a miss whatever the order
    (torch.argmax would pick the first, which would favour whichever pair comes first). A NaN on
    the diagonal is a miss (it compares below everything).
    """
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square (B, B) matrix, got {tuple(scores.shape)}")
    diag = scores.diagonal()
    image_hits = (scores >= diag[:, None]).sum(dim=1) == 1  # only the true pair itself reaches its score
    text_hits = (scores >= diag[None, :]).sum(dim=0) == 1
    return image_hits.float().mean().item(), text_hits.float().mean().item()
