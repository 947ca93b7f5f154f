"""Multi-head latent attention (mla, DeepSeek-V2) and differential attention (diff, Ye et al. 2024):
the contract, causality, backends, KV-cache decoding, FLOP accounting, training, and hand-worked numbers."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pydantic
import pytest
import torch
import torch.nn.functional as F

from bench.autotune import KernelChoices
from bench.kernels import KernelSpec, run_kernels
from models import REQUIRED, available, build_model, check_flops
from models.accounting import attention_flops, matmul_flops_per_token
from models.attention_backends import Mask
from models.registry import build
from tests.conftest import tiny
from tests.test_attention import BACKENDS, HERE

VARIANTS = {
    "mla": {"name": "mla", "kv_rank": 16},  # rope_dim 4 of head_dim 8
    "mla+q_rank": {"name": "mla", "kv_rank": 12, "q_rank": 16, "rope_dim": 2},
    "mla+window": {"name": "mla", "kv_rank": 16, "window": 5},
    "diff": {"name": "diff"},
    "diff+window": {"name": "diff", "lambda_init": 0.5, "window": 5},
}
POSITIONALS = ["rope", "alibi", "learned"]
COMBOS = list(itertools.product(VARIANTS, POSITIONALS, HERE))


def model_for(variant: str, positional: str, backend: str, **overrides):
    spec = {**VARIANTS[variant], "backend": BACKENDS[backend]}
    return build_model(tiny(attention=spec, positional=positional, **overrides), seed=0, kernels=KernelChoices()).eval()


def refusal(**fields) -> str:
    with pytest.raises(pydantic.ValidationError) as info:
        tiny(**fields)
    return str(info.value)


# -- the contract -------------------------------------------------------------------------------------


def test_both_are_listed_with_their_papers_and_options(monkeypatch, capsys):
    from models.__main__ import main

    rows = {row.name: row for row in available("attention")}
    assert rows["mla"].options == {"kv_rank": REQUIRED, "q_rank": None, "rope_dim": None, "window": None, "backend": "auto"}
    assert rows["diff"].options == {"lambda_init": 0.8, "window": None, "backend": "auto"}
    monkeypatch.setenv("COLUMNS", "400")
    assert main(["attention"]) == 0
    out = capsys.readouterr().out
    assert "multi-head latent attention" in out and "(DeepSeek-V2, DeepSeek-AI 2024)" in out
    assert "differential attention" in out and "(Differential Transformer, Ye et al. 2024)" in out


def test_options_and_layouts_that_cannot_work_are_refused_by_name():
    assert "attention 'mla' needs option 'kv_rank' (int)" in refusal(attention="mla")
    assert ("rope_dim=3 must be even and divide the head dim 8 for positional 'rope' to rotate it"
            in refusal(attention={"name": "mla", "kv_rank": 16, "rope_dim": 3}, positional="rope"))
    assert tiny(attention={"name": "mla", "kv_rank": 16, "rope_dim": 3}, positional="learned")  # nothing to rotate
    assert "n_head=3 must be even" in refusal(attention="diff", n_head=3, n_embd=24)
    assert "lambda_init=1.0 must be in [0, 1)" in refusal(attention={"name": "diff", "lambda_init": 1.0})
    # what a kernel cannot do is refused as for the built-in attention: sdpa's flash kernel has no masks
    flash = {"name": "sdpa", "kernel": "flash"}
    assert ("attention 'mla' with backend 'sdpa kernel=flash' cannot add the positional encoding's score bias (bias)"
            in refusal(attention={"name": "mla", "kv_rank": 8, "backend": flash}, positional="alibi"))


@pytest.mark.parametrize("name", ["mla", "diff"])
def test_features_follow_the_kernel(name):
    from models.config import attention_features

    spec = {"name": name, **({"kv_rank": 8} if name == "mla" else {})}
    assert attention_features(tiny(attention=spec)) == {"rotate", "bias", "dropout", "window", "cache", "ragged"}
    flash = tiny(attention={**spec, "backend": {"name": "sdpa", "kernel": "flash"}})
    assert attention_features(flash) == {"rotate", "dropout"}
    assert build_model(tiny(attention={**spec, "backend": "flex"}), seed=0).new_cache() is not None
    with pytest.raises(ValueError, match=f"attention '{name}' does not mix the first layer's values"):
        tiny(attention=spec, value_residual=True)  # their forward takes no values to mix


# -- causality, backends, KV cache --------------------------------------------------------------------


@pytest.mark.parametrize("variant,positional,backend", COMBOS)
@torch.no_grad()
def test_changing_a_token_never_changes_earlier_outputs(variant, positional, backend):
    model = model_for(variant, positional, backend)
    idx = torch.randint(0, 50, (2, 24))
    t = 11
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 50
    before, after = model(idx).logits, model(changed).logits
    assert torch.equal(before[:, :t], after[:, :t])
    assert not torch.allclose(before[:, t], after[:, t])


@pytest.mark.parametrize("variant,positional,backend", [c for c in COMBOS if c[2] != "math"])
@torch.no_grad()
def test_every_backend_agrees_with_math(variant, positional, backend):
    reference = model_for(variant, positional, "math")
    model = model_for(variant, positional, backend)
    model.load_state_dict(reference.state_dict())
    idx = torch.randint(0, 50, (3, 32))
    assert torch.allclose(model(idx).logits, reference(idx).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant,positional,backend", COMBOS)
@torch.no_grad()
def test_kv_cache_decoding_gives_the_logits_of_a_full_forward(variant, positional, backend):
    model = model_for(variant, positional, backend)
    idx = torch.randint(0, 50, (2, 20))
    full = model(idx).logits
    cache = model.new_cache()
    steps = [model(idx[:, :9], cache=cache).logits]  # prefill
    steps.append(model(idx[:, 9:12], cache=cache).logits)  # a chunk of 3 after cached keys
    steps += [model(idx[:, t : t + 1], cache=cache).logits for t in range(12, 20)]  # one token at a time
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


KERNELS = {**{b: BACKENDS[b] for b in HERE[1:]}, "sdpa.flash": {"name": "sdpa", "kernel": "flash"},
           "sdpa.math": {"name": "sdpa", "kernel": "math"}}


@pytest.mark.parametrize("d_qk,d_v", [(12, 8), (8, 16)])  # MLA's q/k wider than v; diff's v wider than q/k
@pytest.mark.parametrize("kind", ["causal", "window", "alibi", "decode-chunk", "decode-window"])
@pytest.mark.parametrize("backend", KERNELS)
@torch.no_grad()
def test_kernels_take_a_value_head_dim_of_their_own(backend, kind, d_qk, d_v):
    B, H, Hkv, Tk = 2, 4, 2, 24
    Tq = 5 if kind.startswith("decode") else Tk
    q, k, v = torch.randn(B, H, Tq, d_qk), torch.randn(B, Hkv, Tk, d_qk), torch.randn(B, Hkv, Tk, d_v)
    k_pos = torch.arange(Tk)
    mask = Mask(k_pos if Tq == Tk else k_pos[-Tq:].clone(), k_pos, 7 if "window" in kind else None,
                torch.linspace(0.5, 0.1, H) if kind == "alibi" else None)
    if backend == "sdpa.flash" and kind != "causal":
        pytest.skip("sdpa's flash kernel takes no mask")
    expected = build("attention_backend", "math")(q, k, v, mask)
    spec = dict(KERNELS[backend]) if isinstance(KERNELS[backend], dict) else {"name": KERNELS[backend]}
    got = build("attention_backend", spec.pop("name"), **spec)(q, k, v, mask)
    assert got.shape == (B, H, Tq, d_v)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["baddbmm", "sdpa"])
def test_training_backends_give_maths_gradients_with_a_value_head_dim_of_their_own(backend):
    B, H, Tk = 2, 4, 16
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=gen) for shape in ((B, H, Tk, 12), (B, H, Tk, 12), (B, H, Tk, 8))]
    grad = torch.randn(B, H, Tk, 8, generator=gen)

    def grads(name: str) -> tuple[torch.Tensor, ...]:
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        return torch.autograd.grad(build("attention_backend", name)(q, k, v, Mask.causal(Tk)), (q, k, v), grad)

    for got, expected in zip(grads(backend), grads("math")):
        assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_flash_attn_gets_one_head_dim_and_q_scale(monkeypatch):
    """flash-attn 2 needs one head dim for q, k and v: a stand-in checks what the backend hands it."""
    import sys
    import types

    seen = []

    def flash_attn_func(q, k, v, dropout_p, causal, window_size, alibi_slopes, softmax_scale=None):
        seen.append((q.shape[-1], k.shape[-1], v.shape[-1], softmax_scale))
        q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) * softmax_scale + torch.full((6, 6), -torch.inf).triu(1)
        return (torch.softmax(scores, -1) @ v).transpose(1, 2).to(torch.bfloat16)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    q, k, v = torch.randn(1, 2, 6, 12), torch.randn(1, 2, 6, 12), torch.randn(1, 2, 6, 8)
    out = build("attention_backend", "flash_attn")(q, k, v, Mask.causal(6))
    assert seen == [(12, 12, 12, 1 / math.sqrt(12))] and out.shape == (1, 2, 6, 8)
    assert torch.allclose(out, build("attention_backend", "math")(q, k, v, Mask.causal(6)), atol=5e-2)
    build("attention_backend", "flash_attn")(k[..., :8], k[..., :8], q, Mask.causal(6))  # v wider: q, k padded
    assert seen[-1] == (12, 12, 12, 1 / math.sqrt(8))


# -- mla: hand-checked numbers ------------------------------------------------------------------------


@pytest.mark.parametrize("rope_dim", [2, 4, 8])
@torch.no_grad()
def test_mla_is_the_deepseek_v2_formula_written_out(rope_dim):
    """softmax((q_nope·k_nopeᵀ + rot(q_rope)·rot(k_rope)ᵀ)/√(D + R))·v with one shared rope key, rotated
    as a rope_dim-wide RoPE, k_nope and v up-projected from the normalised latent."""
    H, D, R, rank = 4, 8, rope_dim, 16
    model = build_model(tiny(n_layer=1, positional="rope", attention={"name": "mla", "kv_rank": rank, "rope_dim": R,
                                                                       "backend": "math"}), seed=0)
    attn = model.blocks[0].attn
    B, T = 2, 7
    x, pos = torch.randn(B, T, 32), torch.arange(T)
    got = attn(x, model.positional.at(pos), pos)

    small = build("positional", "rope", tiny(n_embd=4 * R))  # RoPE over rope_dim-wide heads
    rotation = small.rotation(pos)
    q = attn.q_proj(x).view(B, T, H, D + R).transpose(1, 2)
    q_nope, q_rope = q[..., :D], small.rotate(q[..., D:], rotation)
    c_kv, k_rope = attn.kv_down(x).split([rank, R], -1)
    c_kv = F.layer_norm(c_kv, (rank,), attn.kv_norm.weight, attn.kv_norm.bias)
    k_rope = small.rotate(k_rope[:, None], rotation)  # (B, 1, T, R): one head, every query head uses it
    kv = attn.kv_up(c_kv).view(B, T, H, 2 * D).transpose(1, 2)
    k_nope, v = kv[..., :D], kv[..., D:]
    scores = (q_nope @ k_nope.transpose(-1, -2) + q_rope @ k_rope.transpose(-1, -2)) / math.sqrt(D + R)
    y = torch.softmax(scores + torch.full((T, T), -torch.inf).triu(1), -1) @ v  # (B, H, T, D)
    expected = attn.c_proj(y.transpose(1, 2).reshape(B, T, H * D))
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_mla_caches_only_the_latent_and_the_rope_key():
    config = tiny(attention={"name": "mla", "kv_rank": 16, "rope_dim": 4, "backend": "math"}, positional="rope")
    model = build_model(config, seed=0).to(torch.bfloat16).eval()
    attn = model.blocks[0].attn
    assert attn.kv_cache_bytes_per_token(2) == (16 + 4) * 2 == 40  # bf16
    B, T = 2, 11
    cache = model.new_cache()
    model(torch.randint(0, 50, (B, T)), cache=cache)
    for layer in cache.layers:
        assert layer.c_kv.shape == (B, T, 16) and layer.k_rope.shape == (B, T, 4)
        assert layer.c_kv.dtype == layer.k_rope.dtype == torch.bfloat16
    assert cache.nbytes() == config.n_layer * B * T * attn.kv_cache_bytes_per_token(2)


@torch.no_grad()
def test_mla_cache_rolls_with_the_window():
    model = model_for("mla+window", "rope", "math")  # window 5: the last 4 tokens are kept
    cache = model.new_cache()
    model(torch.randint(0, 50, (1, 11)), cache=cache)
    layer = cache.layers[0]
    assert layer.c_kv.shape == (1, 4, 16) and layer.k_rope.shape == (1, 4, 4) and layer.pos.tolist() == [7, 8, 9, 10]


def test_kv_cache_bytes_per_token_against_mha_gqa_mqa():
    """A 4-head, 64-wide layer at bf16: MHA 2·64 elements; GQA (2 kv heads) 2·32; MQA 2·16; MLA with
    kv_rank 16 and rope_dim 8 (head_dim/2): 24; diff keeps MHA's 2·64."""
    specs = {"mha": "mha", "gqa": {"name": "gqa", "n_kv_head": 2}, "mqa": "mqa",
             "mla": {"name": "mla", "kv_rank": 16}, "diff": "diff"}
    per_token = {name: build_model(tiny(n_head=4, n_embd=64, n_layer=1, attention=spec), seed=0)
                 .blocks[0].attn.kv_cache_bytes_per_token(2) for name, spec in specs.items()}
    assert per_token == {"mha": 256, "gqa": 128, "mqa": 64, "mla": 48, "diff": 256}


