"""pytest-benchmark regressions for the key kernels and one training step.

In the default test run these execute once with timing disabled (a smoke test). To gate:

    pytest tests/benchmarks --benchmark-enable --benchmark-only --benchmark-autosave        # the base
    pytest tests/benchmarks --benchmark-enable --benchmark-only \\
        --benchmark-compare --benchmark-compare-fail=median:10%                              # later

Compare only with a base measured on the same machine; on shared CI machines use median:25%.
CUDA work is synchronised inside each timed call.
"""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build, build_model
from models.attention_backends import Mask

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def tensor(*shape, grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE, requires_grad=grad)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_attention_forward_backward(benchmark, backend):
    kernel = build("attention_backend", backend)
    q, k, v = tensor(4, 8, 256, 64, grad=True), tensor(4, 2, 256, 64, grad=True), tensor(4, 2, 256, 64, grad=True)
    grad = tensor(4, 8, 256, 64)
    mask = Mask.causal(256, DEVICE)

    def step():
        out = kernel(q, k, v, mask)
        grads = torch.autograd.grad(out, (q, k, v), grad)
        synchronize()
        return grads

    grads = benchmark(step)
    assert grads[1].shape == (4, 2, 256, 64) and torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("name", ["gelu", "swiglu"])
def test_mlp_forward_backward(benchmark, name):
    mlp = build("mlp", name, ModelConfig(n_embd=256, n_head=4, n_layer=1, vocab_size=2)).to(DEVICE, DTYPE)
    x = tensor(2048, 256, grad=True)

    def step():
        mlp(x).sum().backward()
        synchronize()

    benchmark(step)
    assert x.grad is not None


def test_rmsnorm_forward(benchmark):
    norm = build("norm", "rmsnorm", 1024, None).to(DEVICE, DTYPE)
    x = tensor(8192, 1024)

    def step():
        with torch.no_grad():
            out = norm(x)
        synchronize()
        return out

    out = benchmark(step)
    assert out.shape == x.shape


def test_training_step(benchmark):
    torch.manual_seed(0)
    config = ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=1024, positional="rope")
    model = build_model(config).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, 1024, (8, 129), device=DEVICE)

    def step():
        loss = model(idx[:, :-1], idx[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        return loss

    loss = benchmark(step)
    assert torch.isfinite(loss)
