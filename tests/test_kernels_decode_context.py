"""Decoding against the context: `bench.kernels --component decode --contexts`, the bytes a KV cache and a
recurrent state hold, what a model declares (``bench.train``), and the report's figure. Timings are
never asserted: only that rows exist and what they hold."""

from __future__ import annotations

import pandas as pd
import pytest
from pydantic import ValidationError

from bench.kernels import KernelSpec, run_kernels
from bench.kernels.__main__ import main as kernels_main
from bench.kernels.config import DecodeKernels
from bench.report import _kernel_tables
from bench.report.figures import decode_context_figure, kernel_figures
from models.accounting import cache_bytes
from models import ModelConfig, build_model
from models.mixers import GatedLinearAttention
from models.registry import build_spec, resolve
from tests.conftest import registered
from tests.test_kernels import PluginAttention

QUICK = {"min_time": 0.01, "threads": 1}
SIZES = {"n_layer": 1, "n_head": 4, "n_embd": 32}
CONTEXTS, NEW, BATCH = [16, 64], 4, 2


class Forgetful(GatedLinearAttention):
    """GLA that drops its carried state at every call: its prefill is right, its cached decode is not."""

    def mix(self, x, positional, state):
        return super().mix(x, positional, {})


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    with registered("attention", "test_forgetful", Forgetful):
        return run_kernels(KernelSpec(decode={
            "variants": ["mha", "gla", {"name": "mha", "positional": "learned"}, "test_forgetful"],
            "contexts": [64, 16], "new_tokens": NEW, "batch": BATCH, **SIZES}, **QUICK))


def _model(attention: str, n_layer: int = 1):
    return build_model(ModelConfig(**{**SIZES, "n_layer": n_layer}, vocab_size=256, block_size=80, bias=False,
                                   attention=attention), seed=0)


def _at(rows: list[dict], name: str) -> dict[tuple[int, str], dict]:
    return {(r["context"], r["phase"]): r for r in rows if r["name"] == name and r.get("phase")}


def test_every_variant_has_a_prefill_and_a_decode_row_at_every_context(rows):
    timed = {(r["name"], r["context"], r["phase"]) for r in rows if r["status"] == "ok"}
    names = ("mha", "gla", "mha+learned")  # learned positions: the model's block_size reaches the longest context
    assert timed == {(n, c, p) for n in names for c in CONTEXTS for p in ("prefill", "decode")}
    for r in rows:
        if r["status"] != "ok":
            continue
        assert r["prompt"] == r["context"] and r["new_tokens"] == NEW and r["median_s"] > 0
        assert r["checked_at"] == 16 and r["max_error"] < 1e-4  # checked once, at the shortest context
        if r["phase"] == "decode":
            assert r["per_token_s"] > 0 and r["tokens_per_s"] > 0
    assert [r["context"] for r in rows if r.get("phase") == "prefill"] == [16, 16, 16, 64, 64, 64]  # shortest first


def test_a_recurrent_state_holds_the_same_bytes_at_every_context(rows):
    gla = _at(rows, "gla")
    state = sum(block.attn.state_bytes(4) for block in _model("gla").blocks)  # fp32 on a CPU
    for context in CONTEXTS:
        r = gla[(context, "decode")]
        assert r["kv_cache_bytes"] == r["kv_cache_bytes_final"] == BATCH * state
        assert r["state_bytes"] == state and r["kv_cache_bytes_per_token"] == 0


def test_a_kv_cache_grows_by_its_declared_bytes_per_token(rows):
    mha = _at(rows, "mha")
    per_token = sum(block.attn.kv_cache_bytes_per_token(4) for block in _model("mha").blocks)
    short, long = mha[(16, "decode")], mha[(64, "decode")]
    assert long["kv_cache_bytes"] - short["kv_cache_bytes"] == (64 - 16) * BATCH * per_token
    assert short["kv_cache_bytes_final"] - short["kv_cache_bytes"] == NEW * BATCH * per_token
    assert short["kv_cache_bytes_per_token"] == per_token and short["state_bytes"] is None