# -- diff: hand-checked numbers -----------------------------------------------------------------------


@torch.no_grad()
def test_diff_is_the_softmax_difference_written_out():
    """λ forced to λ_init (λ vectors zeroed): (softmax(q1·k1ᵀ/√d) − λ·softmax(q2·k2ᵀ/√d))·v per head,
    RMS-normalised over 2d channels and scaled by 1 − λ_init, on heads paired 2i, 2i + 1."""
    model = build_model(tiny(n_layer=1, attention={"name": "diff", "lambda_init": 0.8, "backend": "math"}), seed=0)
    attn = model.blocks[0].attn
    for p in (attn.lambda_q1, attn.lambda_k1, attn.lambda_q2, attn.lambda_k2):
        p.zero_()
    assert attn.lambda_full().item() == pytest.approx(0.8)
    attn.subln.weight.copy_(torch.linspace(0.5, 1.5, 16))  # a gain other than ones, shared by the heads
    B, T, h, d = 2, 6, 2, 8
    x, pos = torch.randn(B, T, 32), torch.arange(T)
    got = attn(x, model.positional.at(pos), pos)  # learned positions: nothing rotated

    q, k, v = attn.c_attn(x).split(32, -1)
    q, k = q.view(B, T, 2 * h, d).transpose(1, 2), k.view(B, T, 2 * h, d).transpose(1, 2)
    v = v.view(B, T, h, 2 * d).transpose(1, 2)
    causal = torch.full((T, T), -torch.inf).triu(1)
    a1 = torch.softmax(q[:, 0::2] @ k[:, 0::2].transpose(-1, -2) / math.sqrt(d) + causal, -1)
    a2 = torch.softmax(q[:, 1::2] @ k[:, 1::2].transpose(-1, -2) / math.sqrt(d) + causal, -1)
    heads = (a1 - 0.8 * a2) @ v  # (B, h, T, 2d)
    heads = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-5) * attn.subln.weight * (1 - 0.8)
    expected = attn.c_proj(heads.transpose(1, 2).reshape(B, T, 32))
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_diff_lambda_is_reparameterised_from_four_vectors():
    attn = build_model(tiny(attention={"name": "diff", "lambda_init": 0.3}), seed=0).blocks[0].attn
    attn.lambda_q1.fill_(0.5)
    attn.lambda_k1.fill_(0.5)
    attn.lambda_q2.fill_(1.0)
    attn.lambda_k2.fill_(-0.25)
    # exp(8 · 0.25) − exp(8 · −0.25) + 0.3
    assert attn.lambda_full().item() == pytest.approx(math.exp(2) - math.exp(-2) + 0.3, rel=1e-6)


