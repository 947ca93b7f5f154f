"""The run configuration: what one training run is (model, data, optimisation and budget, seed, and
the plugins its components come from), validated and hashable, with no training code.

Planning, the runner, executors and workers import these types from here; ``bench.train`` trains a
``RunConfig``. ``resolve_run`` fills the model's vocabulary size from the data: with
``prepare=False`` only from what the data config knows without reading anything (a dry run).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from bench.data import DataConfig, load_dataset
from bench.parallel import DistributedConfig
from models import ModelConfig, flops_per_token, load_plugins, shapes_only
from models.config import prefix_positions
from models.registry import get, resolve

DATA: TypeAdapter = TypeAdapter(DataConfig)
DEFAULT_OPTIMIZER = {"name": "adamw"}  # train.optimizer resolved when a spec names none


class TrainConfig(BaseModel):
    """Optimisation and budget. Defaults follow nanoGPT where it has one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(12, ge=1, description="sequences per optimizer step (the global batch)")
    micro_batch_size: int | None = Field(None, ge=1, description="sequences per forward pass; accumulate the rest")
    seq_len: int | None = Field(None, ge=1, description="default: the data's length, else block_size")
    lr: float = Field(1e-3, gt=0, description="peak learning rate, reached after warmup")
    min_lr: float | None = Field(None, ge=0, description="the rate the schedule decays to; default lr/10")
    weight_decay: float = Field(0.1, ge=0, description="decoupled weight decay, on matrices only")
    beta1: float = Field(0.9, description="AdamW's first-moment decay (also Muon's AdamW part)")
    beta2: float = Field(0.95, description="AdamW's second-moment decay (also Muon's AdamW part)")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this; null: no clipping")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine", description="after warmup: cosine to min_lr, warmup-stable-decay (WSD), or constant")
    warmup_steps: int = Field(100, ge=0, description="steps of linear warmup to lr")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: share of steps spent decaying")
    decay_shape: Literal["linear", "cosine", "sqrt"] = Field("linear", description="WSD: the shape of the decay")
    # the budget: exactly one of these (steps by default)
    steps: int | None = Field(None, ge=1, description="budget: optimizer steps (1000 when no budget is given)")
    tokens: int | None = Field(None, ge=1, description="budget: training tokens")
    flops: float | None = Field(None, gt=0, description="budget: training FLOPs (models.flops_per_token × tokens)")
    seconds: float | None = Field(None, gt=0, description="budget: training seconds (evaluation and checkpoints "
                                  "excluded)")
    eval_every: int = Field(250, ge=1, description="steps between evaluations (and at the last step)")
    eval_batches: int | None = Field(20, ge=1, description="val set of eval_batches × batch_size sequences; None: all (tasks)")
    eval_sequences: int | None = Field(None, ge=1, description="val set of this many sequences whatever the batch "
                                       "size (replaces eval_batches; for studies that vary batch_size)")
    eval_lengths: list[int] = Field(default_factory=list, description="extra val sequence lengths (extrapolation)")
    checkpoint_every: int | None = Field(500, ge=1, description="steps between checkpoints a run resumes from; "
                                         "the last step's is always written")
    diverge_above: float | None = Field(None, description="loss bound; default 3·ln(vocab_size), "
                                         "or 10× the first step's loss for a contrastive model")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="autocast dtype; auto: bf16 where supported on CUDA, on CPU only where measured ≥2× "
                            "faster than fp32 (decided once per machine), else fp32")
    threads: int | None = Field(None, ge=1, description="CPU threads (fixed and recorded); default torch's")
    optimizer: str | dict = Field("adamw", validate_default=True, description="an optimizer spec: adamw | muon | lion or a plugin's, with "
                                  "its options (python -m models optimizer)")
    compile: bool | Literal["auto"] = Field(False, description="torch.compile the model (dynamic=False); auto: where "
                                            "a measured training step on this machine is ≥1.1× faster compiled")
    distributed: DistributedConfig | None = Field(
        None, description="one run on several processes: {strategy: ddp | fsdp | deepspeed, zero_stage, nproc}")

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, spec: str | dict) -> dict:
        return resolve("optimizer", spec)  # {"name": ..., every option with its default}

    @model_validator(mode="after")
    def _one_budget(self) -> TrainConfig:
        given = [k for k in ("steps", "tokens", "flops", "seconds") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one budget, not {' and '.join(given)}")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size}")
        check = getattr(get("optimizer", self.optimizer["name"]).factory, "check", None)
        reason = check(self, {k: v for k, v in self.optimizer.items() if k != "name"}) if check else None
        if reason:
            raise ValueError(f"optimizer: {reason}")
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
    plugins: dict[str, str] = Field(default_factory=dict, description="module -> sha256 of its source: "
                                    "the modules that register this run's third-party components")

    @model_validator(mode="before")
    @classmethod
    def _load_plugins(cls, data: Any) -> Any:
        """Plugins register components the model names: import them before the model is validated,
        and refuse one whose source changed since the run was planned (its results would be stale)."""
        if isinstance(data, dict) and data.get("plugins"):
            load_plugins(data["plugins"])
        return data

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or getattr(self.data, "seq_len", None) or self.model.block_size

    @model_validator(mode="after")
    def _lengths_fit(self) -> RunConfig:
        task_len = getattr(self.data, "seq_len", None)
        if task_len and self.train.seq_len and self.train.seq_len != task_len:
            raise ValueError(f"train.seq_len={self.train.seq_len} differs from the task's seq_len={task_len} "
                             "(a task fixes its example length: leave train.seq_len out)")
        limit = shapes_only(self.model).positional.max_positions
        prefix = prefix_positions(self.model) if hasattr(self.data, "image_shape") else 0  # else refused below
        if limit is not None and self.seq_len + prefix > limit:
            image = f" after the image's {prefix} prefix positions" if prefix else ""
            raise ValueError(f"train.seq_len={self.seq_len}{image} is longer than the {limit} positions "
                             f"'{self.model.positional['name']}' can embed (model.block_size)")
        return self

    @model_validator(mode="after")
    def _images_fit(self) -> RunConfig:
        """Image data needs an image encoder of its size and channels, and an encoder needs images;
        a contrastive loss needs captions and the whole batch at once."""
        source = self.data.source
        shape = self.data.image_shape() if hasattr(self.data, "image_shape") else None
        vision = self.model.vision
        if shape is not None and vision is None:
            raise ValueError(f"model.vision=None but data.source '{source}' gives images: the model would read the "
                             "questions without the pictures; add model.vision (e.g. {name: vit})")
        if shape is None and vision is not None:
            raise ValueError(f"model.vision={vision['name']} reads images but data.source '{source}' gives none; "
                             "use an image source (source: images)")
        if shape is None:
            return self
        channels, height, width = shape
        for key, want in (("image_size", height), ("channels", channels)):
            if vision.get(key) != want:
                raise ValueError(f"model.vision.{key}={vision.get(key)} but data (scene "
                                 f"'{getattr(self.data, 'scene', source)}') gives {channels}×{height}×{width} "
                                 f"images: set model.vision.{key}: {want} (or leave it out: the data's is used)")
        if vision.get("lr") is not None and self.train.distributed is not None and \
                self.train.distributed.strategy in ("fsdp", "deepspeed"):
            raise ValueError(f"model.vision.lr={vision['lr']} cannot be kept under train.distributed.strategy="
                             f"{self.train.distributed.strategy}: it flattens the parameters the encoder's own "
                             "learning rate is set on; use ddp, or leave vision.lr out")
        quantizer = self.model.quantization
        if quantizer is not None and getattr(get("quantization", quantizer["name"]).factory, "stage", "post") == "post":
            raise ValueError(f"model.quantization={quantizer['name']} quantizes after training, but its calibration, "
                             "latency and decode timings read text alone: post-training quantization of a model that "
                             "reads images is not supported (training-time fake_quant is)")
        if self.model.contrastive is not None:
            if getattr(self.data, "format", None) != "caption":
                raise ValueError(f"data.format={getattr(self.data, 'format', None)} but model.contrastive "
                                 f"'{self.model.contrastive['name']}' pairs images with captions: set data.format: caption")
            if self.train.micro_batch_size not in (None, self.train.batch_size) or self.train.distributed:
                raise ValueError(f"train.micro_batch_size={self.train.micro_batch_size} (or train.distributed) splits "
                                 "the batch, but a contrastive loss scores every pair of the batch against the others")
        return self


