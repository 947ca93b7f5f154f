"""`backend: auto`: the fastest backend that passed the correctness gate, measured once, recorded."""

from __future__ import annotations

import contextlib

import pytest
import torch
import yaml

from bench import autotune, hardware, workers
from bench.config import resolve_run
from bench.timing import Timing
from bench.train import train
from models import build_model
from models.attention_backends import AutoAttention, Mask, call_key, call_label
from models.registry import get
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


def measuring() -> AutoAttention:
    """An `auto` kernel that measures on this machine, as bench's models choose."""
    auto = AutoAttention()
    auto.use(autotune.choose_attention)
    return auto


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
        auto = measuring()
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
    first, second = measuring(), measuring()  # two layers, or two runs on one machine
    first(q, k, v, Mask.causal(23))
    second(q, k, v, Mask.causal(23))
    with torch.no_grad():
        first(q, k, v, Mask.causal(23))  # inference: its own direction, its own measurement
    assert len(calls) == 2
    assert calls[0] == ["baddbmm", "math", "sdpa", "sdpa.math"]  # every CPU candidate; flex is left out on CPU
    assert first.choices[next(iter(first.choices))] == second.choices[next(iter(second.choices))]
    key = [k for k in hardware_cache() if k.startswith("attention:cpu:float32") and ":B1:H2/2:T23x23:" in k]
    assert len(key) == 2 and {hardware_cache()[k]["direction"] for k in key} == {"forward_backward", "forward"}


def hardware_cache() -> dict:
    import json

    from bench.paths import cache_dir

    return json.loads((cache_dir("hardware") / f"{hardware.machine_id()}.json").read_text())


def test_auto_computes_what_its_choice_computes_and_decodes():
    config = tiny(attention={"name": "gqa", "n_kv_head": 2, "backend": "auto"}, positional="rope")
    auto = build_model(config, seed=3, kernels=autotune.KernelChoices())
    idx = torch.randint(0, 50, (2, 20))
    logits, loss, _ = auto(idx, idx)
    loss.backward()
    chosen = auto.blocks[0].attn.attend.kernel.choices
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


