"""The training loop: ``train(run, out_dir)`` trains one resolved run and returns its final metrics.

What makes its numbers comparable: batches are a pure function of (seed, step), so every variant
sees the same data and a resumed run the same batches; the global batch is fixed however it is split
into micro-batches; validation uses fixed batches; on CPU a run is bitwise deterministic given its
seed, including across a kill and resume from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import statistics
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from bench import hardware, parallel
from bench.data import DataConfig, Dataset, load_dataset
from bench.parallel import DistributedConfig
from bench.schedules import learning_rate
from models import ModelConfig, build_model

FINAL_TRAIN_LOSS_STEPS = 10  # the final train loss is the mean over this many last steps


class TrainConfig(BaseModel):
    """Optimisation and budget. Defaults follow nanoGPT where it has one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(12, ge=1, description="sequences per optimizer step (the global batch)")
    micro_batch_size: int | None = Field(None, ge=1, description="sequences per forward pass; accumulate the rest")
    seq_len: int | None = Field(None, ge=1, description="default: the data's length, else block_size")
    lr: float = Field(1e-3, gt=0)
    min_lr: float | None = Field(None, ge=0, description="default lr/10")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = Field(1.0, gt=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: share of steps spent decaying")
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"
    # the budget: exactly one of these (steps by default)
    steps: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1)
    flops: float | None = Field(None, gt=0)
    seconds: float | None = Field(None, gt=0)
    eval_every: int = Field(250, ge=1)
    eval_batches: int | None = Field(20, ge=1, description="val set of eval_batches × batch_size sequences; None: all (tasks)")
    eval_sequences: int | None = Field(None, ge=1, description="val set of this many sequences whatever the batch "
                                       "size (replaces eval_batches; for studies that vary batch_size)")
    eval_lengths: list[int] = Field(default_factory=list, description="extra val sequence lengths (extrapolation)")
    checkpoint_every: int | None = Field(500, ge=1)
    diverge_above: float | None = Field(None, description="loss bound; default 3·ln(vocab_size)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    threads: int | None = Field(None, ge=1, description="CPU threads (fixed and recorded); default torch's")
    compile: bool = False
    distributed: DistributedConfig | None = Field(
        None, description="one run on several processes: {strategy: ddp | fsdp | deepspeed, zero_stage, nproc}")

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        given = [k for k in ("steps", "tokens", "flops", "seconds") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget, not {' and '.join(given)}")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size}")
        if self.distributed and self.batch_size % self.distributed.nproc:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by distributed.nproc={self.distributed.nproc}")
        return self

    @property
    def val_sequences(self) -> int | None:
        """How many val sequences every evaluation scores (None: the whole val set, for tasks)."""
        if self.eval_sequences:
            return self.eval_sequences
        return self.eval_batches * self.batch_size if self.eval_batches else None


class RunConfig(BaseModel):
    """One fully resolved training run: what the runner hashes, stores and hands to ``train``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    seed: int = 0

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or getattr(self.data, "seq_len", None) or self.model.block_size

    @model_validator(mode="after")
    def _lengths_fit(self) -> RunConfig:
        task_len = getattr(self.data, "seq_len", None)
        if task_len and self.train.seq_len and self.train.seq_len != task_len:
            raise ValueError(f"train.seq_len={self.train.seq_len} differs from the task's seq_len={task_len} "
                             "(a task fixes its example length: leave train.seq_len out)")
        limit = self.model.shapes_only().positional.max_positions
        if limit is not None and self.seq_len > limit:
            raise ValueError(f"train.seq_len={self.seq_len} is longer than the {limit} positions "
                             f"'{self.model.positional['name']}' can embed (model.block_size)")
        return self


def resolve_run(model: dict, data: dict, train: dict | None = None, seed: int = 0) -> RunConfig:
    """A RunConfig whose model takes its vocabulary size (and block size, for tasks) from the data
    unless the model sets them."""
    from pydantic import TypeAdapter

    data_config = TypeAdapter(DataConfig).validate_python(data)
    model = dict(model)
    if "vocab_size" not in model:
        model["vocab_size"] = load_dataset(data_config).vocab_size
    if "block_size" not in model:
        length = (train or {}).get("seq_len") or getattr(data_config, "seq_len", None)
        if length:
            model["block_size"] = length
    return RunConfig(model=model, data=data_config, train=train or {}, seed=seed)


def budget_steps(run: RunConfig) -> int | None:
    """Optimizer steps in the run's budget (None for a time budget)."""
    c = run.train
    tokens_per_step = c.batch_size * run.seq_len
    if c.tokens:
        return math.ceil(c.tokens / tokens_per_step)
    if c.flops:
        return math.ceil(c.flops / (run.model.flops_per_token(seq_len=run.seq_len) * tokens_per_step))
    if c.seconds:
        return None
    return c.steps or 1000


# -- the loop ---------------------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@torch.no_grad()
def evaluate(model, batches, device, dtype, token_bytes=None) -> dict[str, float]:
    """Loss (nats per labelled token), accuracy on labelled tokens, and bits per byte over batches."""
    was_training = model.training
    model.eval()
    nats = correct = labelled = n_bytes = 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with _autocast(device, dtype):
            logits, _ = model(x)
        logits = logits.float()
        nats += F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1, reduction="sum").item()
        mask = y >= 0
        correct += (logits.argmax(-1)[mask] == y[mask]).sum().item()
        labelled += mask.sum().item()
        if token_bytes is not None:
            n_bytes += float(token_bytes[y[mask].cpu().numpy()].sum())
    model.train(was_training)
    out = {"loss": nats / labelled, "accuracy": correct / labelled}
    if token_bytes is not None:
        out["bpb"] = nats / math.log(2) / n_bytes  # bits per byte: total nats over total bytes
    return out


