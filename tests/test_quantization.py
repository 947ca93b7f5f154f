"""Quantization transforms on a briefly trained tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

from models import available, build_model, quantize
from models.quantization import FakeQuant, cast_quantizable, linear_weight_bytes, model_bytes, quantizable
from tests.conftest import tiny

RUNNABLE = {row.name for row in available("quantization") if row.available}


def batches(n: int, seed: int):
    """A learnable toy language: each token is the previous one plus one, modulo 50, with noise."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 50, (n, 16, 1), generator=g)
    seq = (start + torch.arange(33)) % 50
    noise = torch.rand(seq.shape, generator=g) < 0.1
    seq = torch.where(noise, torch.randint(0, 50, seq.shape, generator=g), seq)
    return seq[..., :-1], seq[..., 1:]


@pytest.fixture(scope="module")
def trained():
    return train_tiny()


def train_tiny():
    """A tiny model trained briefly on the toy language (the same weights every call)."""
    torch.manual_seed(0)
    model = build_model(tiny(n_embd=64, block_size=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    xs, ys = batches(150, seed=0)
    for x, y in zip(xs, ys):
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@torch.no_grad()
def val_loss(model) -> float:
    xs, ys = batches(8, seed=1)
    return sum(model(x, y)[1].item() for x, y in zip(xs, ys)) / len(xs)


@pytest.mark.skipif("int8_weight_only" not in RUNNABLE, reason="torchao not installed")
def test_int8_weight_only_keeps_the_loss_and_shrinks_linear_weights_4x(trained):
    before = val_loss(trained)
    assert before < 2.0  # it learned something (uniform would be ln 50 = 3.9)
    model = copy.deepcopy(trained)
    float_bytes = linear_weight_bytes(model)
    quantize(model, "int8_weight_only")
    assert abs(val_loss(model) - before) / before < 0.01
    ratio = float_bytes / linear_weight_bytes(model)
    assert 3.5 < ratio <= 4.0  # int8 values plus one fp32 scale per output channel
    assert model_bytes(model) < model_bytes(trained)


@pytest.mark.parametrize("name", ["int8_dynamic", "int4_weight_only"])
def test_other_post_training_transforms_run_and_stay_close(trained, name):
    if name not in RUNNABLE:
        pytest.skip(next(r.reason for r in available("quantization", name)))
    before = val_loss(trained)
    model = copy.deepcopy(trained)
    quantizer = quantize(model, name)
    assert abs(val_loss(model) - before) / before < (0.05 if name == "int8_dynamic" else 0.15)
    assert quantizer.format


@pytest.mark.skipif("fake_quant" not in RUNNABLE, reason="torchao not installed")
def test_fake_quant_trains_with_quantized_weights():
    float_model = build_model(tiny())
    qat = build_model(tiny(quantization={"name": "fake_quant", "bits": 4, "group_size": 16}))
    assert type(qat.blocks[0].attn.c_attn).__name__ == "FakeQuantizedLinear"
    assert type(qat.lm_head).__name__ == "Linear"  # the tied head stays in float
    qat.load_state_dict(float_model.state_dict())
    x, y = batches(1, seed=2)
    assert not torch.allclose(qat(x[0], y[0])[1], float_model(x[0], y[0])[1])  # weights were rounded
    qat(x[0], y[0])[1].backward()
    assert qat.blocks[0].attn.c_attn.weight.grad.abs().sum() > 0  # straight-through gradients


def test_post_training_transforms_are_not_applied_at_build():
    model = build_model(tiny(quantization="int8_dynamic"))
    assert type(model.blocks[0].attn.c_attn.weight).__name__ in ("Parameter", "Tensor")


# -- float reference and quantized copy evaluated alike; int4's bf16 cast; QAT's mapping ------------


def _float_run(tmp_path, quantization, dtype: str):
    """A quantize run's config (CPU, the given training dtype) and its float run's folder with a checkpoint."""
    from bench.checkpoint import save_checkpoint
    from bench.config import resolve_run

    data = dict(source="markov", vocab_size=16, n_train_tokens=20000, n_val_tokens=4096, doc_len=256)
    train = dict(batch_size=4, seq_len=32, eval_batches=4, device="cpu", dtype=dtype)
    model = dict(n_layer=1, n_head=2, n_embd=32)
    float_run = resolve_run(model, data, train)
    run = resolve_run({**model, "quantization": quantization}, data, train)
    folder = tmp_path / "float"
    folder.mkdir()
    save_checkpoint(folder / "checkpoint.pt", {"model": build_model(float_run.model, seed=0).state_dict(), "step": 7})
    return run, float_run, folder


@pytest.mark.skipif("int8_weight_only" not in RUNNABLE, reason="torchao not installed")
def test_a_quantization_run_evaluates_the_float_checkpoint_and_its_quantized_copy_in_the_training_dtype(tmp_path):
    from bench.data import load_dataset
    from bench.posttrain import evaluate_quantized
    from bench.train import evaluate

    run, float_run, folder = _float_run(tmp_path, "int8_weight_only", "bfloat16")
    result = evaluate_quantized(run, folder)
    assert result["eval_dtype"] == "bfloat16" and result["steps"] == 7

    # what the training run's eval reports for this checkpoint: the same batches, bf16 autocast
    model = build_model(float_run.model)
    model.load_state_dict(torch.load(folder / "checkpoint.pt", weights_only=True)["model"])
    data = load_dataset(run.data)
    val = data.val_batches(run.train.val_sequences, run.seq_len, run.train.batch_size)
    cpu = torch.device("cpu")
    float_bf16 = evaluate(model, val, cpu, torch.bfloat16, data.token_bytes)
    assert result["val_loss_float"] == pytest.approx(float_bf16["loss"], rel=1e-9, abs=0)
    assert evaluate(model, val, cpu, torch.float32)["loss"] != float_bf16["loss"]  # the dtype is what differs
    quantize(model, "int8_weight_only")
    assert result["val_loss"] == pytest.approx(evaluate(model, val, cpu, torch.bfloat16)["loss"], rel=1e-9, abs=0)

    # the change is paired on this checkpoint: quantized minus float, in nats, and relative
    assert result["val_loss_delta"] == pytest.approx(result["val_loss"] - result["val_loss_float"], abs=1e-12)
    assert result["val_loss_change"] == pytest.approx(result["val_loss_delta"] / result["val_loss_float"], abs=1e-12)
    if "val_bpb" in result:
        assert result["val_bpb_delta"] == pytest.approx(result["val_bpb"] - result["val_bpb_float"], abs=1e-12)


@pytest.mark.skipif("int8_weight_only" not in RUNNABLE, reason="torchao not installed")
def test_a_float32_training_run_is_quantized_and_evaluated_in_float32(tmp_path):
    from bench.posttrain import evaluate_quantized

    run, _, folder = _float_run(tmp_path, "int8_weight_only", "float32")
    result = evaluate_quantized(run, folder)
    assert result["eval_dtype"] == "float32"
    assert result["val_loss_delta"] == pytest.approx(result["val_loss"] - result["val_loss_float"], abs=1e-12)


@pytest.mark.parametrize("moe", [None, {"name": "topk", "n_experts": 2, "top_k": 1}])
def test_cast_quantizable_casts_only_the_linears_that_get_quantized(moe):
    model = build_model(tiny(moe=moe)).eval()
    reference = copy.deepcopy(model)
    expected = {fqn for fqn, m in model.named_modules() if quantizable(m, fqn)}
    assert set(cast_quantizable(model, torch.bfloat16)) == expected
    owners = {f"{fqn}.{name}".lstrip("."): fqn for fqn, m in model.named_modules() for name, _ in
              m.named_parameters(recurse=False)}
    for name, p in model.named_parameters():  # embedding (tied LM head), norms, router: unchanged
        assert p.dtype == (torch.bfloat16 if owners[name] in expected else torch.float32), name
    for name, b in model.named_buffers():
        assert b.dtype == dict(reference.named_buffers())[name].dtype, name
    # each cast layer runs in bf16 and hands back the dtype it was given; the model's output stays fp32
    layer = model.blocks[0].attn.c_attn
    x = torch.randn(2, 5, layer.in_features)
    assert layer(x).dtype == torch.float32 and layer(x.to(torch.bfloat16)).dtype == torch.bfloat16
    x, y = (t[0] for t in batches(1, seed=3))
    logits, loss = model(x, y)[:2]
    assert logits.dtype == torch.float32
    assert abs(loss.item() - reference(x, y)[1].item()) < 0.02
    assert cast_quantizable(model, torch.bfloat16) == []  # idempotent: no second pair of hooks


@pytest.mark.skipif("fake_quant" not in RUNNABLE or "int4_weight_only" not in RUNNABLE, reason="torchao not installed")
def test_qat_int4_fake_quantizes_cpu_weights_as_post_training_int4_does_on_cpu(trained):
    ptq = copy.deepcopy(trained)
    quantize(ptq, {"name": "int4_weight_only", "group_size": 32})
    qat = build_model(tiny(n_embd=64, block_size=32, quantization={"name": "fake_quant", "bits": 4, "group_size": 32}))
    qat.load_state_dict(trained.state_dict())
    layers = {fqn: m for fqn, m in ptq.named_modules() if quantizable(m, fqn)}
    assert layers
    with torch.no_grad():
        for fqn, m in qat.named_modules():
            if fqn in layers:
                served = layers[fqn].weight.dequantize()
                assert torch.equal(m.weight_fake_quantizer(m.weight), served), fqn
    assert "on CPU symmetric" in FakeQuant(bits=4, group_size=32).format


@pytest.mark.skipif("fake_quant" not in RUNNABLE, reason="torchao not installed")
def test_qat_int4_for_cuda_uses_tinygemms_asymmetric_mapping(trained):
    """What int4_weight_only does on CUDA (Int4TilePackedTo4dTensor.from_hp: bf16 weights, tinygemm's
    asymmetric qparams with a float zero point), computed with the same torchao primitives on CPU."""
    from torchao.quantization import MappingType
    from torchao.quantization.quant_primitives import (_choose_qparams_affine_tinygemm,
                                                        _dequantize_affine_tinygemm, _quantize_affine_tinygemm)

    fake = FakeQuant(bits=4, group_size=32)
    assert fake.weight_config("cuda").mapping_type == MappingType.ASYMMETRIC
    assert fake.weight_config("cpu").mapping_type == MappingType.SYMMETRIC
    assert "on CUDA asymmetric" in fake.format
    w = trained.blocks[0].mlp.c_fc.weight.detach().clone()
    hp = w.to(torch.bfloat16)
    block = [1, 32]
    scale, zero = _choose_qparams_affine_tinygemm(hp, MappingType.ASYMMETRIC, tuple(block), torch.int32, 0, 15,
                                                  scale_dtype=torch.bfloat16, zero_point_dtype=torch.bfloat16)
    q = _quantize_affine_tinygemm(hp, block, scale, zero, torch.int32, 0, 15)
    served = _dequantize_affine_tinygemm(q, block, scale, zero, torch.int32, 0, 15, output_dtype=torch.bfloat16)
    w.requires_grad_(True)
    fq = fake.fake_quantizer("cuda")(w)
    assert fq.dtype == torch.float32 and torch.equal(fq.detach(), served.float())
    fq.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0  # straight through the bf16 cast
    assert not torch.equal(fake.fake_quantizer("cpu")(w).detach(), fq.detach())  # the CPU mapping is another


@pytest.mark.skipif(not torch.cuda.is_available() or "int4_weight_only" not in RUNNABLE, reason="needs CUDA and torchao")
def test_int4_on_cuda_casts_only_the_quantized_linears_and_runs_in_fp32_and_bf16(trained):
    from bench.train import evaluate

    cuda = torch.device("cuda")
    float_model = copy.deepcopy(trained).to(cuda)
    model = copy.deepcopy(float_model)
    quantize(model, {"name": "int4_weight_only", "group_size": 32})
    for fqn, m in model.named_modules():  # embedding (tied head) and norms in fp32; quantized layers' biases bf16
        for name, p in m.named_parameters(recurse=False):
            if not quantizable(m, fqn) or name != "weight":
                assert p.dtype == (torch.bfloat16 if quantizable(m, fqn) else torch.float32), f"{fqn}.{name}"
    val = list(zip(*batches(4, seed=1)))
    ref = evaluate(float_model, val, cuda, torch.float32)["loss"]
    for dtype in (torch.float32, torch.bfloat16):
        assert abs(evaluate(model, val, cuda, dtype)["loss"] - ref) / ref < 0.15
    # QAT on CUDA fake-quantizes as the packed kernel computes: the same outputs within bf16 accumulation
    layer, fake = model.blocks[0].mlp.c_fc, FakeQuant(bits=4, group_size=32)
    w = float_model.blocks[0].mlp.c_fc.weight.detach()
    x = torch.randn(8, w.shape[1], device=cuda)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x.bfloat16(), fake.fake_quantizer("cuda")(w).bfloat16()).float()
        assert torch.allclose(layer(x), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
