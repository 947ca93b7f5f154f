"""The component contract: what a member of each family is, and the hooks it may or must provide.

One ``typing.Protocol`` per family. ``register`` checks a component against its family's protocol
and names what is missing; ``python -m models FAMILY`` prints the protocol's text. Hooks marked
*optional* have a default behaviour, stated in their docstring, when a component leaves them out.

Hooks are read in two places. *Factory hooks* (``check``, ``requires``, ``handles``,
``capabilities``, ``device_limitation``, ``stage``) are read from the registered factory before
anything is built, so a config is validated without building a model; a function factory carries
them as attributes. The other hooks are read from the built module.

Attention features. What a config needs from its attention, and what an attention declares it
handles (``handles``); a config that needs a feature its attention does not handle is refused::

    rotate   let the positional encoding rotate q and k (positional.rotate; RoPE); a recurrent mixer
             may accept it and leave q and k unrotated (its ``rotates`` attribute says which)
    bias     add the positional encoding's score bias (positional.bias_slopes(); ALiBi)
    dropout  apply attention dropout (the model's dropout > 0)
    window   restrict each query to a sliding window of keys
    cache    decode incrementally with a KV cache (new_cache())
    ragged   decode a batch whose rows are at different positions (models.gpt.Cache.merge, refused
             without it): forward gets pos (B, T), and new_cache()'s object also offers
             ``merge(caches)``, a classmethod (the caches' rows in one, right-aligned, left-padded with
             keys at attention_backends.PADDING_POSITION), and ``select(rows)`` (keep those rows, given
             as a LongTensor of indices; drop the leading columns that are padding in all of them)
    value_residual  pass its values v through forward's ``values`` (a models.gpt.ValueResidual):
             v = values(v) before attending and caching

Conventions every module family follows: a residual output projection is an ``nn.Linear`` named
``c_proj`` (the GPT scales its initial weights by 1/sqrt(2·n_layer), as GPT-2 does); every
``nn.Linear`` and ``nn.Embedding`` weight is initialised by the GPT from a stream keyed by (seed,
parameter name); raw ``nn.Parameter`` s are set in ``reset_parameters()``. A module keeps no state
between forward passes: what a forward pass produces besides its output (MoE's auxiliary loss and
routing statistics) is returned.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol

FEATURES: dict[str, str] = {
    "rotate": "rotate q and k by the positional encoding",
    "bias": "add the positional encoding's score bias",
    "dropout": "apply attention dropout",
    "window": "restrict queries to a sliding window",
    "cache": "decode with a KV cache",
    "ragged": "decode rows at different positions in one batch",
    "value_residual": "mix the first layer's values into its own (model.value_residual)",
}


def optional(hook: Any) -> Any:
    """Marks a protocol member a component may leave out."""
    getattr(hook, "__func__", hook).__contract_optional__ = True
    return hook


def factory_hook(hook: Any) -> Any:
    """Marks a protocol member read from the registered factory (before building), not the module."""
    getattr(hook, "__func__", hook).__contract_factory__ = True
    return hook


class ModuleComponent(Protocol):
    """Hooks every module family (attention, positional, norm, mlp, moe) may provide."""

    @optional
    @factory_hook
    @staticmethod
    def check(config: Any, options: dict) -> str | None:
        """Why these options cannot work with this config, or None (checked when a config is validated)."""

    @optional
    @factory_hook
    @staticmethod
    def requires(config: Any, options: dict) -> frozenset[str]:
        """Attention features this component needs (see FEATURES); default: none."""

    @optional
    def flops_per_token(self, seq_len: int, causal: bool) -> float:
        """Forward matmul FLOPs per token of the whole module, replacing the count of its nn.Linear
        layers and children (MoE: only the experts a token uses). Default: counted from the tree."""

    @optional
    def extra_flops_per_token(self, seq_len: int, causal: bool) -> float:
        """Forward matmul FLOPs per token beyond its nn.Linear layers (attention's q·kᵀ and probs·v).
        A module whose FLOPs differ from its linear layers' must declare them: ``check_flops`` compares
        the accounting with torch's FlopCounterMode."""

    @optional
    def inactive_params(self) -> int:
        """Parameters a token does not use (MoE's unrouted experts); default 0."""

    @optional
    def init_blocks(self) -> dict[str, list[tuple[str, int]]]:
        """Named row blocks of fused weights, each initialised from its own keyed stream (attention's
        q and each k/v head); default: one stream per weight."""

    @optional
    def reset_parameters(self) -> None:
        """Initialise raw nn.Parameters (called on a stream keyed by the module's name)."""


class Attention(ModuleComponent, Protocol):
    """(config, **options) -> module; forward(x (B,T,C), positional, pos (T,) or (B,T), cache) -> (B,T,C).

    ``positional`` is the model's positional encoding bound to this forward pass's positions: an
    attention that handles ``rotate`` calls ``positional.rotate(q, pos)`` and ``positional.rotate(k,
    pos)``; one that handles ``bias`` adds ``-slope·(i − j)`` from ``positional.bias_slopes()`` to
    its scores. ``cache`` is None or what ``new_cache()`` made; pos are the absolute positions of
    x's tokens: (T,) shared by every row, or (B, T) for one that handles ``ragged`` decoding a merged
    cache (a ``Mask`` built from batched positions is batched: the kernel needs ``ragged``). One that
    handles ``value_residual`` takes ``values`` (passed only when the model mixes values) and attends
    to, and caches, ``values(v)`` instead of its own v.

    The built-in attentions are project → attend → output (``models.attention.SelfAttention``): each
    only projects, and the cache, mask and kernel are the shared ``Attend``'s; a variant subclasses one
    and overrides a step (``output`` to gate the heads, ``project`` to change q, k, v).

    Sub-quadratic mixers (``models.mixers``: linear attention, RetNet, GLA, Mamba-2, DeltaNet, Based,
    H3) are members too: they decode with a state of constant size (``state_bytes``) instead of a
    KV cache that grows per token. Such a mixer may accept a rotating encoding and leave q and k
    unrotated, ordering tokens by its recurrence instead, as the recurrent layers of hybrid models do.
    """

    @factory_hook
    @staticmethod
    def handles(config: Any, options: dict) -> frozenset[str]:
        """The attention features (see FEATURES) these options implement; a config that needs one
        more (a positional encoding, dropout) is refused with a message naming both."""

    def forward(self, x: Any, positional: Any, pos: Any, cache: Any = None) -> Any:
        """(B, T, C) -> (B, T, C)."""

    @optional
    def new_cache(self) -> Any:
        """An empty per-layer KV cache (needed when handles() includes 'cache'; with 'ragged' it also
        offers merge(caches) and select(rows))."""

    @optional
    def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        """KV-cache bytes one token costs in this layer."""

    @optional
    def state_bytes(self, bytes_per_element: int = 2) -> int:
        """Bytes one sequence's decoding state costs in this layer whatever its length (a recurrent
        mixer's state; a layer may have both this and kv_cache_bytes_per_token)."""


class AttentionBackend(Protocol):
    """(**options) -> callable(q (B,Hq,Tq,D), k (B,Hkv,Tk,D), v (B,Hkv,Tk,Dv), mask: Mask, dropout_p) -> (B,Hq,Tq,Dv).

    Hkv divides Hq (grouped-query attention); v's head dim Dv may differ from D (multi-head latent and
    differential attention). Every backend is tested against ``math``.
    Capabilities: causal, window, bias, dropout, decode (queries after cached keys), ragged (a batched
    mask: positions (B, Tq) and (B, Tk), each row at its own). A backend without ``ragged`` raises on
    a batched mask rather than read one row's positions for all.
    """

    @factory_hook
    @staticmethod
    def capabilities(options: dict) -> frozenset[str]:
        """What these options can do: causal, window, bias, dropout, decode, ragged."""

    def __call__(self, q: Any, k: Any, v: Any, mask: Any, dropout_p: float = 0.0) -> Any:
        """softmax(q·kᵀ/√d + bias)·v under the mask."""

    @optional
    @factory_hook
    @staticmethod
    def device_limitation(options: dict, device: Any) -> str | None:
        """Why these options cannot run on `device` (e.g. an sdpa kernel that needs CUDA), or None."""


class Positional(ModuleComponent, Protocol):
    """(config, **options) -> module that embeds positions, rotates q/k, or biases scores.

    Subclass ``models.positional.Positional``, whose defaults do nothing (NoPE); the attention
    features an encoding needs come from ``requires`` (rope: rotate; alibi: bias). Each forward pass
    binds the encoding to its positions once (``Positional.at(pos)``, which calls ``rotation``) and
    hands that to every layer's attention. Positions are (T,), or (B, T) when the rows of a merged
    cache are at different positions; every hook takes both.
    """

    max_positions: int | None  # positions it can encode; None: any length

    def embed(self, pos: Any) -> Any:
        """(T,) or (B, T) positions -> (T, C) or (B, T, C) vectors added to the token embeddings, or None."""

    def rotation(self, pos: Any) -> Any:
        """What rotating at pos (T,) or (B, T) needs, computed once per forward pass (RoPE: cos and
        sin), or None."""

    def rotate(self, x: Any, rotation: Any) -> Any:
        """Rotate queries or keys x (B, H, T, D) with what rotation(pos) gave; identity by default."""

    def bias_slopes(self) -> Any:
        """Per-head slopes m (H,) of a score bias −m·(i − j), or None."""


class Norm(ModuleComponent, Protocol):
    """(dim, config, **options) -> module (..., dim) -> (..., dim).

    A norm whose output is ``weight ⊙ n(x) (+ bias)`` with 1-D ``weight`` and ``bias`` may say so with
    the class attribute ``affine_output = True``: AWQ then folds per-channel scales into them."""

    def forward(self, x: Any) -> Any:
        """Normalise over the last dimension."""


class MLP(ModuleComponent, Protocol):
    """(config, **options) -> module (B,T,C) -> (B,T,C); its output projection is named c_proj."""

    def forward(self, x: Any) -> Any:
        """(B, T, C) -> (B, T, C)."""


class MoE(ModuleComponent, Protocol):
    """(config, **options) -> module (B,T,C) -> ((B,T,C), MoEAux).

    It returns its auxiliary loss (added to the LM loss, already weighted) and detached routing
    statistics with the output: ``models.moe.MoEAux(loss, stats)``, stats holding balance_loss,
    z_loss, tokens_per_expert (E,) and dropped. The trainer sums them over every micro-batch.
    """

    def forward(self, x: Any) -> Any:
        """(B, T, C) -> (output (B, T, C), MoEAux)."""


class Vision(ModuleComponent, Protocol):
    """(config, **options) -> image encoder: images (B, C, H, W) in [0, 1] -> patch features (B, N, width).

    ``config`` is the language model's ModelConfig; the encoder's own sizes are its options. Its
    patches form a grid of (rows, cols), N = rows·cols, known from the options alone (``grid``) so a
    dry run needs no model. Options every member takes: ``image_size``, ``channels``, ``trainable``
    (false: frozen, no gradient) and ``lr`` (its own peak learning rate; default the run's).
    """

    width: int  # features per patch

    @factory_hook
    @staticmethod
    def grid(options: dict) -> tuple[int, int]:
        """(rows, cols) of the patch grid these options produce."""

    def forward(self, images: Any) -> Any:
        """(B, C, H, W) float in [0, 1] -> (B, N, width)."""

    def flops_per_image(self) -> float:
        """Forward matmul FLOPs (convolutions, linear layers and attention) for one image."""


class Connector(ModuleComponent, Protocol):
    """(in_dim, grid, config, **options) -> module: patch features (B, N, in_dim) on a (rows, cols) grid
    -> image tokens (B, M, config.n_embd) in the language model's space (LLaVA's projector,
    nanoVLM's pixel shuffle, the Perceiver resampler / Q-Former)."""

    @factory_hook
    @staticmethod
    def tokens(grid: tuple[int, int], options: dict) -> int:
        """M, the image tokens it makes from a (rows, cols) patch grid."""

    def forward(self, x: Any) -> Any:
        """(B, N, in_dim) -> (B, M, n_embd)."""

    def flops_per_image(self) -> float:
        """Forward matmul FLOPs for one image's patches."""


class Fusion(ModuleComponent, Protocol):
    """(config, n_image_tokens, **options) -> how the language model reads image tokens.

    ``prefix`` places them before the text (LLaVA); ``cross_attention`` adds gated cross-attention
    layers that read them (Flamingo). The GPT calls ``start`` on the text embeddings, ``after_block``
    after every block and ``text`` before the LM head; a cache carries what decoding needs.
    """

    @factory_hook
    @staticmethod
    def positions(n_image_tokens: int, options: dict) -> int:
        """Positions the image takes before the text (a prefix: M; cross-attention: 0)."""

    def start(self, x: Any, image: Any) -> Any:
        """Text embeddings (B, T, C) and image tokens (B, M, C) -> (the residual stream the blocks
        read, how many of its positions come before the text)."""

    def after_block(self, i: int, x: Any, image: Any, cache: Any = None) -> Any:
        """The residual stream after block i -> the stream block i + 1 reads. image: this forward
        pass's image tokens, or None (decoding: what the fusion kept in ``cache.image_kv`` at the prefill)."""

    def text(self, x: Any, prefix: int) -> Any:
        """The final stream -> its text positions only (prefix: image positions at its front)."""


class Contrastive(Protocol):
    """(**options) -> module: image and text embeddings (B, D), each L2-normalised, of B matching
    pairs (row i with row i) -> scalar loss; ``logits(image, text)`` -> (B, B) pair scores."""

    def forward(self, image: Any, text: Any) -> Any:
        """The loss of the batch's B pairs against every other pairing."""

    def logits(self, image: Any, text: Any) -> Any:
        """(B, B): row i image against column j text, higher = more alike."""


class Quantization(Protocol):
    """(**options) -> transform of a model's linear layers: post-training (stage 'post': applied to a
    trained float model) or training-time (stage 'train': QAT, applied when the model is built)."""

    stage: str  # 'post' or 'train'
    format: str  # how weights are stored after apply, for reports

    def apply(self, model: Any) -> Any:
        """Transform the model in place and return it (a calibrated one: apply(model, calibration))."""

    @optional
    def calibration_size(self) -> tuple[int, int | None]:
        """(sequences, tokens each; None: the run's seq_len) of training-split windows the method
        calibrates on (GPTQ, AWQ); they are passed as apply(model, calibration=(N, T) token ids)."""

    @optional
    @factory_hook
    @staticmethod
    def check(config: Any, options: dict) -> str | None:
        """Why these options cannot quantize this config (e.g. a group size), or None."""


class Optimizer(Protocol):
    """(model, train, **options) -> list of torch optimizers that together update every trainable parameter once.

    ``train`` is the run's TrainConfig: lr (the schedule's peak), beta1, beta2, weight_decay. A param
    group may set ``lr_scale``, its learning rate relative to train.lr: each step the trainer sets
    every group's lr to schedule(step)·lr_scale. Gradients are clipped over all optimizers together;
    each one's state_dict is checkpointed, so a resumed run continues bitwise on CPU.
    """

    @optional
    @factory_hook
    @staticmethod
    def check(train: Any, options: dict) -> str | None:
        """Why these options cannot train with these settings (e.g. a distributed strategy), or None."""


PROTOCOLS: dict[str, type] = {
    "attention": Attention,
    "attention_backend": AttentionBackend,
    "positional": Positional,
    "norm": Norm,
    "mlp": MLP,
    "moe": MoE,
    "quantization": Quantization,
    "optimizer": Optimizer,
    "vision": Vision,
    "connector": Connector,
    "fusion": Fusion,
    "contrastive": Contrastive,
}


class Hook:
    """One member of a family's protocol."""

    def __init__(self, name: str, member: Any, annotation: Any = None):
        self.name = name
        function = getattr(member, "__func__", member)
        self.is_method = callable(function)
        self.optional = getattr(function, "__contract_optional__", False)
        self.factory = getattr(function, "__contract_factory__", False)
        self.doc = (inspect.getdoc(function) or "").strip() if self.is_method else ""
        self.function = function if self.is_method else None
        self.annotation = annotation

    @property
    def signature(self) -> str:
        if not self.is_method:
            return f"{self.name}: {self.annotation}"
        params = [p for p in inspect.signature(self.function).parameters.values() if p.name != "self"]
        text = str(inspect.Signature(params, return_annotation=inspect.signature(self.function).return_annotation))
        return f"{self.name}{text}".replace("'", "")

    @property
    def arity(self) -> int:
        """Positional parameters the hook is called with (self excluded)."""
        return sum(1 for p in inspect.signature(self.function).parameters.values()
                   if p.name != "self" and p.default is p.empty)


def hooks(family: str) -> list[Hook]:
    """The members of a family's protocol, in the order the protocol states them (bases first)."""
    found: dict[str, Hook] = {}
    for cls in reversed(PROTOCOLS[family].__mro__):
        if cls is object or cls is Protocol or not getattr(cls, "_is_protocol", False):
            continue
        for name, annotation in getattr(cls, "__annotations__", {}).items():
            found[name] = Hook(name, None, annotation)
        for name, member in vars(cls).items():
            if not name.startswith("_") or name == "__call__":
                if callable(getattr(member, "__func__", member)):
                    found[name] = Hook(name, member)
    return list(found.values())


def describe(family: str) -> str:
    """The contract of a family as text: the protocol's docstring, then each hook."""
    lines = [inspect.cleandoc(PROTOCOLS[family].__doc__ or ""), ""]
    if family == "attention":
        lines += ["Attention features:", *(f"  {name:8} {text}" for name, text in FEATURES.items()), ""]
    lines.append("Hooks:")
    for hook in hooks(family):
        kind = "optional" if hook.optional else "required"
        where = ", read from the factory" if hook.factory else ""
        lines.append(f"  {hook.signature}  [{kind}{where}]")
        if hook.doc:
            lines += [f"      {line}" for line in hook.doc.splitlines()]
    return "\n".join(lines)


def violations(family: str, factory: Callable[..., Any], fixed: dict | None = None) -> list[str]:
    """What a factory lacks or gets wrong against its family's protocol (empty when it complies).

    A class is checked whole; a function factory only for its factory hooks (the module it returns
    is checked by ``built_violations``).
    """
    problems = []
    is_class = inspect.isclass(factory)
    for hook in hooks(family):
        if not is_class and not hook.factory:
            continue
        present = hasattr(factory, hook.name)
        if not present:
            if not hook.optional and hook.is_method:
                problems.append(f"lacks {hook.signature}" + (f" ({_first_sentence(hook.doc)})" if hook.doc else ""))
            elif not hook.optional and not _has_annotation(factory, hook.name):
                problems.append(f"lacks the attribute {hook.signature}")
            continue
        if hook.is_method and hook.factory:
            problems += _shape_problems(hook, getattr(factory, hook.name))
    return problems


def built_violations(family: str, module: Any) -> list[str]:
    """What a built component lacks against its family's protocol (for function factories)."""
    return [f"lacks {hook.signature}" for hook in hooks(family)
            if not hook.optional and not hook.factory and not hasattr(module, hook.name)]


def _first_sentence(text: str) -> str:
    flat = " ".join(text.split())
    return flat.split(". ")[0].rstrip(".")


def _has_annotation(cls: type, name: str) -> bool:
    return any(name in getattr(c, "__annotations__", {}) for c in getattr(cls, "__mro__", ()))


def _shape_problems(hook: Hook, given: Any) -> list[str]:
    """A factory hook must be callable with the protocol's arguments: one shape across families."""
    if not callable(given):
        return [f"{hook.name} must be a callable {hook.signature}"]
    try:
        params = list(inspect.signature(given).parameters.values())
    except (TypeError, ValueError):
        return []
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) > hook.arity or len(positional) < hook.arity:
        return [f"{hook.name} takes {len(positional)} argument(s) but the contract calls {hook.signature}"
                " (a staticmethod)"]
    return []