def test_diff_starts_from_mhas_weights_and_draws_lambda_from_n_0_0_1():
    mha, diff = build_model(tiny(attention="mha"), seed=3), build_model(tiny(attention="diff"), seed=3)
    for a, b in zip(mha.blocks, diff.blocks):
        assert torch.equal(a.attn.c_attn.weight, b.attn.c_attn.weight)  # init_blocks: MHA's keyed streams
        assert torch.equal(a.attn.c_proj.weight, b.attn.c_proj.weight)
    # MHA's parameters plus, per layer, four d-vectors for λ and the head norm's 2d gain
    assert sum(p.numel() for p in diff.parameters()) == sum(p.numel() for p in mha.parameters()) + 2 * (4 * 8 + 16)
    lambdas = torch.cat([torch.cat([b.attn.lambda_q1, b.attn.lambda_k1, b.attn.lambda_q2, b.attn.lambda_k2])
                         for b in diff.blocks]).detach()
    assert 0.05 < lambdas.std().item() < 0.15 and lambdas.abs().mean() > 0
    again = build_model(tiny(attention="diff"), seed=3).blocks[0].attn.lambda_q1
    assert torch.equal(again, diff.blocks[0].attn.lambda_q1)  # reset_parameters on the keyed stream
    assert not torch.equal(build_model(tiny(attention="diff"), seed=4).blocks[0].attn.lambda_q1, again)


