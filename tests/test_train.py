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


class Killed(Exception):
    """Stands in for a process killed mid-run."""


def train_until_killed(run, folder, at_step: int) -> None:
    """Train until the record of `at_step` is written, then die as a killed process would."""

    def kill(record):
        if record["step"] == at_step:
            raise Killed

    with pytest.raises(Killed):
        train(run, folder, on_step=kill)


def test_text_runs_report_bits_per_byte(tmp_path):
    run = resolve_run(TINY, {"source": "stdlib", "max_bytes": 100_000, "tokenizer": "bpe", "vocab_size": 300},
                      fp32(steps=3, batch_size=2, seq_len=32, eval_batches=2, eval_lengths=[64]))
    result = train(run)
    assert 0 < result["val_bpb"] < result["val_loss"] / math.log(2)  # > 1 byte per BPE token
    assert result["data"]["tokenizer"] == "bpe300" and len(result["data"]["corpus_sha256"]) == 64
    assert result["val_loss@64"] is None and "learned positions" in result["val_loss@64_error"]
    assert result["val_loss@64_beyond"] is None  # its loss past the training length is missing too


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


@pytest.mark.parametrize("fp32_s,bf16_s,expected", [(1.0, 300.0, torch.float32), (1.0, 0.4, torch.bfloat16)])
def test_auto_dtype_follows_the_measured_bf16_speed(monkeypatch, fp32_s, bf16_s, expected):
    from bench import hardware

    # ~300× slower on CPUs without bf16 units; 2.5× faster where bf16 pays (the decision's own tests:
    # tests/test_hardware.py)
    decision = hardware.decide_cpu_dtype(fp32_s, bf16_s, repeats=7)
    monkeypatch.setattr(hardware, "cached", lambda key, measure: decision)
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
    hardware.cached("test:rng", lambda: float(torch.randn(1000).sum()))  # a first measurement draws numbers
    assert torch.equal(torch.rand(3), expected)


def test_run_config_round_trips():
    run = resolve_run(TINY, INDUCTION, fp32(steps=3))
    assert RunConfig.model_validate(run.model_dump()) == run


# -- issue 12: fp16 loss scaling, the LM loss of MoE runs, training time, extrapolation past the trained length


@pytest.fixture
def cpu_fp16_peak(monkeypatch):
    """A stand-in for the machine's fp16 matmul peak: measuring it takes minutes on CPUs without fp16 units."""
    from bench import hardware

    monkeypatch.setattr(hardware, "peak_matmul_flops", lambda device, dtype: 1e11)


def fp16(**train) -> dict:
    return {**fp32(**train), "dtype": "float16"}


def test_float16_training_scales_the_loss_and_records_the_scale(tmp_path, cpu_fp16_peak):
    result = train(resolve_run(TINY, MARKOV, fp16(steps=3, batch_size=4, seq_len=32, eval_every=3)), tmp_path / "fp16")
    assert result["status"] == "finished" and result["dtype"] == "float16"
    # torch.amp.GradScaler's initial scale 2¹⁶, no overflow in these steps: every step updated the weights
    assert [(r["grad_scale"], r["skipped_step"]) for r in curve(tmp_path / "fp16")] == [(2.0**16, False)] * 3
    train(resolve_run(TINY, MARKOV, fp32(steps=2, batch_size=4, seq_len=32)), tmp_path / "fp32")
    assert all("grad_scale" not in r and "skipped_step" not in r for r in curve(tmp_path / "fp32"))  # no scaler


def test_the_grad_scaler_keeps_fp16_gradients_that_would_underflow(cpu_fp16_peak):
    from bench.train import Trainer, _autocast

    run = resolve_run(TINY, MARKOV, fp16(steps=1, batch_size=4, seq_len=32))
    trainer = Trainer(run, None)
    strategy, params = trainer.strategy, list(trainer.model.parameters())
    x, y = trainer.data.train_batch(0, run.seed, 4, 32)
    tiny = 2.0**-16  # dlogits ≈ 0.06 / 128 tokens × 2⁻¹⁶ ≈ 7e-9: below fp16's smallest subnormal (6e-8)

    def grads(dtype, scaled: bool) -> torch.Tensor:
        with _autocast(trainer.device, dtype):
            loss = trainer.forward(x, y).loss * tiny
        strategy.backward(strategy.scale(loss) if scaled else loss, last=True)
        if scaled:
            strategy.scaler.unscale_(strategy.optimizers[0])  # AdamW: one optimizer
        g = torch.cat([p.grad.flatten() for p in params])
        strategy.optimizers[0].zero_grad(set_to_none=True)
        return g

    reference = grads(torch.float32, scaled=False)
    unscaled = grads(torch.float16, scaled=False)
    scaled = grads(torch.float16, scaled=True)
    assert strategy.scaler.get_scale() == 2.0**16
    assert (unscaled == 0).float().mean() > 0.9  # without loss scaling fp16 loses almost every gradient
    assert (scaled == 0).float().mean() < 0.1
    assert torch.linalg.vector_norm(scaled - reference) < 0.05 * torch.linalg.vector_norm(reference)


