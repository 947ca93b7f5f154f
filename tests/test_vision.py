"""Image encoders (models.vision) and connectors (models.connector): shapes, FLOP accounting against
torch's counter, bidirectional attention, pixel shuffle's layout, checks, freezing, permutation invariance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.accounting import counted_flops, matmul_flops_per_token
from models.attention import Attend

# importing models.connector and models.vision registers their members (models/__init__ may not yet)
from models.connector import PixelShuffleConnector, Resampler, space_to_depth
from models.registry import build, get
from models.vision import ConvStem, StemConv, ViT
from tests.conftest import registered, tiny

MATH = {"name": "mha", "backend": "math"}  # CPU SDPA's matmuls are invisible to FlopCounterMode

ENCODERS = [
    ("vit", {"attention": MATH}),
    ("vit", {"attention": MATH, "positional": "rope", "patch_size": 2, "n_layer": 1}),
    ("vit", {"attention": MATH, "positional": "alibi", "mlp": "swiglu", "norm": "rmsnorm", "channels": 3}),
    ("vit", {"attention": {"name": "gqa", "n_kv_head": 2, "backend": "math"}, "image_size": 8, "patch_size": 4}),
    ("conv", {}),
    ("conv", {"stages": 3, "channels": 3, "n_embd": 32}),
]


def _images(encoder, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, encoder.channels, encoder.image_size, encoder.image_size)


def _close(expected: float, counted: float, rel: float = 0.02) -> bool:
    return abs(expected - counted) <= rel * counted


@pytest.mark.parametrize("name,options", ENCODERS)
def test_encoder_shapes_grid_and_flops_match_torchs_counter(name, options):
    config = tiny()
    encoder = build("vision", name, config, **options)
    images = _images(encoder)
    out = encoder(images)
    rows, cols = get("vision", name).factory.grid(options)  # the factory hook, from the options alone
    assert (rows, cols) == encoder.grid_size
    assert out.shape == (2, rows * cols, encoder.width)
    assert torch.isfinite(out).all()
    counted = counted_flops(encoder, images) / 2  # per image
    assert counted > 0 and _close(encoder.flops_per_image(), counted), (encoder.flops_per_image(), counted)
    # counted per image by the model, not by the language model's per-token walk
    assert encoder.flops_per_token(64, causal=True) == 0.0 and matmul_flops_per_token(encoder, 64, True) == 0.0


def test_vit_flops_are_the_formula():
    """patch embedding 2·(C·p²)·d·N plus, per layer, 24·N·d² (qkv, proj, 4d MLP) + 4·N²·d (scores, probs·v)."""
    vit = build("vision", "vit", tiny(), attention=MATH, image_size=16, patch_size=4, n_embd=64, n_layer=2)
    N, d = 16, 64
    assert vit.flops_per_image() == 2 * 16 * d * N + 2 * (24 * N * d * d + 4 * N * N * d)


def test_conv_stem_flops_are_the_formula():
    """16×16×1 → 8×8×32 → 4×4×64, then a 64→64 projection at 16 pixels."""
    stem = build("vision", "conv", tiny(), image_size=16, channels=1, stages=2, n_embd=64)
    assert [(c.in_channels, c.out_channels) for c in stem.convs] == [(1, 32), (32, 64)]
    assert stem.flops_per_image() == 2 * 1 * 32 * 9 * 64 + 2 * 32 * 64 * 9 * 16 + 2 * 64 * 64 * 16


CONNECTORS = [
    ("linear", {}),
    ("mlp", {}),
    ("pixel_shuffle", {}),
    ("pixel_shuffle", {"factor": 3}),
    ("resampler", {}),
    ("resampler", {"queries": 5, "n_head": 2}),
]


@pytest.mark.parametrize("name,options", CONNECTORS)
def test_connector_shapes_tokens_and_flops_match_torchs_counter(name, options):
    config = tiny(n_embd=48)
    grid, in_dim = (6, 6), 20
    connector = build("connector", name, in_dim, grid, config, **options)
    x = torch.randn(2, grid[0] * grid[1], in_dim)
    out = connector(x)
    M = get("connector", name).factory.tokens(grid, options)
    assert out.shape == (2, M, 48)
    assert M == {"linear": 36, "mlp": 36, "pixel_shuffle": 36 // options.get("factor", 2) ** 2,
                 "resampler": options.get("queries", 8)}[name]
    counted = counted_flops(connector, x) / 2
    assert counted > 0 and _close(connector.flops_per_image(), counted), (connector.flops_per_image(), counted)
    assert connector.flops_per_token(64, causal=False) == 0.0 and matmul_flops_per_token(connector, 64, False) == 0.0


def test_encoder_and_connector_chain_on_the_encoders_grid():
    config = tiny()
    vit = build("vision", "vit", config, attention=MATH, image_size=16, patch_size=2)  # 8×8 patches
    connector = build("connector", "pixel_shuffle", vit.width, vit.grid_size, config, factor=4)
    assert connector(vit(_images(vit))).shape == (2, 4, config.n_embd)


# -- the ViT attends both ways -----------------------------------------------------------------------


def test_vit_is_bidirectional_the_last_patch_changes_the_first_patchs_features():
    vit = build("vision", "vit", tiny(), attention=MATH, n_layer=1).eval()
    images = _images(vit)
    changed = images.clone()
    changed[:, :, -4:, -4:] = torch.rand(2, 1, 4, 4)  # the last patch (bottom right) only
    first = vit(images)[:, 0]
    assert not torch.allclose(vit(changed)[:, 0], first, atol=1e-6)
    # the control: with a causal mask the first patch could not see the last one
    for module in vit.modules():
        if isinstance(module, Attend):
            module.bidirectional = False
    assert torch.equal(vit(changed)[:, 0], vit(images)[:, 0])


def test_every_attend_in_a_vit_is_bidirectional():
    vit = build("vision", "vit", tiny(), attention={"name": "diff", "backend": "math"}, n_layer=3)
    attends = [m for m in vit.modules() if isinstance(m, Attend)]
    assert len(attends) == 3 and all(a.bidirectional for a in attends)


def test_vit_equals_a_hand_written_forward():
    """One layer: unfold patches, embed, add learned positions, pre-norm attention with no mask and a
    GELU MLP, final norm — written out here with the ViT's own weights."""
    torch.manual_seed(1)
    vit = build("vision", "vit", tiny(), attention=MATH, n_layer=1, n_embd=32, n_head=2, image_size=8,
                patch_size=4, channels=2).eval()
    for p in vit.parameters():  # not the constructors' ones and zeros: every weight matters
        p.data.normal_(0, 0.3)
    images = torch.rand(3, 2, 8, 8)
    block, B, N, d, H = vit.blocks[0], 3, 4, 32, 2

    patches = F.unfold(images, kernel_size=4, stride=4).transpose(1, 2)  # (B, N, C·p·p), raster order
    x = patches @ vit.patch_embed.weight.T + vit.patch_embed.bias + vit.positional.wpe.weight[:N]
    a = F.layer_norm(x, (d,), block.norm_1.weight, block.norm_1.bias)
    q, k, v = (a @ block.attn.c_attn.weight.T + block.attn.c_attn.bias).split(d, dim=2)
    q, k, v = (t.view(B, N, H, d // H).transpose(1, 2) for t in (q, k, v))
    att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // H), dim=-1)  # no mask
    y = (att @ v).transpose(1, 2).reshape(B, N, d)
    x = x + y @ block.attn.c_proj.weight.T + block.attn.c_proj.bias
    m = F.layer_norm(x, (d,), block.norm_2.weight, block.norm_2.bias)
    x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(m)))
    expected = F.layer_norm(x, (d,), vit.norm_f.weight, vit.norm_f.bias)

    torch.testing.assert_close(vit(images), expected, rtol=1e-5, atol=1e-5)


