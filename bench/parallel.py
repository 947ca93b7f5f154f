"""How one training run uses its processes: a single process, DDP, FSDP (fully_shard) or DeepSpeed ZeRO.

The trainer talks to a ``Strategy`` and never to an engine directly (torchtitan keeps parallelism
out of model and loop code the same way). Processes come from torchrun: gloo on CPU, NCCL on GPU.

The global batch is fixed by the spec: every rank draws the same global batch and trains on its
slice, accumulating micro-batches to make up the rest. Each micro-batch's loss is weighted by its
share of the global batch's labelled tokens, times the factor the engine divides by (the world size
for DDP and FSDP, which average gradients; also the accumulation steps for DeepSpeed), so a
1-process and an N-process run compute the same gradients up to summation order.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from models.optimizers import decay_groups, trainable
from models.registry import build


class DistributedConfig(BaseModel):
    """train.distributed: {strategy: ddp | fsdp | deepspeed, zero_stage: 1 | 2 | 3, nproc: N}."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: Literal[1, 2, 3] | None = Field(None, description="deepspeed only; default 1")
    nproc: int = Field(2, ge=1, description="processes (GPUs) per node, launched with torchrun")

    @model_validator(mode="after")
    def _stage_only_for_deepspeed(self) -> DistributedConfig:
        if self.strategy != "deepspeed" and self.zero_stage is not None:
            raise ValueError("zero_stage applies to strategy: deepspeed")
        return self

    @property
    def stage(self) -> int:
        return self.zero_stage or 1

    @property
    def label(self) -> str:
        return f"deepspeed ZeRO-{self.stage}" if self.strategy == "deepspeed" else self.strategy


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place in the torchrun world (rank 0 of 1 outside torchrun)."""
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def _backend() -> str:
    """gloo for CPU tensors and, where there is CUDA, NCCL for CUDA ones: one group serves runs on either
    (the runner joins before it knows each run's device)."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(device: torch.device) -> World:
    """Join torchrun's process group once."""
    w = world()
    if device.type == "cuda":
        torch.cuda.set_device(w.local_rank)
    if w.size > 1 and not dist.is_initialized():
        dist.init_process_group(_backend(), timeout=datetime.timedelta(minutes=30))
    return w


def finish() -> None:
    """Leave the process group together (a rank tearing down early aborts its peers' transport)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def device_for(device: torch.device, w: World) -> torch.device:
    return torch.device("cuda", w.local_rank) if device.type == "cuda" else device


def broadcast_object(value: Any, w: World) -> Any:
    """Rank 0's value on every rank."""
    if w.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t: torch.Tensor, w: World) -> float:
    """The sum of a scalar tensor over ranks, as a number (one device sync)."""
    if w.size > 1:
        dist.all_reduce(t)
    return float(t.item())


def make_optimizers(model: nn.Module, train) -> list[torch.optim.Optimizer]:
    """The run's optimizers (``train.optimizer``, an optimizer-family spec) over the model's parameters."""
    spec = dict(train.optimizer)
    return build("optimizer", spec.pop("name"), model, train, **spec)