def test_float16_skips_overflowing_steps_and_resumes_its_scale(tmp_path, cpu_fp16_peak, monkeypatch):
    import functools

    # start far too high and grow after every good step: overflows skip steps, and the scale keeps changing
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**24,
                                                                   growth_interval=1))
    run = resolve_run(TINY, MARKOV, fp16(steps=10, batch_size=4, seq_len=32, eval_every=5, checkpoint_every=5))
    whole = train(run, tmp_path / "whole")
    records = curve(tmp_path / "whole")
    assert records[0]["grad_scale"] == 2.0**24 and records[0]["skipped_step"]
    # an overflow halves the scale, a good step (growth_interval=1) doubles it
    for before, after in zip(records, records[1:]):
        assert after["grad_scale"] == before["grad_scale"] * (0.5 if before["skipped_step"] else 2.0)
    assert not all(r["skipped_step"] for r in records)

    train_until_killed(run, tmp_path / "resumed", at_step=7)
    resumed = train(run, tmp_path / "resumed")  # from step 5: the checkpoint holds the scaler's state
    assert [(r["train_loss"], r["grad_scale"]) for r in curve(tmp_path / "resumed")] == [
        (r["train_loss"], r["grad_scale"]) for r in records]
    assert resumed["val_loss"] == whole["val_loss"]


def test_deepspeed_refuses_float16():
    from bench import parallel

    model = torch.nn.Linear(4, 4)
    strategy = parallel.DeepSpeedStrategy(parallel.World(), torch.device("cpu"), zero_stage=1)
    with pytest.raises(ValueError, match="train.dtype: float16"):
        strategy.setup(model, TrainConfig(dtype="float16"), micro=1, accumulation=1)


def test_moe_runs_record_the_lm_loss_as_train_loss(tmp_path):
    import torch.nn.functional as F

    from bench.data import load_dataset
    from models import build_model

    def first_step(model_config: dict, out_dir):
        run = resolve_run(model_config, MARKOV, fp32(steps=3, batch_size=4, seq_len=32, eval_every=3))
        result = train(run, out_dir)
        # the first step's loss is the initial model's on batch 0: reproduce it outside the loop
        model = build_model(run.model, seed=run.seed)
        x, y = load_dataset(run.data).train_batch(0, run.seed, 4, 32)
        out = model(x, y)
        lm = F.cross_entropy(out.logits.view(-1, out.logits.size(-1)), y.reshape(-1), ignore_index=-1).item()
        return result, curve(out_dir), out.loss.item(), lm

    result, records, total, lm = first_step({**TINY, "moe": {"name": "topk", "n_experts": 4, "top_k": 2}},
                                            tmp_path / "moe")
    assert total - lm > 1e-3  # the MoE's loss carries its weighted auxiliary losses
    assert records[0]["train_loss"] == pytest.approx(lm, abs=1e-6)  # the LM loss, comparable with a dense run's
    assert records[0]["train_loss"] + records[0]["moe_aux_loss"] == pytest.approx(total, abs=1e-6)
    assert result["train_loss"] == pytest.approx(sum(r["train_loss"] for r in records) / 3)
    assert all(r["moe_aux_loss"] > 0 for r in records)

    result, records, total, lm = first_step(TINY, tmp_path / "dense")
    assert records[0]["train_loss"] == total == lm  # a dense run: the model's loss, as before