def test_a_vit_needs_an_attention_through_attend():
    class NoAttend(nn.Module):
        """An attention plugin that does not use models.attention.Attend."""

        def __init__(self, config):
            super().__init__()
            self.c_proj = nn.Linear(config.n_embd, config.n_embd)

        @staticmethod
        def handles(config, options):
            return frozenset({"rotate", "bias", "dropout"})

        def forward(self, x, positional, pos, cache=None):
            return self.c_proj(x)

    with registered("attention", "no_attend", NoAttend), \
            pytest.raises(ValueError, match="bidirectional attention through models.attention.Attend"):
        build("vision", "vit", tiny(), attention="no_attend")


# -- pixel shuffle's layout --------------------------------------------------------------------------


def test_space_to_depth_groups_each_2x2_neighbourhood_in_raster_order():
    """4×4 grid, feature = patch index (two features: index and 100·index): token (R, C) holds
    patches (2R+i, 2C+j) for (i, j) = (0,0), (0,1), (1,0), (1,1), each patch's features together."""
    index = torch.arange(16, dtype=torch.float32)
    x = torch.stack([index, 100 * index], dim=-1)[None]  # (1, 16, 2)
    out = space_to_depth(x, (4, 4), 2)
    assert out.shape == (1, 4, 8)
    assert out[0, 0].tolist() == [0, 0, 1, 100, 4, 400, 5, 500]
    assert out[0, :, ::2].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_space_to_depth_on_a_non_square_grid():
    x = torch.arange(2 * 6, dtype=torch.float32).view(1, 12, 1)  # 2 rows × 6 cols
    assert space_to_depth(x, (2, 6), 2)[0].tolist() == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]


