"""Kernel timing of the vision-language components: image encoders, connectors, and decoding with an
image under prefix and cross-attention fusion. Exact counts only (FLOPs, tokens, cache bytes): no
timed assertions."""

from __future__ import annotations

import pytest

from bench.kernels import KernelSpec, run_kernels
from bench.kernels.__main__ import main as kernels_main
from bench.kernels.__main__ import parse_args, spec_from_args
from models import ModelConfig, build
from models.config import image_tokens
from models.registry import get
from tests.conftest import registered
from tests.test_kernels import PluginAttention  # a third party's attention that declares no KV cache

QUICK = {"min_time": 0.01, "threads": 1}
TINY_VIT = {"n_embd": 16, "n_layer": 1, "n_head": 2}  # shared: conv takes n_embd only


def by(rows: list[dict], *keys: str) -> dict:
    return {tuple(r.get(k) for k in keys): r for r in rows}


def test_vision_rows_count_flops_per_image_times_batch_and_share_the_sections_options():
    spec = KernelSpec(vision={"batch": 2, "image_size": 8, "channels": 1, "patch_size": 4, "options": TINY_VIT,
                              "variants": ["vit", "conv", {"name": "vit", "patch_size": 3}]}, **QUICK)
    rows = by(run_kernels(spec), "name", "direction")
    assert len(rows) == 6
    context = ModelConfig(n_embd=64, n_head=1, n_layer=1, vocab_size=2, bias=False)
    vit = build("vision", "vit", context, image_size=8, channels=1, patch_size=4, **TINY_VIT)
    conv = build("vision", "conv", context, image_size=8, channels=1, n_embd=16)
    for name, module in (("vit", vit), ("conv", conv)):
        forward, both = rows[(name, "forward")], rows[(name, "forward_backward")]
        for r in (forward, both):
            assert r["status"] == "ok", r
            assert r["component"] == "vision" and r["batch"] == 2 and r["image_size"] == 8 and r["channels"] == 1
            assert r["width"] == 16 and r["flops_per_image"] == module.flops_per_image()
            assert r["median_s"] > 0 and r["flops_per_s"] > 0 and r["pct_peak_flops"] > 0 and r["threads"] == 1
        assert forward["flops"] == 2 * module.flops_per_image()
        assert both["flops"] == 3 * 2 * module.flops_per_image()  # backward: two matmuls per forward matmul
    assert rows[("vit", "forward")]["grid"] == "2x2" and rows[("vit", "forward")]["patches"] == 4
    assert rows[("vit", "forward")]["patch_size"] == 4
    assert rows[("conv", "forward")]["grid"] == "2x2" and "patch_size" not in rows[("conv", "forward")]  # 8 / 2**2
    bad = rows[("vit(patch_size=3)", "forward")]  # the variant's own option wins over the section's
    assert bad["status"] == "failed" and "not divisible by patch_size=3" in bad["reason"] and "median_s" not in bad


def test_connector_rows_carry_the_image_tokens_each_makes_and_its_flops():
    spec = KernelSpec(connector={"batch": 2, "grid": [4, 4], "in_dim": 8, "n_embd": 16, "options": {"queries": 3},
                                 "directions": ["forward", "forward_backward"]}, **QUICK)
    rows = by(run_kernels(spec), "name", "direction")
    context = ModelConfig(n_embd=16, n_head=1, n_layer=1, vocab_size=2, bias=False)
    expected = {"linear": 16, "mlp": 16, "pixel_shuffle": 4, "resampler": 3}  # N, N, N / 2², queries
    assert {name for name, _ in rows} == set(expected)  # default: every registered connector
    for name, tokens in expected.items():
        options = {"queries": 3} if name == "resampler" else {}
        module = build("connector", name, 8, (4, 4), context, **options)
        assert get("connector", name).factory.tokens((4, 4), options) == tokens
        for direction, factor in (("forward", 1), ("forward_backward", 3)):
            r = rows[(name, direction)]
            assert r["status"] == "ok", r
            assert r["image_tokens"] == tokens and r["patches"] == 16 and r["grid"] == "4x4"
            assert r["in_dim"] == 8 and r["n_embd"] == 16 and r["batch"] == 2
            assert r["flops_per_image"] == module.flops_per_image()
            assert r["flops"] == factor * 2 * module.flops_per_image() and r["pct_peak_flops"] > 0


