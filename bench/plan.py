"""Expand a Spec into its runs: variants × sweep points × seeds, each content-addressed.

A run's id is the hash of its resolved configuration (model with every option filled in, the data's
identity including its content hash and code version, train settings, seed, the source hashes of the
plugins its components come from), so rerunning a spec finds finished runs and changing any value —
or editing a plugin — makes a new run. Every run is validated here, before anything trains: errors
name the variant, the file and line, and the key.

``expand(..., prepare=False)`` (a dry run) reads, downloads and tokenizes nothing: runs whose
vocabulary size only the prepared data can tell are validated with a stand-in size, marked
``pending``, and carry no run id.

A study is expanded once per invocation; ``Plan.select`` takes a part of a plan (the variants of
--only, another seed for adaptive seeds) exactly as ``expand`` would plan it, without resolving again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from pydantic import ValidationError

from bench.config import DATA, DEFAULT_OPTIMIZER, RunConfig, budget_steps, resolve_run, vocab_pending
from bench.data import DataUnavailable, load_dataset
from bench.spec import SourceMap, Spec, SpecError, problems, set_dotted
from models import ComponentError, load_plugins
from models.config import COMPONENT_FIELDS
from models.quantization import post_training
from models.registry import components_of, get, resolve


@dataclass(frozen=True)
class PlannedRun:
    run_id: str | None  # None while pending
    variant: str
    sweep: dict[str, Any]  # dotted key -> value at this sweep point
    seed: int
    config: RunConfig
    kind: Literal["train", "quantize"] = "train"
    parent_id: str | None = None  # quantize: the float run whose checkpoint it evaluates
    pending: str | None = None  # planned without preparing the data: what is not known yet
    role: Literal["tune", "eval"] = "eval"  # tune: chooses the variant's setting; eval: enters verdicts

    @property
    def label(self) -> str:
        point = ", ".join(f"{k}={v}" for k, v in self.sweep.items())
        return (f"{self.variant}" + (f" [{point}]" if point else "") + f" seed {self.seed}"
                + (" (tuning)" if self.role == "tune" else ""))


class Resolved(NamedTuple):
    """One variant at one sweep (or tune) point and seed, resolved and validated: what a plan's runs are
    assembled from."""

    variant: str
    point: dict[str, Any]
    seed: int
    config: RunConfig
    pending: str | None  # planned without preparing the data: what is not known yet


@dataclass
class Plan:
    """A study's runs, in the order they execute (float runs first); ``select`` takes a part of it
    (other variants, more seeds) without resolving anything again."""

    spec: Spec
    runs: list[PlannedRun] = field(default_factory=list)
    resolved: list[Resolved] = field(default_factory=list, repr=False)  # what `runs` were assembled from
    role: Literal["tune", "eval"] = "eval"
    prepared: bool = True  # whether the data was prepared (runs have ids)

    def select(self, variants: list[str] | None = None, seeds: list[int] | None = None) -> Plan:
        """The runs of `variants` (in that order; default: all of this plan's) at `seeds` (default: this
        plan's), planned as ``expand`` plans them: a seed the plan does not hold is the same resolved
        configuration with that seed. A variant of the spec this plan does not hold (one that no tune
        point was chosen for) is skipped; a name that is no variant is a SpecError."""
        _check_variants(self.spec, variants)
        points: dict[str, dict[str, list[Resolved]]] = {}  # variant -> point -> its resolved seeds, in order
        for r in self.resolved:
            points.setdefault(r.variant, {}).setdefault(json.dumps(r.point, sort_keys=True, default=str), []).append(r)
        chosen = []
        for variant in variants or list(points):
            for held in points.get(variant, {}).values():
                by_seed = {r.seed: r for r in held}
                for seed in seeds or list(by_seed):
                    first = held[0]
                    chosen.append(by_seed.get(seed) or first._replace(
                        seed=seed, config=first.config.model_copy(update={"seed": seed})))
        return _assemble(self.spec, chosen, self.role, self.prepared)

    @property
    def train_runs(self) -> list[PlannedRun]:
        return [r for r in self.runs if r.kind == "train"]

    @property
    def quantize_runs(self) -> list[PlannedRun]:
        return [r for r in self.runs if r.kind == "quantize"]

    @property
    def identity(self) -> str:
        """What this plan's runs are compared on: each variant's configurations without their seeds.
        Plans of one spec with other seeds share it; an edited budget, base or variant changes it."""
        configs = sorted({(r.variant, r.kind, run_id(r.config.model_copy(update={"seed": 0}), r.kind)) for r in self.runs})
        return hashlib.sha256(json.dumps(configs).encode()).hexdigest()[:16]


def default_optimizer() -> dict:
    """AdamW with every option at its default, as a run resolves a spec that names no optimizer."""
    return resolve("optimizer", DEFAULT_OPTIMIZER)


def run_id(config: RunConfig, kind: str = "train") -> str:
    identity = {
        "kind": kind,
        "model": config.model.to_dict(),
        "data": config.data.identity(),  # reads the data: its content hash
        # how many processes train it is not part of the experiment: the global batch is fixed
        # nor is the optimizer when it is the default AdamW: runs from before the optimizer family keep their ids
        "train": config.train.model_dump(exclude={"distributed"} | ({"optimizer"} if config.train.optimizer == default_optimizer() else set())),
        "seed": config.seed,
    }
    if config.plugins:  # an edited plugin is new code: its runs train again
        identity["plugins"] = config.plugins
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _key(config: RunConfig, kind: str = "train") -> str:
    """Identifies a run within one plan without reading the data (the data's settings stand for it)."""
    return f"{kind}:{config.model_dump_json()}"


def expand(spec: Spec, sources: SourceMap, only: list[str] | None = None, seeds: list[int] | None = None,
           device: str | None = None, prepare: bool = True, tuning: bool = False,
           tuned: dict[str, dict[str, Any]] | None = None) -> Plan:
    """Every run of the study, validated; quantized variants get (and depend on) a float run.

    tuning=True: the tuning runs (role 'tune') — every tune point of each variant on the tuning seeds.
    tuned: each variant's chosen tune point (``analysis.choose_tuned``); its eval runs train at it,
    on the evaluation seeds. prepare=False plans without touching the data (see the module's docstring)."""
    try:
        plugins = load_plugins(spec.plugins)
    except ComponentError as e:
        raise SpecError(f"{sources.locate(('plugins',))}: plugins: {e}") from None
    _check_kernel_names(spec, sources)
    _check_variants(spec, only)
    resolved = []
    for variant in only or list(spec.variants):
        if tuned is not None and variant not in tuned:
            continue  # no eligible tune point: nothing to evaluate
        grid = spec.tune_grid(variant) if tuning else spec.sweep
        keys = list(grid)
        variant_base = spec.variant_base(variant)
        points = [tuned[variant]] if tuned is not None else [
            dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
        for point in points:
            config = variant_base
            for key, value in point.items():
                config = set_dotted(config, key, value)
            if device:
                config = set_dotted(config, "train.device", device)
            for seed in spec.tune_seed_list if tuning else seeds or spec.seed_list:
                run = _resolve(config, seed, variant, sources, plugins, prepare)
                _check_runs_here(run, variant, sources)
                unknown = not prepare and vocab_pending(config.get("model", {}), run.data)
                resolved.append(Resolved(variant, point, seed, run, "vocab_size: determined when the data is prepared"
                                         if unknown else None))

    _check_same_val_set(spec, resolved, sources)
    _check_metric(spec, resolved, sources, prepare)
    return _assemble(spec, resolved, "tune" if tuning else "eval", prepare)


def _assemble(spec: Spec, resolved: list[Resolved], role: Literal["tune", "eval"], prepare: bool) -> Plan:
    """The plan of these resolved runs: one run per distinct configuration, each post-training
    quantized variant with (and after) the float run whose checkpoint it evaluates."""
    planned: dict[str, PlannedRun] = {}

    def add(key: str, make) -> PlannedRun:
        if key not in planned:
            planned[key] = make()
        return planned[key]

    def identify(run: RunConfig, kind: str = "train") -> str | None:
        return run_id(run, kind) if prepare else None

    for variant, point, seed, run, pending in resolved:  # runs that train
        if not post_training(run.model.to_dict()):
            add(_key(run), lambda: PlannedRun(identify(run), variant, point, seed, run, pending=pending, role=role))
    for variant, point, seed, run, pending in resolved:  # post-training quantization: evaluate a float run
        if post_training(run.model.to_dict()):
            float_run = run.model_copy(update={"model": run.model.model_copy(update={"quantization": None})})
            parent = add(_key(float_run), lambda: PlannedRun(  # usually the baseline's own run, trained once
                identify(float_run), f"{variant} (float)", point, seed, float_run, pending=pending, role=role))
            add(_key(run, "quantize"), lambda: PlannedRun(identify(run, "quantize"), variant, point, seed, run,
                                                          "quantize", parent.run_id, pending, role))
    runs = sorted(planned.values(), key=lambda r: r.kind == "quantize")  # float runs first
    return Plan(spec, runs, resolved, role, prepare)


def preparation(plan: Plan) -> list[str]:
    """What preparing the plan's data will do (downloads, tokenizing), each step once, in words."""
    steps: dict[str, None] = {}
    for r in plan.runs:
        for step in r.config.data.preparation():
            steps.setdefault(step)
    return list(steps)


def val_set(run: RunConfig) -> dict[str, Any]:
    """What a run's val loss is measured on: the data (its settings: the same corpus, task and
    tokenizer), the sequence length and the number of val sequences."""
    return {"data": run.data.model_dump(mode="json"), "seq_len": run.seq_len, "sequences": run.train.val_sequences}


def _check_same_val_set(spec: Spec, resolved: list, sources: SourceMap) -> None:
    """A verdict compares val losses: every run of a variant (all sweep points and seeds), and a variant
    and its reference, must be scored on the same val set — the same data, length and sequences.
    Variants on other data (another task) need a reference of their own (compare: {v: ref} or null)."""
    sets: dict[str, tuple[dict, Any]] = {}
    for variant, point, _, run, _ in resolved:
        mine = val_set(run)
        first = sets.setdefault(variant, (mine, point))
        if first[0] != mine:
            _val_set_error(spec, sources, f"variant '{variant}' at {first[1]}", first[0], f"variant '{variant}' at {point}",
                           mine)
    for variant, (mine, _) in sets.items():
        reference = spec.reference_of(variant)
        if reference in sets and sets[reference][0] != mine:
            _val_set_error(spec, sources, f"variant '{variant}'", mine, f"its reference '{reference}'",
                           sets[reference][0], variant)


def _val_set_error(spec: Spec, sources: SourceMap, first: str, a: dict, second: str, b: dict,
                   variant: str | None = None) -> None:
    if a["data"] != b["data"] or a["seq_len"] != b["seq_len"]:
        what = "data" if a["data"] != b["data"] else "sequence length"
        differing = {k: (a["data"].get(k), b["data"].get(k)) for k in {*a["data"], *b["data"]}
                     if a["data"].get(k) != b["data"].get(k)}
        detail = (", ".join(f"{k} {x!r} vs {y!r}" for k, (x, y) in sorted(differing.items()))
                  if differing else f"seq_len {a['seq_len']} vs {b['seq_len']}")
        where = sources.locate(("compare",), ("variants", variant or ""), ("baseline",), ())
        raise SpecError(f"{where}: compare: {first} and {second} train on different {what} ({detail}), so "
                        "their losses are not comparable: give it a reference on the same data under compare: "
                        f"({variant or 'variant'}: <a variant on its data>), or null to make it a reference of its own")
    where = sources.locate(("base", "train", "eval_batches"), ("base", "train"), ("base",))
    raise SpecError(f"{where}: train.eval_sequences: {first} is evaluated on {a['sequences']} val sequences and "
                    f"{second} on {b['sequences']} (eval_batches × batch_size): set base.train.eval_sequences so "
                    "that every run is scored on the same tokens")


def _check_metric(spec: Spec, resolved: list, sources: SourceMap, prepare: bool) -> None:
    """The study's metric must be measurable on every run: an extra evaluation length it names is one
    the runs evaluate, and an online loss needs every training batch unseen (checked once the data is
    prepared)."""
    metric = spec.metric
    if metric is None:
        return
    where = sources.locate(("metric",), ())
    length = re.fullmatch(r"val_\w+@(\d+)(_beyond)?", metric.name)
    for variant, _, _, run, _ in resolved:
        if length and int(length.group(1)) not in run.train.eval_lengths:
            raise SpecError(f"{where}: metric: {metric.name} needs train.eval_lengths to include {length.group(1)} "
                            f"(variant '{variant}' evaluates {run.train.eval_lengths or 'no extra lengths'})")
        if length and length.group(2) and int(length.group(1)) <= run.seq_len:
            raise SpecError(f"{where}: metric: {metric.name} is the loss beyond the training length, but variant "
                            f"'{variant}' trains at {run.seq_len} tokens")
        if metric.name == "online_loss" and prepare and (steps := budget_steps(run)):
            fresh = load_dataset(run.data).single_pass_steps(run.train.batch_size, run.seq_len)
            if steps > fresh:
                raise SpecError(f"{where}: metric: online_loss needs every training batch unseen, but variant '{variant}' "
                                f"trains {steps} steps and its data holds {fresh} steps of unseen batches of "
                                f"{run.train.batch_size}×{run.seq_len} tokens: train fewer steps, use more data, or "
                                "choose a metric measured on held-out data (val_loss)")


def _check_variants(spec: Spec, names: list[str] | None) -> None:
    """Variants asked for by name (--only) must be the spec's."""
    unknown = [v for v in names or [] if v not in spec.variants]
    if unknown:
        raise SpecError(f"--only {unknown[0]}: no such variant; variants: {', '.join(spec.variants)}")


def _check_kernel_names(spec: Spec, sources: SourceMap) -> None:
    """Components the kernels: section names that do not resolve: stop the study before anything trains."""
    if spec.kernels is None:
        return
    for path, message in spec.kernels.component_errors()[:1]:
        keys = tuple(str(k) for k in path if not isinstance(k, int))
        where = sources.locate(keys, keys[:3], keys[:2], ("kernels",))
        raise SpecError(f"{where}: {'.'.join(keys)}: {message}")


def _resolve(config: dict, seed: int, variant: str, sources: SourceMap, plugins: dict[str, str],
             prepare: bool) -> RunConfig:
    unknown = set(config) - {"model", "data", "train"}
    if unknown:
        key = sorted(unknown)[0]
        raise SpecError(f"{sources.locate(('variants', variant, key))}: variants.{variant}.{key}: unknown key "
                        "(a variant overrides model, data or train)")
    try:
        data = DATA.validate_python(config.get("data"))
    except ValidationError as e:
        raise SpecError(_locate_errors(e, config, variant, sources, prefix=("data",))) from None
    try:
        run = resolve_run(config.get("model", {}), data, config.get("train", {}), seed, prepare=prepare)
        used = used_plugins(run, plugins)
        return run.model_copy(update={"plugins": used}) if used else run
    except ValidationError as e:
        raise SpecError(_locate_errors(e, config, variant, sources)) from None
    except (ComponentError, ValueError) as e:  # e.g. an unknown tokenizer, found while loading data
        raise SpecError(f"{sources.locate(('variants', variant, 'data'), ('base', 'data'))}: "
                        f"variant '{variant}': data: {e}") from None
    except DataUnavailable as e:
        raise SpecError(f"{sources.locate(('variants', variant, 'data'), ('base', 'data'))}: "
                        f"variant '{variant}': data: {e}") from None


def used_plugins(run: RunConfig, plugins: dict[str, str]) -> dict[str, str]:
    """The spec's plugins (module -> source hash) that define a component this run's model or optimizer
    uses: an edit to one retrains the runs that use it, and only those."""
    modules = {get("optimizer", run.train.optimizer["name"]).factory.__module__}
    for family in COMPONENT_FIELDS:
        spec = getattr(run.model, family)
        if spec is not None:
            modules |= {c.factory.__module__ for c in components_of(family, spec)}
    return {m: h for m, h in plugins.items() if any(used == m or used.startswith(m + ".") for used in modules)}


def _locate_errors(error: ValidationError, config: dict, variant: str, sources: SourceMap, prefix: tuple = ()) -> str:
    lines = []
    data = config.get("data") or {}
    tags = {str(data.get("source")), str(data.get("task"))}
    for loc, message in problems(error):
        loc = (*prefix, *loc)
        if not loc and (key := re.match(r"([a-z_]+(?:\.[a-z_]+)+)=", message)):  # a check across fields names its key
            loc = tuple(key.group(1).split("."))
        if loc and loc[0] == "data":  # drop discriminated-union tags ('data.task.mqar.seq_len')
            loc = (loc[0], *[p for p in loc[1:3] if p not in tags], *loc[3:])
        budget = ("budget", *loc[1:]) if loc[:1] == ("train",) and len(loc) > 1 else None
        if budget and sources.written(budget):  # the budget shorthand is merged into train
            lines.append(f"{sources.written(budget)}: variant '{variant}': {'.'.join(budget)}: {message}")
            continue
        where = sources.locate(("variants", variant, *loc), ("base", *loc), ("sweep", *loc),
                               ("variants", variant, *loc[:-1]), ("base", *loc[:-1]), ("variants", variant), ())
        lines.append(f"{where}: variant '{variant}': {'.'.join(loc)}: {message}")
    return "\n".join(lines)


def _check_runs_here(run: RunConfig, variant: str, sources: SourceMap) -> None:
    """Refuse, before anything trains, a variant whose components cannot run on this machine."""
    from bench.hardware import resolve_device

    try:
        device = resolve_device(run.train.device)
    except RuntimeError as e:
        raise SpecError(f"{sources.locate(('variants', variant, 'train', 'device'), ('base', 'train', 'device'))}: "
                        f"variant '{variant}': {e}") from None
    distributed = run.train.distributed
    if distributed and distributed.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        where = sources.locate(("variants", variant, "train", "distributed"), ("base", "train", "distributed"), ())
        raise SpecError(f"{where}: variant '{variant}': strategy deepspeed needs deepspeed: "
                        "pip install 'archbench[distributed]'")
    attention = run.model.attention
    components = [(family, spec) for family in ("attention", "positional", "norm", "mlp", "moe", "quantization")
                  if isinstance(spec := getattr(run.model, family), dict)]
    if isinstance(attention.get("backend"), dict):
        components.append(("attention_backend", attention["backend"]))
    for family, spec in components:
        component = get(family, spec["name"])
        reason = component.unavailable_reason()
        if reason is None and family == "attention_backend" and device.type == "cpu":
            reason = component.limitation()  # e.g. FlexAttention: forward only on CPU
        reason = reason or component.device_reason(spec, device)  # e.g. an sdpa kernel that needs CUDA
        if reason:
            where = sources.locate(("variants", variant, "model"), ("base", "model"))
            raise SpecError(f"{where}: variant '{variant}': {family} '{spec['name']}' cannot train here: {reason}")