def test_diff_cache_holds_k_of_both_maps_and_the_wide_v():
    model = build_model(tiny(attention="diff", positional="rope"), seed=0).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 50, (1, 10)), cache=cache)
    layer = cache.layers[0]
    assert layer.k.shape == (1, 4, 10, 8) and layer.v.shape == (1, 2, 10, 16)  # 2h heads of d; h heads of 2d
    assert cache.nbytes() == 2 * 10 * model.blocks[0].attn.kv_cache_bytes_per_token(4)  # layers × tokens × fp32


# -- accounting and training --------------------------------------------------------------------------


@pytest.mark.parametrize("name,options", [
    ("mla", {"kv_rank": 16}), ("mla", {"kv_rank": 24, "q_rank": 32, "rope_dim": 4}), ("mla", {"kv_rank": 16, "window": 4}),
    ("diff", {}), ("diff", {"window": 4, "lambda_init": 0.2}),
])
def test_flop_accounting_matches_torchs_counter(name, options):
    assert check_flops("attention", name, options) is None


def test_attention_core_flops_count_each_dim():
    mla = build("attention", "mla", tiny(), kv_rank=16, rope_dim=4)
    diff = build("attention", "diff", tiny())
    assert mla.extra_flops_per_token(32, False) == attention_flops(1, 4, 1, 32, 8 + 4, 8)
    assert diff.extra_flops_per_token(32, False) == 2 * attention_flops(1, 2, 1, 32, 8, 16)  # two maps, v of 2d
    assert diff.extra_flops_per_token(32, False) == 1.5 * build("attention", "mha", tiny()).extra_flops_per_token(32, False)
    assert matmul_flops_per_token(diff, 32, True) < matmul_flops_per_token(diff, 32, False)  # causal: fewer keys


