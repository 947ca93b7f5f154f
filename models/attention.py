"""Causal self-attention: multi-head, grouped-query and multi-query, optionally windowed.

One module covers the family: ``n_kv_head`` key/value heads shared by groups of query heads (MHA:
n_kv_head = n_head; MQA: 1), an optional sliding window, optional QK-norm, and a kernel backend
from the ``attention_backend`` family. Positional encodings are asked, not named: the module lets
the positional object rotate q and k and hands its score-bias slopes to the kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.flops import attention_flops
from models.attention_backends import PADDING_POSITION, Mask
from models.registry import REQUIRED, build_spec, get, ref, register, resolve


def merge_rows(parts: list[Tensor], dim: int, fill: float = 0) -> Tensor:
    """Several caches' tensors (rows in dim 0, tokens in `dim`) as one: each left-padded with `fill`
    to the most tokens, then stacked row after row, so that every row's newest token is in the last column."""
    width = max(part.shape[dim] for part in parts)
    padded = []
    for part in parts:
        shape = list(part.shape)
        shape[dim] = width - part.shape[dim]
        padded.append(torch.cat([part.new_full(shape, fill), part], dim))
    return torch.cat(padded, 0)


def row_positions(pos: Tensor, rows: int) -> Tensor:
    """A cache's key positions (T,) shared by its rows, or already (B, T), as (rows, T)."""
    return pos.expand(rows, -1) if pos.dim() == 1 else pos


def trim_padding(pos: Tensor) -> tuple[int, Tensor]:
    """Key positions (B, T) of right-aligned rows -> (the first column that is not padding in every row,
    the positions from there on: (T',) when the rows now agree, as rows of one length do, else (B, T'))."""
    start = int((pos != PADDING_POSITION).any(0).nonzero()[0])  # padding is leading: left-padded rows
    pos = pos[:, start:]
    return start, pos[0] if bool((pos == pos[:1]).all()) else pos


class RowCache:
    """What a layer's cache of two tensors (``tensors``, tokens along ``time_dim``, rows first) shares:
    bytes held, and rows at different positions — ``merge`` right-aligns and left-pads the rows of
    several caches with zeros at PADDING_POSITION, which no query sees; ``select`` keeps some rows."""

    tensors: tuple[str, str] = ("k", "v")
    time_dim = 2

    def nbytes(self) -> int:
        """Bytes of the tensors held (padding included)."""
        held = [getattr(self, name) for name in self.tensors]
        return 0 if held[0] is None else sum(t.numel() * t.element_size() for t in held)

    @classmethod
    def merge(cls, caches: list[RowCache]) -> RowCache:
        """The rows of several filled caches (of one model's layer) in one, right-aligned and left-padded."""
        merged = cls()
        merged.keep = caches[0].keep
        parts = [merge_rows([getattr(c, name) for c in caches], cls.time_dim) for name in cls.tensors]
        pos = merge_rows([row_positions(c.pos, getattr(c, cls.tensors[0]).shape[0]) for c in caches], 1, PADDING_POSITION)
        merged._keep_rows(parts, pos)
        return merged

    def select(self, rows: Tensor) -> None:
        """Keep only these rows (indices (B',)), dropping the columns that are padding in all of them."""
        held = [getattr(self, name) for name in self.tensors]
        rows = rows.to(held[0].device)
        self._keep_rows([t[rows] for t in held], row_positions(self.pos, held[0].shape[0])[rows])

    def _keep_rows(self, parts: list[Tensor], pos: Tensor) -> None:
        """Hold the tensors at pos (B, T) without the leading columns that no row uses."""
        start, self.pos = trim_padding(pos)
        for name, t in zip(self.tensors, parts):
            setattr(self, name, t.narrow(self.time_dim, start, t.shape[self.time_dim] - start))


