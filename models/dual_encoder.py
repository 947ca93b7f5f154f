"""A dual encoder for contrastive image–text pretraining (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023).

The image encoder is the config's ``vision`` member; the text encoder is the GPT itself (its blocks,
causal, as CLIP's text transformer), read at the last labelled position, the one that predicts the
caption's end (CLIP reads its [EOS] token). Both are projected into one space of n_embd, normalised,
and scored by the config's ``contrastive`` loss. The image side is mean-pooled over its patches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.gpt import GPT, Output
from models.flops import matmul_flops_per_token
from models.registry import build_spec


class DualEncoder(GPT):
    """forward(captions (B, T), targets (B, T), images=(B, channels, H, W)) -> Output(logits (B, B) pair
    scores, the contrastive loss, []). Row i of the batch is a matching image and caption."""

    def add_modules(self, config) -> None:
        self.image_proj = nn.Linear(self.vision.width, config.n_embd, bias=False)
        self.text_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.pair_loss = build_spec("contrastive", config.contrastive)

    def embed(self, idx: Tensor, targets: Tensor, images: Tensor) -> tuple[Tensor, Tensor]:
        """-> (image (B, D), text (B, D)) embeddings, each L2-normalised."""
        image = self.image_proj(self.vision(images).mean(dim=1))  # patches pooled: (B, D)
        text, _ = self.features(idx)  # (B, T, C)
        labelled = targets >= 0
        if not bool(labelled.any(dim=1).all()):
            raise ValueError("every caption needs a labelled position: the text is read where it predicts its end")
        # the last labelled position of each row: T − 1 − (first labelled position of the reversed row)
        last = idx.shape[1] - 1 - labelled.flip(1).int().argmax(dim=1)
        text = self.text_proj(text[torch.arange(idx.shape[0], device=idx.device), last])
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)

    def forward(self, idx: Tensor, targets: Tensor | None = None, cache=None, images: Tensor | None = None) -> Output:
        if images is None or targets is None or cache is not None:
            raise ValueError("a contrastive dual encoder scores image–caption pairs: it takes captions, their "
                             "targets and images, and does not decode")
        image, text = self.embed(idx, targets, images)
        return Output(self.pair_loss.logits(image, text), self.pair_loss(image, text), [])

    def flops_per_token(self, seq_len: int, causal: bool) -> float:
        """Per caption token: the text encoder's blocks, its projection once per caption and the
        image side once per image (the LM head is never applied)."""
        text = sum(matmul_flops_per_token(b, seq_len, causal) for b in self.blocks)
        per_pair = 2 * (self.image_proj.in_features + self.text_proj.in_features) * self.text_proj.out_features
        return text + (self.vision.flops_per_image() + per_pair) / seq_len
