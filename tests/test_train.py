"""The training loop: it learns, resumes bitwise, records divergence, and its numbers add up."""

from __future__ import annotations

import json
import math

import pytest
import torch

import bench.train
from bench.schedules import learning_rate
from bench.config import RunConfig, TrainConfig, resolve_run
from bench.train import evaluate, train
from models import flops_per_token

TINY = dict(n_layer=2, n_head=2, n_embd=32)
INDUCTION = {"source": "task", "task": "induction", "vocab_size": 32, "seq_len": 32, "n_train": 4000, "n_test": 256}
MARKOV = {"source": "markov", "vocab_size": 16, "n_train_tokens": 50_000, "n_val_tokens": 8192, "doc_len": 256}


def fp32(**train) -> dict:
    """fp32 on CPU whatever this CPU's bf16 speed: bitwise checks need one dtype."""
    return {"device": "cpu", "dtype": "float32", "checkpoint_every": None, **train}


def curve(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_model_learns_induction_copying():
    run = resolve_run(dict(n_layer=2, n_head=2, n_embd=64), INDUCTION,
                      fp32(steps=250, batch_size=32, lr=3e-3, warmup_steps=20, eval_every=250))
    result = train(run)
    assert result["status"] == "finished" and result["val_accuracy"] > 0.95


def test_resolve_takes_vocabulary_and_length_from_the_data():
    run = resolve_run(TINY, INDUCTION)
    assert (run.model.vocab_size, run.model.block_size, run.seq_len) == (32, 32, 32)
    assert resolve_run({**TINY, "vocab_size": 40}, INDUCTION).model.vocab_size == 40


def test_same_seed_same_curve_and_another_seed_another(tmp_path):
    run = resolve_run(TINY, MARKOV, fp32(steps=12, batch_size=4, seq_len=32, eval_every=6))
    train(run, tmp_path / "a")
    train(run, tmp_path / "b")
    train(run.model_copy(update={"seed": 1}), tmp_path / "c")
    a, b, c = (curve(tmp_path / d) for d in "abc")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    assert [r["train_loss"] for r in a] != [r["train_loss"] for r in c]


@pytest.mark.parametrize("kill_after", [3, 7, 10, 16])
def test_a_killed_run_resumes_to_the_same_final_loss_bitwise(tmp_path, kill_after):
    run = resolve_run({**TINY, "dropout": 0.1}, MARKOV,  # dropout: the RNG state must resume too
                      fp32(steps=20, batch_size=4, seq_len=32, eval_every=5, checkpoint_every=5))
    whole = train(run, tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill(record):
        if record["step"] == kill_after:
            raise Killed

    with pytest.raises(Killed):
        train(run, tmp_path / "resumed", on_step=kill)
    resumed = train(run, tmp_path / "resumed")
    assert resumed["val_loss"] == whole["val_loss"] and resumed["train_loss"] == whole["train_loss"]
    assert [r["train_loss"] for r in curve(tmp_path / "resumed")] == [r["train_loss"] for r in curve(tmp_path / "whole")]
    # training a finished run again changes nothing: same final metrics, no extra step recorded
    again = train(run, tmp_path / "resumed")
    assert (again["val_loss"], again["train_loss"]) == (whole["val_loss"], whole["train_loss"])
    assert len(curve(tmp_path / "resumed")) == len(curve(tmp_path / "whole"))


def test_divergence_is_recorded_not_raised(tmp_path):
    run = resolve_run(TINY, MARKOV, fp32(steps=50, batch_size=4, seq_len=32, diverge_above=1.0))
    result = train(run, tmp_path)
    assert result["status"] == "diverged" and result["diverged_at"] == 1
    assert len(curve(tmp_path)) == 1
    nan = resolve_run(TINY, MARKOV, fp32(steps=30, batch_size=4, seq_len=32, lr=1e6, grad_clip=None, warmup_steps=0))
    result = train(nan)
    assert result["status"] == "diverged" and result["diverged_at"] < 30


def test_gradient_accumulation_is_the_same_experiment():
    whole = resolve_run(TINY, INDUCTION, fp32(steps=5, batch_size=8, eval_every=5))
    split = resolve_run(TINY, INDUCTION, fp32(steps=5, batch_size=8, micro_batch_size=2, eval_every=5))
    assert train(split)["val_loss"] == pytest.approx(train(whole)["val_loss"], rel=1e-5)


def test_per_step_metrics_are_written(tmp_path):
    run = resolve_run({**TINY, "moe": {"name": "topk", "n_experts": 4, "top_k": 2}}, MARKOV,
                      fp32(steps=6, batch_size=4, seq_len=32, eval_every=3))
    result = train(run, tmp_path)
    records = curve(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        for key in ("train_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_bytes", "moe_aux_loss"):
            assert r[key] is not None and r[key] >= 0
        assert len(r["moe_expert_fractions"]) == 2 and sum(r["moe_expert_fractions"][0]) == pytest.approx(1.0)
    assert "val_loss" in records[2] and "val_loss" not in records[3] and "val_loss" in records[5]
    assert records[5]["val_loss_above_floor"] == pytest.approx(records[5]["val_loss"] - result["loss_floor"])
    assert 0 < result["mfu"] < 1 and result["tokens_per_s"] > 0 and result["dtype"] == "float32"


def test_moe_statistics_count_every_micro_batch(tmp_path):
    moe = {**TINY, "moe": {"name": "topk", "n_experts": 4, "top_k": 2, "capacity_factor": None}}
    whole = resolve_run(moe, MARKOV, fp32(steps=2, batch_size=8, seq_len=32, eval_every=2))
    split = resolve_run(moe, MARKOV, fp32(steps=2, batch_size=8, micro_batch_size=2, seq_len=32, eval_every=2))
    train(whole, tmp_path / "whole")
    train(split, tmp_path / "split")
    first, quarters = curve(tmp_path / "whole")[0], curve(tmp_path / "split")[0]
    # every token of the step's 8 sequences is routed to top_k experts in each of the 2 layers
    assert first["moe_assignments"] == quarters["moe_assignments"] == [8 * 32 * 2] * 2
    # the first step starts from the same weights: the same routing, however the batch is split
    for a, b in zip(first["moe_expert_fractions"], quarters["moe_expert_fractions"]):
        assert a == pytest.approx(b, abs=1e-6)
    assert quarters["moe_aux_loss"] == pytest.approx(first["moe_aux_loss"], rel=0.05)


def test_text_runs_report_bits_per_byte(tmp_path):
    run = resolve_run(TINY, {"source": "stdlib", "max_bytes": 100_000, "tokenizer": "bpe", "vocab_size": 300},
                      fp32(steps=3, batch_size=2, seq_len=32, eval_batches=2, eval_lengths=[64]))
    result = train(run)
    assert 0 < result["val_bpb"] < result["val_loss"] / math.log(2)  # > 1 byte per BPE token
    assert result["data"]["tokenizer"] == "bpe300" and len(result["data"]["corpus_sha256"]) == 64
    assert result["val_loss@64"] is None and "learned positions" in result["val_loss@64_error"]


def test_bits_per_byte_divides_total_nats_by_total_bytes():
    class Fixed(torch.nn.Module):  # predicts uniformly over 4 tokens: ln 4 nats per token
        def forward(self, x):
            return torch.zeros(*x.shape, 4), None

    y = torch.tensor([[0, 1, 2, 3]])
    token_bytes = torch.tensor([1, 2, 3, 4]).numpy()  # 10 bytes in all
    result = evaluate(Fixed(), [(y, y)], torch.device("cpu"), torch.float32, token_bytes)
    assert result["bpb"] == pytest.approx(4 * math.log(4) / math.log(2) / 10)  # 0.8
    per_token_average = sum(2 / b for b in token_bytes) / 4  # the wrong estimator: 1.04
    assert result["bpb"] != pytest.approx(per_token_average)


def test_budgets_in_tokens_and_flops_become_steps():
    from bench.config import budget_steps

    run = resolve_run(TINY, MARKOV, fp32(tokens=1000, batch_size=4, seq_len=32))
    assert budget_steps(run) == math.ceil(1000 / 128)
    flops = flops_per_token(run.model, seq_len=32) * 128 * 5
    assert budget_steps(resolve_run(TINY, MARKOV, fp32(flops=flops, batch_size=4, seq_len=32))) == 5
    assert budget_steps(resolve_run(TINY, MARKOV, fp32(seconds=3.0, batch_size=4, seq_len=32))) is None
    with pytest.raises(ValueError, match="give one budget, not steps and tokens"):
        TrainConfig(steps=3, tokens=4)


def test_a_time_budget_stops_at_the_first_step_past_it(monkeypatch):
    class Clock:  # each reading advances 1/8 s (exact in binary); a step reads it 3 times: budget, start, end
        now = -0.125

        def perf_counter(self) -> float:
            self.now += 0.125
            return self.now

    monkeypatch.setattr(bench.train, "time", Clock())
    run = resolve_run(TINY, MARKOV, fp32(seconds=1.0, batch_size=4, seq_len=32, eval_every=10**6))
    result = train(run)
    # the budget check before step k reads 1/8 + 3k/8 s: steps 0, 1 and 2 start, step 3 does not
    assert result["status"] == "finished" and result["steps"] == 3 and "val_loss" in result


def test_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert learning_rate(0, 100, schedule="cosine", **kw) == pytest.approx(1 / 11)
    assert learning_rate(10, 100, schedule="cosine", **kw) == pytest.approx(1.0)
    assert learning_rate(55, 100, schedule="cosine", **kw) == pytest.approx(0.55)
    assert learning_rate(100, 100, schedule="cosine", **kw) == pytest.approx(0.1)
    assert learning_rate(79, 100, schedule="wsd", decay_fraction=0.2, **kw) == 1.0
    assert learning_rate(90, 100, schedule="wsd", decay_fraction=0.2, **kw) == pytest.approx(0.55)
    assert learning_rate(90, 100, schedule="wsd", decay_fraction=0.2, decay_shape="sqrt", **kw) == pytest.approx(
        1 - math.sqrt(0.5) * 0.9)
    assert learning_rate(99, 100, schedule="constant", **kw) == 1.0


def test_dtype_is_chosen_per_machine_and_recorded():
    from bench import hardware

    run = resolve_run(TINY, MARKOV, dict(steps=1, batch_size=2, seq_len=16, device="cpu", checkpoint_every=None))
    expected = "bfloat16" if hardware.bf16_is_fast(torch.device("cpu")) else "float32"
    assert train(run)["dtype"] == expected


@pytest.mark.parametrize("bf16_over_fp32_time,expected", [(300.0, torch.float32), (0.5, torch.bfloat16)])
def test_auto_dtype_follows_the_measured_bf16_speed(monkeypatch, bf16_over_fp32_time, expected):
    from bench import hardware

    measured = {"bf16_over_fp32_time:cpu": bf16_over_fp32_time}  # ~300× slower on CPUs without bf16 units
    monkeypatch.setattr(hardware, "_cached", lambda key, measure: measured[key])
    assert hardware.training_dtype(torch.device("cpu"), "auto") == expected
    assert hardware.training_dtype(torch.device("cpu"), "float32") == torch.float32


def test_mfu_is_reported_against_the_datasheet_on_known_gpus(monkeypatch):
    from bench import hardware

    run = resolve_run(TINY, MARKOV, fp32(steps=4, batch_size=2, seq_len=16))
    assert train(run)["mfu_datasheet"] is None  # a CPU has no datasheet entry
    datasheet = hardware.datasheet_peak
    monkeypatch.setattr(hardware, "datasheet_peak", lambda fp=None: datasheet({"gpu": {"name": "NVIDIA A100-SXM4-80GB"}}))
    result = train(run)
    assert result["mfu_datasheet"] == pytest.approx(result["tokens_per_s"] * result["flops_per_token"] / 312e12)


def test_the_gpu_driver_and_clocks_are_read_from_nvidia_smi(monkeypatch):
    import subprocess

    from bench import hardware

    answer = subprocess.CompletedProcess([], 0, "550.54.15, 1755, 1980\n", "")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: answer)
    assert hardware._nvidia_smi() == {"driver": "550.54.15", "sm_clock_mhz": "1755", "sm_clock_max_mhz": "1980"}
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("nvidia-smi")))
    assert hardware._nvidia_smi() == {}  # no NVIDIA driver here: nothing recorded, nothing raised


def test_measuring_this_machine_leaves_the_random_stream_alone():
    from bench import hardware

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    hardware._cached("test:rng", lambda: float(torch.randn(1000).sum()))  # a first measurement draws numbers
    assert torch.equal(torch.rand(3), expected)


def test_run_config_round_trips():
    run = resolve_run(TINY, INDUCTION, fp32(steps=3))
    assert RunConfig.model_validate(run.model_dump()) == run
