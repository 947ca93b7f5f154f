"""Based (Arora et al. 2024, "Simple linear attention language models balance the recall-throughput
tradeoff"): linear attention with a 2nd-order Taylor feature map for recall over the whole context,
plus softmax attention over a short sliding window for precise local shifts and comparisons.

Based interleaves the two (and gated convolutions) as separate layers; here they are two branches of
one layer on the same input, summed before the output projection, so that one ``attention`` spec
gives a model both and its decoding state stays of constant size: the linear branch's
(1 + d + d², head_dim + 1) state per head and the window's last window − 1 keys and values.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from models.attention import Attend, Attention, KVCache, visible_keys
from models.flops import attention_flops
from models.mixers import RecurrentMixer, _heads, _merge_heads, check_options
from models.recurrent import ShortConv, StateCache, chunked_flops
from models.registry import ref, register


def taylor_features(x: Tensor) -> Tensor:
    """Based's feature map, (..., d) -> (..., 1 + d + d²): [1, x/d^¼, (x ⊗ x)/(√2·√d)], so that
    φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d), exp(q·k/√d) to 2nd order. That is at least ½ for any q, k
    (1 + s + s²/2 has no real root): the normaliser never nears zero, as exp's would not."""
    d = x.shape[-1]
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)  # (..., d²): elementwise, no matmul to count
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, outer / (math.sqrt(2) * math.sqrt(d))], -1)


class BasedCache:
    """Both branches' decoding state: a ``StateCache`` (the linear branch's state "S" and the conv's
    last inputs "conv") and a rolling ``KVCache`` of the window's last window − 1 keys and values.
    Each part updates by assigning new tensors; a shallow copy copies the two parts, so that decoding
    into the copy leaves the original as it was (bench.kernels.cases._copy_cache)."""

    def __init__(self, window: int | None = None):
        self.state = StateCache()
        self.kv = KVCache(window)

    def __copy__(self) -> BasedCache:
        copied = BasedCache.__new__(BasedCache)
        copied.state, copied.kv = copy.copy(self.state), copy.copy(self.kv)
        return copied

    def nbytes(self) -> int:
        return self.state.nbytes() + self.kv.nbytes()

    @classmethod
    def merge(cls, caches: list[BasedCache]) -> BasedCache:
        """The rows of several filled caches in one: states stacked, window keys right-aligned."""
        merged = cls.__new__(cls)
        merged.state = StateCache.merge([c.state for c in caches])
        merged.kv = KVCache.merge([c.kv for c in caches])
        return merged

    def select(self, rows: Tensor) -> None:
        """Keep only these rows (indices (B',))."""
        self.state.select(rows)
        self.kv.select(rows)


