"""Two recent attention designs: multi-head latent attention (DeepSeek-V2) and differential attention.

``mla`` caches a low-rank latent of the keys and values instead of the keys and values themselves,
plus one small rotary key shared by every head (DeepSeek-AI 2024, arXiv 2405.04434). ``diff`` takes the
difference of two softmax maps, so that attention noise common to both cancels (Ye et al. 2024,
arXiv 2410.05258).

Both only project (``models.attention.SelfAttention``): the shared ``Attend`` runs the cache, the mask and a
kernel of the ``attention_backend`` family, as for the built-in attention, so every
backend, the KV cache, dropout, sliding windows, ALiBi's score bias and decoding rows at different
positions (a merged, ragged cache) work as far as the kernel can. MLA's decode steps keep that cache
and mask but attend in the latent space with a kernel of their own (``LatentAttend``).
Their q/k head dim differs from v's (MLA: head_dim + rope_dim against head_dim; diff: head_dim against
2·head_dim): math, baddbmm, sdpa, flex and xformers take a separate value head dim; flash kernels
(sdpa's ``flash``, flash-attn) need one head dim and get zero-padded inputs from their backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.flops import attention_flops
from models.attention import Attend, Attention, KVCache, RowCache, SelfAttention, visible_keys
from models.attention_backends import Mask
from models.registry import build_spec, get, ref, register


def _rotates(config) -> bool:
    """Whether the config's positional encoding rotates q and k (asked of the encoding, never named)."""
    spec = config.positional
    requires = getattr(get("positional", spec["name"]).factory, "requires", None)  # an optional hook
    return requires is not None and "rotate" in requires(config, spec)


def _kernel_features(config, options: dict) -> frozenset[str]:
    """What the kernel lets it do, as for the built-in attention; neither mixes in the first layer's
    values (no value_residual: their forward takes no ``values``)."""
    return Attention.handles(config, options) - {"value_residual"}


def _check_window(options: dict) -> str | None:
    window = options.get("window")
    return f"window={window} must be at least 1" if window is not None and window < 1 else None