def test_a_model_built_without_a_chooser_runs_sdpa_and_says_so():
    q, k, v = torch.randn(3, 1, 2, 9, 8)
    auto = AutoAttention()
    assert torch.equal(auto(q, k, v, Mask.causal(9)),
                       torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    record = next(iter(auto.choices.values()))
    assert auto.ran == "sdpa" and "no kernel chooser was given when the model was built" in record["reason"]
    model = build_model(tiny(attention={"name": "mha", "backend": "auto"}), seed=0)
    model(torch.randint(0, 50, (2, 8)))
    assert {r["backend"] for r in model.blocks[0].attn.attend.kernel.choices.values()} == {"sdpa"}


def test_a_model_is_built_with_its_chooser_and_choices_are_not_shared_through_a_class():
    asked = []

    def math_please(q, k, v, mask, dropout_p, direction):
        asked.append(direction)
        return {"name": "math"}, {"backend": "math", "spec": {"name": "math"}, "reason": "scripted"}

    chosen = build_model(tiny(attention={"name": "mha", "backend": "auto"}), seed=0, kernels=math_please)
    plain = build_model(tiny(attention={"name": "mha", "backend": "auto"}), seed=0)  # built after: unaffected
    idx = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        chosen(idx), plain(idx)
    assert asked == ["forward", "forward"]  # once per layer (2 layers): the model's own chooser
    assert chosen.blocks[0].attn.attend.kernel.ran == "math" and plain.blocks[0].attn.attend.kernel.ran == "sdpa"


def test_a_recorded_kernel_that_cannot_run_here_is_measured_again():
    measured = []

    def measure(q, k, v, mask, dropout_p, direction):
        measured.append(direction)
        return {"name": "math"}, {"backend": "math", "reason": "measured here"}

    q, k, v = torch.randn(3, 1, 2, 9, 8)
    call = call_label(call_key(q, k, v, Mask.causal(9), 0.0, "forward"))
    elsewhere = {"call": call, "backend": "xformers", "spec": {"name": "xformers"}, "reason": "fastest on a GPU box"}
    if get("attention_backend", "xformers").unavailable_reason() is None:
        pytest.skip("xformers runs here")
    auto = AutoAttention()
    auto.use(autotune.KernelChoices([elsewhere], measure=measure))
    auto(q, k, v, Mask.causal(9))
    assert measured == ["forward"] and auto.ran == "math"


def test_recorded_choices_are_replayed_and_new_calls_measured():
    measured = []

    def measure(q, k, v, mask, dropout_p, direction):
        measured.append(q.shape[2])
        return {"name": "baddbmm"}, {"backend": "baddbmm", "reason": "measured here"}

    q, k, v = torch.randn(3, 1, 2, 9, 8)
    first = autotune.KernelChoices(measure=measure)
    auto = AutoAttention()
    auto.use(first)
    auto(q, k, v, Mask.causal(9))
    recorded = first.records()
    assert measured == [9] and recorded[0]["spec"] == {"name": "baddbmm"} and recorded[0]["call"].startswith("cpu:float32:1:2:2:9:")
    replay = autotune.KernelChoices(recorded, measure=measure)  # a served model replays the run's record
    auto.use(replay)
    auto(q, k, v, Mask.causal(9))
    assert measured == [9] and auto.ran == "baddbmm"  # replayed, not measured again
    q2, k2, v2 = torch.randn(3, 1, 2, 5, 8)
    auto(q2, k2, v2, Mask.causal(5))  # a call the run never made: measured, and recorded too
    assert measured == [9, 5] and len(replay.records()) == 2


def test_serving_and_quantization_run_the_kernels_the_run_recorded(tmp_path):
    from bench.posttrain import evaluate_quantized
    from bench.serve.model import ServingKernels, load_run

    run = resolve_run(dict(n_layer=1, n_head=2, n_embd=16, attention={"name": "mha", "backend": "auto"}),
                      dict(source="task", task="induction", vocab_size=16, seq_len=16, n_train=200),
                      dict(steps=2, batch_size=4, eval_every=2, device="cpu", dtype="float32"))
    metrics = train(run, tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(run.model_dump(mode="json")))
    recorded = {r["call"]: r for r in metrics["attention_choices"]}
    evaluation = next(r for r in recorded.values() if r["direction"] == "forward")
    served = load_run(tmp_path)
    model = served.model
    kernel = model.blocks[0].attn.attend.kernel
    assert isinstance(kernel.chooser, ServingKernels)
    with torch.no_grad():
        model(torch.randint(0, 16, (4, 16)))  # the evaluation's call: replayed from the run's record
        assert list(kernel.choices.values()) == [evaluation]
        model(torch.randint(0, 16, (3, 16)))  # a batch the run never ran: measured once for its kind
        model(torch.randint(0, 16, (2, 11)))  # another prefill shape: that choice, replayed
    unrecorded, replayed = list(kernel.choices.values())[1:]
    assert "measured for every prefill call" in unrecorded["reason"] and replayed["backend"] == unrecorded["backend"]
    assert len(served.kernels.kinds) == 1
    backends = "/".join(sorted({evaluation["backend"], unrecorded["backend"]}))
    assert served.describe() == {"device": "cpu", "dtype": "float32", "kernel": f"auto: {backends} (prefill)",
                                 "quantization": None}
    quantized = run.model_copy(update={"model": run.model.model_copy(update={"quantization": "int8_dynamic"})})
    choices = evaluate_quantized(quantized, tmp_path)["attention_choices"]
    assert evaluation in choices and all("no kernel chooser" not in r["reason"] for r in choices)


# -- compile: auto ------------------------------------------------------------------------------

TINY_RUN = (dict(n_layer=1, n_head=2, n_embd=16),
            dict(source="task", task="induction", vocab_size=16, seq_len=16, n_train=200))


def fp32_train(**train) -> dict:
    return dict(steps=6, batch_size=4, eval_every=6, checkpoint_every=None, device="cpu", dtype="float32", **train)


@pytest.fixture
def uncached(monkeypatch):
    """Measure every time (the decision's cache has its own test in test_hardware); keep the keys."""
    keys = []
    monkeypatch.setattr(hardware, "cached", lambda key, measure, device=None: keys.append(key) or measure())
    return keys


def test_compile_speed_times_both_steps_and_the_compilation(monkeypatch, uncached):
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)  # the compiler's cost is not the point
    seconds = {"eager": 1.0, "compiled": 0.8}  # the attention kernels' own choice: any
    monkeypatch.setattr(autotune, "time_interleaved",
                        lambda c, *a, **kw: {label: Timing([seconds.get(label, 1.0)]) for label in c})
    model = build_model(tiny(attention={"name": "mha", "backend": "auto"}), seed=0, kernels=autotune.KernelChoices())
    speed = autotune.compile_speed(model, 2, 16, torch.float32, contextlib.nullcontext)
    assert (speed["eager_s"], speed["compiled_s"]) == (1.0, 0.8) and 0 < speed["compile_s"] < 60
    assert uncached[0].startswith(f"compile-speed:cpu:float32:{torch.get_num_threads()}t:B2:T16:")
    assert all(p.grad is None for p in model.parameters())  # the run's own model is left as it was
    assert not model.blocks[0].attn.attend.kernel.choices  # choices were made on a copy