def test_pixel_shuffle_connector_is_space_to_depth_then_linear():
    connector = build("connector", "pixel_shuffle", 3, (4, 4), tiny())
    x = torch.randn(2, 16, 3)
    torch.testing.assert_close(connector(x), connector.proj(space_to_depth(x, (4, 4), 2)))


# -- checks ------------------------------------------------------------------------------------------


def test_vit_refuses_an_image_size_the_patches_do_not_tile():
    reason = ViT.check(tiny(), {"image_size": 18, "patch_size": 4})
    assert reason is not None and "image_size=18" in reason and "patch_size=4" in reason
    assert ViT.check(tiny(), {"image_size": 16, "patch_size": 4}) is None
    with pytest.raises(ValueError, match="image_size=18 is not divisible by patch_size=4"):
        build("vision", "vit", tiny(), image_size=18, patch_size=4)


def test_vit_check_refuses_bad_heads_lr_and_blocks():
    assert "n_head=3" in ViT.check(tiny(), {"n_embd": 64, "n_head": 3})
    assert "lr=0" in ViT.check(tiny(), {"lr": 0.0})
    assert ViT.check(tiny(), {"lr": 1e-4}) is None
    # the encoder's blocks are validated as a config of their own: a window needs a kernel that does one
    reason = ViT.check(tiny(), {"attention": {"name": "mha", "backend": {"name": "sdpa", "kernel": "flash"}},
                                "positional": "alibi"})
    assert reason is not None and reason.startswith("its blocks:") and "alibi" in reason, reason


def test_vit_refuses_alibi_or_a_window_on_kernels_that_would_make_them_causal():
    for backend in ("auto", "flex"):
        reason = ViT.check(tiny(), {"attention": {"name": "mha", "backend": backend}, "positional": "alibi"})
        assert reason is not None and f"backend '{backend}'" in reason and "bias" in reason, reason
        reason = ViT.check(tiny(), {"attention": {"name": "window", "window": 3, "backend": backend}})
        assert reason is not None and "window" in reason, reason
    for backend in ("math", "baddbmm", "sdpa"):
        assert ViT.check(tiny(), {"attention": {"name": "mha", "backend": backend}, "positional": "alibi"}) is None
    assert ViT.check(tiny(), {"attention": {"name": "mha", "backend": "flex"}, "positional": "rope"}) is None


def test_a_windowed_vit_sees_a_band_on_both_sides():
    """window=2 over raster positions: patch i sees i − 1, i and i + 1. The third patch's features
    change with the fourth's pixels (a later patch) and not with the first's."""
    vit = build("vision", "vit", tiny(), attention={"name": "window", "window": 2, "backend": "math"},
                n_layer=1, positional="none", image_size=16, patch_size=4).eval()
    images = _images(vit)
    third = vit(images)[:, 2]
    later, earlier = images.clone(), images.clone()
    later[:, :, :4, 12:] = torch.rand(2, 1, 4, 4)  # patch 3 (row 0, col 3)
    earlier[:, :, :4, :4] = torch.rand(2, 1, 4, 4)  # patch 0
    assert not torch.allclose(vit(later)[:, 2], third, atol=1e-6)
    torch.testing.assert_close(vit(earlier)[:, 2], third)


