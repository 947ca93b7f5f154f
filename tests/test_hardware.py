"""`dtype: auto` on CPU: decided from a stable, cached measurement, with its reason (bench/hardware.py).

The clock is replaced throughout: no test here depends on how fast this machine is."""

from __future__ import annotations

import json

import pytest
import torch

from bench import hardware


class FakeClock:
    """Stands in for hardware._time_step: records each step's block and dtype, answers from a script."""

    def __init__(self, fp32, bf16):
        self.seconds = {torch.float32: fp32, torch.bfloat16: bf16}  # index of the call (warm-up: 0) -> seconds
        self.calls: list[torch.dtype] = []
        self.blocks: list[dict] = []

    def __call__(self, block: dict, dtype: torch.dtype) -> float:
        index = self.calls.count(dtype)
        self.calls.append(dtype)
        self.blocks.append(block)
        return self.seconds[dtype](index)

    def timed(self, dtype: torch.dtype) -> int:
        return self.calls.count(dtype)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A machine that has measured nothing yet."""
    monkeypatch.setenv("ARCHBENCH_CACHE", str(tmp_path))
    return tmp_path


def _clock(monkeypatch, fp32, bf16) -> FakeClock:
    clock = FakeClock(fp32, bf16)
    monkeypatch.setattr(hardware, "_time_step", clock)
    return clock


def noisy(median: float, outlier: float):
    """`median` but for an outlier every 4th call (the first of them the warm-up): what medians are for."""
    return lambda index: outlier if index % 4 == 0 else median


def test_bf16_ten_percent_faster_is_not_enough_and_the_reason_names_ratio_and_threshold(fresh_cache, monkeypatch):
    _clock(monkeypatch, fp32=noisy(1.0, 9.0), bf16=noisy(0.9, 30.0))
    dtype, reason = hardware.cpu_dtype_decision()
    assert dtype == torch.float32
    assert reason.startswith("float32: median fp32 vs bf16-autocast forward+backward of a 256→1024→256 MLP on "
                             "2048 tokens over 7 interleaved repetitions: ")
    assert "fp32 1000 ms, bf16 900 ms" in reason and "1.11× as fast" in reason
    assert "below the 2× speed-up threshold" in reason
    assert hardware.training_dtype(torch.device("cpu"), "auto") == torch.float32
    assert not hardware.bf16_is_fast(torch.device("cpu"))


def test_bf16_two_and_a_half_times_faster_trains_in_bf16(fresh_cache, monkeypatch):
    _clock(monkeypatch, fp32=noisy(1.0, 9.0), bf16=noisy(0.4, 30.0))
    dtype, reason = hardware.cpu_dtype_decision()
    assert dtype == torch.bfloat16
    assert "2.50× as fast" in reason and "at least the 2× speed-up threshold" in reason
    assert hardware.training_dtype(torch.device("cpu"), "auto") == torch.bfloat16
    assert hardware.training_dtype(torch.device("cpu"), "float32") == torch.float32  # a named dtype is kept


@pytest.mark.parametrize("fp32,bf16,expected", [(2.0, 1.0, "bfloat16"), (1.99, 1.0, "float32"), (1.0, 0.9, "float32"),
                                               (1.0, 0.4, "bfloat16"), (1.0, 300.0, "float32")])
def test_the_decision_is_a_function_of_the_two_medians(fp32, bf16, expected):
    first = hardware.decide_cpu_dtype(fp32, bf16, repeats=7)
    assert first == hardware.decide_cpu_dtype(fp32, bf16, repeats=7)
    assert first["dtype"] == expected and first["threshold"] == hardware.BF16_MIN_SPEEDUP == 2.0
    assert first["speedup"] == pytest.approx(fp32 / bf16) and first["reason"].startswith(f"{expected}:")


def test_the_measurement_is_a_warm_up_then_seven_alternating_pairs_of_one_mlp_training_step(fresh_cache,
                                                                                            monkeypatch):
    clock = _clock(monkeypatch, fp32=lambda index: 0.05, bf16=lambda index: 0.02)
    hardware.cpu_dtype_decision()
    assert clock.timed(torch.bfloat16) == clock.timed(torch.float32) == 1 + hardware.DTYPE_PROBE_REPEATS == 1 + 7
    assert clock.calls[:2] == [torch.float32, torch.bfloat16]  # the warm-up of each, not counted
    timed = clock.calls[2:]
    pairs = [timed[i:i + 2] for i in range(0, len(timed), 2)]
    assert pairs == [[torch.float32, torch.bfloat16], [torch.bfloat16, torch.float32]] * 3 + [[torch.float32,
                                                                                             torch.bfloat16]]
    block, = {id(b): b for b in clock.blocks}.values()  # one block, the same weights every step
    assert block["x"].shape == block["target"].shape == (2048, 256) and block["x"].dtype == torch.float32
    assert block["w1"].shape == (1024, 256) and block["w2"].shape == (256, 1024)
    assert all(block[name].requires_grad and block[name].dtype == torch.float32 for name in ("w1", "b1", "w2", "b2"))


def test_the_step_is_a_forward_and_backward_in_fp32_or_under_bf16_autocast(monkeypatch):
    """The real clock, run on fewer tokens (its times are not looked at): fp32 gradients both ways, and bf16's
    differ from fp32's by rounding only, so autocast did take effect."""
    monkeypatch.setattr(hardware, "DTYPE_PROBE_TOKENS", 256)
    block = hardware._probe_block()
    assert block["x"].shape == (256, 256) and block["w1"].shape == (1024, 256)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float32):  # fp32 twice: grads are cleared, not accumulated
        assert hardware._time_step(block, dtype) > 0
        grads[dtype] = [block[name].grad.clone() for name in ("w1", "b1", "w2", "b2")]
    for g32, g16 in zip(grads[torch.float32], grads[torch.bfloat16]):
        assert g32.dtype == g16.dtype == torch.float32 and g32.abs().sum() > 0
        assert not torch.equal(g32, g16) and torch.allclose(g32, g16, rtol=0.1, atol=0.05 * g32.abs().max())
    once = hardware._probe_block()
    assert hardware._time_step(once, torch.float32) > 0
    assert all(torch.allclose(once[n].grad, g, rtol=1e-4, atol=1e-8)  # the third step's, not twice it
               for n, g in zip(("w1", "b1", "w2", "b2"), grads[torch.float32]))