class Trainer:
    """One run's state; ``run()`` trains to the budget and returns the final metrics."""

    def __init__(self, run: RunConfig, out_dir: Path | None, on_step: Callable[[dict], None] | None = None):
        self.run_config, self.cfg = run, run.train
        self.out_dir = Path(out_dir) if out_dir else None
        self.on_step = on_step
        device = hardware.resolve_device(self.cfg.device)
        self.world = parallel.init_process_group(device)
        self.device = parallel.device_for(device, self.world)
        self.dtype = hardware.training_dtype(self.device, self.cfg.dtype)
        if self.device.type == "cpu" and self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.data: Dataset = load_dataset(run.data)
        if self.data.vocab_size > run.model.vocab_size:
            raise ValueError(f"the data has {self.data.vocab_size} tokens but model.vocab_size is {run.model.vocab_size}")
        self.seq_len = run.seq_len
        # the global batch, split over ranks, then into micro-batches on each rank
        if self.cfg.batch_size % self.world.size:
            raise ValueError(f"batch_size={self.cfg.batch_size} does not split over {self.world.size} processes")
        self.per_rank = self.cfg.batch_size // self.world.size
        self.micro = min(self.cfg.micro_batch_size or self.per_rank, self.per_rank)
        if self.per_rank % self.micro:
            raise ValueError(f"{self.per_rank} sequences per process do not split into micro-batches of {self.micro}")
        self.tokens_per_step = self.cfg.batch_size * self.seq_len
        self.flops_per_token = run.model.flops_per_token(causal=False, seq_len=self.seq_len)  # PaLM/nanoGPT MFU convention
        self.total_steps = budget_steps(run) or 10**12  # None: a time budget, the clock decides
        self.diverge_above = self.cfg.diverge_above or 3 * math.log(run.model.vocab_size)
        self.min_lr = self.cfg.lr / 10 if self.cfg.min_lr is None else self.cfg.min_lr

        torch.manual_seed(run.seed)  # dropout's stream, the same on every rank
        self.model = build_model(run.model, seed=run.seed).to(self.device)  # weights keyed by (seed, name)
        self.strategy = parallel.make_strategy(self.cfg.distributed, self.world, self.device)
        self.strategy.setup(self.model, self.cfg, self.micro, self.per_rank // self.micro)
        self.forward = torch.compile(self.strategy.module) if self.cfg.compile else self.strategy.module
        self.val = self.data.val_batches(self.cfg.val_sequences, self.seq_len, self.micro)
        self.extra_val = {n: self.data.val_batches(self.cfg.val_sequences, n, self.micro) for n in self.cfg.eval_lengths}
        self.peak_flops = hardware.peak_matmul_flops(self.device, self.dtype) * self.world.size  # every process's share
        self._metrics_file = None
        self._resumed: dict = {}  # the checkpoint's state when this run resumed

    # -- files --------------------------------------------------------------------------------

    @property
    def _checkpoint_path(self) -> Path | None:
        return self.out_dir / "checkpoint.pt" if self.out_dir else None

    def _write_metrics(self, record: dict) -> None:
        if self._metrics_file:  # opened by rank 0 only
            self._metrics_file.write(json.dumps(record) + "\n")
            self._metrics_file.flush()

    def _resume(self) -> int:
        """Restore the last checkpoint; drop metrics recorded after it. Returns the step to continue from."""
        state = self.strategy.load(self._checkpoint_path) if self.out_dir else None
        metrics = self.out_dir / "metrics.jsonl" if self.out_dir else None
        self._resumed = state or {}
        if state is None:
            if metrics and self.world.main:
                metrics.unlink(missing_ok=True)
            return 0
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        if self.world.main and metrics.exists():
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= state["step"]]
            metrics.write_text("".join(line + "\n" for line in kept))
        return state["step"]

    def _checkpoint(self, step: int, record: dict, train_losses: list[float], elapsed: float) -> None:
        # the loop's state beyond the model's: a resumed run reports what an uninterrupted one would
        extra = {"step": step, "torch_rng": torch.get_rng_state(), "record": record,
                 "train_losses": train_losses[-FINAL_TRAIN_LOSS_STEPS:], "elapsed": elapsed}
        if self.device.type == "cuda":
            extra["cuda_rng"] = torch.cuda.get_rng_state()
        self.strategy.save(self._checkpoint_path, extra)  # collective: every rank takes part

    # -- steps --------------------------------------------------------------------------------

    def _lr(self, step: int, elapsed: float) -> float:
        c = self.cfg
        progress, total = step, self.total_steps
        if c.seconds and step >= c.warmup_steps:
            # a time budget: after warmup the schedule follows the clock, on a notional 10⁶-step axis
            progress, total = c.warmup_steps + elapsed / c.seconds * 1e6, c.warmup_steps + 1e6
        return learning_rate(progress, total, lr=c.lr, min_lr=self.min_lr, warmup_steps=c.warmup_steps,
                             schedule=c.schedule, decay_fraction=c.decay_fraction, decay_shape=c.decay_shape)

    def _train_step(self, step: int, lr: float) -> tuple[float, float]:
        self.strategy.set_lr(lr)
        x, y = self.data.train_batch(step, self.run_config.seed, self.cfg.batch_size, self.seq_len)
        labelled = (y >= 0).sum().item()  # of the global batch
        mine = slice(self.world.rank * self.per_rank, (self.world.rank + 1) * self.per_rank)
        chunks = list(zip(x[mine].split(self.micro), y[mine].split(self.micro)))
        total = torch.zeros((), device=self.device)
        for i, (xm, ym) in enumerate(chunks):
            # weight each micro-batch by its share of the batch's labelled tokens: one loss, however split
            weight = (ym >= 0).sum().item() / labelled
            xm, ym = xm.to(self.device, non_blocking=True), ym.to(self.device, non_blocking=True)
            with _autocast(self.device, self.dtype):
                _, loss = self.forward(xm, ym)
            self.strategy.backward(loss * (weight * self.strategy.loss_factor), last=i == len(chunks) - 1)
            total += loss.detach() * weight
        norm = self.strategy.step()
        return parallel.all_reduce_sum(total, self.world), norm

    def _eval_record(self) -> dict:
        token_bytes = self.data.token_bytes
        result = evaluate(self.model, self.val, self.device, self.dtype, token_bytes)
        record = {"val_loss": result["loss"]}
        if self.data.kind == "task":
            record["val_accuracy"] = result["accuracy"]
        if "bpb" in result:
            record["val_bpb"] = result["bpb"]
        if self.data.loss_floor is not None:
            record["val_loss_above_floor"] = result["loss"] - self.data.loss_floor
        for length, batches in self.extra_val.items():
            try:
                record[f"val_loss@{length}"] = evaluate(self.model, batches, self.device, self.dtype)["loss"]
            except ValueError as e:  # e.g. learned positions past block_size: recorded, not raised
                record[f"val_loss@{length}"] = None
                record[f"val_loss@{length}_error"] = str(e)
        return record

    def _moe_record(self) -> dict:
        stats = self.model.moe_stats()
        if not stats:
            return {}
        parts = self.model.loss_parts
        return {
            "moe_aux_loss": float(parts["aux"]),
            "moe_balance_loss": statistics.fmean(float(s["balance_loss"]) for s in stats),
            "moe_z_loss": statistics.fmean(float(s["z_loss"]) for s in stats),
            "moe_dropped_fraction": statistics.fmean(
                float(s["dropped"]) / float(s["tokens_per_expert"].sum()) for s in stats),
            "moe_expert_fractions": [(s["tokens_per_expert"] / s["tokens_per_expert"].sum()).tolist() for s in stats],
        }

    def run(self) -> dict[str, Any]:
        """Train to the budget from the last checkpoint (or the start); return the final metrics."""
        start = self._resume()
        writes = self.out_dir and self.world.main  # metrics are written by rank 0 only
        with open(self.out_dir / "metrics.jsonl", "a") if writes else contextlib.nullcontext() as f:
            self._metrics_file = f
            steps = self.steps(start)
            while True:
                try:
                    next(steps)
                except StopIteration as done:
                    return done.value

    def steps(self, start: int = 0) -> Generator[dict, None, dict[str, Any]]:
        """The loop, one optimizer step per iteration: yields each step's record, returns the final metrics."""
        self.model.train()
        status, diverged_at, step = "finished", None, start
        step_times: list[float] = []
        train_losses: list[float] = list(self._resumed.get("train_losses", []))
        record: dict = dict(self._resumed.get("record", {}))
        wall_start = time.perf_counter() - self._resumed.get("elapsed", 0.0)  # a time budget counts earlier attempts
        while step < self.total_steps:
            elapsed = time.perf_counter() - wall_start
            if self.cfg.seconds and elapsed >= self.cfg.seconds:
                break
            lr = self._lr(step, elapsed)
            t0 = time.perf_counter()
            loss, grad_norm = self._train_step(step, lr)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step += 1
            step_times.append(dt)
            train_losses.append(loss)
            tokens_per_s = self.tokens_per_step / dt
            record = {"step": step, "tokens": step * self.tokens_per_step, "train_loss": loss, "lr": lr,
                      "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                      "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
                      "peak_memory_bytes": _peak_memory(self.device), **self._moe_record()}
            if not math.isfinite(loss) or loss > self.diverge_above:
                status, diverged_at = "diverged", step
                self._write_metrics(record)
                break
            last = step == self.total_steps
            if step % self.cfg.eval_every == 0 or last:
                record.update(self._eval_record())
            self._write_metrics(record)
            if self.on_step and self.world.main:
                self.on_step(record)
            every = self.cfg.checkpoint_every
            if self.out_dir and (last or (every and step % every == 0)):  # always the final one
                self._checkpoint(step, record, train_losses, time.perf_counter() - wall_start)
            yield record
        if status == "finished" and "val_loss" not in record:  # a time budget ended between evals
            record.update(self._eval_record())
            self._write_metrics({**record, "step": step})
            if self.out_dir:
                self._checkpoint(step, record, train_losses, time.perf_counter() - wall_start)
        return self._final(status, step, diverged_at, record, step_times, train_losses)

    def _final(self, status, step, diverged_at, record, step_times, train_losses) -> dict[str, Any]:
        steady = step_times[min(len(step_times) - 1, 2):] if step_times else []  # skip warm-up steps
        tokens_per_s = self.tokens_per_step / statistics.median(steady) if steady else None
        kernel = getattr(self.model.blocks[0].attn, "kernel", None)
        return {
            "status": status,
            "steps": step,
            "diverged_at": diverged_at,
            "tokens": step * self.tokens_per_step,
            "train_loss": statistics.fmean(train_losses[-FINAL_TRAIN_LOSS_STEPS:]) if train_losses else None,
            **{k: v for k, v in record.items() if k.startswith(("val_", "moe_"))},
            "loss_floor": self.data.loss_floor,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak_flops if tokens_per_s else None,
            "peak_flops": self.peak_flops,
            # on known GPUs, also against the datasheet's dense bf16 peak (A100 312, H100 SXM 989 TFLOP/s)
            "mfu_datasheet": (tokens_per_s * self.flops_per_token / (datasheet * self.world.size)
                              if tokens_per_s and (datasheet := hardware.datasheet_peak()) else None),
            "peak_memory_bytes": _peak_memory(self.device),
            "params": self.run_config.model.param_counts(),
            "flops_per_token": self.flops_per_token,
            "device": self.device.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "world_size": self.world.size,
            "strategy": self.strategy.name,
            "resumed_from": self._resumed.get("step", 0),  # the checkpoint's step, 0 for a fresh start
            "attention_kernel": getattr(kernel, "ran", None) or getattr(kernel, "name", None),
            "data": self.data.fingerprint,
        }


def train(run: RunConfig, out_dir: str | Path | None = None, *, on_step: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train one run to its budget (resuming from out_dir's checkpoint if there is one); return final metrics.

    out_dir receives metrics.jsonl (one record per step, val metrics on eval steps) and checkpoint.pt.
    Divergence (non-finite loss or loss above the bound) ends the run with status "diverged".
    """
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    try:
        return Trainer(run, out_dir, on_step).run()
    finally:
        torch.set_num_threads(threads)  # a run's `threads` setting does not outlive it
