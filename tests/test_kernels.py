"""Kernel timing: FLOP formulas, the harness, the correctness gate, unavailable backends, decode."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import bench.timing
from bench.kernels import KernelSpec, run_kernels
from bench.kernels.__main__ import main as kernels_main
from bench.timing import time_interleaved, time_one
from models import build
from models.accounting import attention_flops, matmul_flops_per_token
from models.attention_backends import Mask, MathAttention
from models.registry import list_components
from tests.conftest import registered, tiny


QUICK = {"min_time": 0.01, "threads": 1}  # one thread: tiny kernels on a busy 2-core machine stay fast


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("hq,hkv,tq,tk", [(4, 4, 64, 64), (8, 2, 64, 64), (8, 1, 7, 40)])
def test_attention_flops_match_torchs_counter_on_the_math_kernel(hq, hkv, tq, tk):
    q, k, v = torch.randn(2, hq, tq, 16), torch.randn(2, hkv, tk, 16), torch.randn(2, hkv, tk, 16)
    pos = torch.arange(tk)
    mask = Mask(pos[-tq:] if tq != tk else pos, pos)
    # the math kernel computes every score, so the counter sees all Tk keys per query
    assert counted(lambda: build("attention_backend", "math")(q, k, v, mask)) == attention_flops(2, hq, tq, tk, 16, 16)
    assert attention_flops(2, hq, tq, tk, 16, 16) == 4 * 2 * hq * tq * tk * 16  # FlashAttention's 4·B·H·N²·d


@pytest.mark.parametrize("name", ["gelu", "relu2", "swiglu", "geglu"])
def test_mlp_flops_match_torchs_counter_forward_and_backward(name):
    mlp = build("mlp", name, tiny(n_embd=64))
    x = torch.randn(128, 64, requires_grad=True)
    forward = matmul_flops_per_token(mlp, 1, False) * 128
    assert counted(lambda: mlp(x)) == forward
    assert counted(lambda: mlp(x).sum().backward()) == 3 * forward  # backward: two matmuls per matmul


@pytest.mark.parametrize("n_experts,top_k", [(4, 1), (4, 2), (8, 2)])
def test_moe_flops_match_torchs_counter(n_experts, top_k):
    moe = build("moe", "topk", tiny(n_embd=64), n_experts=n_experts, top_k=top_k, capacity_factor=None)
    x = torch.randn(1, 256, 64)
    assert counted(lambda: moe(x)) == moe.flops_per_token(1, False) * 256


class FakeClock:
    """Stands in for time.perf_counter: each timed call advances it by the next scripted duration."""

    def __init__(self, durations):
        self.now, self.durations = 0.0, iter(durations)

    def perf_counter(self) -> float:
        return self.now

    def call(self) -> None:
        self.now += next(self.durations)


def test_the_harness_reports_median_and_iqr_and_calibrates_repetitions(monkeypatch):
    # warm-up calls of 10 ms, then every third call stalls at 100 ms: the median ignores the stalls
    durations = [0.010, 0.010] + [0.100 if i % 3 == 2 else 0.010 for i in range(1000)]
    clock = FakeClock(durations)
    monkeypatch.setattr(bench.timing, "time", clock)
    timing = time_one(clock.call, min_time=0.3, warmup=2)
    assert len(timing.samples) == 30  # 0.3 s / 10 ms per call
    assert timing.median == pytest.approx(0.010)
    assert timing.iqr == pytest.approx(0.090)  # quartiles 10 ms and 100 ms
    assert timing.noisy


def test_the_harness_times_a_known_duration_within_5_percent():
    timing = time_one(lambda: time.sleep(0.02), min_time=0.3)  # sleeping is immune to CPU contention
    assert timing.median == pytest.approx(0.02, rel=0.05)


def test_interleaving_cancels_a_drift_that_biases_back_to_back_timing(monkeypatch):
    # the machine slows down steadily (a neighbour's job, heat): each call costs 0.5% more than the last.
    # Two measurements of one kernel, interleaved as the harness times any comparison, agree; timed one
    # after the other they would not. (Scripted durations: real timings on a shared machine are no test.)
    clock = FakeClock([0.010 * 1.005 ** i for i in range(4000)])
    monkeypatch.setattr(bench.timing, "time", clock)
    timings = time_interleaved({"first": clock.call, "second": clock.call}, min_time=0.3, warmup=1)
    assert timings["first"].median == pytest.approx(timings["second"].median, rel=0.01)
    first, second = time_one(clock.call, min_time=0.3, warmup=1), time_one(clock.call, min_time=0.3, warmup=1)
    assert second.median > 1.1 * first.median  # back to back, the drift reads as a difference


def test_a_steady_kernel_is_not_flagged_noisy(monkeypatch):
    clock = FakeClock([0.020] * 2 + [0.020, 0.021] * 100)  # 5% spread, under the 10% threshold
    monkeypatch.setattr(bench.timing, "time", clock)
    timing = time_one(clock.call, min_time=0.3, warmup=2)
    assert timing.median == pytest.approx(0.020) and timing.iqr == pytest.approx(0.001) and not timing.noisy


def test_interleaving_gives_every_candidate_the_same_repetitions():
    calls = []
    timings = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, min_time=0.001,
                               warmup=1, min_reps=7)
    assert len(timings["a"].samples) == len(timings["b"].samples) >= 7
    assert calls[2:6] in (["a", "b", "b", "a"], ["b", "a", "a", "b"])  # rotating order after the warm-up


class WrongAttention(MathAttention):
    """Returns v unchanged: deliberately wrong."""

    def __call__(self, q, k, v, mask, dropout_p=0.0):
        return v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)


def test_the_correctness_gate_rejects_a_wrong_kernel_and_does_not_time_it():
    with registered("attention_backend", "test_wrong", WrongAttention):
        rows = run_kernels(KernelSpec(attention={"backends": ["math", "test_wrong"], "variants": ["mha"], "seq_lens": [32],
                                                 "batch": 1, "n_head": 2, "head_dim": 8}, **QUICK))
    by_backend = {r["backend"]: r for r in rows}
    assert by_backend["math"]["status"] == "ok" and "median_s" in by_backend["math"]
    wrong = by_backend["test_wrong"]
    assert wrong["status"] == "mismatch" and "against math" in wrong["reason"]
    assert "median_s" not in wrong and wrong["max_error"] > 0.1


def test_components_under_comparison_are_timed_interleaved(monkeypatch):
    import bench.kernels.cases as cases

    compared = []
    original = cases.time_interleaved
    monkeypatch.setattr(cases, "time_interleaved", lambda candidates, *a, **k: compared.append(sorted(candidates))
                        or original(candidates, *a, **k))
    run_kernels(KernelSpec(mlp={"names": ["gelu", "swiglu"], "tokens": 16, "n_embd": 16, "directions": ["forward"]},
                           norm={"names": ["layernorm", "rmsnorm"], "tokens": 16, "dim": 16}, **QUICK))
    assert compared == [["gelu", "swiglu"], ["layernorm", "rmsnorm"]]


def test_a_sweep_may_compile_flex_attention_for_every_shape(monkeypatch):
    import torch._dynamo

    import bench.kernels as kernels

    seen = []
    monkeypatch.setitem(kernels.SECTIONS, "norm", lambda cfg, ctx: seen.append(torch._dynamo.config.recompile_limit) or [])
    run_kernels(KernelSpec(norm={"names": ["rmsnorm"]}))
    assert seen[0] >= 256  # dynamo's default of 8 would fall back to the unfused kernel mid-sweep
    assert torch._dynamo.config.recompile_limit == 8


def test_cases_that_cannot_run_are_rows_and_the_sweep_goes_on():
    rows = run_kernels(KernelSpec(
        attention={"backends": ["math"], "seq_lens": [16], "variants": ["gqa", "mha"], "batch": 1, "n_head": 4,
                   "head_dim": 8, "n_kv_head": 3},  # 4 heads cannot share 3 kv heads
        decode={"variants": ["gqa", "mha"], "prompt": 8, "new_tokens": 2, "n_layer": 1, "n_head": 4, "n_embd": 16,
                "n_kv_head": 3},
        mlp={"names": ["gelu", "nope"], "tokens": 16, "n_embd": 16, "directions": ["forward"]},
        quantization={"names": ["nope"], "tokens": 4, "in_features": 32, "out_features": 32},
        **QUICK))
    status = {(r["component"], r["name"], r.get("phase")): (r["status"], r.get("reason", "")) for r in rows}
    assert status[("attention", "gqa", None)][0] == "failed"
    assert status[("decode", "gqa", None)][0] == "failed" and "n_kv_head" in status[("decode", "gqa", None)][1]
    assert status[("mlp", "nope", None)] == ("failed", "ComponentError: unknown mlp 'nope'; valid: geglu, gelu, relu2, swiglu")
    assert status[("quantization", "nope", None)][0] == "unavailable"
    for ok in (("attention", "mha", None), ("decode", "mha", "decode"), ("mlp", "gelu", None), ("quantization", "float", None)):
        assert status[ok][0] == "ok", ok  # the sweep went on past each failure


def test_unavailable_and_unsupported_backends_are_rows_with_a_reason():
    rows = run_kernels(KernelSpec(attention={"backends": ["flash_attn", "xformers", "sdpa", "nope"], "seq_lens": [32],
                                             "variants": ["window"], "batch": 1, "n_head": 2, "head_dim": 8},
                                  **QUICK))
    by_backend = {r["backend"]: r for r in rows}
    if not torch.cuda.is_available():
        for name in ("flash_attn", "xformers"):
            assert by_backend[name]["status"] == "unavailable"
            assert by_backend[name]["reason"] in ("needs CUDA", f"{name.replace('_', '-')} not installed (pip install 'archbench[gpu]')")
    assert by_backend["nope"]["status"] == "unavailable" and "unknown attention_backend 'nope'" in by_backend["nope"]["reason"]
    assert by_backend["sdpa"]["status"] == "ok"


def test_rows_carry_flops_bandwidth_and_peaks():
    rows = run_kernels(KernelSpec(
        attention={"backends": ["sdpa"], "variants": ["mha"], "seq_lens": [64], "batch": 1, "n_head": 2, "head_dim": 16,
                   "directions": ["forward", "backward", "forward_backward"]},
        norm={"names": ["rmsnorm"], "tokens": 256, "dim": 256},
        mlp={"names": ["swiglu"], "tokens": 64, "n_embd": 64, "directions": ["forward"]},
        moe={"n_experts": [4], "top_k": [2], "tokens": 64, "n_embd": 32, "expert_hidden": 64},
        quantization={"names": ["int8_weight_only", "gptq", "awq"], "tokens": 8, "in_features": 128, "out_features": 128},
        **QUICK))
    attention = {r["direction"]: r for r in rows if r["component"] == "attention"}
    # the whole module: its projections (q, k, v: 32 -> 96; out: 32 -> 32) and the attention core,
    # counted as FlashAttention counts it — causal: (N + 1)/2 visible keys on average
    linear = 64 * (2 * 32 * 96 + 2 * 32 * 32)
    core = attention_flops(1, 2, 64, 65 / 2, 16, 16)
    assert attention["forward"]["flops"] == pytest.approx(linear + core)
    assert attention["backward"]["flops"] == pytest.approx(2 * linear + 2.5 * core)  # FlashAttention's 2.5 for the core
    assert attention["forward_backward"]["flops"] == pytest.approx(3 * linear + 3.5 * core)
    norm = next(r for r in rows if r["component"] == "norm")
    assert norm["bytes"] == 2 * 256 * 256 * 4 and norm["bytes_per_s"] > 0 and norm["pct_peak_bandwidth"] > 0
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and r["threads"] == 1 and r["machine"]  # the fixed thread count, recorded
    assert {r["component"] for r in rows} == {"attention", "norm", "mlp", "moe", "quantization"}
    formats = {r["name"]: r.get("format", "") for r in rows if r["component"] == "quantization"}
    assert formats["gptq"].startswith("GPTQ") and formats["awq"].startswith("AWQ")  # calibrated on the timed input


def test_decode_with_the_kv_cache_equals_full_recompute_for_every_variant_timed():
    with registered("attention", "test_plugin", PluginAttention):  # its handles() has no 'cache'
        rows = run_kernels(KernelSpec(decode={"prompt": 24, "new_tokens": 4, "n_layer": 2, "n_head": 4, "n_embd": 32,
                                              "n_kv_head": 2, "window": 8}, **QUICK))
    (plugin,) = [r for r in rows if r["name"] == "test_plugin"]
    assert plugin["status"] == "unsupported" and "median_s" not in plugin
    assert plugin["reason"] == "attention 'test_plugin' does not decode with a KV cache (cache): it handles rotate"
    by_variant = {}
    for r in rows:
        if r is plugin:
            continue
        assert r["status"] == "ok", (r.get("name"), r.get("reason"))  # the gate compared cached decode with a full forward
        assert r["max_error"] < 1e-4
        by_variant.setdefault(r["name"], {})[r["phase"]] = r
    softmax = {"mha", "gqa", "mqa", "window", "mla", "diff"}
    mixers = set(by_variant) - softmax  # the recurrent mixers (models.mixers): a state of constant size, no KV cache
    assert softmax <= set(by_variant) and {"linear", "retnet", "gla", "mamba2"} <= mixers
    per_token = {v: by_variant[v]["decode"]["kv_cache_bytes_per_token"] for v in softmax}
    # layers × (k, v) × elements × fp32; mla: layers × (kv_rank 64 (the section's fill) + rope_dim 8/2) × fp32
    assert per_token == {"mha": 2 * 2 * 32 * 4, "gqa": 2 * 2 * 16 * 4, "mqa": 2 * 2 * 8 * 4, "window": 2 * 2 * 32 * 4,
                         "mla": 2 * (64 + 4) * 4, "diff": 2 * 2 * 32 * 4}
    for v in mixers:  # what the state holds is what its layers declare (batch 1), before and after decoding
        decode = by_variant[v]["decode"]
        assert decode["kv_cache_bytes_per_token"] == 0 and decode["state_bytes"] > 0, v
        assert decode["kv_cache_bytes"] == decode["kv_cache_bytes_final"] == decode["state_bytes"], v
    assert by_variant["window"]["prefill"]["kv_cache_bytes"] < by_variant["mha"]["prefill"]["kv_cache_bytes"]


def test_python_m_bench_kernels_prints_a_table_and_stores_rows(tmp_path, capsys):
    assert kernels_main(["--variants", "mha", "--backends", "math", "sdpa", "flash_attn", "--seq-lens", "32", "--batch", "1",
                         "--heads", "2", "--head-dim", "8", "--min-time", "0.01", "--threads", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "kernels on" in out and "sdpa" in out and "flash_attn" in out
    from bench.results import load

    kernels = load(tmp_path).kernels
    assert len(kernels) == 3 and set(kernels["backend"]) == {"math", "sdpa", "flash_attn"}
    assert kernels["hardware"].iloc[0]["cpu"] and kernels["machine_id"].notna().all()


def test_the_cli_takes_variants_as_yaml_mappings_with_a_positional_encoding(capsys):
    assert kernels_main(["--variants", "{name: mha, positional: alibi}", "--backends", "math", "--seq-lens", "16",
                         "--batch", "1", "--heads", "2", "--head-dim", "8", "--min-time", "0.01", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "mha+alibi" in out and "positional=alibi" in out


# -- components come from the registry: plugins are timed with no list to edit --------------------------


class PluginAttention(nn.Module):
    """Causal attention with its own kernel and no backend option: a third party's module."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    @staticmethod
    def handles(config, options: dict) -> frozenset[str]:
        return frozenset({"rotate"})  # no score bias, no window, no KV cache

    def forward(self, x, positional, pos, cache=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = positional.rotate(q, pos), positional.rotate(k, pos)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class CausalOnlyAttention(MathAttention):
    """The math kernel declaring causal masking only: no window, no score bias."""

    @staticmethod
    def capabilities(options: dict) -> frozenset[str]:
        return frozenset({"causal"})


class ScaleNorm(nn.Module):
    """x scaled to norm g·√d (Nguyen & Salazar 2019), one learned scalar."""

    def __init__(self, dim: int, config=None, *, eps: float = 1e-5):
        super().__init__()
        self.g, self.eps = nn.Parameter(torch.ones(())), eps

    def forward(self, x):
        return self.g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class SloppyNorm(ScaleNorm):
    """Wrong below fp32: skips the normalisation for half-precision inputs."""

    def forward(self, x):
        return super().forward(x) if x.dtype == torch.float32 else self.g * x


class SquaredMLP(nn.Module):
    """x -> relu(x W)² V with a hidden size it requires (no default)."""

    def __init__(self, config, *, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


TINY_ATTENTION = {"seq_lens": [16], "batch": 1, "n_head": 2, "head_dim": 8, "n_kv_head": 1, "window": 4}


def test_a_plugin_attention_is_timed_with_no_list_to_edit():
    with registered("attention", "test_plugin", PluginAttention):
        rows = run_kernels(KernelSpec(
            attention={**TINY_ATTENTION, "backends": ["math"], "directions": ["forward_backward"]}, **QUICK))
    attention = {(r["name"], r["backend"]): r for r in rows}
    plugin = attention[("test_plugin", "own")]  # timed as itself: it has no backend option
    assert plugin["status"] == "ok" and plugin["median_s"] > 0 and plugin["max_error"] < 1e-4, plugin
    assert plugin["flops"] == 3 * 16 * (2 * 16 * 48 + 2 * 16 * 16)  # its linear layers (models.accounting)
    # every registered attention (the recurrent mixers of models.mixers too, and any added since) and the plugin
    assert {name for name, _ in attention} >= {"diff", "gqa", "mha", "mla", "mqa", "window", "linear", "retnet", "gla",
                                               "mamba2", "test_plugin"}
    for name in ("diff", "gqa", "mha", "mla", "mqa", "window"):  # the built-ins, with the backend named
        assert attention[(name, "math")]["status"] == "ok"


def test_plugin_norms_and_mlps_are_timed_against_the_same_module_in_fp32():
    with registered("norm", "test_scalenorm", ScaleNorm), registered("mlp", "test_squared", SquaredMLP):
        rows = run_kernels(KernelSpec(
            mlp={"tokens": 16, "n_embd": 16, "options": {"hidden": 24}, "directions": ["forward"]},  # fills its option
            norm={"tokens": 16, "dim": 16, "directions": ["forward_backward"]}, **QUICK))
    by = {(r["component"], r["name"], r["direction"]): r for r in rows}
    assert {name for component, name, _ in by if component == "mlp"} == {"geglu", "gelu", "relu2", "swiglu", "test_squared"}
    assert {name for component, name, _ in by if component == "norm"} == {"layernorm", "rmsnorm", "test_scalenorm"}
    for r in rows:
        assert r["status"] == "ok" and r["median_s"] > 0, r
    assert by[("mlp", "test_squared", "forward")]["flops"] == 16 * 2 * 2 * 16 * 24  # from models.accounting
    assert by[("norm", "test_scalenorm", "forward_backward")]["max_error"] < 1e-4  # gradients, the scalar g's too


def test_a_module_whose_low_precision_path_is_wrong_is_a_mismatch_and_not_timed():
    with registered("norm", "test_sloppy", SloppyNorm):
        rows = run_kernels(KernelSpec(norm={"names": ["rmsnorm", "test_sloppy"], "tokens": 16, "dim": 16},
                                      dtype="bfloat16", **QUICK))
    by = {r["name"]: r for r in rows}
    assert by["rmsnorm"]["status"] == "ok" and by["rmsnorm"]["dtype"] == "bfloat16"
    sloppy = by["test_sloppy"]
    assert sloppy["status"] == "mismatch" and "against the same module in float32" in sloppy["reason"]
    assert "median_s" not in sloppy and sloppy["max_error"] > 0.1


def test_an_attention_and_backend_that_lack_a_needed_feature_are_unsupported_naming_it():
    with registered("attention", "test_plugin", PluginAttention), \
            registered("attention_backend", "test_causal_only", CausalOnlyAttention):
        rows = run_kernels(KernelSpec(attention={
            **TINY_ATTENTION, "backends": ["math", "test_causal_only"],
            "variants": ["window", {"name": "mha", "positional": "alibi"}, {"name": "test_plugin", "positional": "alibi"},
                         {"name": "mha", "backend": {"name": "sdpa", "kernel": "flash"}, "positional": "alibi"}]},
            **QUICK))
    by = {(r["name"], r["backend"]): r for r in rows}
    assert by[("window", "math")]["status"] == by[("mha+alibi", "math")]["status"] == "ok"
    assert by[("mha+alibi", "math")]["positional"] == "alibi"
    expected = {
        ("window", "test_causal_only"): "test_causal_only cannot restrict queries to a sliding window (window), "
                                        "needed by attention 'window' (its own options)",
        ("mha+alibi", "test_causal_only"): "test_causal_only cannot add the positional encoding's score bias (bias), "
                                           "needed by positional 'alibi'",
        ("test_plugin+alibi", "own"): "attention 'test_plugin' cannot add the positional encoding's score bias (bias), "
                                      "needed by positional 'alibi'",
        ("mha+alibi", "sdpa(kernel=flash)"): "sdpa(kernel=flash) cannot add the positional encoding's score bias (bias)",
    }
    for key, reason in expected.items():
        assert by[key]["status"] == "unsupported" and by[key]["reason"].startswith(reason), by[key]
        assert "median_s" not in by[key]
    assert len([r for r in rows if r["name"] == "mha+alibi"]) == 3  # a variant naming its backend gets only that one


def test_a_plugin_attention_with_a_wrong_low_precision_path_is_a_mismatch():
    class Sloppy(PluginAttention):
        def forward(self, x, positional, pos, cache=None):
            out = super().forward(x, positional, pos, cache)
            return out if x.dtype == torch.float32 else out + 1

    with registered("attention", "test_sloppy", Sloppy):
        rows = run_kernels(KernelSpec(attention={**TINY_ATTENTION, "variants": ["test_sloppy"]}, dtype="bfloat16",
                                      **QUICK))
    (row,) = rows
    assert row["status"] == "mismatch" and "against the same module in float32" in row["reason"], row


def test_kernel_sections_name_components_the_registry_checks_when_planned():
    spec = KernelSpec(attention={"variants": ["mha", "alibi", {"name": "gqa", "n_kv_head": "two"}], "backends": ["flsh"]},
                      decode={"variants": [{"name": "mha", "positional": "rotary"}]}, norm={"names": ["rmsnrm"]})
    errors = dict(spec.component_errors())
    # the registry's message lists every registered attention (the recurrent mixers too, and any added since)
    assert errors[("kernels", "attention", "variants", 1)] == \
        f"unknown attention 'alibi'; valid: {', '.join(list_components('attention'))}"
    assert {"diff", "gqa", "mha", "mla", "mqa", "window", "gla"} <= set(list_components("attention"))
    assert "expects int | None, got 'two'" in errors[("kernels", "attention", "variants", 2)]
    assert "unknown attention_backend 'flsh' (did you mean 'flash_attn'?)" in errors[("kernels", "attention", "backends", 0)]
    assert "unknown positional 'rotary'" in errors[("kernels", "decode", "variants", 0, "positional")]
    assert "did you mean 'rmsnorm'" in errors[("kernels", "norm", "names", 0)]
    assert len(errors) == 5
    with pytest.raises(ValueError, match="a registered name or a mapping with 'name'"):
        KernelSpec(attention={"variants": [{"n_kv_head": 2}]})


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("ablations/*.yaml")), ids=lambda p: p.stem)
def test_the_shipped_kernel_sections_are_valid(path):
    section = yaml.safe_load(path.read_text()).get("kernels")
    if section:
        assert KernelSpec(**section).component_errors() == []