def test_emulated_bf16_stops_after_two_repetitions(fresh_cache, monkeypatch):
    clock = _clock(monkeypatch, fp32=lambda index: 0.05, bf16=lambda index: 15.0)  # 300× slower
    dtype, reason = hardware.cpu_dtype_decision()
    assert dtype == torch.float32 and "over 2 interleaved repetitions" in reason and "bf16 300× slower" in reason
    assert clock.timed(torch.bfloat16) == 1 + 2
    # one slow bf16 step (a hiccup) is not enough to stop: the median of 7 decides
    clock = _clock(monkeypatch, fp32=lambda index: 0.05, bf16=lambda index: 15.0 if index <= 1 else 0.02)
    assert hardware._measure_cpu_dtype()["dtype"] == "bfloat16" and clock.timed(torch.bfloat16) == 1 + 7


def test_the_decision_is_measured_once_per_machine_and_cached_with_its_reason(fresh_cache, monkeypatch):
    clock = _clock(monkeypatch, fp32=noisy(1.0, 9.0), bf16=noisy(0.4, 30.0))
    decided = hardware.cpu_dtype_decision()
    measured = len(clock.calls)
    again = _clock(monkeypatch, fp32=lambda index: 0.4, bf16=lambda index: 1.0)  # would say fp32
    assert hardware.cpu_dtype_decision() == decided and not again.calls
    assert hardware.dtype_reason("cpu", "auto") == decided[1] and not again.calls and measured == 2 + 14
    cached = json.loads((fresh_cache / "hardware" / f"{hardware.machine_id()}.json").read_text())
    (key, record), = ((k, v) for k, v in cached.items() if k.startswith("cpu_dtype:"))
    assert key == f"cpu_dtype:step:bf16>=2x:{torch.get_num_threads()}t"  # not the bare-matmul decision's key
    assert record["dtype"] == "bfloat16" and record["reason"] == decided[1]
    assert (record["fp32_median_s"], record["bf16_median_s"], record["repeats"]) == (1.0, 0.4, 7)
    assert (record["probe"], record["tokens"], record["width"], record["hidden"]) == ("mlp-step", 2048, 256, 1024)


def test_an_old_bare_matmul_decision_in_the_cache_is_not_reused(fresh_cache, monkeypatch):
    path = hardware.cache_dir("hardware") / f"{hardware.machine_id()}.json"
    old = {"dtype": "bfloat16", "reason": "bfloat16: median 1024×1024 matmul ..."}
    path.write_text(json.dumps({f"cpu_dtype:bf16>=1.5x:{torch.get_num_threads()}t": old}))
    clock = _clock(monkeypatch, fp32=noisy(1.0, 9.0), bf16=noisy(0.9, 30.0))
    assert hardware.cpu_dtype_decision()[0] == torch.float32 and len(clock.calls) == 2 + 14


def test_a_decision_another_process_wrote_first_wins(fresh_cache, monkeypatch):
    path = hardware.cache_dir("hardware") / f"{hardware.machine_id()}.json"

    def measure_while_another_process_finishes_first():
        path.write_text(json.dumps({"test:key": "theirs"}))
        return "ours"

    assert hardware.cached("test:key", measure_while_another_process_finishes_first) == "theirs"
    assert json.loads(path.read_text()) == {"test:key": "theirs"}


def test_dtype_reason_explains_auto_only(fresh_cache, monkeypatch):
    _clock(monkeypatch, fp32=noisy(1.0, 9.0), bf16=noisy(0.9, 30.0))
    assert hardware.dtype_reason("cpu", "float32") is None and hardware.dtype_reason("cpu", "bfloat16") is None
    assert hardware.dtype_reason("cpu", "auto") == hardware.cpu_dtype_decision()[1]
    assert hardware.dtype_reason("cpu", "auto").startswith("float32: ")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.dtype_reason("cuda", "auto") == "bfloat16: NVIDIA H200 supports bf16"
    assert hardware.dtype_reason("auto", "auto") == "bfloat16: NVIDIA H200 supports bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert hardware.dtype_reason("cuda:0", "auto") == "float32: NVIDIA H200 lacks bf16"
