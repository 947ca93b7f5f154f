"""Attention variants, kernel backends, masks and KV-cache decoding."""

from __future__ import annotations

import itertools

import pytest
import torch

from bench import autotune
from models import available, build_model
from models.attention_backends import Mask
from models.positional import alibi_slopes
from models.registry import build
from tests.conftest import tiny

ATTENTIONS = {
    "mha": {"name": "mha"},
    "gqa": {"name": "gqa", "n_kv_head": 2},
    "mqa": {"name": "mqa"},
    "window": {"name": "window", "window": 5},
    "gqa+window": {"name": "gqa", "n_kv_head": 2, "window": 5},
    "mha+qk_norm": {"name": "mha", "qk_norm": True},
}
POSITIONALS = ["learned", "sinusoidal", "rope", "alibi", "none"]
RUNNABLE = {row.name: row for row in available("attention_backend") if row.available}
BACKENDS = {
    "math": "math",
    "baddbmm": "baddbmm",
    "sdpa": "sdpa",
    "flex": {"name": "flex", "compile": False},  # eager flex: no 20 s compile per shape in tests
    "auto": "auto",  # the measured choice (bench.autotune.KernelChoices, given to the model)
}
HERE = [b for b in BACKENDS if b in RUNNABLE]
COMBOS = list(itertools.product(ATTENTIONS, POSITIONALS, HERE))


def model_for(attention: str, positional: str, backend: str, **overrides):
    spec = {**ATTENTIONS[attention], "backend": BACKENDS[backend]}
    return build_model(tiny(attention=spec, positional=positional, **overrides), kernels=autotune.KernelChoices()).eval()


def test_unavailable_backends_say_why():
    rows = {row.name: row for row in available("attention_backend")}
    for name in ("flash_attn", "xformers"):
        if not torch.cuda.is_available():
            assert not rows[name].available
            assert rows[name].reason in ("needs CUDA", f"{name.replace('_', '-')} not installed (pip install 'archbench[gpu]')")


@pytest.mark.parametrize("attention,positional,backend", COMBOS)
@torch.no_grad()
def test_changing_a_token_never_changes_earlier_outputs(attention, positional, backend):
    model = model_for(attention, positional, backend)
    idx = torch.randint(0, 50, (2, 24))
    t = 11
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 50
    before = model(idx).logits
    after = model(changed).logits
    assert torch.equal(before[:, :t], after[:, :t])
    assert not torch.allclose(before[:, t], after[:, t])  # the change is visible where it should be


@pytest.mark.parametrize("attention,positional,backend", [c for c in COMBOS if c[2] != "math"])
@torch.no_grad()
def test_every_backend_agrees_with_math(attention, positional, backend):
    reference = model_for(attention, positional, "math")
    model = model_for(attention, positional, backend)
    model.load_state_dict(reference.state_dict())
    idx = torch.randint(0, 50, (3, 32))
    assert torch.allclose(model(idx)[0], reference(idx)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["causal", "window", "alibi", "window+alibi", "decode-chunk", "decode-window"])
@pytest.mark.parametrize("backend", HERE[1:])
@torch.no_grad()
def test_kernels_agree_with_math_on_masks(kind, backend):
    B, H, Hkv, D, Tq, Tk = 2, 6, 3, 16, 40, 40
    if kind.startswith("decode"):
        Tq = 7  # a chunk of new queries after 33 cached keys (bottom-right aligned)
    q = torch.randn(B, H, Tq, D)
    k, v = torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    k_pos = torch.arange(Tk)
    q_pos = k_pos if Tq == Tk else k_pos[-Tq:].clone()
    window = 9 if "window" in kind else None
    slopes = alibi_slopes(H) if "alibi" in kind else None
    mask = Mask(q_pos, k_pos, window, slopes)
    expected = build("attention_backend", "math")(q, k, v, mask)
    got = build("attention_backend", backend, **({"compile": False} if backend == "flex" else {}))(q, k, v, mask)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["causal", "window", "alibi", "decode-chunk"])