@pytest.mark.parametrize("speed,micro_steps,compiled,why", [
    (dict(eager_s=0.025, compiled_s=0.020, compile_s=20.0), 10_000, True, "compiled: a training step"),
    (dict(eager_s=0.025, compiled_s=0.020, compile_s=20.0), None, True, "compiled: a training step"),  # a time budget
    (dict(eager_s=0.025, compiled_s=0.024, compile_s=20.0), 10_000, False, "below the 1.1× threshold"),
    (dict(eager_s=0.025, compiled_s=0.020, compile_s=20.0), 1_200, False,
     "the run's 1200 steps would save 6 s, less than compiling costs"),
    (dict(error="RuntimeError: no C++ compiler"), 10_000, False, "does not compile here: RuntimeError: no C++ compiler"),
])
def test_compile_auto_compiles_where_it_pays_for_itself(speed, micro_steps, compiled, why):
    decision = autotune.compile_decision(speed, micro_steps)
    assert decision["compile"] is compiled and why in decision["reason"]
    if "error" not in speed:
        assert "takes 25 ms eager" in decision["reason"] and f"after {speed['compile_s']:.3g} s compiling" in decision["reason"]


def test_auto_chooses_before_compiling_so_the_graph_does_not_break():
    model = build_model(tiny(attention={"name": "mha", "backend": "auto"}, positional="rope", dropout=0.1), seed=0,
                        kernels=autotune.KernelChoices())
    x = torch.randint(0, 50, (2, 16))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    autotune.make_choices(model, x, contextlib.nullcontext)  # dropout draws, on a forked stream
    assert torch.equal(torch.rand(3), expected) and all(p.grad is None for p in model.parameters())
    assert {r["direction"] for r in model.blocks[0].attn.attend.kernel.choices.values()} == {"forward_backward"}
    explanation = torch._dynamo.explain(model)(x, x)
    mask = Mask(torch.arange(9), torch.arange(9), window=4)
    assert mask.allowed is mask.allowed and mask.distance is mask.distance  # once per mask, shared by every layer
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]


