"""The GPT, assembled from registered components.

Reads like nanoGPT's model.py: token embedding, positional encoding, n_layer pre-norm blocks, final
norm, LM head. Which attention, positional encoding, norm, MLP or MoE is used comes from the
``ModelConfig``; this file names none of them.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig, attention_features
from models.registry import build_spec


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_1 = build_spec("norm", config.norm, config.n_embd, config)
        self.attn = build_spec("attention", config.attention, config)
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
    """KV caches of every layer plus the number of tokens they hold."""

    def __init__(self, layers: list):
        self.layers = layers
        self.length = 0

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def parameter_seed(seed: int, name: str) -> int:
    """The seed of one parameter's generator: a stable hash of (run seed, parameter name)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "big") >> 1


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, seed: int | None = None):
        """seed: the initialisation's seed (default: drawn from torch's global generator)."""
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
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
            self.norm_f = build_spec("norm", config.norm, config.n_embd, config)
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            # 1-D so that no optimizer decays it like a weight matrix; layer 0's values are v₁ itself
            self.value_mix = nn.Parameter(torch.full((2 * (config.n_layer - 1),), 0.5)) if config.value_residual else None
            if config.tie_embeddings:
                self.wte.weight = self.lm_head.weight  # https://paperswithcode.com/method/weight-tying
            self.init_weights(seed)

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

    def forward(self, idx: Tensor, targets: Tensor | None = None, cache: Cache | None = None) -> Output:
        """idx (B, T) token ids -> Output(logits (B, T, vocab), loss or None, MoE auxiliaries).

        targets (B, T) with -1 where no loss is wanted. With a cache, idx continues the cached
        tokens. With MoE the loss includes the weighted auxiliary losses, returned in ``aux`` too.
        """
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        limit = self.positional.max_positions
        if limit is not None and start + T > limit:
            raise ValueError(
                f"positions up to {start + T} but this positional encoding covers {limit} "
                "(learned positions stop at block_size; use rope, alibi, sinusoidal or none to go longer)"
            )
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)

        x = self.wte(idx)  # (B, T, C)
        pos_emb = self.positional.embed(pos)  # (T, C) or None
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
        x = self.norm_f(x)
        logits = self.lm_head(x)  # (B, T, vocab)
        if self.config.logit_softcap is not None:  # tanh in fp32: bf16's 8 bits would coarsen the cap
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits.float() / cap)
        if cache is not None:
            cache.length += T

        if targets is None:
            return Output(logits, None, aux)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        if aux:
            loss = loss + sum(a.loss for a in aux)
        return Output(logits, loss, aux)

    def new_cache(self) -> Cache | None:
        """An empty KV cache, or None when some layer's attention cannot decode incrementally."""
        if "cache" not in attention_features(self.config):
            return None
        return Cache([b.attn.new_cache() for b in self.blocks])

    @torch.no_grad()
    def generate(
        self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 picks the most likely."""
        limit = self.positional.max_positions
        cache = self.new_cache() if use_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and limit is not None and idx.shape[1] > limit:
                cache = None  # past the position table: crop and recompute, as nanoGPT does
            if cache is None:
                logits = self(idx if limit is None else idx[:, -limit:]).logits
            else:
                logits = self(idx[:, cache.length :], cache=cache).logits
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


def build_model(config: ModelConfig | dict[str, Any], seed: int | None = None) -> GPT:
    """Build a GPT from a config (or a dict of one), its weights initialised from `seed` (default:
    drawn from torch's global generator); training-time quantization (QAT) is applied here."""
    if not isinstance(config, ModelConfig):
        config = ModelConfig.from_dict(config)
    model = GPT(config, seed)
    if config.quantization is not None:
        quantizer = build_spec("quantization", config.quantization)
        if quantizer.stage == "train":
            quantizer.apply(model)
    return model
