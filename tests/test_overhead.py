"""bench.overhead step: what it measures is the model's own work, and it reports every path it compares."""

from __future__ import annotations

import textwrap

import pytest
import torch

from bench import overhead, workers
from models import build_model
from tests.conftest import tiny


def test_the_matmul_peak_is_measured_at_every_linear_shape_of_the_step():
    model = build_model(tiny(mlp="swiglu"), seed=0)
    shapes = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    peak = overhead.model_shape_matmul_peak(model, 64, torch.device("cpu"), torch.float32)
    assert set(peak["per_shape"]) == {f"{what} 64×{k}×{n}" for k, n in shapes
                                      for what in ("forward", "input grad", "weight grad")}
    # the aggregate is a time-weighted mean: between the slowest and the fastest shape
    assert min(peak["per_shape"].values()) <= peak["flops_per_s"] <= max(peak["per_shape"].values())


SPEC = """\
name: steptest
base:
  model: {n_layer: 1, n_head: 2, n_embd: 32, positional: rope}
  data: {source: task, task: induction, vocab_size: 16, seq_len: 16, n_train: 500}
  train: {batch_size: 8, warmup_steps: 2, device: cpu, dtype: float32}
budget: {steps: 50}
variants:
  mha: {}
  mqa: {model.attention: mqa}
"""


def test_the_step_benchmark_compares_sdpa_auto_and_compiled_on_the_same_batches(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # compilation is tested in test_autotune
    monkeypatch.setattr(workers, "workers_decision",
                        lambda run: {"workers": 2, "reason": "scripted", "steps_per_s": {"1": 10.0, "2": 15.0}})
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(SPEC))
    assert overhead.main(["step", "--spec", str(spec), "--steps", "30"]) == 0
    out = capsys.readouterr().out
    assert "training step of steptest's baseline mha (1×32, 2 heads, vocab 16), batch 8×16, float32" in out
    assert "backend auto (forward_backward): " in out and "compile auto for the spec's 50 steps: " in out
    for label in ("sdpa, eager (the old default)", "backend auto, eager", "backend auto, compiled"):
        assert label in out
    assert "--workers auto runs 2 process(es) (scripted): the machine trains 1920 tokens/s" in out  # 15 × 8 × 16


def test_the_paths_train_the_same_model_on_the_same_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    monkeypatch.setattr(workers, "workers_decision", lambda run: {"workers": 1, "reason": "scripted"})
    spec = tmp_path / "spec.yaml"
    spec.write_text(textwrap.dedent(SPEC))
    r = overhead.step_throughput(str(spec), steps=30)
    assert r["max_loss_difference"]["auto compiled"] == pytest.approx(r["max_loss_difference"]["auto"], abs=0)
    assert r["max_loss_difference"]["auto"] < 1e-4  # the chosen kernel passed the fp32 gate
    assert all(tps > 0 for tps in r["tokens_per_s"].values()) and r["warmup_steps"]["sdpa"] >= 2
