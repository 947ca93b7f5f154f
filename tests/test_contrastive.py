"""Contrastive image–text losses (models/contrastive.py): CLIP's softmax InfoNCE and SigLIP's pairwise
sigmoid, checked against numbers worked on paper, against independent references, and by name."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import models.contrastive  # noqa: F401  (registers the family's members)
from models.contrastive import ClipLoss, SigLipLoss, recall_at_1
from models.registry import ComponentError, build, list_components

E1_E2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
# text rows 60° apart: t0 = (1, 0), t1 = (cos 60°, sin 60°) = (1/2, √3/2); both unit length
SIXTY = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])


def clip(**options) -> ClipLoss:
    return build("contrastive", "clip", **options)


def siglip(**options) -> SigLipLoss:
    return build("contrastive", "siglip", **options)


def unit(rows: int, dim: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, dtype=torch.float64), dim=-1)


# --- numbers worked on paper ---------------------------------------------------------------------

def test_clip_on_orthogonal_pairs_by_hand():
    # scale exp(t) = 1 (temperature 1): logits = I·Tᵀ = [[1, 0], [0, 1]].
    # each row (and column) is a 2-way softmax with the true logit 1 against 0:
    #   CE = −log(e¹ / (e¹ + e⁰)) = log(1 + e⁻¹) = log(1.3678794) = 0.3132617
    # both directions give the same, so loss = (0.3132617 + 0.3132617) / 2 = 0.3132617
    loss = clip(init_temperature=1.0)
    assert torch.equal(loss.logits(E1_E2, E1_E2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert loss(E1_E2, E1_E2).item() == pytest.approx(0.3132617, abs=1e-6)
    # temperature 1/2 (scale 2): logits [[2, 0], [0, 2]], CE = log(1 + e⁻²) = log(1.1353353) = 0.1269280
    assert clip(init_temperature=0.5)(E1_E2, E1_E2).item() == pytest.approx(0.1269280, abs=1e-6)


def test_clip_on_pairs_at_sixty_degrees_by_hand():
    # image = e1, e2; text = (1, 0), (1/2, √3/2); scale 1.
    # logits = I·Tᵀ = [[1, 1/2], [0, √3/2 = 0.8660254]]
    # image→text (rows):  row 0: log(1 + e^(1/2 − 1))   = log(1 + 0.6065307) = 0.4740770
    #                     row 1: log(1 + e^(0 − 0.8660)) = log(1 + 0.4206200) = 0.3510934
    # text→image (cols):  col 0 = (1, 0), true 1:        log(1 + e⁻¹)        = 0.3132617
    #                     col 1 = (1/2, 0.8660), true 2nd: log(1 + e^(0.5 − 0.8660)) = log(1.6934852) = 0.5267886
    # loss = ((0.4740770 + 0.3510934) / 2 + (0.3132617 + 0.5267886) / 2) / 2 = 1.6652207 / 4 = 0.4163052
    loss = clip(init_temperature=1.0)
    assert loss(E1_E2, SIXTY).item() == pytest.approx(0.4163052, abs=1e-6)
    # the directions differ here: swapping image and text transposes the logits, same symmetric loss
    assert loss(SIXTY, E1_E2).item() == pytest.approx(0.4163052, abs=1e-6)


def test_siglip_on_orthogonal_pairs_by_hand():
    # scale 1, bias 0: logits = [[1, 0], [0, 1]]
    #   diagonal, z = +1, logit 1:  −log σ(1)  = log(1 + e⁻¹) = 0.3132617  (twice)
    #   off it,   z = −1, logit 0:  −log σ(0)  = log 2        = 0.6931472  (twice)
    # sum = 2·0.3132617 + 2·0.6931472 = 2.0128178; / B = 2 → 1.0064089
    assert siglip(init_scale=1.0, init_bias=0.0)(E1_E2, E1_E2).item() == pytest.approx(1.0064089, abs=1e-6)
    # bias −1: diagonal logit 0 → log 2 = 0.6931472; off logit −1, z = −1 → −log σ(1) = 0.3132617
    # sum 2.0128178 / 2 = 1.0064089 again (mirror image)
    assert siglip(init_scale=1.0, init_bias=-1.0)(E1_E2, E1_E2).item() == pytest.approx(1.0064089, abs=1e-6)
    # bias +1 (catches a flipped sign): diagonal logit 2 → log(1 + e⁻²) = 0.1269280;
    # off logit 1, z = −1 → −log σ(−1) = log(1 + e) = 1.3132617; (2·0.1269280 + 2·1.3132617) / 2 = 1.4401897
    assert siglip(init_scale=1.0, init_bias=1.0)(E1_E2, E1_E2).item() == pytest.approx(1.4401897, abs=1e-6)


def test_siglip_on_pairs_at_sixty_degrees_by_hand():
    # scale 1, bias 0: logits = [[1, 1/2], [0, 0.8660254]]
    #   (0,0) z=+1: −log σ(1)       = log(1 + e⁻¹)       = 0.3132617
    #   (1,1) z=+1: −log σ(0.8660)  = log(1 + 0.4206200) = 0.3510934
    #   (0,1) z=−1: −log σ(−1/2)    = log(1 + e^(1/2))   = log(2.6487213) = 0.9740770
    #   (1,0) z=−1: −log σ(0)       = log 2              = 0.6931472
    # sum = 2.3315793; / 2 = 1.1657896
    assert siglip(init_scale=1.0, init_bias=0.0)(E1_E2, SIXTY).item() == pytest.approx(1.1657896, abs=1e-6)


# --- the learnable scale and bias ----------------------------------------------------------------

def test_initial_values_are_the_papers():
    c = clip()
    assert c.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert c.scale().item() == pytest.approx(14.2857143, rel=1e-6)  # 1/0.07
    s = siglip()
    assert s.logit_scale.exp().item() == pytest.approx(10.0, rel=1e-6)
    assert s.logit_bias.item() == -10.0
    assert {n for n, _ in c.named_parameters()} == {"logit_scale"}
    assert {n for n, _ in s.named_parameters()} == {"logit_scale", "logit_bias"}
    assert "scale=14.29" in repr(c) and "bias=-10" in repr(s)


def test_reset_parameters_restores_the_initial_values():
    c, s = clip(init_temperature=0.1), siglip(init_scale=5.0, init_bias=-3.0)
    with torch.no_grad():
        c.logit_scale.fill_(0.0)
        s.logit_scale.fill_(0.0)
        s.logit_bias.fill_(0.0)
    c.reset_parameters()
    s.reset_parameters()
    assert c.scale().item() == pytest.approx(10.0, rel=1e-6)
    assert s.logit_scale.exp().item() == pytest.approx(5.0, rel=1e-6) and s.logit_bias.item() == -3.0


def test_gradients_reach_the_scale_and_bias():
    image, text = unit(6, 8).float(), unit(6, 8).float()
    c, s = clip(), siglip()
    c(image, text).backward()
    s(image, text).backward()
    for p in (c.logit_scale, s.logit_scale, s.logit_bias):
        assert p.grad is not None and torch.isfinite(p.grad) and p.grad.item() != 0.0
    # SigLIP at its init: every pair's logit is ≈ −10, so the negatives are already right and the
    # positives wrong: the loss wants a larger bias
    assert s.logit_bias.grad.item() < 0


def test_clip_scale_is_clamped_at_max_scale():
    image, text = unit(4, 8).float(), unit(4, 8).float()
    hot = clip(init_temperature=0.001)  # exp(t) = 1000 before the clamp
    assert hot.logit_scale.exp().item() == pytest.approx(1000.0, rel=1e-5)
    assert hot.scale().item() == 100.0
    torch.testing.assert_close(hot.logits(image, text), 100.0 * image @ text.T)
    hot(image, text).backward()
    assert hot.logit_scale.grad.item() == 0.0  # past the clamp the temperature stops learning
    assert clip(init_temperature=0.001, max_scale=50.0).scale().item() == 50.0
    cool = clip(init_temperature=0.02)  # scale 50 < 100: not clamped
    assert cool.scale().item() == pytest.approx(50.0, rel=1e-6)


# --- agreement with independent references -------------------------------------------------------

def test_siglip_equals_a_double_loop_over_pairs():
    B = 5
    image, text = unit(B, 7), unit(B, 7)
    s = siglip(init_scale=3.0, init_bias=-2.5).double()
    s.reset_parameters()  # log 3 drawn again in float64
    total = 0.0
    for i in range(B):
        for j in range(B):
            dot = sum(image[i, k].item() * text[j, k].item() for k in range(7))
            logit = 3.0 * dot - 2.5
            z = 1.0 if i == j else -1.0
            total += math.log(1.0 + math.exp(-z * logit))  # −log σ(z·logit)
    assert s(image, text).item() == pytest.approx(total / B, rel=1e-10)


def test_clip_equals_cross_entropy_in_each_direction():
    B = 6
    image, text = unit(B, 9), unit(B, 9)
    c = clip(init_temperature=0.2).double()
    c.reset_parameters()  # log 5 drawn again in float64
    labels = torch.arange(B)
    image_to_text = F.cross_entropy(5.0 * torch.einsum("id,jd->ij", image, text), labels)
    text_to_image = F.cross_entropy(5.0 * torch.einsum("jd,id->ji", text, image), labels)
    assert c(image, text).item() == pytest.approx((image_to_text + text_to_image).item() / 2, rel=1e-10)
    assert image_to_text.item() != pytest.approx(text_to_image.item())  # the directions really differ


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        clip()(unit(3, 4), unit(2, 4))
    with pytest.raises(ValueError, match="same shape"):
        siglip()(unit(3, 4)[None], unit(3, 4)[None])


# --- recall@1 ------------------------------------------------------------------------------------

def test_recall_at_1_on_a_hand_made_matrix():
    scores = torch.tensor([
        [0.90, 0.10, 0.75],  # row 0: best is col 0 ✓          col 0 = (.90, .80, .72): best row 0 ✓
        [0.80, 0.30, 0.10],  # row 1: best is col 0, not 1 ✗    col 1 = (.10, .30, .20): best row 1 ✓
        [0.72, 0.20, 0.70],  # row 2: best is col 0, not 2 ✗    col 2 = (.75, .10, .70): best row 0 ✗
    ])
    i2t, t2i = recall_at_1(scores)
    assert i2t == pytest.approx(1 / 3) and t2i == pytest.approx(2 / 3)
    assert recall_at_1(scores.T) == pytest.approx((2 / 3, 1 / 3))  # transposing swaps the directions
    assert recall_at_1(torch.eye(4)) == (1.0, 1.0)


def test_recall_at_1_counts_a_tie_for_the_top_as_a_miss():
    # row 0 ties (1, 1): torch.argmax would pick col 0, the true pair, but a tie is a miss here
    scores = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert scores[0].argmax().item() == 0
    # rows: 0 tie ✗, 1 ✓ → 1/2; cols: col 0 = (1, 0) ✓, col 1 = (1, 1) tie ✗ → 1/2
    assert recall_at_1(scores) == (0.5, 0.5)
    assert recall_at_1(torch.ones(3, 3)) == (0.0, 0.0)
    with pytest.raises(ValueError, match="square"):
        recall_at_1(torch.ones(2, 3))


# --- by name through the registry ----------------------------------------------------------------

def test_built_by_name_and_options_checked():
    assert list_components("contrastive") == ["clip", "siglip"]
    s = build("contrastive", "siglip")
    assert isinstance(s, SigLipLoss) and s.logit_bias.item() == -10.0
    assert isinstance(build("contrastive", "clip", init_temperature=0.1, max_scale=50), ClipLoss)  # int ok for float
    with pytest.raises(ComponentError, match="siglip' has no option 'temperature'"):
        build("contrastive", "siglip", temperature=0.07)
    with pytest.raises(ComponentError, match="option 'init_bias' expects float"):
        build("contrastive", "siglip", init_bias="-10")
    with pytest.raises(ComponentError, match="unknown contrastive 'clap'"):
        build("contrastive", "clap")