def test_a_connector_that_cannot_tile_the_grid_is_a_row_and_the_sweep_goes_on():
    rows = run_kernels(KernelSpec(connector={"batch": 1, "grid": [4, 4], "in_dim": 8, "n_embd": 16,
                                             "variants": [{"name": "pixel_shuffle", "factor": 3}, "linear", "nope"],
                                             "directions": ["forward"]}, **QUICK))
    status = {r["name"]: (r["status"], r.get("reason", "")) for r in rows}
    assert status["pixel_shuffle(factor=3)"][0] == "failed" and "does not divide the 4×4" in status["pixel_shuffle(factor=3)"][1]
    assert status["nope"][0] == "failed" and "unknown connector 'nope'" in status["nope"][1]
    assert status["linear"] == ("ok", "")


@pytest.fixture(scope="module")
def image_decode_rows():
    """Two VLMs, prefix and cross-attention, 2 layers of 2 heads × 8 over a 2×2-patch image; batch 2."""
    section = {"image_size": 8, "channels": 1, "patch_size": 4, "options": TINY_VIT, "prompt": 5, "new_tokens": 3,
               "batch": 2, "n_layer": 2, "n_head": 2, "n_embd": 16}
    import bench.kernels.cases as cases

    compared, original = [], cases.time_interleaved

    def spy(candidates, *a, **k):
        compared.append(sorted(candidates))
        return original(candidates, *a, **k)

    cases.time_interleaved = spy
    try:
        spec = KernelSpec(image_decode=section, **QUICK)
        rows = run_kernels(spec)
    finally:
        cases.time_interleaved = original
    return spec, rows, compared


def test_image_decode_times_both_fusions_interleaved_after_checking_the_cache(image_decode_rows):
    spec, rows, compared = image_decode_rows
    assert compared == [["cross_attention decode", "cross_attention prefill", "prefix decode", "prefix prefill"]]
    phases = by(rows, "name", "phase")
    assert set(phases) == {(f, p) for f in ("prefix", "cross_attention") for p in ("prefill", "decode")}
    for (fusion, phase), r in phases.items():
        assert r["status"] == "ok", r
        assert r["component"] == "image_decode" and r["fusion"] == fusion and r["direction"] == "inference"
        assert r["max_error"] < 1e-4  # the cached greedy decode gave the full forward's logits
        assert r["vision"] == "vit" and r["connector"] == "linear" and r["grid"] == "2x2" and r["median_s"] > 0
        assert r["backend"] == "auto"  # the language model's attention backend, as decode's rows name it
    for fusion in ("prefix", "cross_attention"):
        decode = phases[(fusion, "decode")]
        assert decode["per_token_s"] == decode["median_s"] / 3
        assert decode["tokens_per_s"] == pytest.approx(2 * 3 / decode["median_s"])
        assert phases[(fusion, "prefill")]["flops"] > 0 and "flops" not in decode


def test_the_prefix_cache_holds_the_image_positions_and_cross_attention_its_image_keys_and_values(image_decode_rows):
    spec, rows, _ = image_decode_rows
    config = ModelConfig(**spec.image_decode.model("prefix"))
    assert image_tokens(config) == 4  # a 2×2 patch grid, linear connector
    per_token = 2 * 2 * 16 * 4  # layers × (k, v) × n_embd (mha: heads × head_dim) × fp32, per sequence
    batch, prompt, new, image = 2, 5, 3, 4
    phases = by(rows, "name", "phase")
    # cross-attention after both blocks keeps each image token's projected k and v in both: as many bytes
    # as the prefix's image positions take in the KV cache, but outside the attention's rows
    for fusion, prefix, cross in (("prefix", 4, 0), ("cross_attention", 0, batch * image * per_token)):
        for phase in ("prefill", "decode"):
            r = phases[(fusion, phase)]
            assert r["image_tokens"] == image and r["prefix_positions"] == prefix
            assert r["kv_cache_bytes_per_token"] == per_token
            assert r["image_kv_bytes"] == cross
            assert r["kv_cache_bytes"] == batch * (prompt + prefix) * per_token + cross  # after prefill, as decode's rows
            assert r["kv_cache_bytes_final"] == batch * (prompt + prefix + new) * per_token + cross
            assert r["kv_cache_bytes_steps"] == [batch * (prompt + prefix + t) * per_token + cross for t in range(new + 1)]
            assert r["kv_cache_image_bytes"] == batch * prefix * per_token + cross