def test_a_time_budget_counts_training_time_only(monkeypatch, tmp_path):
    from bench.train import Trainer

    class Clock:  # stands still unless a step (1/4 s) or an evaluation or checkpoint (100 s each) runs
        now = 0.0

        def perf_counter(self) -> float:
            return self.now

    clock = Clock()
    monkeypatch.setattr(bench.train, "time", clock)

    def costs(seconds, original):
        def timed(*args, **kwargs):
            clock.now += seconds
            return original(*args, **kwargs)
        return timed

    monkeypatch.setattr(Trainer, "_train_step", costs(0.25, Trainer._train_step))
    monkeypatch.setattr(bench.train, "evaluate", costs(100.0, bench.train.evaluate))
    monkeypatch.setattr(Trainer, "_checkpoint", costs(100.0, Trainer._checkpoint))
    run = resolve_run(TINY, MARKOV, fp32(seconds=1.0, batch_size=4, seq_len=32, eval_every=1, checkpoint_every=1,
                                         warmup_steps=0))
    whole = train(run, tmp_path / "whole")
    # 4 steps of 1/4 s fill the 1 s budget, however long the evaluations and checkpoints after each took
    assert whole["status"] == "finished" and whole["steps"] == 4
    # the schedule follows training time too: step k starts k/4 s into the budget
    lrs = [learning_rate(t * 1e6, 1e6, lr=run.train.lr, min_lr=run.train.lr / 10, warmup_steps=0,
                         schedule="cosine") for t in (0.0, 0.25, 0.5, 0.75)]
    assert [r["lr"] for r in curve(tmp_path / "whole")] == pytest.approx(lrs)
    # each step's record carries the training time so far (curves against time), evaluations excluded
    assert [r["seconds"] for r in curve(tmp_path / "whole")] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # and the run what serving it caches per token: k and v, 2 layers × 2 heads × 16 dims, 2 bytes each
    assert whole["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 2

    train_until_killed(run, tmp_path / "resumed", at_step=2)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["elapsed"] == 0.25  # step 1's
    clock.now = 1e4  # a later attempt: the wall clock moved on, the training time did not
    resumed = train(run, tmp_path / "resumed")
    assert resumed["steps"] == 4 and [r["lr"] for r in curve(tmp_path / "resumed")] == pytest.approx(lrs)
    assert curve(tmp_path / "resumed")[-1]["seconds"] == pytest.approx(1.0)  # training time, not the wall clock


def test_evaluate_from_position_counts_only_the_later_targets():
    class Fixed(torch.nn.Module):  # positions 0-1: uniform over tokens {0, 1} (ln 2); from 2 on: over all 4 (ln 4)
        def forward(self, x):
            logits = torch.zeros(*x.shape, 4)
            logits[:, :2, 2:] = -math.inf
            return logits, None

    y = torch.tensor([[0, 1, 2, 3], [1, 0, 3, 2]])
    token_bytes = torch.tensor([1, 2, 3, 4]).numpy()
    whole = evaluate(Fixed(), [(y, y)], torch.device("cpu"), torch.float32, token_bytes)
    beyond = evaluate(Fixed(), [(y, y)], torch.device("cpu"), torch.float32, token_bytes, from_position=2)
    assert whole["loss"] == pytest.approx((4 * math.log(2) + 4 * math.log(4)) / 8)  # half inside, half beyond
    assert beyond["loss"] == pytest.approx(math.log(4))  # the 4 targets at positions 2 and 3 only
    assert beyond["accuracy"] == 0.0 and whole["accuracy"] == 2 / 8  # argmax 0: right at (0, 0) and (1, 1)
    assert beyond["bpb"] == pytest.approx(4 * math.log(4) / math.log(2) / (3 + 4 + 4 + 3))  # bytes of tokens 2, 3
    masked = torch.tensor([[0, 1, -1, 3]])  # unlabelled targets stay uncounted
    assert evaluate(Fixed(), [(masked, masked)], torch.device("cpu"), torch.float32, from_position=2)["loss"] == \
        pytest.approx(math.log(4))


def test_extrapolation_evals_report_the_positions_past_the_training_length(tmp_path):
    from bench.train import Trainer

    run = resolve_run({**TINY, "positional": "rope"}, MARKOV,
                      fp32(steps=2, batch_size=4, seq_len=32, eval_every=2, eval_lengths=[64, 16]))
    trainer = Trainer(run, tmp_path)
    result = trainer.run()
    beyond = evaluate(trainer.model, trainer.extra_val[64], trainer.device, torch.float32, from_position=32)["loss"]
    assert result["val_loss@64_beyond"] == beyond and result["val_loss@64"] is not None
    assert result["val_loss@64"] != beyond
    assert "val_loss@16_beyond" not in result and "val_loss@16" in result  # nothing past the training length
    assert curve(tmp_path)[-1]["val_loss@64_beyond"] == beyond


@pytest.mark.parametrize("times,kept", [
    ([9.0, 5.0, 3.0, 2.0, 1.0, 1.1, 1.0, 0.9, 1.0, 1.0], 6),  # compiling, then settling: from the 5th step
    ([1.0] * 10, 8),  # eager: the first two steps only
    ([9.0] * 6 + [1.0] * 4, 5),  # never more than half
    ([1.0, 1.0, 1.0, 5.0, 1.0, 1.0], 4),  # a slow step later on is kept: it is part of the run
    ([3.0], 1),
])
def test_tokens_per_second_excludes_warm_up(times, kept):
    assert bench.train.steady_state(times) == times[len(times) - kept:]


def test_the_dtype_is_decided_at_the_runs_own_thread_count(monkeypatch):
    # the bf16 speed-up depends on the threads (cached per count): decide with the run's, not the caller's
    seen = []
    real = bench.train.hardware.training_dtype
    monkeypatch.setattr(bench.train.hardware, "training_dtype",
                        lambda device, requested: seen.append(torch.get_num_threads()) or real(device, "float32"))
    run = resolve_run(TINY, INDUCTION, {**fp32(steps=1, batch_size=4, eval_every=1), "dtype": "auto", "threads": 1})
    before = torch.get_num_threads()
    train(run)
    assert seen == [1] and torch.get_num_threads() == before
