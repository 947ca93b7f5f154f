"""Image encoders (family "vision"). Context: (config), the language model's ModelConfig; the
encoder's own sizes are its options. Images (B, C, H, W) float in [0, 1] -> patch features (B, N, width),
N = rows·cols patches in raster order (row by row, left to right).

    vit   ViT patch encoder (Dosovitskiy et al. 2021): linear patch embedding, then bidirectional
          transformer blocks built from the registry (attention, positional, norm, MLP)
    conv  convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better"):
          stride-2 3×3 convolutions, then a 1×1 projection; each output pixel is a patch

Every member takes ``image_size``, ``channels``, ``trainable`` (false: frozen, every parameter's
requires_grad off, so no gradient and no optimizer state) and ``lr`` (its own peak learning rate;
None: the run's). An encoder's FLOPs are counted per image (``flops_per_image``) by the model's
accounting; its ``flops_per_token`` is 0 so the language model's per-token walk does not count it.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch
from torch import Tensor, nn

from models.attention import Attend
from models.config import ModelConfig, needed_features
from models.flops import matmul_flops_per_token
from models.gpt import Block
from models.registry import build_spec, ref, register

# Kernels that take a bidirectional mask's window and ALiBi bias from Mask.allowed / Mask.bias. flex,
# flash_attn and xformers build windows and ALiBi causally from the mask's fields, ignoring
# Mask.bidirectional, and auto may pick them; an encoder without either (mask kind 'none') runs on any.
BIDIRECTIONAL_KERNELS = ("math", "baddbmm", "sdpa")


def with_defaults(factory: Any, options: dict) -> dict:
    """options with the factory's keyword-only defaults filled in: a factory hook may get a partial spec."""
    params = inspect.signature(factory).parameters.values()
    defaults = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.default is not p.empty}
    return {**defaults, **options}


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, C·p·p): non-overlapping p×p patches in raster order, each flattened
    channel-major (c, i, j), the order of F.unfold and of a Conv2d's flattened weight."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.view(B, C, H // p, p, W // p, p)  # (B, C, rows, i, cols, j)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, rows, cols, C, i, j)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def _check_common(options: dict) -> str | None:
    """What every encoder refuses: sizes below 1 and a learning rate that is not positive."""
    for key in ("image_size", "channels"):
        if options[key] < 1:
            return f"{key}={options[key]} must be at least 1"
    if options["lr"] is not None and options["lr"] <= 0:
        return f"lr={options['lr']} must be positive (or None: the run's)"
    return None


def _check_images(images: Tensor, channels: int, image_size: int, name: str) -> None:
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, image_size, image_size):
        raise ValueError(f"vision '{name}' takes images (B, {channels}, {image_size}, {image_size}), "
                         f"got {tuple(images.shape)}")


def _freeze(module: nn.Module, trainable: bool) -> None:
    """A frozen encoder's parameters get no gradient (and so no optimizer state). The GPT still
    initialises them (under no_grad): frozen at their seeded initial values."""
    if not trainable:
        module.requires_grad_(False)


def _take(encoder: nn.Module, name: str, config, options: dict) -> None:
    """Refuse options the member's check refuses (as a config would), and set what every encoder
    exposes: image_size, channels, grid_size (rows, cols), width, trainable and lr."""
    reason = type(encoder).check(config, options)
    if reason:
        raise ValueError(f"vision '{name}': {reason}")
    encoder.image_size, encoder.channels = options["image_size"], options["channels"]
    encoder.grid_size = type(encoder).grid(options)
    encoder.width = options["n_embd"]
    encoder.trainable, encoder.lr = options["trainable"], options["lr"]