@pytest.mark.parametrize("backend", ["baddbmm", "sdpa"])
def test_training_backends_give_maths_gradients(kind, backend):
    """What a training step uses: q, k and v gradients (grouped kv heads included) equal math's."""
    B, H, Hkv, D, Tk = 2, 6, 3, 16, 24
    Tq = 5 if kind.startswith("decode") else Tk
    k_pos = torch.arange(Tk)
    mask = Mask(k_pos if Tq == Tk else k_pos[-Tq:].clone(), k_pos, 7 if kind == "window" else None,
                alibi_slopes(H) if kind == "alibi" else None)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=gen) for shape in ((B, H, Tq, D), (B, Hkv, Tk, D), (B, Hkv, Tk, D))]
    grad = torch.randn(B, H, Tq, D, generator=gen)

    def grads(name: str) -> tuple[torch.Tensor, ...]:
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        return torch.autograd.grad(build("attention_backend", name)(q, k, v, mask), (q, k, v), grad)

    for got, expected in zip(grads(backend), grads("math")):
        assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_math_backend_matches_hand_written_softmax_attention():
    q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    expected = torch.softmax((q @ k.transpose(-1, -2)) / 2 + torch.full((5, 5), -torch.inf).triu(1), -1) @ v
    got = build("attention_backend", "math")(q, k, v, Mask.causal(5))
    assert torch.allclose(got, expected, atol=1e-6)


@torch.no_grad()
def test_gqa_with_all_kv_heads_equals_mha_with_the_same_weights():
    mha = build_model(tiny(attention={"name": "mha", "backend": "math"})).eval()
    gqa = build_model(tiny(attention={"name": "gqa", "n_kv_head": 4, "backend": "math"})).eval()
    gqa.load_state_dict(mha.state_dict())
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(gqa(idx)[0], mha(idx)[0])


@torch.no_grad()
def test_mqa_equals_gqa_with_one_kv_head():
    mqa = build_model(tiny(attention="mqa")).eval()
    gqa = build_model(tiny(attention={"name": "gqa", "n_kv_head": 1})).eval()
    gqa.load_state_dict(mqa.state_dict())
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(gqa(idx)[0], mqa(idx)[0])


@torch.no_grad()
def test_gqa_shares_each_kv_head_across_its_query_group():
    """GQA with 2 kv heads equals MHA whose k/v weights repeat each kv head over 2 query heads."""
    gqa = build_model(tiny(attention={"name": "gqa", "n_kv_head": 2, "backend": "math"})).eval()
    mha = build_model(tiny(attention={"name": "mha", "backend": "math"})).eval()
    state = gqa.state_dict()
    for i in range(2):
        w = state[f"blocks.{i}.attn.c_attn.weight"]  # (32 + 2·16, 32): q, then k and v of 2 heads
        b = state[f"blocks.{i}.attn.c_attn.bias"]
        q, k, v = w.split([32, 16, 16])
        qb, kb, vb = b.split([32, 16, 16])
        repeat = lambda t: t.view(2, 8, *t.shape[1:]).repeat_interleave(2, 0).reshape(32, *t.shape[1:])  # noqa: E731
        state[f"blocks.{i}.attn.c_attn.weight"] = torch.cat([q, repeat(k), repeat(v)])
        state[f"blocks.{i}.attn.c_attn.bias"] = torch.cat([qb, repeat(kb), repeat(vb)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 50, (2, 16))
    assert torch.allclose(mha(idx)[0], gqa(idx)[0], atol=1e-6)


def test_window_one_sees_only_itself():
    v = torch.randn(1, 2, 6, 4)
    out = build("attention_backend", "math")(torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), v,
                                             Mask.causal(6, window=1))
    assert torch.allclose(out, v)


