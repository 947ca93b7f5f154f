"""FLOPs and parameters of a module tree: what ``models.accounting`` builds a config's counts from.

FLOPs count matmuls only (2 per multiply-add): every ``nn.Linear``, plus what a module declares beyond
its linear layers (``extra_flops_per_token``), or its own total (``flops_per_token``). Depends on no
model class, so components can count themselves with it.
"""

from __future__ import annotations

from torch import nn


def count_params(module: nn.Module) -> int:
    """Unique parameters (a tied embedding and LM head count once)."""
    return sum(p.numel() for p in module.parameters())


def active_params(module: nn.Module) -> int:
    """Parameters one token uses: all, minus experts a token is not routed to."""
    return count_params(module) - sum(m.inactive_params() for m in module.modules() if hasattr(m, "inactive_params"))


def matmul_flops_per_token(module: nn.Module, seq_len: int, causal: bool) -> float:
    """Forward matmul FLOPs per token of a module processing sequences of seq_len tokens."""
    if hasattr(module, "flops_per_token"):
        return module.flops_per_token(seq_len, causal)
    flops = 0.0
    if isinstance(module, nn.Linear):
        flops += 2 * module.in_features * module.out_features
    if hasattr(module, "extra_flops_per_token"):
        flops += module.extra_flops_per_token(seq_len, causal)
    return flops + sum(matmul_flops_per_token(child, seq_len, causal) for child in module.children())


def attention_flops(batch: int, n_head: int, q_len: int, mean_visible_keys: float, d_qk: int, d_v: int) -> float:
    """Forward FLOPs of q·kᵀ and probs·v, as FlashAttention's benchmarks count them:
    2·B·H_q·N_q·N̄_k·(d_qk + d_v) — 4·B·H·N²·d for full attention, about half that when causal."""
    return 2 * batch * n_head * q_len * mean_visible_keys * (d_qk + d_v)


# FlashAttention's convention: the backward pass costs 2.5 forward passes (it recomputes q·kᵀ).
ATTENTION_BACKWARD = 2.5


def palm_flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token in the PaLM/nanoGPT form 6·N + 12·L·H·Q·T.

    N excludes position embeddings and counts a tied embedding once; the attention term counts the
    full (non-causal) score matrix.
    """
    return 6 * n_params + 12 * n_layer * n_head * head_dim * seq_len