@register("vision", "vit", description="ViT patch encoder: linear patch embedding + bidirectional transformer blocks (Dosovitskiy et al. 2021)")
class ViT(nn.Module):
    """ViT (Dosovitskiy et al. 2021) without a class token: the connector reads every patch.

    Patches (p×p, flattened) -> ``patch_embed`` (a Linear, so the GPT's seeded init covers it) ->
    + position embedding -> n_layer pre-norm ``models.gpt.Block`` s -> ``norm_f``. The blocks are
    built from an encoder ModelConfig of the options (attention, positional, norm and MLP come from
    the registry, as the language model's do) with every ``Attend`` set bidirectional: each patch
    attends to every other. Positions are the patch indices 0..N−1 in raster order.
    """

    width: int  # features per patch (n_embd)
    grid_size: tuple[int, int]  # (rows, cols) of patches

    def __init__(
        self,
        config,
        *,
        image_size: int = 16,
        channels: int = 1,
        patch_size: int = 4,
        n_layer: int = 2,
        n_embd: int = 64,
        n_head: int = 4,
        attention: ref("attention") = "mha",
        positional: ref("positional") = "learned",
        norm: ref("norm") = "layernorm",
        mlp: ref("mlp") = "gelu",
        trainable: bool = True,
        lr: float | None = None,
    ):
        super().__init__()
        options = {"image_size": image_size, "channels": channels, "patch_size": patch_size, "n_layer": n_layer,
                   "n_embd": n_embd, "n_head": n_head, "attention": attention, "positional": positional,
                   "norm": norm, "mlp": mlp, "trainable": trainable, "lr": lr}
        _take(self, "vit", config, options)
        self.patch_size = patch_size
        self.n_patches = self.grid_size[0] * self.grid_size[1]
        inner = _encoder_config(config, options)

        self.patch_embed = nn.Linear(channels * patch_size * patch_size, n_embd, bias=config.bias)
        self.positional = build_spec("positional", inner.positional, inner)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(inner) for _ in range(n_layer))
        self.norm_f = build_spec("norm", inner.norm, inner.n_embd, inner)
        for block in self.blocks:
            attends = [m for m in block.attn.modules() if isinstance(m, Attend)]
            if not attends:
                raise ValueError(f"vision 'vit': attention '{inner.attention['name']}' has no models.attention.Attend "
                                 "in its layers; a vision encoder needs bidirectional attention through "
                                 "models.attention.Attend (the shared cache → mask → kernel step), which it sets "
                                 "bidirectional")
            for attend in attends:
                attend.bidirectional = True  # every patch sees every patch: no causal mask
        _freeze(self, trainable)

    @staticmethod
    def grid(options: dict) -> tuple[int, int]:
        """(rows, cols) = (image_size // patch_size,) * 2."""
        options = with_defaults(ViT, options)
        side = options["image_size"] // options["patch_size"]
        return side, side

    @staticmethod
    def check(config, options: dict) -> str | None:
        """Patches must tile the image, heads divide the width, and the encoder's own blocks
        (attention with positional, norm, MLP) must form a valid config."""
        options = with_defaults(ViT, options)
        reason = _check_common(options)
        if reason:
            return reason
        size, patch = options["image_size"], options["patch_size"]
        if patch < 1 or size % patch:
            return f"image_size={size} is not divisible by patch_size={patch}"
        if options["n_head"] < 1 or options["n_embd"] % options["n_head"]:
            return f"n_embd={options['n_embd']} must be divisible by n_head={options['n_head']}"
        try:
            inner = _encoder_config(config, options)
        except ValueError as e:  # pydantic's ValidationError is one: the encoder's blocks cannot be built
            errors = getattr(e, "errors", None)
            text = errors()[0]["msg"] if callable(errors) else str(e)
            return "its blocks: " + text.removeprefix("Value error, ")
        banded = sorted({"bias", "window"} & set(needed_features(inner)))
        backend = inner.attention.get("backend")
        if banded and isinstance(backend, dict) and backend["name"] not in BIDIRECTIONAL_KERNELS:
            return (f"its attention's {' and '.join(banded)} with backend '{backend['name']}' would be causal "
                    f"(that kernel ignores a bidirectional mask's other side); use backend "
                    f"{', '.join(BIDIRECTIONAL_KERNELS)}")
        return None

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, N, width)."""
        _check_images(images, self.channels, self.image_size, "vit")
        x = self.patch_embed(patchify(images, self.patch_size))  # (B, N, width)
        pos = torch.arange(self.n_patches, device=images.device)  # raster order
        pos_emb = self.positional.embed(pos)  # (N, width) or None (rope, alibi, none)
        if pos_emb is not None:
            x = x + pos_emb
        x = self.drop(x)
        positions = self.positional.at(pos)  # what rotating needs, once for every block
        for block in self.blocks:
            x, _ = block(x, positions, pos)  # no MoE in an encoder: no auxiliary output
        return self.norm_f(x)

    def flops_per_image(self) -> float:
        """Forward matmul FLOPs for one image: the patch embedding and every block at full
        (non-causal) attention over the N patches — bidirectional, so the full score matrix is real."""
        N = self.n_patches
        flops = 2 * self.patch_embed.in_features * self.patch_embed.out_features * N
        return flops + sum(matmul_flops_per_token(block, N, causal=False) * N for block in self.blocks)

    def flops_per_token(self, seq_len: int, causal: bool) -> float:
        """0: the encoder is counted per image (``flops_per_image``) by the model's accounting, so the
        language model's per-token tree walk does not count it."""
        return 0.0


def _encoder_config(config, options: dict) -> ModelConfig:
    """The ModelConfig a ViT's blocks are built from: its own sizes and components, the language
    model's bias and dropout; block_size = N patches (learned positions cover exactly those)."""
    rows, cols = ViT.grid(options)
    return ModelConfig(n_layer=options["n_layer"], n_head=options["n_head"], n_embd=options["n_embd"],
                       block_size=rows * cols, vocab_size=1, bias=config.bias, dropout=config.dropout,
                       attention=options["attention"], positional=options["positional"], norm=options["norm"],
                       mlp=options["mlp"])