class LatentCache(RowCache):
    """MLA's per-layer cache: the normalised kv latent and the rotated shared rope key of each token.

    The cache costs kv_rank + rope_dim elements per token, against 2·n_head·head_dim for multi-head
    attention. A prefill up-projects keys and values from it; a decode step attends over it directly,
    the up-projections absorbed into the query and the output (``MultiHeadLatentAttention.absorbs``).
    With a sliding window only the last window − 1 tokens are kept, as ``KVCache`` does; rows at
    different positions (``merge``) are right-aligned and left-padded, as ``KVCache``'s are.
    """

    tensors = ("c_kv", "k_rope")
    time_dim = 1

    def __init__(self, window: int | None = None):
        self.keep = None if window is None else window - 1
        self.c_kv: Tensor | None = None  # (B, T, kv_rank)
        self.k_rope: Tensor | None = None  # (B, T, rope_dim)
        self.pos: Tensor | None = None  # (T,), or (B, T) when the rows are at different positions

    def update(self, c_kv: Tensor, k_rope: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Append this step's latents and rope keys at positions pos (T,) or (B, T); return all that
        the step's queries may attend to."""
        if self.c_kv is not None:  # new tensors, never in-place: a shallow copy of the cache stays valid
            c_kv, k_rope = torch.cat([self.c_kv, c_kv], 1), torch.cat([self.k_rope, k_rope], 1)
            pos = torch.cat([self.pos, pos], -1)
        start = 0 if self.keep is None else max(0, c_kv.shape[1] - self.keep)
        self.c_kv, self.k_rope, self.pos = c_kv[:, start:], k_rope[:, start:], pos[..., start:]
        return c_kv, k_rope, pos


def latent_attention(q: Tensor, c_kv: Tensor, k_rope: Tensor, mask: Mask, dropout_p: float = 0.0) -> Tensor:
    """MLA's absorbed kernel: multi-query attention over its cache as it is held. q (B, H, T, kv_rank + R),
    each head's query in the latent space, already scaled; every head shares the keys [c_kv, k_rope]
    ((B, Tk, kv_rank), (B, Tk, R)) and the values c_kv -> (B, H, T, kv_rank).

    A sequence's H·T queries are the rows of one matmul against its one latent "head": the cache is
    read once per product, never copied per head (a grouped-query kernel repeats its kv head per query
    head) nor concatenated into one key."""
    B, H, T, _ = q.shape
    L = c_kv.shape[-1]
    q_latent, q_rope = q.reshape(B, H * T, -1).split([L, q.shape[-1] - L], dim=-1)  # (B, H·T, L), (B, H·T, R)
    scores = torch.baddbmm(q_rope @ k_rope.transpose(1, 2), q_latent, c_kv.transpose(1, 2))  # (B, H·T, Tk)
    scores = scores.view(B, H, T, -1)
    if mask.kind != "none":  # causal among the step's tokens, the window, ALiBi, a ragged cache's padding
        scores = scores + mask.bias(scores.dtype)  # (1 or H, T, Tk), or (B, 1 or H, T, Tk)
    probs = F.dropout(scores.softmax(dim=-1), dropout_p)
    return (probs.view(B, H * T, -1) @ c_kv).view(B, H, T, L)


class LatentAttend(Attend):
    """MLA's ``Attend``: the shared cache → mask → kernel over each head's expanded keys and values
    (training, prefill), or, for a decode step (``MultiHeadLatentAttention.absorbs``), the same cache
    and mask over the cached latents themselves with the up-projections absorbed (DeepSeek-V2's
    inference form): the queries enter the latent space before the kernel (``absorb_query``),
    ``latent_attention`` attends there (``self.latent``'s kernel) and each head's output leaves it after
    (``absorb_output``). No per-head key or value is made: a new token costs 2·H·(2·kv_rank + R) FLOPs
    per cached token and one read of the cache as held, where up-projecting the cache again costs
    4·H·D·kv_rank per cached token and writes 2·H·D elements of it.
    """

    def __init__(self, backend: dict | str, window: int | None, dropout: float, mla: MultiHeadLatentAttention):
        super().__init__(backend, window, dropout)
        self.latent = Attend("math", window, dropout)  # the absorbed step's cache → mask, with its own kernel:
        self.latent.kernel = latent_attention  # a backend would repeat the one latent head per query head
        # the attention it serves, kept out of the module tree: kv_up's weights are registered once, there
        object.__setattr__(self, "mla", mla)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, cache: LatentCache | None = None,
                slopes: Tensor | None = None, expand=None) -> Tensor:
        """q (B, H, T, D + R) at positions pos; k, v: this step's c_kv and k_rope -> (B, H, T, D)."""
        if not self.mla.absorbs(q.shape[2], cache):
            return super().forward(q, k, v, pos, cache, slopes, expand)
        y = self.latent(self.mla.absorb_query(q), k, v, pos, cache, slopes)  # the cache as held: (B, H, T, kv_rank)
        return self.mla.absorb_output(y)


