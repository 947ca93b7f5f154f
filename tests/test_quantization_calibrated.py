"""GPTQ and AWQ: hand-worked core steps, lower layer output error than round-to-nearest on a trained
model, the same int4 storage as int4_weight_only, calibration from the training split only."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from models import available, build_model, quantize
from models.quantization import quantizable
from models.quantization_calibrated import AWQ, GPTQ, Grid, awq_clip, awq_scales, awq_search, gptq
from models.registry import ComponentError, resolve
from tests.conftest import tiny
from tests.test_quantization import batches, train_tiny, val_loss

pytestmark = pytest.mark.skipif(not any(r.name == "gptq" and r.available for r in available("quantization")),
                                reason="torchao not installed")
CPU4 = Grid(4, 4)


@pytest.fixture(scope="module")
def trained():
    return train_tiny()


def calibration_tokens(seed: int = 2) -> torch.Tensor:
    """64 training-like windows of 32 tokens of the toy language the `trained` model learned."""
    return batches(4, seed)[0].reshape(-1, 32)


def layer_inputs(model, tokens) -> dict[str, torch.Tensor]:
    """Each quantizable layer's input (tokens, k) over `tokens`, from a float model."""
    inputs, handles = {}, []
    for fqn, m in model.named_modules():
        if quantizable(m, fqn):
            handles.append(m.register_forward_pre_hook(
                lambda mod, a, fqn=fqn: inputs.setdefault(fqn, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in inputs.items()}


def error(x, w, w_hat) -> float:
    return float((x @ (w - w_hat).T).detach().norm())


def rtn_weights(model) -> dict[str, torch.Tensor]:
    """Each quantizable layer's weight after int4_weight_only (group 32), dequantized."""
    rtn = copy.deepcopy(model)
    quantize(rtn, {"name": "int4_weight_only", "group_size": 32})
    return {fqn: m.weight.dequantize() for fqn, m in rtn.named_modules() if quantizable(m, fqn)}


# -- the grid: round-to-nearest on it is int4_weight_only ------------------------------------------------


def test_round_to_nearest_on_the_cpu_grid_is_int4_weight_only_bitwise(trained):
    rtn = copy.deepcopy(trained)
    quantize(rtn, {"name": "int4_weight_only", "group_size": 32})
    mine = copy.deepcopy(trained)
    grid = Grid(4, 32)
    for (fqn, theirs), m in zip(rtn.named_modules(), mine.modules()):
        if quantizable(theirs, fqn):
            q, scale, zero = grid.round_to_nearest(m.weight.detach())
            assert torch.equal(q, theirs.weight.qdata) and torch.equal(scale, theirs.weight.scale)
            assert torch.equal(zero, theirs.weight.zero_point)
            packed = grid.pack(q, scale, zero, torch.float32)
            assert type(packed) is type(theirs.weight) and packed.block_size == theirs.weight.block_size
            m.weight = torch.nn.Parameter(packed, requires_grad=False)
    x = batches(1, seed=5)[0][0]
    assert torch.equal(mine(x).logits, rtn(x).logits)  # same storage, same kernel, same numbers


def test_the_cuda_grid_is_tinygemms_asymmetric_mapping():
    from torchao.quantization import MappingType
    from torchao.quantization.quant_primitives import _choose_qparams_affine_tinygemm

    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    grid = Grid(4, 32, "cuda")
    scale, zero = grid.params(w)
    s, z = _choose_qparams_affine_tinygemm(w.bfloat16(), MappingType.ASYMMETRIC, (1, 32), torch.int32, 0, 15,
                                           scale_dtype=torch.bfloat16, zero_point_dtype=torch.bfloat16)
    assert torch.equal(scale, s.view(8, 2).float()) and torch.equal(zero, z.view(8, 2).float())
    q = grid.quantize(w, scale, zero)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    # ŵ = q·scale + zero − 8·scale, within half a step of w
    w_hat = grid.dequantize(q, scale, zero)
    step = scale.repeat_interleave(32, dim=1)
    assert torch.allclose(w_hat, q * step + zero.repeat_interleave(32, dim=1) - 8 * step, atol=1e-6)
    assert bool(((w - w_hat).abs() <= step / 2 + 1e-3).all())


# -- GPTQ --------------------------------------------------------------------------------------------------


def test_gptq_core_step_on_a_hand_worked_2x4_example():
    """Inputs 0 and 1 are correlated (H01 = 1, H00 = H11 = 2): quantizing w0 with error e, GPTQ moves w1
    by −e·[U]01/[U]00 = +e/2 (U the Cholesky factor of H⁻¹ = ⅓[[2, −1], [−1, 2]] ⊕ I), so that
    w0·x0 + w1·x1 changes least. Row 0: scale 0.75/7.5 = 0.1; w0 = 0.75 → 7 (clamped), e = 0.05;
    w1 = 0.13 + 0.025 = 0.155 → 2 where round-to-nearest gives 1. Columns 2, 3 are uncorrelated."""
    w = torch.tensor([[0.75, 0.13, 0.3, -0.2], [-0.75, 0.47, 0.0, 0.1]])
    H = torch.tensor([[2.0, 1.0, 0, 0], [1.0, 2.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    q, scale, zero = gptq(w, H, CPU4, damp=0.0, act_order=False)
    assert torch.allclose(scale, torch.full((2, 1), 0.1)) and not zero.any()
    # row 1: w0 = −0.75 → −8 (the grid's lower end), e = +0.05, w1 = 0.47 + 0.025 = 0.495 → 5
    assert q.tolist() == [[7, 2, 3, -2], [-8, 5, 0, 1]]
    rtn = CPU4.round_to_nearest(w)[0]
    assert rtn.tolist() == [[7, 1, 3, -2], [-8, 5, 0, 1]]
    # the output error eᵀHe of row 0: GPTQ 2·0.05² + 2·0.05·(−0.07) + 2·0.07² = 0.0078, RTN 0.0098
    for ints, expected in ((q, 0.0078), (rtn, 0.0098)):
        e = w[0] - CPU4.dequantize(ints, scale, zero)[0]
        assert float(e @ H @ e) == pytest.approx(expected, abs=1e-6)
    # act_order puts the larger H diagonal first; here [2, 2, 1, 1] keeps the order and the result
    assert torch.equal(gptq(w, H, CPU4, damp=0.0, act_order=True)[0], q)


def test_gptq_with_act_order_keeps_groups_contiguous_and_quantizes_the_largest_inputs_first():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g) * torch.tensor([0.1, 0.1, 0.1, 0.1, 3.0, 3.0, 3.0, 3.0])
    w = torch.randn(4, 8, generator=g)
    H = x.T @ x / len(x)
    q, scale, zero = gptq(w, H, CPU4, act_order=True)
    # static groups: each group's scale is round-to-nearest's, from the original weights
    assert torch.equal(scale, CPU4.params(w)[0])
    assert error(x, w, CPU4.dequantize(q, scale, zero)) < error(x, w, CPU4.dequantize(*CPU4.round_to_nearest(w)))


def test_gptq_lowers_every_layers_output_error_below_round_to_nearest(trained):
    tokens = calibration_tokens()
    model = copy.deepcopy(trained)
    quantizer = quantize(model, {"name": "gptq", "group_size": 32}, tokens)
    inputs, rtn = layer_inputs(trained, tokens), rtn_weights(trained)
    assert set(quantizer.layers) == set(inputs)
    for fqn, m in model.named_modules():
        if quantizable(m, fqn):
            w = dict(trained.named_modules())[fqn].weight
            assert type(m.weight).__name__ == "IntxUnpackedToInt8Tensor" and m.weight.block_size == (1, 32)
            ours, theirs = error(inputs[fqn], w, m.weight.dequantize()), error(inputs[fqn], w, rtn[fqn])
            assert ours < theirs, fqn
            assert quantizer.layers[fqn].error < quantizer.layers[fqn].error_rtn
    assert val_loss(model) < val_loss(_rtn_model(trained))


def _rtn_model(model):
    rtn = copy.deepcopy(model)
    quantize(rtn, {"name": "int4_weight_only", "group_size": 32})
    return rtn


# -- AWQ ---------------------------------------------------------------------------------------------------


def test_awq_core_step_on_a_hand_worked_2x4_example():
    """Channel 0's activations are 4× the others': α = 1 gives s = mean|x|/√(max·min) = [2, ½, ½, ½].
    Row 0, W·s = [0.24, 0.375, 0.155, 0.02], scale 0.375/7.5 = 0.05 → q = [5, 7, 3, 0] → Q/s =
    [0.125, 0.7, 0.3, 0]; round-to-nearest (scale 0.1) gives [0.1, 0.7, 0.3, 0]. The salient weight
    0.12 is now off by 0.005 instead of 0.02, and for x = [4, 1, 1, 1] the output error is 0.08, not 0.18."""
    x = torch.tensor([[4.0, 1, 1, 1], [-4.0, -1, -1, 1]])
    s = awq_scales(x.abs().mean(0), 1.0)
    assert s.tolist() == pytest.approx([2, 0.5, 0.5, 0.5])
    assert awq_scales(x.abs().mean(0), 0.5).tolist() == pytest.approx([2**0.5, 2**-0.5, 2**-0.5, 2**-0.5])
    w = torch.tensor([[0.12, 0.75, 0.31, 0.04], [0.36, 0.30, 0.0, 0.0]])
    awq = CPU4.dequantize(*CPU4.round_to_nearest(w * s)) / s
    rtn = CPU4.dequantize(*CPU4.round_to_nearest(w))
    assert awq[0].tolist() == pytest.approx([0.125, 0.7, 0.3, 0.0], abs=1e-6)
    assert rtn[0].tolist() == pytest.approx([0.1, 0.7, 0.3, 0.0], abs=1e-6)
    # row 1: RTN scale 0.048 → [0.336, 0.288, 0, 0]; AWQ: W·s = [0.72, 0.15, 0, 0], scale 0.096 → [0.336, 0.384, 0, 0]
    assert awq[1].tolist() == pytest.approx([0.336, 0.384, 0, 0], abs=1e-6)
    assert rtn[1].tolist() == pytest.approx([0.336, 0.288, 0, 0], abs=1e-6)
    token = x[0]
    assert float(((w - awq) @ token)[0]) == pytest.approx(0.08, abs=1e-6)
    assert float(((w - rtn) @ token)[0]) == pytest.approx(0.18, abs=1e-6)

    # the search over α ∈ {0, ½}: α = 0 is round-to-nearest; the best α has the smallest error
    alpha, best, errors = awq_search(x, [w], CPU4, n_grid=2)
    assert errors[0] == pytest.approx(float(((x @ (w - rtn).T) ** 2).sum()), rel=1e-5)
    assert alpha == [0.0, 0.5][int(np.argmin(errors))] and torch.equal(best, awq_scales(x.abs().mean(0), alpha))


def test_awq_clipping_shrinks_a_range_whose_outlier_no_input_reads():
    """Input 0 is always 0: the outlier weight 1.0 in it costs nothing, and with the range clipped the
    other three weights of the group are rounded on a finer grid (r·1.0/7.5 instead of 1.0/7.5)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g) * torch.tensor([0.0, 1, 1, 1])
    w = torch.tensor([[1.0, 0.11, 0.23, 0.37]])
    clipped = awq_clip(x, w, CPU4)
    assert float(clipped.abs().max()) < 1.0 and torch.equal(clipped[0, 1:], w[0, 1:])  # only the outlier moved

    def out_error(v):
        return float((x @ (w - CPU4.dequantize(*CPU4.round_to_nearest(v))).T).pow(2).sum())

    assert out_error(clipped) < out_error(w)
    assert torch.equal(awq_clip(x, w, CPU4, max_shrink=0.0), w)  # no ratio below 1 tried: nothing clipped


def test_awq_does_not_clip_the_layers_that_produce_attention_scores(trained):
    from models.quantization_calibrated import _score_layers

    assert _score_layers(trained) == {"blocks.0.attn.c_attn", "blocks.1.attn.c_attn"}
    mla = build_model(tiny(n_embd=64, attention={"name": "mla", "kv_rank": 32, "rope_dim": 8}))
    assert {n.split(".", 2)[-1] for n in _score_layers(mla)} == {"attn.q_proj", "attn.kv_down", "attn.kv_up"}
    tokens = calibration_tokens()
    clipped, unclipped = copy.deepcopy(trained), copy.deepcopy(trained)
    quantize(clipped, {"name": "awq", "group_size": 32}, tokens)
    quantize(unclipped, {"name": "awq", "group_size": 32, "clip": False}, tokens)
    weights = {name: [dict(m.named_modules())[name].weight for m in (clipped, unclipped)]
               for name in ("blocks.0.attn.c_attn", "blocks.0.mlp.c_fc")}
    assert torch.equal(*[w.qdata for w in weights["blocks.0.attn.c_attn"]])  # the same: not clipped
    assert not torch.equal(*[w.qdata for w in weights["blocks.0.mlp.c_fc"]])


@pytest.mark.parametrize("config", [dict(), dict(norm="rmsnorm", mlp="swiglu", n_embd=96),  # swiglu hidden 256
                                    dict(moe={"name": "topk", "n_experts": 2, "top_k": 1})],
                         ids=["layernorm-gelu", "rmsnorm-swiglu", "moe"])
def test_awq_computes_what_its_scaled_weights_say_with_scales_folded_into_norms(config):
    """A float copy whose layers hold Q(W·s)/s computes what the AWQ model computes: 1/s folded into
    the norm (and s into every layer reading it, a float router included) or applied at run time."""
    torch.manual_seed(0)
    model = build_model(tiny(**{"n_embd": 64, **config})).eval()
    with torch.no_grad():  # uneven activations, so that AWQ scales something
        for m in model.modules():
            if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 1:
                m.weight.copy_(torch.rand(m.weight.shape) * 3)
    tokens = torch.randint(0, 50, (32, 32))
    awq = copy.deepcopy(model)
    quantizer = quantize(awq, {"name": "awq", "group_size": 32}, tokens)
    assert quantizer.folded, "no scale folded into a norm"
    if "moe" not in config:
        assert {n.rsplit(".", 1)[-1] for n in quantizer.folded} == {"c_attn", "c_fc"}
    reference = copy.deepcopy(model)
    layers = dict(awq.named_modules())
    with torch.no_grad():
        for fqn, m in reference.named_modules():
            if quantizable(m, fqn):
                m.weight.copy_(layers[fqn].weight.dequantize() / quantizer.scales[fqn])
    x = torch.randint(0, 50, (2, 32))
    assert torch.allclose(awq(x).logits, reference(x).logits, atol=1e-4, rtol=1e-4)


def test_awq_lowers_the_output_error_of_the_layers_it_scales(trained):
    tokens = calibration_tokens()
    model = copy.deepcopy(trained)
    quantizer = quantize(model, {"name": "awq", "group_size": 32}, tokens)
    inputs, rtn = layer_inputs(trained, tokens), rtn_weights(trained)
    modules, scaled = dict(trained.named_modules()), 0
    for fqn, m in model.named_modules():
        if quantizable(m, fqn) and quantizer.layers[fqn].detail["alpha"] > 0:
            scaled += 1
            w_hat = m.weight.dequantize() / quantizer.scales[fqn]
            assert error(inputs[fqn], modules[fqn].weight, w_hat) < error(inputs[fqn], modules[fqn].weight, rtn[fqn]), fqn
    assert scaled >= 2


def test_awq_protects_outlier_channels_that_round_to_nearest_crushes(trained):
    """AWQ's premise, made true: a function-preserving rewrite gives two input channels of every
    norm-fed layer 20× larger activations and 20× smaller weights (as LLMs grow outlier channels).
    Round-to-nearest then rounds those salient weights coarsely; AWQ scales them back up first."""
    outliers = copy.deepcopy(trained)
    with torch.no_grad():
        for block in outliers.blocks:
            for norm, layer in ((block.norm_1, block.attn.c_attn), (block.norm_2, block.mlp.c_fc)):
                norm.weight[:2] *= 20
                norm.bias[:2] *= 20
                layer.weight[:, :2] /= 20
    before = val_loss(outliers)
    assert before == pytest.approx(val_loss(trained), abs=1e-5)
    rtn, awq = copy.deepcopy(outliers), copy.deepcopy(outliers)
    quantize(rtn, {"name": "int4_weight_only", "group_size": 32})
    quantize(awq, {"name": "awq", "group_size": 32}, calibration_tokens())
    assert val_loss(awq) - before < 0.5 * (val_loss(rtn) - before)


# -- calibration data, options, determinism -----------------------------------------------------------------


def test_calibration_windows_come_from_the_training_split_fixed_by_the_seed():
    from bench.data import MarkovConfig, load_dataset

    data = load_dataset(MarkovConfig(vocab_size=16, n_train_tokens=20000, n_val_tokens=4096, doc_len=256))
    calibration = data.calibration_batch(seed=3, n_sequences=64, seq_len=32).numpy()
    assert calibration.shape == (64, 32)
    assert np.array_equal(calibration, data.calibration_batch(3, 64, 32).numpy())
    assert not np.array_equal(calibration, data.calibration_batch(4, 64, 32).numpy())
    assert not np.array_equal(calibration, data.train_batch(0, 3, 64, 32)[0].numpy())  # a stream of its own
    train = np.lib.stride_tricks.sliding_window_view(data.train_tokens, 32)
    val = {tuple(row) for batch in data.val_batches(None, 32, 64) for row in batch[0].numpy()}
    for window in calibration:  # a training window, and no validation sequence (by its token ids)
        assert (train == window).all(axis=1).any()
        assert tuple(window) not in val


def test_the_same_seed_gives_bitwise_equal_quantized_weights(trained):
    for spec in ({"name": "gptq", "group_size": 32}, {"name": "awq", "group_size": 32}):
        a, b, c = (copy.deepcopy(trained) for _ in range(3))
        quantize(a, spec, calibration_tokens(seed=2))
        quantize(b, spec, calibration_tokens(seed=2))
        quantize(c, spec, calibration_tokens(seed=3))
        weights = [[m.weight for fqn, m in model.named_modules() if quantizable(m, fqn)] for model in (a, b, c)]
        assert all(torch.equal(x.qdata, y.qdata) and torch.equal(x.scale, y.scale) for x, y in zip(weights[0], weights[1]))
        assert any(not torch.equal(x.qdata, z.qdata) for x, z in zip(weights[0], weights[2]))


def test_calibrated_options_are_checked_and_resolved_to_one_form():
    resolved = resolve("quantization", {"name": "gptq", "calibration": {"sequences": 64}})
    assert resolved == {"name": "gptq", "bits": 4, "group_size": 128, "damp": 0.01, "act_order": True,
                        "calibration": {"sequences": 64, "seq_len": None}}
    assert resolve("quantization", "awq")["calibration"] == {"sequences": 128, "seq_len": None}
    with pytest.raises(ComponentError, match="calibration"):
        resolve("quantization", {"name": "gptq", "calibration": {"sequence": 64}})
    with pytest.raises(ComponentError, match="calibration"):
        resolve("quantization", {"name": "awq", "calibration": {"sequences": "64"}})
    with pytest.raises(ComponentError, match="bits"):
        resolve("quantization", {"name": "gptq", "bits": 3})
    assert "must divide" in GPTQ.check(tiny(n_embd=48), {"group_size": 32})
    assert AWQ.check(tiny(n_embd=64), {"group_size": 32}) is None
    with pytest.raises(ValueError, match="calibration"):
        GPTQ().apply(build_model(tiny()))


def test_a_gptq_run_calibrates_on_its_seeds_training_windows_and_records_what_it_did(tmp_path):
    from bench.posttrain import evaluate_quantized
    from tests.test_quantization import _float_run

    spec = {"name": "gptq", "group_size": 32, "calibration": {"sequences": 16}}
    run, _, folder = _float_run(tmp_path, spec, "float32")
    result = evaluate_quantized(run, folder)
    assert (result["calibration_sequences"], result["calibration_seq_len"]) == (16, run.seq_len)
    assert result["calibration_seed"] == run.seed and result["calibration_split"] == "train"
    assert result["quantize_seconds"] > 0 and result["decode_ms_per_token"] > 0 and result["decode_ms_per_token_float"] > 0
    assert set(result["layer_errors"]) == {"blocks.0.attn.c_attn", "blocks.0.attn.c_proj", "blocks.0.mlp.c_fc",
                                           "blocks.0.mlp.c_proj"}
    assert result["quantization_format"].startswith("GPTQ")


@pytest.mark.parametrize("name", ["gptq", "awq"])
def test_experts_no_calibration_token_reaches_are_rounded_to_nearest_and_stored_alike(name):
    torch.manual_seed(0)
    model = build_model(tiny(n_embd=64, moe={"name": "topk", "n_experts": 8, "top_k": 1})).eval()
    quantizer = quantize(model, {"name": name, "group_size": 32}, torch.randint(0, 50, (1, 4)))  # 4 tokens, 8 experts
    assert quantizer.uncalibrated and all(".experts." in n for n in quantizer.uncalibrated)
    assert "rounded to nearest" in quantizer.format
    layers = [fqn for fqn, m in model.named_modules() if quantizable(m, fqn)]
    assert set(layers) == set(quantizer.layers) | set(quantizer.uncalibrated)
    assert all(type(m.weight).__name__ == "IntxUnpackedToInt8Tensor" for fqn, m in model.named_modules() if fqn in layers)
