"""`backend: auto`: the fastest backend that passed the correctness gate, measured once, recorded."""

from __future__ import annotations

import pytest
import torch

from bench import autotune, hardware
from bench.config import resolve_run
from bench.timing import Timing
from bench.train import train
from models import build_model
from models.attention_backends import AutoAttention, Mask
from tests.conftest import registered, tiny


class WrongAttention:
    """Fast and wrong: returns v unchanged."""

    name = "test_wrong"

    @staticmethod
    def capabilities(options: dict) -> frozenset[str]:
        return frozenset({"causal", "window", "bias", "dropout", "decode"})

    def __call__(self, q, k, v, mask, dropout_p=0.0):
        return v.repeat_interleave(q.shape[1] // v.shape[1], dim=1) * 1.0


class CausalOnlyAttention(WrongAttention):
    """Right, but only for plain causal masks."""

    name = "test_causal_only"

    @staticmethod
    def capabilities(options: dict) -> frozenset[str]:
        return frozenset({"causal"})

    def __call__(self, q, k, v, mask, dropout_p=0.0):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


@pytest.fixture(autouse=True)
def _chooser():
    autotune.install()


def scripted_timings(order: list[str]):
    """time_interleaved that makes candidates faster the earlier they come in `order` (others slowest)."""
    def fake(candidates, device="cpu", **kwargs):
        for fn in candidates.values():
            fn()  # the timed work still runs once
        return {label: Timing([1.0 + (order.index(label) if label in order else len(order))]) for label in candidates}
    return fake


def call(backend, q, k, v, mask):
    return backend(q, k, v, mask)


def test_auto_picks_the_fastest_backend_that_passed_the_gate(monkeypatch):
    # the wrong backend is "fastest", the causal-only one next: auto must skip the first, take the second
    monkeypatch.setattr(autotune, "time_interleaved", scripted_timings(["test_wrong", "test_causal_only", "math"]))
    with registered("attention_backend", "test_wrong", WrongAttention), \
            registered("attention_backend", "test_causal_only", CausalOnlyAttention):
        q, k, v = torch.randn(3, 2, 4, 17, 8)
        auto = AutoAttention()
        out = auto(q, k, v, Mask.causal(17))
        record = next(iter(auto.choices.values()))
        assert record["backend"] == "test_causal_only" and auto.ran == "test_causal_only"
        assert "test_wrong" not in record["median_s"]
        assert record["rejected"]["test_wrong"].startswith("failed the correctness gate: max error")
        assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)

        # a sliding window: the causal-only backend cannot, so it is not a candidate
        window = Mask(torch.arange(17), torch.arange(17), window=4)
        auto(q, k, v, window)
        windowed = [r for r in auto.choices.values() if r is not record][0]
        assert windowed["rejected"]["test_causal_only"] == "cannot window"
        assert windowed["backend"] == "math"


def test_a_choice_is_measured_once_per_machine_and_shape(monkeypatch):
    calls = []
    real = autotune.time_interleaved
    monkeypatch.setattr(autotune, "time_interleaved", lambda c, *a, **kw: calls.append(sorted(c)) or real(c, *a, **kw))
    q, k, v = torch.randn(3, 1, 2, 23, 8, requires_grad=True).unbind(0)
    first, second = AutoAttention(), AutoAttention()  # two layers, or two runs on one machine
    first(q, k, v, Mask.causal(23))
    second(q, k, v, Mask.causal(23))
    with torch.no_grad():
        first(q, k, v, Mask.causal(23))  # inference: its own direction, its own measurement
    assert len(calls) == 2
    assert calls[0] == ["math", "sdpa", "sdpa.math"]  # every CPU candidate; flex is left out on CPU
    assert first.choices[next(iter(first.choices))] == second.choices[next(iter(second.choices))]
    key = [k for k in hardware_cache() if k.startswith("attention:cpu:float32") and ":T23x23:" in k]
    assert len(key) == 2 and {hardware_cache()[k]["direction"] for k in key} == {"forward_backward", "forward"}


def hardware_cache() -> dict:
    import json

    from bench.paths import cache_dir

    return json.loads((cache_dir("hardware") / f"{hardware.machine_id()}.json").read_text())


def test_auto_computes_what_its_choice_computes_and_decodes():
    config = tiny(attention={"name": "gqa", "n_kv_head": 2, "backend": "auto"}, positional="rope")
    auto = build_model(config, seed=3)
    idx = torch.randint(0, 50, (2, 20))
    logits, loss, _ = auto(idx, idx)
    loss.backward()
    chosen = auto.blocks[0].attn.kernel.choices
    spec = next(r["spec"] for r in chosen.values() if r["direction"] == "forward_backward")
    same = build_model(tiny(attention={"name": "gqa", "n_kv_head": 2, "backend": spec}, positional="rope"), seed=3)
    assert torch.equal(same(idx, idx).loss, loss)  # bitwise: auto adds nothing to the computation
    auto.eval()
    prompt = idx[:, :5]
    torch.manual_seed(0)
    cached = auto.generate(prompt, 10, temperature=0)
    assert torch.equal(cached, auto.generate(prompt, 10, temperature=0, use_cache=False))


def test_the_run_records_the_choice_and_the_numbers_behind_it():
    run = resolve_run(dict(n_layer=1, n_head=2, n_embd=16, attention={"name": "mha", "backend": "auto"}),
                      dict(source="task", task="induction", vocab_size=16, seq_len=16, n_train=200),
                      dict(steps=2, batch_size=4, eval_every=2, checkpoint_every=None))
    metrics = train(run)
    training = [r for r in metrics["attention_choices"] if r["direction"] == "forward_backward"]
    assert len(training) == 1 and metrics["attention_kernel"] == training[0]["backend"]
    assert training[0]["backend"] in training[0]["median_s"]
    assert min(training[0]["median_s"], key=training[0]["median_s"].get) == training[0]["backend"]
    assert {r["direction"] for r in metrics["attention_choices"]} == {"forward_backward", "forward"}  # evaluation too


def test_without_the_chooser_auto_runs_sdpa(monkeypatch):
    monkeypatch.setattr(AutoAttention, "chooser", None)
    q, k, v = torch.randn(3, 1, 2, 9, 8)
    auto = AutoAttention()
    assert torch.equal(auto(q, k, v, Mask.causal(9)),
                       torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert auto.ran == "sdpa" and "no chooser" in next(iter(auto.choices.values()))["reason"]
