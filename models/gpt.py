"""The GPT, assembled from registered components.

Reads like nanoGPT's model.py: token embedding, positional encoding, n_layer pre-norm blocks, final
norm, LM head. Which attention, positional encoding, norm, MLP or MoE is used comes from the
``ModelConfig``; this file names none of them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.attention_backends import KernelChooser, use_kernels
from models.config import (ModelConfig, attention_features, backends_handling, image_tokens, layer_attention,
                           prefix_positions)
from models.contract import FEATURES
from models.registry import build_spec


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.norm_1 = build_spec("norm", config.norm, config.n_embd, config)
        self.attn = build_spec("attention", layer_attention(config, layer), config)  # a hybrid's differ by layer
        self.norm_2 = build_spec("norm", config.norm, config.n_embd, config)
        self.routed = config.moe is not None  # a MoE returns its auxiliary loss and stats with its output
        if self.routed:
            self.mlp = build_spec("moe", config.moe, config)
        else:
            self.mlp = build_spec("mlp", config.mlp, config)

    def forward(self, x: Tensor, positional, pos: Tensor, cache=None, values=None) -> tuple[Tensor, Any]:
        """(B, T, C) -> ((B, T, C), the MoE layer's MoEAux or None). values: the forward pass's
        ValueResidual, handed to the attention only when the model mixes values."""
        mixing = {"values": values} if values is not None else {}  # an attention without the feature never sees it
        x = x + self.attn(self.norm_1(x), positional, pos, cache, **mixing)
        out, aux = self.mlp(self.norm_2(x)) if self.routed else (self.mlp(self.norm_2(x)), None)
        return x + out, aux


class ValueResidual:
    """Value residual learning (Zhou et al. 2024), one per forward pass: the first layer's attention
    values v₁ (B, Hkv, T, D) are kept, and every later layer i attends to a_i·v_i + b_i·v₁ instead of
    v_i, with (a_i, b_i) learnable (the GPT's ``value_mix``, from (0.5, 0.5) as in modded-nanoGPT)."""

    def __init__(self, mix: Tensor):
        self.mix = mix.view(-1, 2)  # (n_layer − 1, 2)
        self.first: Tensor | None = None
        self.layer = 0

    def __call__(self, v: Tensor) -> Tensor:
        """The values layer `self.layer` attends to (and caches); call once per layer, in order."""
        if self.first is None:
            self.first, self.layer = v, 1
            return v
        a, b = self.mix[self.layer - 1].to(v.dtype)
        self.layer += 1
        return a * v + b * self.first


class Output(NamedTuple):
    """What the GPT's forward pass returns."""

    logits: Tensor  # (B, T, vocab)
    loss: Tensor | None  # the LM loss plus every MoE layer's weighted auxiliary loss (with targets)
    aux: list  # each MoE layer's MoEAux (auxiliary loss, routing statistics) of this forward pass


class Cache:
    """KV caches of every layer plus the number of tokens each row holds.

    A batch prefilled together has every row at one position: ``length`` counts its tokens. A
    continuous-batching server prefills each request alone and ``merge`` s the caches into one whose
    rows are at their own positions (``lengths``): right-aligned, every row's newest token in the last
    column, shorter rows left-padded with keys that no query sees. The model then decodes all rows in
    one forward pass, each at its own positions; ``select`` lets finished rows leave.
    """

    def __init__(self, layers: list, refusal: Callable[[], str] | None = None):
        """layers: each layer's cache (the attention's new_cache()); refusal: None when the model can
        decode rows at different positions, else what says why not (called only when merging)."""
        self.layers = layers
        self.refusal = refusal
        self.image_kv: dict[int, tuple[Tensor, Tensor]] = {}  # cross-attention: layer -> the image's keys, values
        self.rows: int | None = None  # the batch size, set by the first forward pass
        self._length = 0  # tokens every row holds, while they are at one position
        self._lengths: Tensor | None = None  # (B,) tokens of each row, once rows are at different positions

    @property
    def ragged(self) -> bool:
        """Whether the rows are at different positions."""
        return self._lengths is not None

    @property
    def length(self) -> int:
        """The number of tokens every row holds; only while the rows are at one position."""
        if self._lengths is not None:
            raise ValueError(f"the rows of this cache are at different positions ({self._lengths.tolist()}): "
                             "use cache.lengths")
        return self._length

    @length.setter
    def length(self, value: int) -> None:
        if self._lengths is not None:
            raise ValueError("the rows of this cache are at different positions: they have no one length")
        self._length = value

    @property
    def lengths(self) -> Tensor:
        """(B,) int64: the number of tokens each row holds."""
        if self._lengths is not None:
            return self._lengths
        if self.rows is None:
            raise ValueError("an empty cache has no rows yet: run a forward pass with it first")
        return torch.full((self.rows,), self._length, dtype=torch.long)

    def nbytes(self) -> int:
        """Bytes the layers' caches hold (left padding included), and cross-attention's image keys and values."""
        image = sum(t.numel() * t.element_size() for kv in self.image_kv.values() for t in kv)
        return sum(layer.nbytes() for layer in self.layers) + image

    @classmethod
    def merge(cls, caches: Sequence[Cache]) -> Cache:
        """One cache holding the rows of `caches` (one model's, each filled; rows in their order),
        right-aligned and left-padded. The caches themselves are left as they were."""
        for cache in caches:
            if cache.refusal is not None:
                raise ValueError(cache.refusal())
            if cache.rows is None:
                raise ValueError("cannot merge an empty cache: prefill it first")
        if len({len(cache.layers) for cache in caches}) != 1:
            raise ValueError("cannot merge caches of models with different numbers of layers")
        kinds = {type(layer) for cache in caches for layer in cache.layers}
        if not all(hasattr(kind, "merge") and hasattr(kind, "select") for kind in kinds):
            raise ValueError(f"layer caches {sorted(k.__name__ for k in kinds)} cannot merge rows (they lack merge/select)")
        layers = [type(parts[0]).merge(list(parts)) for parts in zip(*(cache.layers for cache in caches))]
        merged = cls(layers)
        if len({tuple(cache.image_kv) for cache in caches}) != 1:
            raise ValueError("cannot merge the caches of requests with and without an image")
        merged.image_kv = {i: tuple(torch.cat(parts) for parts in zip(*(c.image_kv[i] for c in caches)))
                           for i in caches[0].image_kv}  # every image has the same number of tokens
        merged._set_lengths(torch.cat([cache.lengths.cpu() for cache in caches]))
        return merged

    def select(self, rows: Sequence[int] | Tensor) -> None:
        """Keep only these rows (indices, in the order given) and drop the leading columns that are
        padding in every one of them."""
        index = torch.as_tensor(rows, dtype=torch.long)
        if index.dim() != 1 or index.numel() == 0:
            raise ValueError(f"select takes a non-empty list of row indices, not {rows!r}")
        lengths = self.lengths[index.to(self.lengths.device)]  # an empty cache raises here
        for layer in self.layers:
            layer.select(index)
        self.image_kv = {i: tuple(t[index.to(t.device)] for t in kv) for i, kv in self.image_kv.items()}
        self._set_lengths(lengths)

    def _set_lengths(self, lengths: Tensor) -> None:
        """Rows of one length are at one position again (the layers' caches then share their positions too)."""
        self.rows = lengths.numel()
        if bool((lengths == lengths[0]).all()):
            self._length, self._lengths = int(lengths[0]), None
        else:
            self._lengths = lengths


def parameter_seed(seed: int, name: str) -> int:
    """The seed of one parameter's generator: a stable hash of (run seed, parameter name)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "big") >> 1


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, seed: int | None = None, kernels: KernelChooser | None = None):
        """seed: the initialisation's seed (default: drawn from torch's global generator).
        kernels: what picks the kernel of every ``backend: auto`` attention (default: sdpa, recorded)."""
        super().__init__()
        self.config = config
        seed = int(torch.randint(2**62, (), device="cpu")) if seed is None else seed
        # constructors draw from the global generator: fork it, so that the caller's stream (dropout)
        # does not depend on how many tensors the architecture happened to create
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.wte = nn.Embedding(config.vocab_size, config.n_embd)
            self.positional = build_spec("positional", config.positional, config)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
            self.norm_f = build_spec("norm", config.norm, config.n_embd, config)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            # 1-D so that no optimizer decays it like a weight matrix; layer 0's values are v₁ itself
            self.value_mix = nn.Parameter(torch.full((2 * (config.n_layer - 1),), 0.5)) if config.value_residual else None
            if config.tie_embeddings:
                self.wte.weight = self.lm_head.weight  # https://paperswithcode.com/method/weight-tying
            if config.vision is not None:  # a vision-language model: images → patches → image tokens
                self.vision = build_spec("vision", config.vision, config)
                for p in self.vision.parameters():  # its own peak learning rate (models.optimizers.decay_groups)
                    p.peak_lr = config.vision.get("lr")
                if config.connector is not None:
                    self.connector = build_spec("connector", config.connector, self.vision.width,
                                                self.vision.grid_size, config)
                    self.fusion = build_spec("fusion", config.fusion, config, image_tokens(config))
            self.add_modules(config)
            self.init_weights(seed)
        if kernels is not None:
            use_kernels(self, kernels)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """nanoGPT's init — N(0, 0.02), residual projections (``c_proj``) scaled by 1/sqrt(2·n_layer)
        as in GPT-2 — with every parameter drawn from its own generator keyed by (seed, name).

        Two variants with the same seed so start from the same weights wherever their parameter names
        and shapes agree, and a module added to one does not shift the draws of the others: their
        per-seed differences in loss then measure the component, not the initialisation. A module
        may split a fused weight into named row blocks (``init_blocks()``, e.g. attention's q and each
        k/v head), each keyed on its own. Parameters of other modules are reset by the module's own
        ``reset_parameters()`` on a stream keyed by its name, or keep their constructed values (norm
        gains and biases: ones and zeros).
        """
        modules = dict(self.named_modules())
        blocks = {f"{prefix}.{name}": layout for prefix, m in modules.items() if hasattr(m, "init_blocks")
                  for name, layout in m.init_blocks().items()}
        for name, p in self.named_parameters():  # a tied weight once, under its first name
            owner_name, _, leaf = name.rpartition(".")
            owner = modules[owner_name]
            if isinstance(owner, nn.Linear | nn.Embedding) and leaf == "weight":
                std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else 0.02
                layout = blocks.get(name, [("", p.shape[0])])
                if sum(rows for _, rows in layout) != p.shape[0]:
                    raise ValueError(f"{name}: init_blocks cover {sum(r for _, r in layout)} of {p.shape[0]} rows")
                for rows, (label, _) in zip(p.split([r for _, r in layout]), layout):
                    key = parameter_seed(seed, f"{name}/{label}" if label else name)
                    nn.init.normal_(rows, 0.0, std, generator=torch.Generator().manual_seed(key))
            elif isinstance(owner, nn.Linear) and leaf == "bias":
                nn.init.zeros_(p)
            elif hasattr(owner, "reset_parameters"):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(parameter_seed(seed, owner_name))
                    owner.reset_parameters()

    def add_modules(self, config: ModelConfig) -> None:
        """Modules a subclass adds before the weights are initialised (``models.dual_encoder``)."""

    def see(self, images: Tensor) -> Tensor:
        """images (B, channels, H, W) in [0, 1] -> image tokens (B, M, C) in the text's space."""
        return self.connector(self.vision(images))  # (B, N patches, width) -> (B, M, C)

    def forward(self, idx: Tensor, targets: Tensor | None = None, cache: Cache | None = None,
                images: Tensor | None = None) -> Output:
        """idx (B, T) token ids -> Output(logits (B, T, vocab), loss or None, MoE auxiliaries).

        targets (B, T) with -1 where no loss is wanted. With a cache, idx continues the cached
        tokens. With MoE the loss includes the weighted auxiliary losses, returned in ``aux`` too.
        images (B, channels, H, W): what a vision-language model reads with the text (its fusion
        says how); the logits and loss are the text's alone.
        """
        x, aux = self.features(idx, cache, images)
        logits = self.lm_head(x)  # (B, T, vocab)
        if self.config.logit_softcap is not None:  # tanh in fp32: bf16's 8 bits would coarsen the cap
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits.float() / cap)
        if targets is None:
            return Output(logits, None, aux)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        if aux:
            loss = loss + sum(a.loss for a in aux)
        return Output(logits, loss, aux)

    def features(self, idx: Tensor, cache: Cache | None = None, images: Tensor | None = None) -> tuple[Tensor, list]:
        """idx (B, T) -> (the final norm's output at the text positions (B, T, C), MoE auxiliaries)."""
        image = self.see(images) if images is not None else None  # (B, M, C)
        x = self.wte(idx)  # (B, T, C)
        prefix = 0
        if image is not None:
            x, prefix = self.fusion.start(x, image)  # a prefix puts the M image tokens first: (B, M + T, C)
        B, T, _ = x.shape
        limit = self.positional.max_positions
        ragged = cache is not None and cache.ragged  # rows at different positions (merged caches)
        if ragged:  # each row continues from its own length: positions (B, T) all the way down
            lengths = cache.lengths.to(idx.device)  # (B,)
            pos = lengths[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            end = int(lengths.max()) + T if limit is not None else 0  # a device sync: only when bounded
        else:
            start = cache.length if cache is not None else 0
            pos = torch.arange(start, start + T, device=idx.device)  # (T,)
            end = start + T
        if limit is not None and end > limit:
            raise ValueError(
                f"positions up to {end} but this positional encoding covers {limit} "
                "(learned positions stop at block_size; use rope, alibi, sinusoidal or none to go longer)"
            )

        pos_emb = self.positional.embed(pos)  # (T, C), (B, T, C) when ragged, or None
        if pos_emb is not None:
            x = x + pos_emb
        x = self.drop(x)
        positions = self.positional.at(pos)  # what rotating needs, computed once for every layer
        values = ValueResidual(self.value_mix) if self.value_mix is not None else None
        aux = []
        for i, block in enumerate(self.blocks):
            x, block_aux = block(x, positions, pos, cache.layers[i] if cache is not None else None, values)
            if block_aux is not None:
                aux.append(block_aux)
            if self.config.fusion is not None:
                x = self.fusion.after_block(i, x, image, cache)  # cross-attention reads the image here
        if ragged:
            cache._lengths = lengths + T
        elif cache is not None:
            cache.length += T
            cache.rows = B
        return self.norm_f(self.fusion.text(x, prefix) if prefix else x), aux

    def new_cache(self) -> Cache | None:
        """An empty KV cache, or None when some layer's attention cannot decode incrementally."""
        features = attention_features(self.config)
        if "cache" not in features:
            return None
        return Cache([b.attn.new_cache() for b in self.blocks], None if "ragged" in features else self._ragged_refusal)

    def _ragged_refusal(self) -> str:
        """Why this model cannot decode rows at different positions, naming the backends that could."""
        name, backend = self.config.attention["name"], self.config.attention.get("backend")
        message = f"attention '{name}' cannot {FEATURES['ragged']} (ragged)"
        if not isinstance(backend, dict):  # an attention with no kernel backend
            return message
        can = backends_handling(self.config, {"ragged"})
        return f"{message} with backend '{backend['name']}'; backends that can: {', '.join(can) or 'none'}"

    @torch.no_grad()
    def generate(
        self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
        use_cache: bool = True, images: Tensor | None = None,
    ) -> Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 picks the most likely.
        images: what a vision-language model reads with idx (B, channels, H, W)."""
        limit = self.positional.max_positions
        if limit is not None and images is not None:
            limit -= prefix_positions(self.config)  # the text's share of the positions
        cache = self.new_cache() if use_cache else None
        fed = 0  # text tokens the cache holds (a prefix's image positions are not text)
        for _ in range(max_new_tokens):
            if cache is not None and limit is not None and idx.shape[1] > limit:
                cache = None  # past the position table: crop and recompute, as nanoGPT does
            if cache is None:
                logits = self(idx if limit is None else idx[:, -limit:], images=images).logits
            else:
                logits = self(idx[:, fed:], cache=cache, images=images if fed == 0 else None).logits
                fed = idx.shape[1]
            logits = logits[:, -1, :]  # (B, vocab)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx
