"""Mixture-of-experts feed-forward: a router sends each token to its top-k experts.

k = 1 is the Switch Transformer (Fedus et al. 2021). Experts are any registered MLP. Each expert
takes at most capacity = ⌈capacity_factor · k · N / E⌉ assignments, first choices before second
(GShard); the rest are dropped, i.e. pass through on the residual. Capacity binds in training only:
evaluation and KV-cache decoding route every token, so a token's output never depends on which other
tokens share its batch. Auxiliary losses: Switch's
load-balancing loss E·Σ f_i·P_i (1 at uniform routing, its minimum) and ST-MoE's router z-loss.
The module keeps no state between calls: it returns the weighted auxiliary loss and the routing
statistics with its output (``MoEAux``), so every micro-batch's count and ``torch.compile`` is safe.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.flops import count_params, matmul_flops_per_token
from models.registry import build_spec, ref, register


class MoEAux(NamedTuple):
    """What one MoE layer's forward pass gives besides its output."""

    loss: Tensor  # weighted balance + z loss: added to the LM loss, it trains the router
    stats: dict[str, Tensor]  # detached: balance_loss, z_loss, tokens_per_expert (E,), dropped


class MoE(nn.Module):
    """Top-k routed experts with capacity, load-balancing and z-loss; optional shared expert."""

    def __init__(
        self,
        config,
        *,
        n_experts: int = 8,
        top_k: int = 2,
        capacity_factor: float | None = 1.25,
        expert: ref("mlp") = "gelu",
        shared_expert: bool = False,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
    ):
        super().__init__()
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight
        self.router = nn.Linear(config.n_embd, n_experts, bias=False)
        self.experts = nn.ModuleList(build_spec("mlp", expert, config) for _ in range(n_experts))
        self.shared = build_spec("mlp", expert, config) if shared_expert else None

    @staticmethod
    def check(config, options: dict) -> str | None:
        if not 1 <= options["top_k"] <= options["n_experts"]:
            return f"top_k={options['top_k']} must be between 1 and n_experts={options['n_experts']}"
        if options["capacity_factor"] is not None and options["capacity_factor"] <= 0:
            return f"capacity_factor={options['capacity_factor']} must be positive (or null for no limit)"
        return None

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        """(B, T, C) -> ((B, T, C), MoEAux)."""
        B, T, C = x.shape
        tokens = x.reshape(-1, C)  # (N, C)
        N, E, k = tokens.shape[0], self.n_experts, self.top_k
        logits = self.router(tokens).float()  # (N, E)
        probs = logits.softmax(dim=-1)
        gate, chosen = probs.topk(k, dim=-1)  # (N, k)
        if k > 1:  # renormalise over the chosen experts; with k = 1 the raw probability trains the router
            gate = gate / gate.sum(dim=-1, keepdim=True)

        # assignments in priority order: every token's first choice, then every second choice
        expert_of = chosen.t().reshape(-1)  # (k·N,)
        token_of = torch.arange(N, device=x.device).repeat(k)
        gate_of = gate.t().reshape(-1)
        onehot = F.one_hot(expert_of, E)  # (k·N, E)
        per_expert = onehot.sum(0)  # assignments each expert was asked to take
        kept = torch.ones_like(expert_of, dtype=torch.bool)
        if self.capacity_factor is not None and self.training:  # evaluation and decoding are dropless
            capacity = math.ceil(self.capacity_factor * k * N / E)
            slot = (onehot.cumsum(0) * onehot).sum(-1) - 1  # rank of the assignment within its expert
            kept = slot < capacity

        out = torch.zeros_like(tokens)
        order = kept.nonzero().squeeze(1)
        order = order[expert_of[order].argsort(stable=True)]  # kept assignments grouped by expert
        sizes = torch.bincount(expert_of[order], minlength=E).tolist()
        for expert, idx in zip(self.experts, order.split(sizes)):
            if idx.numel():
                tok = token_of[idx]
                out.index_add_(0, tok, expert(tokens[tok]) * gate_of[idx, None].to(tokens.dtype))
        if self.shared is not None:
            out = out + self.shared(tokens)

        fraction = per_expert.float() / (k * N)  # f_i: share of assignments routed to expert i
        balance = E * (fraction * probs.mean(0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()
        stats = {
            "balance_loss": balance.detach(),
            "z_loss": z.detach(),
            "tokens_per_expert": per_expert.detach(),
            "dropped": (~kept).sum().detach(),
        }
        return out.view(B, T, C), MoEAux(self.balance_loss_weight * balance + self.z_loss_weight * z, stats)

    def flops_per_token(self, seq_len: int, causal: bool) -> float:
        """Router, k experts and the shared expert: what one token costs, not all experts."""
        expert = matmul_flops_per_token(self.experts[0], seq_len, causal)
        shared = matmul_flops_per_token(self.shared, seq_len, causal) if self.shared is not None else 0
        return 2 * self.router.in_features * self.n_experts + self.top_k * expert + shared

    def inactive_params(self) -> int:
        """Parameters a token does not use: the n_experts − top_k experts it is not routed to."""
        return (self.n_experts - self.top_k) * count_params(self.experts[0])


register("moe", "topk", description="top-k routed MoE (GShard; Mixtral), any registered MLP as expert")(MoE)
register("moe", "switch", description="Switch Transformer MoE: top-1 routing (Fedus et al. 2021)",
         fixed={"top_k": 1})(MoE)
