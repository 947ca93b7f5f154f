"""Every sub-quadratic mixer (a ``RecurrentMixer`` in the attention family) against the contract the
issue sets: causal; its chunked (training) form equal to its recurrent (decoding) form and to a
naive reference; decode equal to the full forward; rows at different positions batched as if alone;
FLOPs equal to torch's counter; a decoding state whose size does not grow with the context. Then the
hybrid: the right mixer in each layer."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_model, check_flops
from models.config import attention_features, hybrid_layers
from models.mixers import RecurrentMixer
from models.positional import Positions
from models.recurrent import CHANNEL_DECAY_FLOOR, chunked, recurrent
from models.registry import build_spec, get, list_components
from tests.conftest import tiny
from tests.test_ragged_decode import JOINER, PROMPTS, decode_alone, prompts_of, serve

MIXERS = [name for name in list_components("attention") if issubclass(get("attention", name).factory, RecurrentMixer)]
SMALL = {"based": {"window": 4}}  # a window shorter than the prompts: the rolling part rolls


def spec(name: str) -> dict:
    return {"name": name, **SMALL.get(name, {})}


def naive(q, k, v, log_decay):
    """O(T²): o_t = Σ_{s≤t} (q_t ⊙ e^{b_t − b_s})·k_s v_sᵀ with b the cumulative log decay, in float64."""
    g = log_decay if log_decay.dim() == 4 else log_decay[..., None]
    b = g.cumsum(2)  # (B, H, T, Dk or 1)
    T = q.shape[2]
    decay = (b[:, :, :, None] - b[:, :, None]).exp() * torch.ones(T, T).tril()[:, :, None]  # (B, H, T, T, Dk or 1)
    return torch.einsum("bhtd,bhtsd,bhsd,bhsv->bhtv", q, decay.expand(-1, -1, -1, -1, q.shape[-1]), k, v)


def test_every_issue_mixer_is_registered():
    assert set(MIXERS) == {"linear", "retnet", "gla", "mamba2", "deltanet", "based", "h3"}


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("T,chunk", [(1, 4), (13, 4), (32, 8), (37, 64)])
def test_chunked_equals_recurrent_equals_naive(per_channel, T, chunk):
    gen = torch.Generator().manual_seed(T)
    B, H, Dk, Dv = 2, 3, 5, 4
    q, k, v = (torch.randn(B, H, T, d, generator=gen, dtype=torch.float64) for d in (Dk, Dk, Dv))
    shape = (B, H, T, Dk) if per_channel else (B, H, T)
    log_decay = torch.rand(*shape, generator=gen, dtype=torch.float64) * CHANNEL_DECAY_FLOOR
    expected = naive(q, k, v, log_decay)
    state = torch.randn(B, H, Dk, Dv, generator=gen, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        args = [t.to(dtype) for t in (q, k, v, log_decay)]
        o_c, s_c = chunked(*args, chunk=chunk)
        o_r, s_r = recurrent(*args)
        assert (o_c - expected).abs().max() <= tol * max(1.0, expected.abs().max())
        assert (o_r - expected).abs().max() <= tol * max(1.0, expected.abs().max())
        assert torch.allclose(s_c, s_r, atol=tol * max(1.0, s_r.abs().max()), rtol=0)
        # from a carried state: two halves equal the whole
        o1, s1 = chunked(*(t[:, :, : T // 2] for t in args), state.to(dtype), chunk=chunk)
        o2, s2 = chunked(*(t[:, :, T // 2:] for t in args), s1, chunk=chunk)
        o_w, s_w = recurrent(*args, state.to(dtype))
        assert torch.allclose(torch.cat([o1, o2], 2), o_w, atol=tol * max(1.0, o_w.abs().max()), rtol=0)
        assert torch.allclose(s2, s_w, atol=tol * max(1.0, s_w.abs().max()), rtol=0)


def module(name: str, positional: str = "rope"):
    config = tiny(attention=spec(name), positional=positional)
    model = build_model(config, seed=0).eval()  # the GPT's init: raw parameters set, as trained
    return model.blocks[0].attn, model.positional


def bound(positional, T: int, batch: int | None = None):
    pos = torch.arange(T) if batch is None else torch.arange(T).expand(batch, T)
    return Positions(pos, positional, positional.rotation(pos)), pos


@pytest.mark.parametrize("name", MIXERS)
@torch.no_grad()
def test_a_future_token_changes_no_past_output(name):
    attn, positional = module(name)
    x = torch.randn(2, 20, 32)
    changed = x.clone()
    changed[:, 12] += 1.0
    p, pos = bound(positional, 20)
    before, after = attn(x, p, pos), attn(changed, p, pos)
    # exactly equal, but for an FFT convolution's rounding (h3): a millionth of the output's scale
    assert torch.allclose(before[:, :12], after[:, :12], atol=1e-6 * float(before.abs().max()), rtol=0)
    assert not torch.allclose(before[:, 12:], after[:, 12:])


@pytest.mark.parametrize("name", MIXERS)
@torch.no_grad()
def test_chunked_module_output_equals_its_token_by_token_recurrence(name):
    attn, positional = module(name)
    x = torch.randn(2, 21, 32)
    p, pos = bound(positional, 21)
    whole = attn(x, p, pos)
    cache, steps = attn.new_cache(), []
    for t in range(21):
        pt, post = Positions(pos[t:t + 1], positional, positional.rotation(pos[t:t + 1])), pos[t:t + 1]
        steps.append(attn(x[:, t:t + 1], pt, post, cache))
    assert torch.allclose(torch.cat(steps, 1), whole, atol=1e-5, rtol=0), (torch.cat(steps, 1) - whole).abs().max()


@pytest.mark.parametrize("positional", ["none", "rope", "learned"])
@pytest.mark.parametrize("name", MIXERS)
@torch.no_grad()
def test_decode_equals_the_full_forward(name, positional):
    model = build_model(ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=40,
                                    attention=spec(name), positional=positional), seed=0).eval()
    idx = torch.randint(0, 50, (2, 40))
    full = model(idx).logits
    cache = model.new_cache()
    steps = [model(idx[:, :23], cache=cache).logits] + [model(idx[:, t:t + 1], cache=cache).logits for t in range(23, 40)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MIXERS)
@torch.no_grad()
def test_rows_at_different_positions_decode_as_if_alone(name):
    model = build_model(tiny(attention=spec(name), positional="rope"), seed=0).eval()
    assert {"cache", "ragged"} <= attention_features(model.config)
    *prompts, joiner = prompts_of((*PROMPTS, JOINER))
    seen = serve(model, prompts, joiner)  # merged, rows leaving and joining (tests/test_ragged_decode.py)
    for request, prompt in enumerate([*prompts, joiner]):
        got = torch.stack(seen[request])
        expected, _ = decode_alone(model, prompt, len(got))
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), (request, (got - expected).abs().max())


@pytest.mark.parametrize("name", MIXERS)
def test_flops_equal_torchs_counter(name):
    assert check_flops("attention", name, SMALL.get(name), seq_len=24) is None
    assert check_flops("attention", name, SMALL.get(name), seq_len=7) is None  # a partial chunk


@pytest.mark.parametrize("name", MIXERS)
@torch.no_grad()
def test_the_decoding_state_does_not_grow_with_the_context(name):
    model = build_model(tiny(attention=spec(name), positional="none", block_size=64), seed=0).eval()
    held = []
    for T in (9, 30, 60):
        cache = model.new_cache()
        model(torch.randint(0, 50, (3, T)), cache=cache)
        held.append(cache.nbytes())
        for _ in range(3):
            model(torch.randint(0, 50, (3, 1)), cache=cache)
        held.append(cache.nbytes())
    assert len(set(held)) == 1, held
    assert held[0] == 3 * sum(block.attn.state_bytes(4) for block in model.blocks)  # fp32: 4 bytes


def test_a_mixer_declares_no_kv_cache_per_token_and_attention_no_state():
    model = build_model(tiny(attention="gla", hybrid={"attention": "mha", "every": 2}), seed=0)
    gla, mha = model.blocks[0].attn, model.blocks[1].attn
    assert not hasattr(gla, "kv_cache_bytes_per_token") and gla.state_bytes(2) > 0
    assert not hasattr(mha, "state_bytes") and mha.kv_cache_bytes_per_token(2) == 2 * 32 * 2


# -- hybrids -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hybrid,expected", [
    ({"attention": "mha", "every": 2}, ["gla", "mha", "gla", "mha", "gla"]),
    ({"attention": "mha", "every": 4}, ["gla", "gla", "gla", "mha", "gla"]),
    ({"attention": {"name": "window", "window": 4}, "layers": [0, 4]}, ["window", "gla", "gla", "gla", "window"]),
])
def test_the_hybrid_places_the_named_attention_in_its_layers(hybrid, expected):
    config = tiny(n_layer=5, attention="gla", hybrid=hybrid)
    model = build_model(config, seed=0)
    classes = {name: type(build_spec("attention", name if name != "window" else {"name": "window", "window": 4},
                                     config)) for name in set(expected)}
    assert [type(b.attn) for b in model.blocks] == [classes[name] for name in expected]
    assert hybrid_layers(config) == [i for i, name in enumerate(expected) if name != "gla"]
    assert model.blocks[expected.index("gla")].attn.state_bytes(2) > 0


@torch.no_grad()
def test_a_hybrid_decodes_as_its_full_forward_and_keeps_both_caches():
    model = build_model(ModelConfig(n_layer=4, n_head=4, n_embd=32, vocab_size=50, block_size=40, attention="mamba2",
                                    positional="rope", hybrid={"attention": {"name": "gqa", "n_kv_head": 2}, "every": 2}), seed=0).eval()
    idx = torch.randint(0, 50, (2, 40))
    cache = model.new_cache()
    steps = [model(idx[:, :23], cache=cache).logits] + [model(idx[:, t:t + 1], cache=cache).logits for t in range(23, 40)]
    assert torch.allclose(torch.cat(steps, 1), model(idx).logits, atol=1e-5, rtol=0)
    per_token = sum(b.attn.kv_cache_bytes_per_token(4) for b in model.blocks if hasattr(b.attn, "kv_cache_bytes_per_token"))
    state = sum(b.attn.state_bytes(4) for b in model.blocks if hasattr(b.attn, "state_bytes"))
    assert cache.nbytes() == 2 * (40 * per_token + state)


def test_a_hybrid_is_refused_where_either_attention_lacks_a_needed_feature():
    with pytest.raises(ValueError, match="attention 'gla' does not add the positional encoding's score bias"):
        tiny(n_layer=4, attention="gla", positional="alibi", hybrid={"attention": "mha", "every": 2})
    with pytest.raises(ValueError, match="model.hybrid places attention 'mha' in layers \\[7\\]"):
        tiny(n_layer=4, attention="gla", hybrid={"attention": "mha", "layers": [7]})
    with pytest.raises(ValueError, match="expected \\{attention: <spec>, every: k\\}"):
        tiny(attention="gla", hybrid={"attention": "mha"})
    with pytest.raises(ValueError, match="unknown attention 'mhaa'"):
        tiny(attention="gla", hybrid={"attention": "mhaa", "every": 2})
    # alibi on every layer: fine when no layer is a mixer (every layer takes the hybrid's attention)
    assert attention_features(tiny(n_layer=2, attention="gla", positional="alibi",
                                   hybrid={"attention": "mha", "every": 1})) >= {"bias"}


def test_a_model_without_hybrid_keeps_its_stored_form():
    assert "hybrid" not in tiny().to_dict()  # runs hashed before hybrids keep their ids


@pytest.mark.parametrize("name", ["linear", "retnet", "deltanet"])
def test_a_mixer_with_mhas_projection_starts_from_mhas_q_k_v(name):
    mixer, mha = (build_model(tiny(attention=a), seed=3).blocks[0].attn for a in (name, "mha"))
    rows = mha.c_attn.weight.shape[0]
    assert torch.equal(mixer.c_attn.weight[:rows], mha.c_attn.weight)


@pytest.mark.parametrize("name,gate", [("gla", "models.mixers.FLA_DECAYED"), ("mamba2", "models.mixers.FLA_DECAYED"),
                                       ("deltanet", "models.mixer_delta.FLA_DELTA")])
@torch.no_grad()
def test_kernel_fla_runs_the_chunked_form_through_the_gated_fla_call_and_decodes_in_pytorch(name, gate, monkeypatch):
    """fla itself needs CUDA (tests/test_fla_kernels.py checks the mapping against a fake fla); here the
    mixer's dispatch: sequences through the gated call, single decoded tokens through the recurrence."""
    import importlib

    owner, _, attribute = gate.rpartition(".")
    pure = getattr(importlib.import_module(owner), attribute).reference_fn
    calls = []
    monkeypatch.setattr(importlib.import_module(owner), attribute,
                        lambda *args: calls.append(args[0].shape[2]) or pure(*args))
    model = build_model(tiny(attention=name, positional="none"), seed=0).eval()
    for block in model.blocks:
        block.attn.kernel = "fla"  # as kernel: fla builds it, where fla and CUDA are present
    idx = torch.randint(0, 50, (2, 12))
    cache = model.new_cache()
    model(idx[:, :9], cache=cache)
    model(idx[:, 9:10], cache=cache)
    assert calls == [9, 9]  # the 9-token prefill in both layers; the decoded token never


def test_kernel_fla_is_refused_where_fla_cannot_run():
    from models import fla_kernels

    reason = fla_kernels.unavailable_reason()
    if reason is None:
        pytest.skip("fla and CUDA are present here")
    with pytest.raises(ValueError, match=f"kernel=fla: {reason[:20]}"):
        tiny(attention={"name": "gla", "kernel": "fla"})