def test_a_model_that_cannot_decode_with_a_kv_cache_is_an_unsupported_row():
    with registered("attention", "test_nocache", PluginAttention):
        rows = run_kernels(KernelSpec(image_decode={"image_size": 8, "channels": 1, "patch_size": 4, "options": TINY_VIT,
                                                    "prompt": 3, "new_tokens": 1, "n_layer": 1, "n_head": 2, "n_embd": 16,
                                                    "fusions": ["prefix", "nope"], "attention": "test_nocache"}, **QUICK))
    status = {r["name"]: (r["status"], r.get("reason")) for r in rows}
    assert status["prefix"] == ("unsupported", "attention 'test_nocache' does not decode with a KV cache (cache)")
    assert status["nope"][0] == "failed" and "unknown fusion 'nope'" in status["nope"][1]
    assert not any("median_s" in r for r in rows)


def test_the_cli_parses_image_components_and_runs_them_at_a_tiny_size(tmp_path, capsys):
    argv = ["--component", "vision", "connector", "--batch", "1", "--image-size", "8", "--channels", "1",
            "--patch-size", "4", "--grid", "2", "2", "--in-dim", "8", "--n-embd", "16", "--directions", "forward",
            "--connectors", "linear", "pixel_shuffle", "--min-time", "0.01", "--threads", "1"]
    spec = spec_from_args(parse_args(argv))
    assert spec.attention is None and spec.image_decode is None
    assert spec.vision.variants is None and (spec.vision.image_size, spec.vision.channels, spec.vision.patch_size) == (8, 1, 4)
    assert spec.connector.variants == ["linear", "pixel_shuffle"] and spec.connector.grid == [2, 2]
    assert (spec.connector.in_dim, spec.connector.n_embd, spec.connector.batch) == (8, 16, 1)
    assert kernels_main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vision" in out and "vit" in out and "conv" in out and "pixel_shuffle" in out and "image_tokens=1" in out
    from bench.results import load

    kernels = load(tmp_path).kernels
    assert len(kernels) == 4 and set(kernels["status"]) == {"ok"}
    assert dict(zip(kernels["name"], kernels["image_tokens"]))["pixel_shuffle"] == 1


def test_the_cli_builds_an_image_decode_section():
    spec = spec_from_args(parse_args(["--component", "image_decode", "--vision", "{name: conv, stages: 1}", "--connectors",
                                      "resampler", "--fusions", "{name: cross_attention, every: 2}", "--prompt", "7",
                                      "--new-tokens", "2", "--image-size", "16"]))
    section = spec.image_decode
    assert section.vision == {"name": "conv", "stages": 1} and section.connector == "resampler"
    assert section.fusions == [{"name": "cross_attention", "every": 2}]
    assert (section.prompt, section.new_tokens, section.image_size) == (7, 2, 16)


def test_image_sections_name_components_the_registry_checks_when_planned():
    spec = KernelSpec(vision={"variants": ["vitt", {"name": "conv", "stagez": 2}]},
                      connector={"variants": ["linear", {"name": "resampler", "querys": 2}]},
                      image_decode={"fusions": ["prefix", "xattn"]})
    errors = dict(spec.component_errors())
    assert "unknown vision 'vitt'" in errors[("kernels", "vision", "variants", 0)]
    assert "has no option 'stagez'" in errors[("kernels", "vision", "variants", 1)]
    assert "has no option 'querys'" in errors[("kernels", "connector", "variants", 1)]
    assert "unknown fusion 'xattn'" in errors[("kernels", "image_decode", "fusions", 1)]
    assert len(errors) == 4
    # a model that does not validate whole: a pixel shuffle of 3 on the vit's 8×8 grid (32 / 4)
    errors = dict(KernelSpec(image_decode={"connector": {"name": "pixel_shuffle", "factor": 3}}).component_errors())
    assert set(errors) == {("kernels", "image_decode", "fusions", 0), ("kernels", "image_decode", "fusions", 1)}
    assert "factor=3 does not divide the 8×8 patch grid" in errors[("kernels", "image_decode", "fusions", 0)]
    assert KernelSpec(vision={}, connector={}, image_decode={}).component_errors() == []
    with pytest.raises(ValueError, match="a registered name or a mapping with 'name'"):
        KernelSpec(vision={"variants": [{"stages": 2}]})