class KVCache(RowCache):
    """Keys and values of one layer for the tokens decoded so far.

    With a sliding window only the last window − 1 tokens are kept (a rolling cache), so the next
    token attends to exactly `window` keys without a mask.

    Rows at different positions (``merge``): the rows are right-aligned, shorter ones left-padded
    with zero keys and values at PADDING_POSITION, which no query sees; the rolling cache keeps each
    row's last window − 1 columns, which are its newest tokens.
    """

    def __init__(self, window: int | None = None):
        self.keep = None if window is None else window - 1
        self.k: Tensor | None = None  # (B, Hkv, T, D)
        self.v: Tensor | None = None
        self.pos: Tensor | None = None  # (T,), or (B, T) when the rows are at different positions

    def update(self, k: Tensor, v: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Append this step's keys/values at positions pos (T,) or (B, T); return all that the step's
        queries may attend to."""
        if self.k is not None:  # new tensors, never in-place: a shallow copy of the cache stays valid
            k, v, pos = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2), torch.cat([self.pos, pos], -1)
        start = 0 if self.keep is None else max(0, k.shape[2] - self.keep)
        self.k, self.v, self.pos = k[:, :, start:], v[:, :, start:], pos[..., start:]
        return k, v, pos


class Attend(nn.Module):
    """What every softmax attention shares after its projections: cache → mask → kernel.

    It takes each head's queries and the two tensors a layer caches per token (keys and values; MLA:
    its latent and shared rope key), appends those to the cache, turns them into each head's keys and
    values (``expand``: the identity unless the attention caches something else), builds the mask
    from the token positions and runs the kernel of the ``attention_backend`` family.
    """

    def __init__(self, backend: dict | str, window: int | None, dropout: float):
        super().__init__()
        self.kernel = build_spec("attention_backend", backend)
        self.window = window
        self.dropout = dropout
        self.bidirectional = False  # causal; an encoder (models.vision) sets it on its layers' Attend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, cache: RowCache | None = None,
                slopes: Tensor | None = None, expand=None) -> Tensor:
        """q (B, H, T, Dq) at positions pos (T,) or (B, T); k, v: this step's cached tensors -> (B, H, T, Dv).
        slopes (H,): ALiBi-style score bias per query head, or None."""
        k_pos = pos
        if cache is not None:
            k, v, k_pos = cache.update(k, v, pos)  # every token the step's queries may attend to
        if expand is not None:
            k, v = expand(k, v)  # (B, Hkv, Tk, Dq), (B, Hkv, Tk, Dv)
        mask = Mask(pos, k_pos, self.window, slopes, self.bidirectional)
        return self.kernel(q, k, v, mask, self.dropout if self.training else 0.0)


class SelfAttention(nn.Module):
    """project → attend → output: the one shape of every attention here.

    A subclass builds ``self.attend`` (an ``Attend``) and the projections, and defines ``project``;
    it may override ``expand`` (what the cache holds → keys and values), ``score_slopes``, ``combine``
    (the kernel's heads → the heads to merge) and ``output`` (e.g. to gate the heads' output).
    """

    def forward(self, x: Tensor, positional, pos: Tensor, cache: RowCache | None = None, values=None) -> Tensor:
        """x (B, T, C) at positions pos (T,), or (B, T) when the cache's rows differ -> (B, T, C)."""
        B, T, _ = x.shape
        q, k, v = self.project(x, positional, pos, values)
        y = self.attend(q, k, v, pos, cache, self.score_slopes(positional), self.expand)  # (B, H, T, Dv)
        y = self.combine(y).transpose(1, 2).contiguous().view(B, T, -1)  # heads merged: (B, T, H·Dv)
        return self.output(y, x)

    def project(self, x: Tensor, positional, pos: Tensor, values=None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, C) -> each head's queries (B, H, T, Dq) and this step's two cached tensors."""
        raise NotImplementedError

    expand = None  # the cached tensors are the keys and values themselves

    def score_slopes(self, positional) -> Tensor | None:
        """Each query head's score-bias slope (ALiBi), asked of the positional encoding."""
        return positional.bias_slopes()

    def combine(self, y: Tensor) -> Tensor:
        """The kernel's output (B, H, T, Dv) -> the heads the output projection reads."""
        return y

    def output(self, y: Tensor, x: Tensor) -> Tensor:
        """The merged heads y (B, T, H·Dv) -> (B, T, C); x (B, T, C) is the attention's input."""
        return self.resid_dropout(self.c_proj(y))