@pytest.mark.parametrize("spec", [{"name": "mla", "kv_rank": 16, "q_rank": 16}, {"name": "diff"}], ids=["mla", "diff"])
def test_a_tiny_model_trains(spec):
    model = build_model(tiny(attention={**spec, "backend": "math"}, positional="rope", dropout=0.1), seed=0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (8, 16), generator=gen)
    targets = torch.roll(idx, -1, dims=1)  # a fixed batch to fit
    losses = []
    for _ in range(20):
        loss = model(idx, targets).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
    grads = [p.grad for p in model.blocks[0].attn.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # λ vectors and norms included


def test_the_kernel_timer_times_both_with_every_backend_and_decode():
    rows = run_kernels(KernelSpec(
        attention={"variants": ["mla", "diff"], "backends": ["math", "baddbmm", "sdpa", "auto"], "seq_lens": [16],
                   "batch": 1, "n_head": 4, "head_dim": 8, "kv_rank": 16, "directions": ["forward", "forward_backward"]},
        decode={"variants": ["mla", "diff"], "prompt": 8, "new_tokens": 3, "n_layer": 2, "n_head": 4, "n_embd": 32,
                "kv_rank": 16},
        min_time=0.01, threads=1))
    for r in rows:
        assert r["status"] == "ok" and r["median_s"] > 0, r
    attention = [r for r in rows if r["component"] == "attention"]
    assert {(r["name"], r["backend"]) for r in attention} == {
        (n, b) for n in ("mla", "diff") for b in ("math", "baddbmm", "sdpa", "auto")}
    decode = {(r["name"], r["phase"]): r for r in rows if r["component"] == "decode"}
    assert decode[("mla", "decode")]["kv_cache_bytes_per_token"] == 2 * (16 + 4) * 4  # layers × (rank + rope) × fp32
    assert decode[("diff", "decode")]["kv_cache_bytes_per_token"] == 2 * 2 * 32 * 4
    assert decode[("mla", "prefill")]["kv_cache_bytes"] == 2 * 8 * (16 + 4) * 4  # layers × prompt × elements × fp32


def test_every_softmax_attention_is_project_attend_output():
    """One seam: each attention only projects (and may expand what it caches, combine or gate heads);
    the cache, the mask and the kernel are the shared Attend's, MLA and diff included."""
    from models.attention import Attend, SelfAttention
    from tests.test_attention import ATTENTIONS

    for spec in [*ATTENTIONS.values(), *VARIANTS.values()]:
        attn = build_model(tiny(attention=spec), seed=0).blocks[0].attn
        assert isinstance(attn.attend, Attend) and type(attn).forward is SelfAttention.forward, spec
    models_dir = Path(__file__).resolve().parents[1] / "models"
    source = "".join((models_dir / f).read_text() for f in ("attention.py", "attention_modern.py"))
    assert source.count("Mask(") == 1 and source.count(".update(") == 1  # the tail is written once