@pytest.mark.parametrize("attention,positional,backend", COMBOS)
@torch.no_grad()
def test_kv_cache_decoding_gives_the_logits_of_a_full_forward(attention, positional, backend):
    model = model_for(attention, positional, backend)
    idx = torch.randint(0, 50, (2, 20))
    full = model(idx).logits
    cache = model.new_cache()
    steps = [model(idx[:, :9], cache=cache)[0]]  # prefill
    steps.append(model(idx[:, 9:12], cache=cache)[0])  # a chunk of 3 after cached keys
    steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(12, 20)]  # one token at a time
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_kv_cache_decoding_of_an_moe_model_gives_the_full_forwards_logits():
    # capacity would drop different tokens in a 20-token forward than in a 1-token step: not in eval
    model = build_model(tiny(moe={"name": "topk", "n_experts": 4, "top_k": 2, "capacity_factor": 1.0})).eval()
    idx = torch.randint(0, 50, (2, 20))
    full = model(idx).logits
    cache = model.new_cache()
    steps = [model(idx[:, :9], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(9, 20)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_kv_cache_holds_only_kv_heads_and_rolls_with_the_window():
    model = model_for("gqa+window", "rope", "sdpa")
    cache = model.new_cache()
    model(torch.randint(0, 50, (1, 20)), cache=cache)
    layer = cache.layers[0]
    assert layer.k.shape == (1, 2, 4, 8)  # 2 kv heads, window 5 → 4 kept, head dim 8
    assert cache.nbytes() == 2 * 2 * (2 * 4 * 8) * 4  # layers × (k, v) × elements × fp32


@pytest.mark.parametrize("positional", ["sinusoidal", "rope", "alibi", "none"])
@torch.no_grad()
def test_generation_with_cache_equals_recompute_and_runs_past_the_training_context(positional):
    model = build_model(tiny(positional=positional, block_size=16)).eval()
    prompt = torch.randint(0, 50, (2, 5))
    cached = model.generate(prompt, 30, temperature=0)
    recomputed = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert cached.shape == (2, 35)
    assert torch.equal(cached, recomputed)


@torch.no_grad()
def test_learned_positions_stop_at_block_size_with_a_clear_error():
    model = build_model(tiny(positional="learned", block_size=16)).eval()
    with pytest.raises(ValueError, match="learned positions stop at block_size"):
        model(torch.randint(0, 50, (1, 17)))
    # generation crops to the last block_size tokens, as nanoGPT does
    assert model.generate(torch.randint(0, 50, (1, 10)), 10, temperature=0).shape == (1, 20)


def test_sdpa_records_the_kernel_that_ran():
    model = model_for("mha", "rope", "sdpa")
    model(torch.randint(0, 50, (1, 8)))
    assert model.blocks[0].attn.attend.kernel.ran in {"math", "flash_attention", "efficient_attention", "cudnn_attention"}


def test_flex_refuses_to_train_on_cpu_with_the_reason():
    from models.attention_backends import _flex_cpu_backward_missing

    if "flex" not in RUNNABLE or torch.cuda.is_available() or not _flex_cpu_backward_missing():
        pytest.skip("FlexAttention trains here")
    model = build_model(tiny(attention={"name": "mha", "backend": {"name": "flex", "compile": False}}))
    with pytest.raises(RuntimeError, match="forward only on CPU.*train with backend sdpa or math"):
        model(torch.randint(0, 50, (1, 8)), torch.randint(0, 50, (1, 8)))[1].backward()


def test_qk_norm_normalises_each_head_with_the_models_norm():
    from models.norm import RMSNorm

    model = build_model(tiny(norm="rmsnorm", attention={"name": "mha", "qk_norm": True, "backend": "math"}))
    attn = model.blocks[0].attn
    assert isinstance(attn.q_norm, RMSNorm) and attn.q_norm.weight.shape == (8,)  # head dim
    seen = {}
    attn.attend.kernel = lambda q, k, v, mask, p: seen.update(q=q, k=k) or build("attention_backend", "math")(q, k, v, mask)
    model(torch.randint(0, 50, (1, 6)))
    for t in (seen["q"], seen["k"]):  # positional 'learned' leaves q, k unrotated: unit RMS per head
        assert torch.allclose(t.pow(2).mean(-1), torch.ones(()), atol=1e-2), t.pow(2).mean(-1)


def test_flash_attn_gets_half_precision_inputs_whatever_it_is_given(monkeypatch):
    """flash-attn has fp16/bf16 kernels only; a stand-in module checks what the backend hands it."""
    import sys
    import types

    seen = []

    def flash_attn_func(q, k, v, dropout_p, causal, window_size, alibi_slopes):
        seen.append({q.dtype, k.dtype, v.dtype})
        return build("attention_backend", "math")(*(t.transpose(1, 2).float() for t in (q, k, v)),
                                                    Mask(torch.arange(q.shape[1]), torch.arange(k.shape[1]))).transpose(1, 2).to(q.dtype)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    kernel = build("attention_backend", "flash_attn")
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)  # fp32 beside a bf16 v
    v = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    out = kernel(q, k, v, Mask(torch.arange(8), torch.arange(8)))
    assert seen == [{torch.bfloat16}] and out.dtype == torch.float32
    kernel(q, k, v.float(), Mask(torch.arange(8), torch.arange(8)))  # an fp32 evaluation
    assert seen[-1] == {torch.bfloat16}