class Strategy:
    """One process, or one rank of several: forward, backward, step, and checkpoints."""

    name = "single"
    loss_factor = 1.0  # what the engine divides the summed gradient by, undone on the loss

    def __init__(self, world: World, device: torch.device):
        self.world, self.device = world, device
        self.scaler: torch.amp.GradScaler | None = None  # float16 only: dynamic loss scaling

    def setup(self, model: nn.Module, train, micro: int, accumulation: int) -> None:
        """Wrap the model and make the optimizer; `micro` sequences per forward, `accumulation` forwards per step."""
        self.model = model
        self.module = model  # what the loop calls forward on
        self.optimizers = make_optimizers(model, train)
        self.grad_clip = train.grad_clip
        if train.dtype == "float16":
            # fp16's 5 exponent bits flush small gradients to zero: scale the loss up, unscale the
            # gradients before clipping, skip steps whose gradients overflowed. Under FSDP2 the
            # overflow check of sharded (DTensor) gradients is reduced over ranks by DTensor itself.
            self.scaler = torch.amp.GradScaler(self.device.type)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate: scaled up under float16, the loss itself otherwise."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """One micro-batch's backward; gradients are synchronised across ranks on the last only."""
        loss.backward()

    def set_lr(self, lr: float) -> None:
        """The schedule's learning rate, times each param group's ``lr_scale`` (1 unless its optimizer set one)."""
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> float:
        """Clip, update, zero; returns the gradient norm before clipping (of the unscaled gradients).

        Under float16 a step whose gradients overflowed is skipped and the scale backs off."""
        if self.scaler is not None:
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)  # clip the true gradients
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or float("inf"))
        for optimizer in self.optimizers:
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # -- checkpoints: one full copy written by rank 0, loadable at any world size ------------------

    def save(self, path: Path, extra: dict) -> None:
        from bench.checkpoint import save_checkpoint

        model, optimizer = self._full_state()  # collective under FSDP: every rank takes part
        if self.world.main:
            scaler = {"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}
            save_checkpoint(path, {**extra, "strategy": self.name, "world_size": self.world.size,
                                   "model": model, "optimizer": optimizer, **scaler})

    def load(self, path: Path) -> dict | None:
        """Restore model and optimizer; returns the `extra` state saved beside them (None: no checkpoint)."""
        from bench.checkpoint import load_checkpoint

        state = load_checkpoint(path)  # every rank reads the full copy (the run folder is shared)
        if state is None:
            return None
        written = state.get("strategy", "single")
        if not self._can_resume(written):
            raise RuntimeError(f"this checkpoint was written by {written}; resume it with {written}, not {self.name}")
        self._restore(state.pop("model"), state.pop("optimizer"))
        scaler = state.pop("grad_scaler", None)
        if self.scaler is not None and scaler is not None:
            self.scaler.load_state_dict(scaler)
        return state

    def _full_state(self) -> tuple[dict, dict | list[dict]]:
        states = [optimizer.state_dict() for optimizer in self.optimizers]
        return self.model.state_dict(), states[0] if len(states) == 1 else states  # one: the format before Muon

    def _restore(self, model: dict, optimizer: dict | list[dict]) -> None:
        self.model.load_state_dict(model)
        states = optimizer if isinstance(optimizer, list) else [optimizer]
        if len(states) != len(self.optimizers):
            raise RuntimeError(f"this checkpoint holds {len(states)} optimizer state(s), the run's optimizer has "
                               f"{len(self.optimizers)}: it was written with another train.optimizer")
        for optimizer, state in zip(self.optimizers, states):
            optimizer.load_state_dict(state)

    def _can_resume(self, written: str) -> bool:
        return not {written, self.name} - {"single", "ddp"}  # single and DDP share one format


class DDPStrategy(Strategy):
    name = "ddp"

    def setup(self, model, train, micro, accumulation):
        super().setup(model, train, micro, accumulation)
        self.loss_factor = float(self.world.size)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        self.module = DistributedDataParallel(model, device_ids=ids)

    def backward(self, loss, last):
        with contextlib.nullcontext() if last else self.module.no_sync():
            loss.backward()


class FSDPStrategy(Strategy):
    """FSDP2 (torch.distributed.fsdp.fully_shard): each block sharded, then the whole model."""

    name = "fsdp"

    def setup(self, model, train, micro, accumulation):
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        super().setup(model, train, micro, accumulation)
        self.loss_factor = float(self.world.size)

    def backward(self, loss, last):
        self.model.set_requires_gradient_sync(last)
        loss.backward()

    def _full_state(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(self.model, self.optimizers, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _restore(self, model, optimizer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(self.model, self.optimizers, model_state_dict=model, optim_state_dict=optimizer,
                       options=StateDictOptions(full_state_dict=True))  # each rank keeps its shard

    def _can_resume(self, written):
        return written == self.name


class DeepSpeedStrategy(Strategy):
    """DeepSpeed's engine with ZeRO stage 1, 2 or 3, accumulation and clipping; its own optimizer (torch
    AdamW) for adamw, the run's torch optimizer otherwise (elementwise ones such as Lion: ZeRO partitions
    their state like AdamW's; Muon is refused when the config is validated)."""

    def __init__(self, world, device, zero_stage: int):
        super().__init__(world, device)
        self.zero_stage = zero_stage
        self.name = f"deepspeed-zero{zero_stage}"

    def config(self, train, micro: int, accumulation: int) -> dict:
        """The DeepSpeed config, built from the spec's train settings."""
        return {
            "train_batch_size": train.batch_size,
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accumulation,
            "gradient_clipping": train.grad_clip or 0.0,
            "zero_optimization": {"stage": self.zero_stage},
            **({"optimizer": {"type": "AdamW", "params": {"lr": train.lr, "betas": [train.beta1, train.beta2],
                                                          "weight_decay": train.weight_decay, "torch_adam": True}}}
               if train.optimizer["name"] == "adamw" else {"zero_allow_untested_optimizer": True}),
            "bf16": {"enabled": False},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def setup(self, model, train, micro, accumulation):
        if train.dtype == "float16":
            # DeepSpeed's fp16 mode brings its own loss scaler and fp16 master weights: a different
            # experiment from the other strategies' autocast + torch.amp.GradScaler, so refused here
            raise ValueError("train.dtype: float16 is not supported with distributed.strategy: deepspeed "
                             "(DeepSpeed would need its own fp16 loss scaler); use bfloat16 or float32, "
                             "or strategy ddp/fsdp for float16")
        import deepspeed

        self.model = model
        self.loss_factor = float(self.world.size * accumulation)
        if train.optimizer["name"] == "adamw":
            client = {"model_parameters": decay_groups(trainable(model), train.weight_decay)}
        else:
            (optimizer,) = make_optimizers(model, train)  # one optimizer over every parameter
            client = {"optimizer": optimizer}
        self.engine, optimizer, _, _ = deepspeed.initialize(model=model, config=self.config(train, micro, accumulation),
                                                            **client)
        self.optimizers = [optimizer]  # ZeRO's wrapper: its param groups are the ones the schedule sets
        self.module = self.engine

    def backward(self, loss, last):
        self.engine.backward(loss)
        if not last:
            self.engine.step()  # DeepSpeed counts micro-batches in step(); it updates at the boundary only

    def step(self):
        self.engine.step()  # the accumulation boundary: clip, update, zero
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, path, extra):
        folder = path.with_suffix(".deepspeed")
        self.engine.save_checkpoint(str(folder), tag="state", client_state=extra)
        if self.world.main:
            (folder / "archbench.json").write_text(json.dumps({"world_size": self.world.size, "strategy": self.name,
                                                               "step": extra["step"]}))

    def load(self, path):
        folder = path.with_suffix(".deepspeed")
        meta_path = folder / "archbench.json"
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        if meta["strategy"] != self.name:
            raise RuntimeError(f"this checkpoint was written by {meta['strategy']}; resume it with that strategy")
        if meta["world_size"] != self.world.size:
            raise RuntimeError(
                f"this DeepSpeed ZeRO-{self.zero_stage} checkpoint was written by {meta['world_size']} processes and "
                f"ZeRO shards optimizer state per rank: resume with nproc={meta['world_size']} (or convert it with "
                "DeepSpeed's universal checkpointing)")
        _, client = self.engine.load_checkpoint(str(folder), tag="state")
        return client


def make_strategy(config: DistributedConfig | None, w: World, device: torch.device) -> Strategy:
    """The spec's strategy (DDP under torchrun when the spec names none); one process needs no DDP."""
    if config is None or config.strategy == "ddp":
        return DDPStrategy(w, device) if w.size > 1 else Strategy(w, device)
    if w.size == 1:
        init_single_process_group(device)  # FSDP and DeepSpeed want a process group even for one process
    return FSDPStrategy(w, device) if config.strategy == "fsdp" else DeepSpeedStrategy(w, device, config.stage)


def init_single_process_group(device: torch.device) -> None:
    """FSDP and DeepSpeed need a process group even for one process: a world of one."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(_backend(), rank=0, world_size=1)