class StemConv(nn.Conv2d):
    """3×3, stride-2, padding-1 convolution (halves each side of an even image) with He-normal
    weights: the GPT initialises only nn.Linear / nn.Embedding weights itself and calls this
    ``reset_parameters`` for the rest, on a stream keyed by the conv's name (deterministic per seed)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool):
        super().__init__(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=bias)

    def reset_parameters(self) -> None:
        # fan-in He init keeps the activations' scale through each GELU (0.02 would shrink a
        # 9-input first layer's output to almost nothing)
        nn.init.kaiming_normal_(self.weight, mode="fan_in", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)


@register("vision", "conv", description="convolutional stem: stride-2 3×3 convs + GELU, then a 1×1 projection (Xiao et al. 2021)")
class ConvStem(nn.Module):
    """A small conv stem (Xiao et al. 2021, "Early convolutions help transformers see better").

    ``stages`` StemConvs (3×3, stride 2) each followed by GELU; stage i (0-based) outputs
    n_embd // 2**(stages − 1 − i) channels, doubling up to n_embd at the last (e.g. stages=2,
    n_embd=64: C → 32 → 64), as the paper's stem doubles channels at each stride-2 conv (it uses
    BatchNorm + ReLU; a stem without batch statistics keeps a forward pass per image). Then a 1×1
    projection ``proj`` (an nn.Linear over each pixel's channels: the same map, seeded by the GPT).
    Each output pixel is a patch: grid = image_size / 2**stages per side, in raster order.
    """

    width: int  # features per patch (n_embd)
    grid_size: tuple[int, int]  # (rows, cols) of patches

    def __init__(
        self,
        config,
        *,
        image_size: int = 16,
        channels: int = 1,
        stages: int = 2,
        n_embd: int = 64,
        trainable: bool = True,
        lr: float | None = None,
    ):
        super().__init__()
        options = {"image_size": image_size, "channels": channels, "stages": stages, "n_embd": n_embd,
                   "trainable": trainable, "lr": lr}
        _take(self, "conv", config, options)
        widths = [channels] + [n_embd // 2 ** (stages - 1 - i) for i in range(stages)]
        self.convs = nn.ModuleList(StemConv(cin, cout, config.bias) for cin, cout in itertools.pairwise(widths))
        self.act = nn.GELU()
        self.proj = nn.Linear(n_embd, n_embd, bias=config.bias)
        _freeze(self, trainable)

    @staticmethod
    def grid(options: dict) -> tuple[int, int]:
        """(rows, cols) = (image_size / 2**stages,) * 2."""
        options = with_defaults(ConvStem, options)
        side = options["image_size"] // 2 ** options["stages"]
        return side, side

    @staticmethod
    def check(config, options: dict) -> str | None:
        """Every stage must halve the image exactly, and the channel widths must be whole."""
        options = with_defaults(ConvStem, options)
        reason = _check_common(options)
        if reason:
            return reason
        size, stages, width = options["image_size"], options["stages"], options["n_embd"]
        if stages < 1:
            return f"stages={stages} must be at least 1"
        if size % 2**stages:
            return f"image_size={size} is not divisible by 2**stages={2**stages} (stages={stages})"
        if width % 2 ** (stages - 1):
            return f"n_embd={width} must be divisible by 2**(stages-1)={2 ** (stages - 1)}: the first stage has n_embd/2**(stages-1) channels"
        return None

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, N, width)."""
        _check_images(images, self.channels, self.image_size, "conv")
        x = images
        for conv in self.convs:
            x = self.act(conv(x))  # (B, C_i, H/2^i, W/2^i)
        x = x.flatten(2).transpose(1, 2)  # (B, rows·cols, n_embd), raster order
        return self.proj(x)

    def flops_per_image(self) -> float:
        """2·C_in·C_out·k²·H_out·W_out per convolution (the counter counts padded taps too), plus the
        1×1 projection at every output pixel."""
        flops, side = 0.0, self.image_size
        for conv in self.convs:
            side //= 2
            k_h, k_w = conv.kernel_size
            flops += 2 * conv.in_channels * conv.out_channels * k_h * k_w * side * side
        return flops + 2 * self.proj.in_features * self.proj.out_features * self.grid_size[0] * self.grid_size[1]

    def flops_per_token(self, seq_len: int, causal: bool) -> float:
        """0: the encoder is counted per image (``flops_per_image``) by the model's accounting, so the
        language model's per-token tree walk does not count it."""
        return 0.0