class Attention(SelfAttention):
    """Causal self-attention with n_kv_head key/value heads and an optional sliding window."""

    def __init__(
        self,
        config,
        *,
        n_kv_head: int | None = None,
        window: int | None = None,
        backend: ref("attention_backend") = "auto",
        qk_norm: bool = False,
    ):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = n_kv_head or config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.window = window
        kv_dim = self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = build_spec("norm", config.norm, self.head_dim, config) if qk_norm else None
        self.k_norm = build_spec("norm", config.norm, self.head_dim, config) if qk_norm else None
        self.attend = Attend(backend, window, config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    @staticmethod
    def check(config, options: dict) -> str | None:
        """Why these options cannot work with this config, or None."""
        n_kv = options.get("n_kv_head") or config.n_head
        if n_kv < 1 or config.n_head % n_kv:
            return f"n_kv_head={n_kv} must divide n_head={config.n_head}"
        if options.get("window") is not None and options["window"] < 1:
            return f"window={options['window']} must be at least 1"
        return None

    @staticmethod
    def requires(config, options: dict) -> frozenset[str]:
        """Attention features these options need: a window needs a kernel that can do one."""
        return frozenset({"window"}) if options.get("window") else frozenset()

    @staticmethod
    def handles(config, options: dict) -> frozenset[str]:
        """Rotation always; score bias, dropout, window, KV-cache decoding and decoding rows at
        different positions (ragged) as far as its kernel can."""
        backend = resolve("attention_backend", options["backend"])
        can = get("attention_backend", backend["name"]).factory.capabilities(backend)
        return frozenset({"rotate", "value_residual"} | (can & {"bias", "dropout", "window"})
                         | ({"cache"} if "decode" in can else set())
                         | ({"ragged"} if {"decode", "ragged"} <= can else set()))

    def project(self, x: Tensor, positional, pos: Tensor, values=None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, C) -> q (B, H, T, D), k and v (B, Hkv, T, D): rotated, normalised, values mixed."""
        B, T, C = x.shape
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.q_norm is not None:
            # CUDA autocast runs norms in fp32: back to v's dtype, as every kernel wants one dtype
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        q, k = positional.rotate(q, pos), positional.rotate(k, pos)
        if values is not None:  # value residual: mixed with the first layer's before caching
            v = values(v)
        return q, k, v

    def new_cache(self) -> KVCache:
        return KVCache(self.window)

    def init_blocks(self) -> dict[str, list[tuple[str, int]]]:
        """Row blocks of the fused q/k/v projection, each drawn from its own keyed stream at init:
        MHA, GQA and MQA with the same seed then share the queries and the k/v heads they have in common."""
        D = self.head_dim
        heads = [(f"{kind}{h}", D) for kind in "kv" for h in range(self.n_kv_head)]
        return {"c_attn.weight": [("q", self.n_head * D), *heads]}

    def extra_flops_per_token(self, seq_len: int, causal: bool) -> float:
        """Matmul FLOPs beyond the linear layers: q·kᵀ and probs·v over the visible keys."""
        return attention_flops(1, self.n_head, 1, visible_keys(seq_len, self.window, causal), self.head_dim, self.head_dim)

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        return 2 * self.n_kv_head * self.head_dim * bytes_per_element


def visible_keys(seq_len: int, window: int | None, causal: bool) -> float:
    """Mean number of keys a query attends to over a sequence of seq_len tokens.

    causal=False counts the full score matrix, as torch's FlopCounterMode and the PaLM formula do.
    """
    if not causal:
        return float(seq_len)
    # query i sees min(i + 1, w) keys: 1, 2, ..., w, w, ..., w
    w = min(window or seq_len, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


register("attention", "mha", description="multi-head attention (Vaswani et al. 2017)",
         fixed={"n_kv_head": None})(Attention)
register("attention", "gqa", description="grouped-query attention: n_kv_head shared k/v heads (Ainslie et al. 2023)",
         defaults={"n_kv_head": REQUIRED})(Attention)
register("attention", "mqa", description="multi-query attention: one shared k/v head (Shazeer 2019)",
         fixed={"n_kv_head": 1})(Attention)
register("attention", "window", description="sliding-window attention over the last `window` tokens (Longformer; Mistral)",
         defaults={"window": REQUIRED})(Attention)