def test_a_variant_whose_cached_decode_is_wrong_is_a_mismatch_row_and_is_not_timed(rows):
    (forgetful,) = [r for r in rows if r["name"] == "test_forgetful"]
    assert forgetful["status"] == "mismatch" and "median_s" not in forgetful and "phase" not in forgetful
    assert forgetful["context"] == 16 and "after a 16-token prompt" in forgetful["reason"]


def test_the_figure_draws_decode_against_context_only_for_rows_that_name_one(rows):
    frame = pd.DataFrame(rows)
    figure = decode_context_figure(frame)
    assert figure is not None and figure.startswith("<svg") and "per-token latency against context" in figure
    assert [title for title, _ in kernel_figures(frame)] == ["decode cost against context"]  # no bars of mixed contexts
    one_prompt = frame.drop(columns=["context"])
    assert decode_context_figure(one_prompt) is None
    assert "decode" in [title for title, _ in kernel_figures(one_prompt)]
    assert decode_context_figure(frame.assign(status="failed")) is None


def test_the_report_table_states_a_state_per_sequence_beside_the_kv_cache_per_token(rows):
    (machine,) = _kernel_tables(pd.DataFrame(rows))
    assert machine["decode_contexts"] and machine["decode_state"]
    table = {(d["name"], d["context"]): d for d in machine["decode"]}
    assert table[("gla", 64)]["kv_per_token"] == "none" and table[("gla", 64)]["state"] != "–"
    assert table[("mha", 64)]["state"] == "–" and table[("mha", 64)]["kv_per_token"] == "256 B"  # 2 × 32 × fp32
    assert table[("mha", 64)]["length"] == 64 + NEW


def test_what_a_model_declares_for_mha_gla_and_a_hybrid_of_both():
    mha, gla = _model("mha", 2), _model("gla", 2)
    assert cache_bytes(mha) == (2 * 2 * 32 * 2, None)  # layers × (k, v) × C × bf16
    # GLA: per layer n_head × key_dim (C/2/H) × head_dim × bf16, and no KV cache
    assert cache_bytes(gla) == (0, 2 * 4 * 4 * 8 * 2)
    mix = _model("mha", 2)  # built by hand: layer 1 a GLA, whatever the config says
    mix.blocks[1].attn = build_spec("attention", resolve("attention", "gla"), mix.config)
    assert cache_bytes(mix) == (2 * 32 * 2, 4 * 4 * 8 * 2)
    assert cache_bytes(mix, 4) == (2 * 32 * 4, 4 * 4 * 8 * 4)  # the decode rows' reading, at fp32
    mix.blocks[0].attn = PluginAttention(mix.config)  # says neither what it caches nor what state it keeps
    assert cache_bytes(mix) == (None, 4 * 4 * 8 * 2)


def test_contexts_replace_the_prompt_and_size_the_model():
    cfg = DecodeKernels(contexts=[1024, 256, 256], new_tokens=8)
    assert cfg.lengths() == [256, 1024] and cfg.block_size == 1032
    assert DecodeKernels(prompt=100, new_tokens=8).lengths() == [100]
    with pytest.raises(ValidationError, match="at least 1 token"):
        DecodeKernels(contexts=[0, 16])


def test_the_cli_prints_ms_per_token_and_bytes_held_per_context(capsys):
    assert kernels_main(["--component", "decode", "--variants", "mha", "gla", "--contexts", "16", "32",
                         "--new-tokens", "2", "--n-embd", "32", "--n-layer", "1", "--batch", "1",
                         "--min-time", "0.01", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    summary = out[out.index("decode against context"):]
    assert "16 tokens" in summary and "32 tokens" in summary and "state" in summary and "KV cache" in summary
    assert "gla" in summary and "mha" in summary
