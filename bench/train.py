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
from typing import Any

import torch
import torch.nn.functional as F
from bench import autotune, hardware, parallel, pictures
from bench.config import RunConfig, budget_steps
from bench.data import Dataset, load_dataset
from bench.schedules import learning_rate
from models import build_model, flops_per_token, param_counts
from models.accounting import cache_bytes
from models.attention_backends import use_kernels

FINAL_TRAIN_LOSS_STEPS = 10  # the final train loss is the mean over this many last steps


# -- the loop ---------------------------------------------------------------------------------------


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def model_inputs(batch: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A batch (inputs, targets[, images]) on the device: (x, y, what else the model takes by keyword)."""
    x, y, *images = batch
    extra = {"images": images[0].to(device, non_blocking=True)} if images else {}
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True), extra


@torch.no_grad()
def evaluate(model, batches, device, dtype, token_bytes=None, from_position: int = 0) -> dict[str, float]:
    """Loss (nats per labelled token), accuracy on labelled tokens, exact match per sequence (every
    labelled token right: ``exact``, one bool per sequence in order) and bits per byte over batches.

    from_position: count only the targets at positions ≥ it (0-based index of the predicting token;
    e.g. the run's training length: the positions a length-extrapolation eval never trained on).
    """
    was_training = model.training
    model.eval()
    nats = correct = labelled = n_bytes = 0.0
    exact = []
    for batch in batches:
        x, y, extra = model_inputs(batch, device)
        if from_position:
            y = y.clone()
            y[..., :from_position] = -1  # unlabelled: not counted in any of the metrics
        with _autocast(device, dtype):
            logits = model(x, **extra)[0]  # the logits of the Output (or of any (logits, ...) a model returns)
        logits = logits.float()
        nats += F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1, reduction="sum").item()
        mask = y >= 0
        right = (logits.argmax(-1) == y) & mask
        correct += right.sum().item()
        labelled += mask.sum().item()
        exact += (right == mask).all(dim=1).tolist()
        if token_bytes is not None:
            n_bytes += float(token_bytes[y[mask].cpu().numpy()].sum())
    model.train(was_training)
    if not labelled:
        raise ValueError(f"no labelled targets at positions ≥ {from_position}")
    out = {"loss": nats / labelled, "accuracy": correct / labelled, "exact": exact}
    if token_bytes is not None:
        out["bpb"] = nats / math.log(2) / n_bytes  # bits per byte: total nats over total bytes
    return out


@torch.no_grad()
def evaluate_pairs(model, batches, device, dtype) -> dict[str, float]:
    """A contrastive model on image–caption pairs: the loss in batches of the training batch's size (it
    depends on it), averaged per pair, and recall@1 each way over the whole validation set (the
    argmax: a tie goes to the first). A retrieved
    caption (image) counts as right when its caption's tokens are the true one's: scenes that share
    a caption are not told apart by any model."""
    was_training = model.training
    model.eval()
    losses, images, texts, captions = [], [], [], []
    for batch in batches:
        x, y, extra = model_inputs(batch, device)
        with _autocast(device, dtype):
            image, text = model.embed(x, y, **extra)
            losses.append((model.pair_loss(image, text).item(), len(x)))
        images.append(image.float())
        texts.append(text.float())
        captions.append(y)
    model.train(was_training)
    scores = model.pair_loss.logits(torch.cat(images), torch.cat(texts))  # (N, N): image i against caption j
    caption = torch.cat(captions)
    same = (caption[:, None, :] == caption[None, :, :]).all(-1)  # (N, N): pair i and j share a caption
    rows = torch.arange(len(caption), device=scores.device)
    return {"loss": sum(loss * n for loss, n in losses) / sum(n for _, n in losses),  # per pair
            "recall_i2t": same[rows, scores.argmax(1)].float().mean().item(),
            "recall_t2i": same[scores.argmax(0), rows].float().mean().item()}


def moe_record(routing: list[tuple[float, list]]) -> dict[str, Any]:
    """A step's MoE metrics from every micro-batch: (weight, each layer's MoEAux) per micro-batch.

    Losses are weighted like the LM loss (by labelled tokens); assignments and drops are counted
    over the whole step, so the fractions are those of the global batch on this process.
    """
    if not routing:
        return {}
    layers = len(routing[0][1])
    per_expert = [sum(aux[i].stats["tokens_per_expert"].float() for _, aux in routing) for i in range(layers)]
    dropped = [sum(float(aux[i].stats["dropped"]) for _, aux in routing) for i in range(layers)]

    def weighted(value) -> float:  # averaged over layers, weighted over micro-batches
        return sum(w * statistics.fmean(float(value(a)) for a in aux) for w, aux in routing)

    return {
        "moe_aux_loss": sum(w * float(sum(a.loss.detach() for a in aux)) for w, aux in routing),
        "moe_balance_loss": weighted(lambda a: a.stats["balance_loss"]),
        "moe_z_loss": weighted(lambda a: a.stats["z_loss"]),
        "moe_dropped_fraction": statistics.fmean(d / float(n.sum()) for d, n in zip(dropped, per_expert)),
        "moe_assignments": [int(n.sum()) for n in per_expert],
        "moe_expert_fractions": [(n / n.sum()).tolist() for n in per_expert],
    }


def steady_state(step_times: list[float], slower: float = 1.2) -> list[float]:
    """The step times after warm-up, for tokens/s: the first 2 steps (allocator, first calls) and every
    leading step still > `slower`× the median of the later half (compilation, autotuning,
    recompiles) are dropped, but never more than half the steps."""
    if not step_times:
        return []
    settled = statistics.median(step_times[len(step_times) // 2:])
    skip = min(len(step_times) - 1, 2)
    while skip < len(step_times) // 2 and step_times[skip] > slower * settled:
        skip += 1
    return step_times[skip:]


class Trainer:
    """One run's state; ``run()`` trains to the budget and returns the final metrics."""

    def __init__(self, run: RunConfig, out_dir: Path | None, on_step: Callable[[dict], None] | None = None):
        self.run_config, self.cfg = run, run.train
        self.out_dir = Path(out_dir) if out_dir else None
        self.on_step = on_step
        device = hardware.resolve_device(self.cfg.device)
        self.world = parallel.init_process_group(device)
        self.device = parallel.device_for(device, self.world)
        if self.device.type == "cpu" and self.cfg.threads:  # first: the dtype decision depends on it
            torch.set_num_threads(self.cfg.threads)
        self.dtype = hardware.training_dtype(self.device, self.cfg.dtype)
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
        self.flops_per_token = flops_per_token(run.model, causal=False, seq_len=self.seq_len)  # PaLM/nanoGPT MFU convention
        self.total_steps = budget_steps(run) or 10**12  # None: a time budget, the clock decides
        # a contrastive loss is no next-token loss: its bound is 10× its first step's (set then, and checkpointed)
        self.diverge_above = self.cfg.diverge_above or (3 * math.log(run.model.vocab_size)
                                                        if run.model.contrastive is None else None)
        self.min_lr = self.cfg.lr / 10 if self.cfg.min_lr is None else self.cfg.min_lr

        self.kernels = autotune.KernelChoices()  # `backend: auto` measures on this machine; the run records it
        torch.manual_seed(run.seed)  # dropout's stream, the same on every rank
        # weights keyed by (seed, name)
        self.model = build_model(run.model, seed=run.seed, kernels=self.kernels).to(self.device)
        self.compiled, self.compile_reason = self._compile_choice()  # measured on the unwrapped model
        if self.compiled:  # kernels chosen before tracing, on the unwrapped model
            x = self.data.train_batch(0, run.seed, self.micro, self.seq_len)[0]
            autotune.make_choices(self.model, x.to(self.device), lambda: _autocast(self.device, self.dtype))
        self.strategy = parallel.make_strategy(self.cfg.distributed, self.world, self.device)
        self.strategy.setup(self.model, self.cfg, self.micro, self.per_rank // self.micro)
        self.forward = torch.compile(self.strategy.module, dynamic=False) if self.compiled else self.strategy.module
        self.val = self.data.val_batches(self.cfg.val_sequences, self.seq_len, self.micro)
        self.extra_val = {n: self.data.val_batches(self.cfg.val_sequences, n, self.micro) for n in self.cfg.eval_lengths}
        self.peak_flops = hardware.peak_matmul_flops(self.device, self.dtype) * self.world.size  # every process's share
        self._metrics_file = None
        self._resumed: dict = {}  # the checkpoint's state when this run resumed

    def _compile_choice(self) -> tuple[bool, str]:
        """Whether to train the compiled model, and why (`compile: auto` measures it on this machine)."""
        if self.cfg.compile != "auto":
            return self.cfg.compile, f"compile: {str(self.cfg.compile).lower()} in the spec"
        speed = autotune.compile_speed(self.model, self.micro, self.seq_len, self.dtype,
                                       lambda: _autocast(self.device, self.dtype))
        # a time budget's total_steps is unbounded: long enough to repay compiling
        decision = autotune.compile_decision(speed, self.total_steps * (self.per_rank // self.micro))
        return decision["compile"], decision["reason"]

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
        if self.diverge_above is None and (state or {}).get("diverge_above") is not None:
            self.diverge_above = state["diverge_above"]  # the bound the run set at its first step
        if self.kernels.remember((state or {}).get("kernels", ())):  # a resumed run runs the kernels it chose;
            use_kernels(self.model, self.kernels)  # ones chosen here before (to compile) differ: chosen again
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
                 "train_losses": train_losses[-FINAL_TRAIN_LOSS_STEPS:], "elapsed": elapsed,
                 "kernels": self.kernels.records(),  # serving and quantization run what training ran
                 "device": self.device.type, "dtype": str(self.dtype).removeprefix("torch."),  # and serving, as trained
                 "diverge_above": self.diverge_above}
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

    def _train_step(self, step: int, lr: float) -> tuple[float, float, dict]:
        """One optimizer step over the global batch: (LM loss, grad norm, more of the step's record:
        MoE metrics of every micro-batch; the loss scale under float16).

        The optimizer backpropagates the model's loss (with MoE: the LM loss plus the weighted
        auxiliary losses); the loss returned, recorded and checked for divergence is the LM loss
        alone, comparable with a dense model's (the auxiliary losses are recorded as moe_aux_loss).
        """
        self.strategy.set_lr(lr)
        batch = self.data.train_batch(step, self.run_config.seed, self.cfg.batch_size, self.seq_len)
        labelled = (batch[1] >= 0).sum().item()  # of the global batch
        mine = slice(self.world.rank * self.per_rank, (self.world.rank + 1) * self.per_rank)
        chunks = list(zip(*(part[mine].split(self.micro) for part in batch)))  # (x, y[, images]) per micro-batch
        total = torch.zeros((), device=self.device)
        routing = []  # (weight, each MoE layer's MoEAux) per micro-batch
        for i, chunk in enumerate(chunks):
            # weight each micro-batch by its share of the batch's labelled tokens: one loss, however split
            weight = (chunk[1] >= 0).sum().item() / labelled
            xm, ym, extra = model_inputs(chunk, self.device)
            with _autocast(self.device, self.dtype):
                _, loss, aux = self.forward(xm, ym, **extra)
            self.strategy.backward(self.strategy.scale(loss * (weight * self.strategy.loss_factor)),
                                   last=i == len(chunks) - 1)
            if aux:  # the Output's loss less its auxiliary losses: the LM cross-entropy
                total += (loss.detach() - sum(a.loss.detach() for a in aux)) * weight
                routing.append((weight, aux))
            else:
                total += loss.detach() * weight
        scaler = self.strategy.scaler
        scale = scaler.get_scale() if scaler is not None else None  # the scale this step's gradients carry
        norm = self.strategy.step()
        extra = moe_record(routing)
        if scaler is not None:  # an overflow skips the update and backs the scale off
            extra.update(grad_scale=scale, skipped_step=scaler.get_scale() < scale)
        return parallel.all_reduce_sum(total, self.world), norm, extra

    def _eval_record(self) -> dict:
        if self.run_config.model.contrastive is not None:
            pairs = evaluate_pairs(self.model, self.val, self.device, self.dtype)
            return {"val_loss": pairs["loss"], "val_recall_i2t": pairs["recall_i2t"],
                    "val_recall_t2i": pairs["recall_t2i"]}
        token_bytes = self.data.token_bytes
        result = evaluate(self.model, self.val, self.device, self.dtype, token_bytes)
        record = {"val_loss": result["loss"]}
        if self.data.kind == "task":
            record["val_accuracy"] = result["accuracy"]
        if self.data.kind == "image":  # a question is answered when its every answer token is right
            record["val_accuracy"] = statistics.fmean(result["exact"])
            types = self.data.val_types(self.cfg.val_sequences)
            for index, name in enumerate(self.data.question_types):
                answered = [e for e, t in zip(result["exact"], types) if t == index]
                if answered:
                    record[f"val_accuracy_{name}"] = statistics.fmean(answered)
        if "bpb" in result:
            record["val_bpb"] = result["bpb"]
        if self.data.loss_floor is not None:
            record["val_loss_above_floor"] = result["loss"] - self.data.loss_floor
        for length, batches in self.extra_val.items():
            # past the training length, also the loss on the untrained positions alone: the average
            # over all positions is half in-distribution at twice the length
            beyond = f"val_loss@{length}_beyond" if length > self.seq_len else None
            try:
                record[f"val_loss@{length}"] = evaluate(self.model, batches, self.device, self.dtype)["loss"]
                if beyond:
                    record[beyond] = evaluate(self.model, batches, self.device, self.dtype,
                                              from_position=self.seq_len)["loss"]
            except ValueError as e:  # e.g. learned positions past block_size: recorded, not raised
                record[f"val_loss@{length}"] = None
                if beyond:
                    record[beyond] = None
                record[f"val_loss@{length}_error"] = str(e)
        return record

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
        # a time budget counts training time only, earlier attempts' included (the checkpoint's
        # "elapsed"): time spent evaluating and checkpointing is paused, not spent
        wall_start = time.perf_counter() - self._resumed.get("elapsed", 0.0)
        paused = 0.0
        while step < self.total_steps:
            elapsed = time.perf_counter() - wall_start - paused
            if self.cfg.seconds and elapsed >= self.cfg.seconds:
                break
            lr = self._lr(step, elapsed)
            t0 = time.perf_counter()
            loss, grad_norm, routing = self._train_step(step, lr)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step += 1
            step_times.append(dt)
            train_losses.append(loss)
            tokens_per_s = self.tokens_per_step / dt
            # "seconds": training time at the end of this step (evaluation and checkpoints excluded), for
            # curves per second; from the step's own timing, so the loop reads the clock no more often
            record = {"step": step, "tokens": step * self.tokens_per_step,
                      "seconds": t0 + dt - wall_start - paused, "train_loss": loss, "lr": lr,
                      "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                      "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
                      "peak_memory_bytes": _peak_memory(self.device), **routing}
            if self.diverge_above is None and math.isfinite(loss):
                self.diverge_above = 10 * loss
            if not math.isfinite(loss) or loss > self.diverge_above:
                status, diverged_at = "diverged", step
                self._write_metrics(record)
                break
            last = step == self.total_steps
            if step % self.cfg.eval_every == 0 or last:
                pause = time.perf_counter()
                record.update(self._eval_record())
                paused += time.perf_counter() - pause
            self._write_metrics(record)
            if self.on_step and self.world.main:
                self.on_step(record)
            every = self.cfg.checkpoint_every
            if self.out_dir and (last or (every and step % every == 0)):  # always the final one
                pause = time.perf_counter()
                self._checkpoint(step, record, train_losses, pause - wall_start - paused)
                paused += time.perf_counter() - pause
            yield record
        if status == "finished" and "val_loss" not in record:  # a time budget ended between evals
            pause = time.perf_counter()
            record.update(self._eval_record())
            paused += time.perf_counter() - pause
            self._write_metrics({**record, "step": step})
            if self.out_dir:
                self._checkpoint(step, record, train_losses, time.perf_counter() - wall_start - paused)
        return self._final(status, step, diverged_at, record, step_times, train_losses)

    def _final(self, status, step, diverged_at, record, step_times, train_losses) -> dict[str, Any]:
        steady = steady_state(step_times)
        tokens_per_s = self.tokens_per_step / statistics.median(steady) if steady else None
        attn = self.model.blocks[0].attn
        kernel = getattr(getattr(attn, "attend", attn), "kernel", None)  # a plugin may hold its kernel itself
        return {
            "status": status,
            "steps": step,
            "diverged_at": diverged_at,
            "tokens": step * self.tokens_per_step,
            # steps whose batches were all unseen data: the online loss is held-out up to there
            "single_pass_steps": self.data.single_pass_steps(self.cfg.batch_size, self.seq_len),
            "epochs": step * self.cfg.batch_size / self.data.examples_per_epoch(self.seq_len),
            "train_loss": statistics.fmean(train_losses[-FINAL_TRAIN_LOSS_STEPS:]) if train_losses else None,
            **{k: v for k, v in record.items() if k.startswith(("val_", "moe_"))},
            "loss_floor": self.data.loss_floor,
            "tokens_per_s": tokens_per_s,
            "warmup_steps_excluded": len(step_times) - len(steady),  # from tokens_per_s and mfu
            "mfu": tokens_per_s * self.flops_per_token / self.peak_flops if tokens_per_s else None,
            "peak_flops": self.peak_flops,
            # on known GPUs, also against the datasheet's dense bf16 peak (A100 312, H100 SXM 989 TFLOP/s)
            "mfu_datasheet": (tokens_per_s * self.flops_per_token / (datasheet * self.world.size)
                              if tokens_per_s and (datasheet := hardware.datasheet_peak()) else None),
            "peak_memory_bytes": _peak_memory(self.device),
            "params": param_counts(self.run_config.model),
            "flops_per_token": self.flops_per_token,
            # what serving it caches (bf16): per token, and a recurrent mixer's state per sequence
            **dict(zip(("kv_cache_bytes_per_token", "state_bytes"), cache_bytes(self.model, 2))),
            "device": self.device.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "compiled": self.compiled,
            "compile_reason": self.compile_reason,
            "world_size": self.world.size,
            "strategy": self.strategy.name,
            "resumed_from": self._resumed.get("step", 0),  # the checkpoint's step, 0 for a fresh start
            "attention_kernel": getattr(kernel, "ran", None) or getattr(kernel, "name", None),
            # backend auto: every choice this run made (call shape, direction) with the medians behind it
            "attention_choices": self.kernels.records() or None,
            "data": self.data.fingerprint,
            **self._answer_samples(status),
        }

    def _answer_samples(self, status: str) -> dict:
        """A vision-language run keeps its first validation examples with its answers (the report's picture)."""
        if self.data.kind != "image" or self.run_config.model.contrastive is not None or status != "finished":
            return {}
        types = self.data.val_types(self.cfg.val_sequences)
        return {"val_samples": pictures.answer_samples(self.model, self.val, types, self.data.question_types,
                                                       self.data.decode, self.device)}


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
