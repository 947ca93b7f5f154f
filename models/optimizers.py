"""Optimizers, a component family like the model's parts: ``train.optimizer: {name: ..., options}``.

A factory takes the model and the run's ``TrainConfig`` (lr, beta1/beta2, weight_decay) and returns
the torch optimizers that together update every trainable parameter exactly once. Each param group
may carry ``lr_scale``: its learning rate relative to ``train.lr``; the trainer's schedule sets
``lr = schedule(step) · lr_scale`` on every group of every optimizer each step, clips the gradients of
all of them together and checkpoints each one's state.

    adamw  torch AdamW (fused where available); weight decay on matrices, none on biases and gains
    muon   Muon on the blocks' 2-D weight matrices, AdamW on embeddings, head, norms and biases
    lion   Lion (sign of interpolated momentum), decoupled weight decay as in the paper

AdamW and Lion decay a weight by lr × weight_decay per step, so their decay is matched when that
product is (Lion's paper: a 3-10× smaller lr with a 3-10× larger weight decay). ``lr_weight_decay``
states the product itself (weight_decay = lr_weight_decay / train.lr), so the two stay matched
whatever learning rate each is tuned to.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from models.registry import register


def decay_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float, lr: float | None = None,
                 **extra) -> list[dict]:
    """nanoGPT's grouping: weight decay on matrices (≥ 2-D), none on biases and norm gains.
    A parameter with its own peak learning rate (``p.peak_lr``, set by the GPT from ``vision.lr``)
    goes in groups of its own whose ``lr_scale`` is peak_lr / lr (times any given). Empty groups are left out."""
    scale = extra.pop("lr_scale", 1.0)
    own = lambda p: getattr(p, "peak_lr", None) if lr else None  # noqa: E731
    groups = []
    for peak in dict.fromkeys(own(p) for _, p in params):  # in order of first appearance
        mine = [p for _, p in params if own(p) == peak]
        group_scale = scale if peak is None else peak / lr  # its own peak, whatever the group's scale
        groups += [{"params": [p for p in mine if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": group_scale, **extra},
                   {"params": [p for p in mine if p.dim() < 2], "weight_decay": 0.0, "lr_scale": group_scale, **extra}]
    return [g for g in groups if g["params"]]


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def weight_decay(train, lr_weight_decay: float | None) -> float:
    """train.weight_decay, or the decay that makes lr × weight_decay equal lr_weight_decay."""
    return train.weight_decay if lr_weight_decay is None else lr_weight_decay / train.lr


@register("optimizer", "adamw", description="AdamW (Loshchilov & Hutter 2019), fused where the platform has it; "
          "betas (train.beta1, train.beta2), decay on matrices only")
def adamw(model: nn.Module, train, *, lr_weight_decay: float | None = None) -> list[torch.optim.Optimizer]:
    """lr_weight_decay: the per-step decay lr × weight_decay to hold at any lr (default: train.weight_decay)."""
    groups = decay_groups(trainable(model), weight_decay(train, lr_weight_decay), train.lr)
    betas = (train.beta1, train.beta2)
    try:  # fused AdamW where the platform has it (CUDA; CPU in recent torch)
        return [torch.optim.AdamW(groups, lr=train.lr, betas=betas, fused=True)]
    except (RuntimeError, TypeError):
        return [torch.optim.AdamW(groups, lr=train.lr, betas=betas)]


def muon_matrices(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(what Muon updates, what AdamW updates): the 2-D weight matrices inside the transformer blocks,
    and everything else: embeddings and the (possibly tied) LM head, norms, biases, and tensors of
    other ranks such as stacked MoE experts (Muon orthogonalises one matrix at a time)."""
    hidden, rest = [], []
    for name, p in trainable(model):
        (hidden if p.dim() == 2 and name.startswith("blocks.") else rest).append((name, p))
    return hidden, rest


def _muon_probe() -> str | None:
    return None if hasattr(torch.optim, "Muon") else f"needs torch.optim.Muon (torch ≥ 2.9; this is {torch.__version__})"


def _muon_check(train, options: dict) -> str | None:
    distributed = getattr(train, "distributed", None)
    if distributed is not None and distributed.strategy == "deepspeed":
        return ("muon cannot train under DeepSpeed ZeRO: ZeRO flattens and partitions the parameters, and "
                "Newton–Schulz needs each weight matrix whole; use strategy ddp or fsdp")
    return None


def muon(model: nn.Module, train, *, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
         adjust_lr: Literal["original", "match_rms_adamw"] = "original",
         adamw_lr: float | None = None, lr_weight_decay: float | None = None) -> list[torch.optim.Optimizer]:
    """train.lr is Muon's learning rate; the AdamW part follows the same schedule at `adamw_lr`
    (default: train.lr, tied: a tuned lr tunes both). `adjust_lr`: 'original' scales by √max(1,
    rows/cols) (Keller Jordan's), 'match_rms_adamw' by 0.2·√max(rows, cols) (Moonshot's: AdamW's
    learning rates suit both parts). lr_weight_decay: as AdamW's."""
    hidden, rest = muon_matrices(model)
    decay = weight_decay(train, lr_weight_decay)
    optimizers = []
    if hidden:
        optimizers.append(torch.optim.Muon([p for _, p in hidden], lr=train.lr, weight_decay=decay,
                                           momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                           adjust_lr_fn=adjust_lr))
    if rest:
        scale = (adamw_lr or train.lr) / train.lr
        optimizers.append(torch.optim.AdamW(decay_groups(rest, decay, train.lr, lr_scale=scale),
                                            lr=train.lr * scale, betas=(train.beta1, train.beta2)))
    return optimizers


muon.check = _muon_check
register("optimizer", "muon", probe=_muon_probe,
         description="Muon (Jordan et al. 2024): momentum, then Newton–Schulz orthogonalisation (quintic "
         "3.4445, −4.7750, 2.0315) of each 2-D block matrix, lr scaled by √max(1, rows/cols); AdamW for the rest")(muon)


@register("optimizer", "lion", description="Lion (Chen et al. 2023): the sign of interpolated momentum, "
          "decoupled weight decay; use a 3–10× smaller lr and larger weight_decay than AdamW's")
def lion(model: nn.Module, train, *, beta1: float = 0.9, beta2: float = 0.99,
         lr_weight_decay: float | None = None) -> list[torch.optim.Optimizer]:
    """lr_weight_decay: the per-step decay lr × weight_decay to hold at any lr (default: train.weight_decay);
    give AdamW the same to compare them at matched decay."""
    from lion_pytorch import Lion

    return [Lion(decay_groups(trainable(model), weight_decay(train, lr_weight_decay), train.lr), lr=train.lr, betas=(beta1, beta2))]