class MultiHeadLatentAttention(SelfAttention):
    """Multi-head latent attention (DeepSeek-V2): keys and values from a cached low-rank latent, plus a
    decoupled rotary key shared by every head.

    Per token: c_kv = norm(W_dkv·x) (kv_rank) and k_rope = rotate(W_kr·x) (rope_dim, one head) are what
    the cache holds; each head's k_nope and v (head_dim each) are up-projected from c_kv; each head's
    query is [q_nope (head_dim), rotate(q_rope) (rope_dim)], from x directly or through its own
    normalised latent (q_rank). Scores use the concatenated [nope, rope] dims, so the softmax scale is
    1/√(head_dim + rope_dim), as in DeepSeek-V2 (its 1/√192 for 128 + 64).

    Two equal ways to attend (``LatentAttend``): training and prefill up-project every cached latent into
    each head's keys and values (``expand``) for the ``attention_backend`` kernel; a decode step absorbs
    the up-projections instead (``absorbs``: DeepSeek-V2's inference form) and attends over the cached
    latents themselves, never making per-head keys or values.
    """

    def __init__(
        self,
        config,
        *,
        kv_rank: int,
        q_rank: int | None = None,
        rope_dim: int | None = None,
        window: int | None = None,
        backend: ref("attention_backend") = "auto",
    ):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.kv_rank, self.q_rank = kv_rank, q_rank
        self.rope_dim = rope_dim if rope_dim is not None else self.head_dim // 2
        self.window = window
        H, D, R = self.n_head, self.head_dim, self.rope_dim
        if q_rank is None:  # queries straight from x: H heads of [nope, rope]
            self.q_proj = nn.Linear(config.n_embd, H * (D + R), bias=config.bias)
        else:  # queries through their own normalised low-rank latent (DeepSeek-V2's d_c')
            self.q_down = nn.Linear(config.n_embd, q_rank, bias=config.bias)
            self.q_norm = build_spec("norm", config.norm, q_rank, config)
            self.q_up = nn.Linear(q_rank, H * (D + R), bias=config.bias)
        self.kv_down = nn.Linear(config.n_embd, kv_rank + R, bias=config.bias)  # c_kv and the shared k_rope
        self.kv_norm = build_spec("norm", config.norm, kv_rank, config)
        self.kv_up = nn.Linear(kv_rank, H * 2 * D, bias=config.bias)  # each head's k_nope and v
        self.c_proj = nn.Linear(H * D, config.n_embd, bias=config.bias)
        self.attend = LatentAttend(backend, window, config.dropout, self)  # kernels scale by 1/√(D + R): q's head dim
        self.resid_dropout = nn.Dropout(config.dropout)
        # where the rope slice sits in a head_dim-wide vector for the positional encoding to rotate it:
        # every (D/R)-th rotation pair, first halves then second halves (RoPE pairs i with i + D/2 at
        # frequency base^(−2i/D)), so its frequencies are base^(−2j/R): those of a rope_dim-wide RoPE.
        # None when R = D (no placing needed) or R cannot be placed (check() then allows no rotation)
        pairs = torch.arange(R // 2) * (D // R) if R < D and R % 2 == 0 and D % R == 0 else None
        self.register_buffer("rope_index", None if pairs is None else torch.cat([pairs, D // 2 + pairs]),
                             persistent=False)

    @staticmethod
    def check(config, options: dict) -> str | None:
        """Why these options cannot work with this config, or None."""
        head_dim = config.n_embd // config.n_head
        rope_dim = options.get("rope_dim")
        rope_dim = head_dim // 2 if rope_dim is None else rope_dim
        if options["kv_rank"] < 1:
            return f"kv_rank={options['kv_rank']} must be at least 1"
        if options.get("q_rank") is not None and options["q_rank"] < 1:
            return f"q_rank={options['q_rank']} must be at least 1"
        if rope_dim < 1:
            return f"rope_dim={rope_dim} must be at least 1 (the decoupled rotary key carries the positions)"
        if _rotates(config) and (rope_dim % 2 or head_dim % rope_dim):
            return (f"rope_dim={rope_dim} must be even and divide the head dim {head_dim} for positional "
                    f"'{config.positional['name']}' to rotate it (it rotates head_dim-wide pairs); "
                    f"e.g. rope_dim={head_dim // 2}")
        return _check_window(options)

    # what the kernel can do decides the features, as for the built-in attention
    requires = staticmethod(Attention.requires)
    handles = staticmethod(_kernel_features)

    def project(self, x: Tensor, positional, pos: Tensor, values=None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, C) -> q (B, H, T, D + R) and what the cache holds: c_kv (B, T, kv_rank), k_rope (B, T, R)."""
        B, T, C = x.shape
        H, D, R = self.n_head, self.head_dim, self.rope_dim
        q = self.q_proj(x) if self.q_rank is None else self.q_up(self.q_norm(self.q_down(x)))
        q_nope, q_rope = q.view(B, T, H, D + R).transpose(1, 2).split([D, R], dim=-1)  # (B, H, T, D), (B, H, T, R)
        c_kv, k_rope = self.kv_down(x).split([self.kv_rank, R], dim=-1)  # (B, T, kv_rank), (B, T, R)
        # CUDA autocast runs norms in fp32: back to the projection's dtype, which the cache and kernel keep
        c_kv = self.kv_norm(c_kv).to(k_rope.dtype)
        q_rope = self._rotate(positional, q_rope, pos)
        k_rope = self._rotate(positional, k_rope.unsqueeze(1), pos).squeeze(1)  # (B, T, R): one head for all
        return torch.cat([q_nope, q_rope], dim=-1), c_kv, k_rope

    def absorbs(self, T: int, cache: LatentCache | None) -> bool:
        """Whether a step of T new tokens attends with the up-projections absorbed (over the cached latents)
        rather than expanded into each head's keys and values.

        Only decode steps: at inference (training, whose autograd, attention dropout and FLOP accounting
        follow the expanded path, keeps it), with a cache that already holds tokens (a prefill expands),
        and while absorbing costs fewer FLOPs. Expanding k_nope and v costs 4·H·D·kv_rank per key;
        absorbing costs that per query (W_UK in, W_UV out) and 4·H·(kv_rank − D) more per query·key pair
        (scores and values over kv_rank dims per head instead of D). Over a cache longer than the step
        that is cheaper while T·(kv_rank − D) < D·kv_rank: always for one token; for T < 170 at
        DeepSeek-V2's kv_rank 512 and head_dim 128; for T < 64 at bench.kernels' decode (64 and 32).

        And only while kv_up is the plain x·Wᵀ + b of the weight it holds, which absorbing reads: a
        quantized kv_up (its weight a tensor subclass), a fake-quantized one (a Linear subclass) or one
        that hooks run in another dtype (``models.quantization``) expands, as its forward defines it.
        """
        if self.training or cache is None or cache.c_kv is None:
            return False
        up = self.kv_up
        wrapped = type(up) is not nn.Linear or type(up.weight) is not nn.Parameter  # (fake-)quantized
        if wrapped or up._forward_pre_hooks or up._forward_hooks:
            return False
        return T * (self.kv_rank - self.head_dim) < self.head_dim * self.kv_rank

    def absorb_query(self, q: Tensor) -> Tensor:
        """Each head's query (B, H, T, D + R) -> its query in the latent space (B, H, T, kv_rank + R),
        [q_nope·W_UK, q_rope], scaled by the expanded path's 1/√(D + R): q_nope·k_nopeᵀ = (q_nope·W_UK)·c_kvᵀ.
        kv_up's bias drops out: q_nope·b_UK is the same for every key, which the softmax ignores."""
        H, D, R, L = self.n_head, self.head_dim, self.rope_dim, self.kv_rank
        w_uk = self.kv_up.weight.view(H, 2 * D, L)[:, :D]  # (H, D, L): the k_nope rows of each head
        q_nope, q_rope = (q * (D + R) ** -0.5).split([D, R], dim=-1)  # the scale on H·T queries, not H·T·Tk scores
        return torch.cat([q_nope @ w_uk, q_rope], dim=-1)

    def absorb_output(self, y: Tensor) -> Tensor:
        """Each head's output in the latent space (B, H, T, kv_rank), Σ p·c_kv -> its output (B, H, T, D),
        W_UV·(Σ p·c_kv) = Σ p·v; kv_up's b_UV added once, as the probabilities sum to 1."""
        H, D, L = self.n_head, self.head_dim, self.kv_rank
        w_uv = self.kv_up.weight.view(H, 2 * D, L)[:, D:]  # (H, D, L): the v rows of each head
        y = y @ w_uv.transpose(1, 2)
        return y if self.kv_up.bias is None else y + self.kv_up.bias.view(H, 2 * D)[:, None, D:].to(y.dtype)

    def expand(self, c_kv: Tensor, k_rope: Tensor) -> tuple[Tensor, Tensor]:
        """The cached latents (B, Tk, kv_rank) and rope keys (B, Tk, R) -> each head's keys
        (B, H, Tk, D + R) and values (B, H, Tk, D): the prefill's and training's path (decode absorbs)."""
        B, Tk, _ = c_kv.shape
        H, D, R = self.n_head, self.head_dim, self.rope_dim
        kv = self.kv_up(c_kv).view(B, Tk, H, 2 * D).transpose(1, 2)  # (B, H, Tk, 2D)
        k_nope, v = kv.split([D, D], dim=-1)  # (B, H, Tk, D) each
        return torch.cat([k_nope, k_rope.unsqueeze(1).expand(B, H, Tk, R)], dim=-1), v

    def _rotate(self, positional, x: Tensor, pos: Tensor) -> Tensor:
        """Rotate a rope slice x (B, H, T, rope_dim) with the positional encoding, which rotates
        head_dim-wide vectors: placed on every (head_dim/rope_dim)-th rotation pair, rotated, read back."""
        if self.rope_index is None:  # rope_dim = head_dim, or an encoding that does not rotate (check())
            return positional.rotate(x, pos)
        full = x.new_zeros(*x.shape[:-1], self.head_dim).index_copy(-1, self.rope_index, x)  # (B, H, T, D)
        return positional.rotate(full, pos).index_select(-1, self.rope_index)

    def new_cache(self) -> LatentCache:
        return LatentCache(self.window)

    def extra_flops_per_token(self, seq_len: int, causal: bool) -> float:
        """q·kᵀ over head_dim + rope_dim and probs·v over head_dim, per head, for the visible keys."""
        keys = visible_keys(seq_len, self.window, causal)
        return attention_flops(1, self.n_head, 1, keys, self.head_dim + self.rope_dim, self.head_dim)

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """The latent and the shared rope key: (kv_rank + rope_dim) elements per token."""
        return (self.kv_rank + self.rope_dim) * bytes_per_element


class DifferentialAttention(SelfAttention):
    """Differential attention (Differential Transformer): (softmax(q1·k1ᵀ/√d) − λ·softmax(q2·k2ᵀ/√d))·v.

    Layout, the paper's parameter-matched one: n_head/2 differential heads, each with two query/key
    halves of d = head_dim (the n_head q and k heads of multi-head attention, paired: 2i and 2i + 1)
    and one value of 2·head_dim. The fused q, k, v projection and the output projection therefore
    have MHA's shapes and parameters (plus 4·d for λ and 2·d for the head norm), and are initialised
    from the same keyed streams as MHA's (init_blocks). The q/k head dim is the positional encoding's,
    so RoPE rotates q1, k1, q2, k2 as it rotates MHA's heads; ALiBi gives each of them its head's slope.

    λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init, one scalar per layer from four learned d-vectors
    (drawn from N(0, 0.1)). Each head's output is RMS-normalised over its 2d channels and scaled by
    (1 − λ_init). The paper sets λ_init = 0.8 − 0.6·exp(−0.3·(l − 1)) by layer index l; a model config
    has one attention spec for every layer and the attention does not know its index, so λ_init is an
    option, by default 0.8 (the schedule's value for deep layers).

    The two maps are one kernel call over 2h heads, (q1, k1, v) then (q2, k2, v): softmax(A)·v − λ·softmax(B)·v
    equals (softmax(A) − λ·softmax(B))·v, so every backend, the KV cache, windows and dropout work.
    """

    def __init__(
        self,
        config,
        *,
        lambda_init: float = 0.8,
        window: int | None = None,
        backend: ref("attention_backend") = "auto",
    ):
        super().__init__()
        self.n_head = config.n_head  # q/k heads; n_head/2 differential heads
        self.head_dim = config.n_embd // config.n_head  # d: the q/k head dim; v's is 2d
        self.lambda_init = lambda_init
        self.window = window
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.zeros(self.head_dim)) for _ in range(4))
        # the paper's head norm: RMSNorm over each head's 2d channels (one gain shared by the heads)
        self.subln = build_spec("norm", {"name": "rmsnorm", "eps": 1e-5}, 2 * self.head_dim, config)
        self.attend = Attend(backend, window, config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    @staticmethod
    def check(config, options: dict) -> str | None:
        """Why these options cannot work with this config, or None."""
        if config.n_head % 2:
            return f"n_head={config.n_head} must be even: pairs of q/k heads make the n_head/2 differential heads"
        if not 0.0 <= options["lambda_init"] < 1.0:
            return f"lambda_init={options['lambda_init']} must be in [0, 1) (outputs are scaled by 1 − lambda_init)"
        return _check_window(options)

    requires = staticmethod(Attention.requires)
    handles = staticmethod(_kernel_features)

    def reset_parameters(self) -> None:
        """λ_q1, λ_k1, λ_q2, λ_k2 from N(0, 0.1), as the paper's code draws them."""
        for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(p, 0.0, 0.1)

    def lambda_full(self) -> Tensor:
        """λ = exp(λ_q1·λ_k1) − exp(λ_q2·λ_k2) + λ_init, a scalar."""
        return (torch.exp((self.lambda_q1 * self.lambda_k1).sum()) - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
                + self.lambda_init)

    def project(self, x: Tensor, positional, pos: Tensor, values=None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, C) -> q and k (B, 2h, T, d), the first map's heads before the second's (MHA's heads
        2i, then 2i + 1), and v (B, h, T, 2d); k and v as cached."""
        B, T, C = x.shape
        D = self.head_dim
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, D).transpose(1, 2)  # (B, 2h, T, d): heads 2i, 2i + 1 pair up
        k = k.view(B, T, self.n_head, D).transpose(1, 2)  # (B, 2h, T, d)
        v = v.view(B, T, self.n_head // 2, 2 * D).transpose(1, 2)  # (B, h, T, 2d)
        q, k = positional.rotate(q, pos), positional.rotate(k, pos)
        return torch.cat([q[:, 0::2], q[:, 1::2]], 1), torch.cat([k[:, 0::2], k[:, 1::2]], 1), v

    def expand(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Both maps in one kernel call: each value head once per map."""
        return k, torch.cat([v, v], 1)  # (B, 2h, Tk, d), (B, 2h, Tk, 2d)

    def score_slopes(self, positional) -> Tensor | None:
        """Each q/k head keeps its ALiBi slope, in the queries' order."""
        slopes = positional.bias_slopes()  # (2h,) or None
        return None if slopes is None else torch.cat([slopes[0::2], slopes[1::2]])

    def combine(self, y: Tensor) -> Tensor:
        """The two maps' outputs (B, 2h, T, 2d) -> (softmax(A) − λ·softmax(B))·v per head, normalised (B, h, T, 2d)."""
        y1, y2 = y.chunk(2, dim=1)
        y = self.subln(y1 - self.lambda_full() * y2) * (1.0 - self.lambda_init)
        return y.to(y1.dtype)  # CUDA autocast: the norm ran in fp32

    def new_cache(self) -> KVCache:
        return KVCache(self.window)  # k (B, 2h, T, d) and v (B, h, T, 2d): n_embd elements each per token

    def init_blocks(self) -> dict[str, list[tuple[str, int]]]:
        """MHA's row blocks (q, then each k and v head of head_dim rows): with the same seed, diff
        starts from MHA's projection weights, its value head i being MHA's v heads 2i and 2i + 1."""
        D = self.head_dim
        heads = [(f"{kind}{h}", D) for kind in "kv" for h in range(self.n_head)]
        return {"c_attn.weight": [("q", self.n_head * D), *heads]}

    def extra_flops_per_token(self, seq_len: int, causal: bool) -> float:
        """Both maps: q·kᵀ over d and probs·v over 2d, for each of the n_head/2 heads and visible keys
        (1.5× multi-head attention's: the value product runs once per map)."""
        keys = visible_keys(seq_len, self.window, causal)
        return 2 * attention_flops(1, self.n_head // 2, 1, keys, self.head_dim, 2 * self.head_dim)

    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """k (2h heads of d) and v (h heads of 2d): 2·n_embd elements, as multi-head attention's."""
        return 2 * self.n_head * self.head_dim * bytes_per_element


register("attention", "mla",
         description="multi-head latent attention: k/v up-projected from a cached low-rank latent, plus a shared "
                     "rotary key (DeepSeek-V2, DeepSeek-AI 2024)")(MultiHeadLatentAttention)
register("attention", "diff",
         description="differential attention: the λ-weighted difference of two softmax maps, heads RMS-normalised "
                     "(Differential Transformer, Ye et al. 2024)")(DifferentialAttention)


__all__ = ["DifferentialAttention", "LatentCache", "MultiHeadLatentAttention"]