class Based(RecurrentMixer):
    """Taylor linear attention plus sliding-window softmax attention, summed (see the module docstring).

    Linear branch: per head q, k projected to feature_dim = d, φ = ``taylor_features``, values
    head_dim; o_t = φ(q_t)·Σ_{s≤t} φ(k_s)ᵀv_s / (φ(q_t)·Σ_{s≤t} φ(k_s) + eps), the normaliser carried
    as an extra value column (as ``LinearAttention``), no decay; not rotated, as in Based (causality and
    the window branch give the order). conv > 0 adds a short causal convolution on its q, k, v.
    Window branch: its own q, k, v (head_dim per head), rotated by a rotating encoding, softmax over
    the last `window` tokens through ``Attend`` (the kernel of `backend`).
    """

    rotates = True  # the window branch rotates its q and k

    def __init__(self, config, *, feature_dim: int = 16, window: int = 16,
                 backend: ref("attention_backend") = "auto", conv: int = 0):
        super().__init__()
        C, H = config.n_embd, config.n_head
        self.n_head, self.head_dim, self.feature_dim, self.window = H, config.head_dim, feature_dim, window
        self.c_taylor = nn.Linear(C, 2 * H * feature_dim + C, bias=config.bias)  # linear branch: q, k (d per head), v
        self.conv = ShortConv(2 * H * feature_dim + C, conv, config.bias) if conv else None
        self.c_window = nn.Linear(C, 3 * C, bias=config.bias)  # window branch: q, k, v
        self.attend = Attend(backend, window, config.dropout)
        self.c_proj = nn.Linear(C, C, bias=config.bias)

    @staticmethod
    def check(config, options: dict) -> str | None:
        if options.get("feature_dim", 16) < 1 or options.get("window", 16) < 1:
            return f"feature_dim={options.get('feature_dim')} and window={options.get('window')} must be at least 1"
        return check_options(options)

    @staticmethod
    def requires(config, options: dict) -> frozenset[str]:
        """The window branch needs a kernel that restricts queries to a window."""
        return frozenset({"window"})

    @staticmethod
    def handles(config, options: dict) -> frozenset[str]:
        """What the window branch's kernel can do (as ``Attention.handles``: window, dropout, cache,
        ragged), plus rotation; no score bias (the linear branch could not add one) nor value residual."""
        return Attention.handles(config, options) & {"rotate", "window", "dropout", "cache", "ragged"}

    def forward(self, x: Tensor, positional, pos: Tensor, cache: BasedCache | None = None) -> Tensor:
        """x (B, T, C) at positions pos (T,) or (B, T) -> (B, T, C); the cache's parts are replaced."""
        state = cache.state.tensors if cache is not None else {}
        y, new = self.taylor(x, state)  # (B, H, T, D)
        q, k, v = (_heads(t, self.n_head) for t in self.c_window(x).chunk(3, dim=-1))  # (B, H, T, D) each
        q, k = positional.rotate(q, pos), positional.rotate(k, pos)
        y = y + self.attend(q, k, v, pos, cache.kv if cache is not None else None)  # (B, H, T, D)
        if cache is not None:
            cache.state.set(**new)
        return self.c_proj(_merge_heads(y))

    def taylor(self, x: Tensor, state: dict) -> tuple[Tensor, dict]:
        """The linear branch: x (B, T, C) -> (each head's output (B, H, T, D), its new state)."""
        qkv, new = self.c_taylor(x), {}
        if self.conv is not None:
            qkv, new["conv"] = self.conv(qkv, state.get("conv"))
        Hd = self.n_head * self.feature_dim
        q, k, v = (_heads(t, self.n_head) for t in qkv.split([Hd, Hd, x.shape[-1]], dim=-1))
        q, k = taylor_features(q), taylor_features(k)  # (B, H, T, 1 + d + d²)
        o, new["S"] = self.normalised(q, k, v, state.get("S"))
        return o, new

    def new_cache(self) -> BasedCache:
        return BasedCache(self.window)

    def expanded_dim(self) -> int:
        """Features per head after the Taylor map: 1 + d + d²."""
        return 1 + self.feature_dim + self.feature_dim ** 2

    def extra_flops_per_token(self, seq_len: int, causal: bool) -> float:
        """The chunked recurrence over (1 + d + d²)-wide keys and head_dim + 1 values (the normaliser),
        and the window's q·kᵀ and probs·v (causal=False: all T keys, what the math kernel computes)."""
        linear = self.n_head * chunked_flops(seq_len, self.expanded_dim(), self.head_dim + 1, self.chunk)
        window = visible_keys(seq_len, self.window, causal)
        return linear + attention_flops(1, self.n_head, 1, window, self.head_dim, self.head_dim)

    def state_elements(self) -> int:
        """The linear state and the window's last window − 1 keys and values (the conv's aside)."""
        linear = self.n_head * self.expanded_dim() * (self.head_dim + 1)
        return linear + (self.window - 1) * 2 * self.n_head * self.head_dim


register("attention", "based", description="Taylor linear attention + sliding-window softmax (Based, Arora et al. 2024)")(Based)