# a dry run validates a run whose vocabulary is unknown until the data is prepared with this size;
# such a run is marked pending and never trained or stored
STAND_IN_VOCAB = 256


def resolve_run(model: dict, data: dict, train: dict | None = None, seed: int = 0,
                plugins: dict[str, str] | None = None, *, prepare: bool = True) -> RunConfig:
    """A RunConfig whose model takes its vocabulary size (and block size, for tasks) from the data
    unless the model sets them.

    prepare=False reads, downloads and tokenizes nothing: the vocabulary size is the one the data
    config states (tasks, markov, byte, a sized BPE), else STAND_IN_VOCAB (see ``vocab_pending``).
    """
    data_config = DATA.validate_python(data)
    model = dict(model)
    if model.get("vision") is not None and hasattr(data_config, "image_shape"):  # the data's image size, unless set
        channels, height, _ = data_config.image_shape()
        vision = {"name": model["vision"]} if isinstance(model["vision"], str) else dict(model["vision"])
        model["vision"] = {"image_size": height, "channels": channels, **vision}
    if "vocab_size" not in model:
        if prepare:
            model["vocab_size"] = load_dataset(data_config).vocab_size
        else:
            model["vocab_size"] = data_config.known_vocab_size() or STAND_IN_VOCAB
    if "block_size" not in model:
        length = (train or {}).get("seq_len") or getattr(data_config, "seq_len", None)
        if length:  # a vision-language model's prefix takes positions before the text
            model["block_size"] = length + (_prefix(model, length) if model.get("vision") else 0)
    return RunConfig(model=model, data=data_config, train=train or {}, seed=seed, plugins=plugins or {})


def _prefix(model: dict, length: int) -> int:
    """The image's prefix positions of a model config (0 when the config is invalid: RunConfig then
    refuses it, with the key)."""
    try:
        return prefix_positions(ModelConfig(**{**model, "block_size": length}))
    except ValueError:
        return 0


def vocab_pending(model: dict, data: DataConfig) -> bool:
    """Whether a run's vocabulary size is known only once its data is prepared."""
    return "vocab_size" not in model and data.known_vocab_size() is None


def budget_steps(run: RunConfig) -> int | None:
    """Optimizer steps in the run's budget (None for a time budget)."""
    c = run.train
    tokens_per_step = c.batch_size * run.seq_len
    if c.tokens:
        return math.ceil(c.tokens / tokens_per_step)
    if c.flops:
        return math.ceil(c.flops / (flops_per_token(run.model, seq_len=run.seq_len) * tokens_per_step))
    if c.seconds:
        return None
    return c.steps or 1000