def test_a_model_that_does_not_compile_trains_eagerly_with_the_reason(monkeypatch, uncached):
    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError("inductor: no working C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: Broken())
    run = resolve_run(*TINY_RUN, fp32_train(compile="auto"))
    metrics = train(run)
    assert metrics["status"] == "finished" and metrics["compiled"] is False
    assert metrics["compile_reason"] == "does not compile here: RuntimeError: inductor: no working C++ compiler"


def test_compiled_training_matches_eager_and_records_why():
    eager = train(resolve_run(*TINY_RUN, fp32_train(compile=False)))
    compiled = train(resolve_run(*TINY_RUN, fp32_train(compile=True)))  # a real torch.compile (~30 s here)
    assert (eager["compiled"], compiled["compiled"]) == (False, True)
    assert compiled["compile_reason"] == "compile: true in the spec"
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], abs=1e-5)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], abs=1e-5)


# -- --workers auto -------------------------------------------------------------------------------


@pytest.mark.parametrize("rates,expected", [({1: 16.3, 2: 28.4}, 2), ({1: 20.0, 2: 15.0}, 1)])
def test_workers_auto_takes_the_layout_that_trains_most_steps(monkeypatch, uncached, rates, expected):
    monkeypatch.setattr(hardware, "cpu_cores", lambda: 2)
    monkeypatch.setattr(workers, "measure_layouts", lambda run, layouts, cores: {w: rates[w] for w in layouts})
    decision = workers.workers_decision(resolve_run(*TINY_RUN, fp32_train()))
    assert decision["workers"] == expected
    assert decision["reason"] == (f"measured processes × threads per process: 1×2 threads {rates[1]:.3g} steps/s, "
                                  f"2×1 threads {rates[2]:.3g} steps/s")
    assert uncached[0].startswith("workers:cpu:2c:")


def test_one_core_means_one_worker(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_cores", lambda: 1)
    assert workers.workers_decision(resolve_run(*TINY_RUN, fp32_train()))["workers"] == 1


def test_layouts_are_measured_by_training_side_by_side():
    # real processes: each layout's copies of the run train at once, and each counts its steps
    rates = workers.measure_layouts(resolve_run(*TINY_RUN, fp32_train()), [1, 2], 2, seconds=0.3)
    assert set(rates) == {1, 2} and all(r > 1 for r in rates.values())


def test_a_resumed_run_runs_the_kernels_its_checkpoint_recorded(tmp_path):
    from bench.checkpoint import load_checkpoint, save_checkpoint

    run = resolve_run(dict(n_layer=1, n_head=2, n_embd=16, attention={"name": "mha", "backend": "auto"}),
                      dict(source="task", task="induction", vocab_size=16, seq_len=16, n_train=200),
                      dict(steps=4, batch_size=4, eval_every=4, checkpoint_every=2, device="cpu", dtype="float32"))

    class Killed(Exception):
        pass

    def kill(record):
        if record["step"] == 3:
            raise Killed

    with pytest.raises(Killed):
        train(run, tmp_path, on_step=kill)
    path = tmp_path / "checkpoint.pt"
    state = load_checkpoint(path)
    (training,) = [r for r in state["kernels"] if r["direction"] == "forward_backward"]
    elsewhere = "sdpa.math" if training["backend"] != "sdpa.math" else "math"  # as if chosen on another machine
    spec = {"name": "sdpa", "kernel": "math"} if elsewhere == "sdpa.math" else {"name": "math"}
    state["kernels"] = [{**training, "backend": elsewhere, "spec": spec, "reason": "chosen before the run was moved"}]
    save_checkpoint(path, state)
    resumed = train(run, tmp_path)
    assert resumed["attention_kernel"] == elsewhere  # what the run chose, not what this machine would
    assert [r["backend"] for r in resumed["attention_choices"] if r["direction"] == "forward_backward"] == [elsewhere]


def test_remember_says_whether_a_recorded_choice_replaces_one_made_here():
    choices = autotune.KernelChoices(measure=lambda *a: ({"name": "sdpa"}, {"backend": "sdpa"}))
    assert not choices.remember([{"call": "c", "backend": "math", "spec": {"name": "math"}}])  # new: nothing replaced
    assert not choices.remember([{"call": "c", "backend": "math", "spec": {"name": "math"}}])  # the same choice
    assert choices.remember([{"call": "c", "backend": "baddbmm", "spec": {"name": "baddbmm"}}])