def test_conv_stem_refuses_an_image_size_its_stages_do_not_halve():
    assert "image_size=12" in ConvStem.check(tiny(), {"image_size": 12, "stages": 3})
    assert ConvStem.check(tiny(), {"image_size": 16, "stages": 3}) is None
    assert ConvStem.grid({"image_size": 16, "stages": 3}) == (2, 2)
    with pytest.raises(ValueError, match="image_size=12"):
        build("vision", "conv", tiny(), image_size=12, stages=3)


def test_pixel_shuffle_refuses_a_factor_that_does_not_tile_the_grid():
    reason = PixelShuffleConnector.check_grid((4, 4), {"factor": 3})
    assert reason is not None and "factor=3" in reason and "4×4" in reason
    assert PixelShuffleConnector.check_grid((4, 4), {"factor": 2}) is None
    assert PixelShuffleConnector.check_grid((4, 6), {}) is None  # default factor 2
    with pytest.raises(ValueError, match="factor=3"):
        build("connector", "pixel_shuffle", 8, (4, 4), tiny(), factor=3)


def test_resampler_refuses_heads_that_do_not_divide_the_width():
    assert "n_head=5" in Resampler.check(tiny(n_embd=32), {"n_head": 5})
    assert Resampler.check(tiny(n_embd=32), {"n_head": 4}) is None


def test_encoders_refuse_images_of_the_wrong_shape():
    vit = build("vision", "vit", tiny(), image_size=16, channels=1)
    with pytest.raises(ValueError, match=r"\(B, 1, 16, 16\)"):
        vit(torch.rand(2, 3, 16, 16))


# -- freezing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options", [("vit", {"attention": MATH}), ("conv", {})])
def test_a_frozen_encoder_gets_no_gradient(name, options):
    config = tiny()
    encoder = build("vision", name, config, trainable=False, **options)
    connector = build("connector", "mlp", encoder.width, encoder.grid_size, config)
    connector(encoder(_images(encoder))).square().mean().backward()
    params = list(encoder.parameters())
    assert params and all(p.grad is None and not p.requires_grad for p in params)
    assert all(p.grad is not None for p in connector.parameters())  # the control: the loss did flow
    trainable = build("vision", name, config, **options)
    trainable(_images(trainable)).square().mean().backward()
    assert all(p.grad is not None for p in trainable.parameters() if p.requires_grad)
    assert all(p.requires_grad for p in trainable.parameters())


# -- the resampler -----------------------------------------------------------------------------------


def test_resampler_does_not_depend_on_the_patches_order():
    connector = build("connector", "resampler", 20, (4, 4), tiny(), queries=6)
    x = torch.randn(3, 16, 20)
    order = torch.randperm(16)
    assert not torch.equal(order, torch.arange(16))
    torch.testing.assert_close(connector(x[:, order]), connector(x), rtol=1e-5, atol=1e-6)
    # while the linear connector's tokens follow the patches
    linear = build("connector", "linear", 20, (4, 4), tiny())
    assert not torch.allclose(linear(x[:, order]), linear(x))


def test_resampler_queries_are_reset_deterministically():
    connector = build("connector", "resampler", 20, (4, 4), tiny(n_embd=64), queries=64)
    torch.manual_seed(5)
    connector.reset_parameters()
    first = connector.queries.detach().clone()
    torch.manual_seed(5)
    connector.reset_parameters()
    assert torch.equal(connector.queries, first)
    assert abs(first.std().item() - 0.02) < 0.002


def test_stem_conv_reset_is_deterministic_he_normal():
    conv = StemConv(16, 64, bias=True)
    torch.manual_seed(3)
    conv.reset_parameters()
    first = conv.weight.detach().clone()
    torch.manual_seed(3)
    conv.reset_parameters()
    assert torch.equal(conv.weight, first) and torch.count_nonzero(conv.bias) == 0
    assert abs(first.std().item() - math.sqrt(2 / (16 * 9))) < 0.01
