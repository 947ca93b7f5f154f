"""Ablation specs: YAML in, a validated ``Spec`` out, or a ``SpecError`` that names file:line and key.

    name: attention
    description: MHA vs MQA vs GQA on the Markov language
    extends: base.yaml              # inherit another spec; keys here override it
    plugins: [my_pkg.my_attention]  # modules that register components
    base: {model: {...}, data: {...}, train: {...}}
    variants:                       # named overrides of base (nested or dotted keys)
      mha: {}
      gqa: {model.attention: {name: gqa, n_kv_head: 2}}
    ladder:                         # instead of variants: a recipe ladder, each step on top of the one
      - gpt2: {}                    #   before and compared with it (and, in the report, with the first)
      - rope: {model.positional: rope}
    baseline: mha                   # default: the first variant
    compare: {gqa_window: gqa}      # optional: a variant's own reference (default: the baseline);
                                    # null: a reference itself, compared with nothing (another task)
    extrapolate_to: 1.0e21          # optional: compute multipliers also stated there (scaling studies)
    sweep: {model.n_embd: [64, 128]} # crossed with every variant, every point trained on the eval seeds
    cells:                          # crossed; every variant trained in every cell and compared with its
      model.n_embd: [32, 64, 128]   #   reference in the same cell: variants become variant@cell, e.g.
      data.seq_len: [64, 128, 256]  #   gla@n_embd=64,seq_len=128 (Zoology's MQAR grid; not with ladder, sweep)
    tune: {train.lr: [1e-3, 3e-3], tune_seeds: 1}  # each variant's setting, chosen on held-out seeds
                                    # (1000, 1001, ...), then trained on the eval seeds for the verdict
    seeds: 2                        # a count (0..n-1), a list, or {min: 2, max: 8}: adaptive seeds
    metric: val_loss                # what verdicts test (bench.metrics): val_accuracy, online_loss,
                                    # {name: tokens_to_target, target: 1.0}, val_loss@256_beyond, ...
    margin: 0.01                    # equivalence margin of the metric (default: 0.01 nats or accuracy)
    saturation: 0.995               # the metric's bound: both sides at it on every seed = saturated
    alpha: 0.05                     # the rate of false verdicts the study allows
    paired_test: t                  # or permutation (exact sign-flip): how per-seed differences are tested
    budget: {steps: 300}            # shorthand for base.train's budget
    kernels: {attention: {...}}     # components to time as kernels here (bench.kernels.config)
    serving: {request_rate: [1, 4, inf]}  # serve each variant's run under load after training (bench.serve)
    speed: {rounds: 20}             # each comparison's training steps timed side by side (bench.speed;
                                    # the default; null: none, and no claim about training speed)
    finding:                        # a published direction this study tests (bench.findings)
      direction: RoPE beats learned absolute positions
      source: Su et al. 2021 (RoFormer)
      expect: {rope: better}        # the verdict(s) each comparison should reach

Merging (extends, variants, sweep, --set) is a deep merge, except that a mapping of another kind —
a component with a different ``name``, data with a different ``source`` or ``task`` — replaces the
old one instead of inheriting its options.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveInt, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from bench.kernels.config import KernelSpec
from bench.metrics import LEARNING_SPEED, MetricSpec
from bench.speed import SpeedSpec
from bench.stats import Design


class SpecError(Exception):
    """A spec that cannot run; the message names where and what was expected."""


# -- dicts --------------------------------------------------------------------------------------------


def expand_dotted(mapping: Any) -> Any:
    """{"model.attention": x} → {"model": {"attention": x}}, recursively."""
    if not isinstance(mapping, dict):
        return mapping
    out: dict = {}
    for key, value in mapping.items():
        parts = str(key).split(".")
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        leaf = expand_dotted(value)
        if isinstance(target.get(parts[-1]), dict) and isinstance(leaf, dict):
            target[parts[-1]] = deep_merge(target[parts[-1]], leaf)
        else:
            target[parts[-1]] = leaf
    return out


# keys that say what a mapping *is*, outermost first: a data source, a task, a component's name
DISCRIMINATORS = ("source", "task", "name")


def deep_merge(base: Any, override: Any) -> Any:
    """override on top of base; a mapping of another kind (new source, task or name) replaces the old,
    keeping only the outer discriminators it did not change (a new task stays a task source)."""
    if isinstance(base, str) and isinstance(override, dict) and "name" not in override:
        base = {"name": base}  # `attention: mha` then `attention: {window: 8}`: options for mha
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return copy.deepcopy(override)
    for i, key in enumerate(DISCRIMINATORS):
        if key in override and key in base and override[key] != base[key]:
            kept = {k: base[k] for k in DISCRIMINATORS[:i] if k in base and k not in override}
            return {**kept, **copy.deepcopy(override)}
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if key in merged else copy.deepcopy(value)
    return merged


def set_dotted(mapping: dict, dotted: str, value: Any) -> dict:
    return deep_merge(mapping, expand_dotted({dotted: value}))


# -- where a key was written --------------------------------------------------------------------------


@dataclass
class SourceMap:
    """Finds the file and line where a dotted key was written (child spec first, then what it extends)."""

    documents: list[tuple[str, yaml.Node]] = field(default_factory=list)
    set_keys: dict[str, str] = field(default_factory=dict)  # dotted key -> "--set k=v"

    def locate(self, *paths: tuple[str, ...]) -> str:
        """file:line of the first path that was written (or the --set that gave it)."""
        for path in paths:
            where = self.written(path)
            if where:
                return where
        return self.documents[0][0] if self.documents else "<spec>"

    def written(self, path: tuple[str, ...]) -> str | None:
        """Where `path` was written: the --set that set it (or a key above it), its file:line, or else
        a --set of a key below it (`--set base.modle.n_layer=2` for an unknown `base.modle`); None."""
        dotted = ".".join(map(str, path))
        for key, text in self.set_keys.items():
            if dotted == key or dotted.startswith(key + "."):
                return text
        for filename, root in self.documents:
            node = _find(root, [str(p) for p in path]) if path else root
            if node is not None:
                return f"{filename}:{node.start_mark.line + 1}"
        for key, text in self.set_keys.items():
            if path and key.startswith(dotted + "."):
                return text
        return None


def _find(node: yaml.Node, path: list[str]) -> yaml.Node | None:
    """The key node at the end of path, if the whole path was written (dotted keys count as levels)."""
    if not isinstance(node, yaml.MappingNode):
        return None
    for key_node, value_node in node.value:
        parts = str(key_node.value).split(".")
        if path[: len(parts)] == parts:
            rest = path[len(parts) :]
            found = _find(value_node, rest) if rest else key_node
            if found is not None:
                return found
    return None


# -- cells: every variant in every cell of a grid --------------------------------------------------------

CELL = "@"  # joins a variant and its cell: "gla@n_embd=64,seq_len=128" (safe in run tables, the store, --only)
# what a cell may set: a key of base, or a whole section whose values are mappings (keys that move
# together: data: [{seq_len: 64, num_kv_pairs: 4}, {seq_len: 128, num_kv_pairs: 8}])
CELL_KEY = re.compile(r"(model|data|train)(\.[A-Za-z0-9_]+)*")
_LABEL = re.compile(r"[A-Za-z0-9_.+-]+")  # a value as a cell's label shows it: no separator, no shell character


def _value_label(value: Any) -> str:
    """A cell value as its label shows it: 64, 0.001, true, window-window4 ({name: window, window: 4})."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, dict):
        name = [str(value["name"])] if "name" in value else []
        return "-".join(name + [f"{k}{_value_label(v)}" for k, v in value.items() if k != "name"])
    if isinstance(value, list):
        return "-".join(_value_label(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def cell_grid(cells: Mapping[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every cell of a ``cells:`` grid, the keys crossed (the first outermost), each with its label:
    ``key=value`` per key, joined by commas, a key named by its last segment (``n_embd=64,seq_len=128``;
    the whole dotted key where two keys end alike). A key whose values do not read as short distinct
    labels (mappings with symbols, long floats alike) labels them by position: ``attention=v1``."""
    short = [key.rsplit(".", 1)[-1] for key in cells]
    per_key = []
    for name, (key, values) in zip(short, cells.items()):
        name = name if short.count(name) == 1 else key
        labels = [_value_label(v) for v in values]
        if len(set(labels)) < len(labels) or not all(_LABEL.fullmatch(label) for label in labels):
            labels = [f"v{i}" for i in range(1, len(values) + 1)]
        per_key.append([(f"{name}={label}", value) for label, value in zip(labels, values)])
    return [(",".join(label for label, _ in combo), {key: copy.deepcopy(value) for key, (_, value) in zip(cells, combo)})
            for combo in itertools.product(*per_key)]


def cell_variants(variants: list[str], cells: Mapping[str, list[Any]]) -> dict[str, tuple[str, dict[str, Any]]] | None:
    """Each expanded variant ("gla@n_embd=64,seq_len=128") -> (its variant, its cell), when `variants` are
    exactly every variant in every cell of `cells` in the order ``Spec`` expands them; else None."""
    grid = cell_grid(cells)
    bases = list(dict.fromkeys(name.rpartition(CELL)[0] for name in variants))
    expected = {f"{base}{CELL}{label}": (base, cell) for base in bases for label, cell in grid}
    if not all(bases) or any(CELL in base for base in bases) or list(expected) != list(variants):
        return None
    return expected


def _cells_problem(cells: Any) -> str | None:
    """What is wrong with a ``cells:`` mapping's form (None: nothing), naming the key."""
    if not isinstance(cells, dict):
        return f"expected a mapping of dotted keys to lists of values, e.g. {{model.n_embd: [32, 64]}}, got {cells!r}"
    for key, values in cells.items():
        if not isinstance(key, str) or not CELL_KEY.fullmatch(key):
            return (f"'{key}' is not a key of base (model.<key>, data.<key> or train.<key>, e.g. "
                    "model.n_embd, data.seq_len; or a whole section, data, whose values are mappings)")
        if key in ("model", "data", "train") and isinstance(values, list) and not all(isinstance(v, dict) for v in values):
            return f"'{key}': a whole section's values are mappings of its keys, e.g. [{{seq_len: 64, num_kv_pairs: 4}}]"
        if not isinstance(values, list):
            return f"'{key}': expected a list of values, got {values!r}"
        if not values:
            return f"'{key}' has no values"
        seen = [json.dumps(v, sort_keys=True, default=str) for v in values]
        if len(set(seen)) < len(seen):
            return f"'{key}' repeats a value: {values!r}"
    return None


# -- the spec -----------------------------------------------------------------------------------------


TUNE_SEED_START = 1000  # tuning seeds by count start here: never among the evaluation seeds
STORED = "stored"  # validation context: a spec as the store holds it (its ladder already climbed)


class SeedRange(BaseModel):
    """Adaptive seeds: every variant starts with `min`; comparisons still inconclusive get one more
    seed at a time, up to `max` (seeds 0..max-1)."""

    model_config = ConfigDict(extra="forbid")
    min: int = Field(description="seeds every variant trains first (0..min-1); at least 2")
    max: int = Field(description="the most seeds a comparison gets (0..max-1)")


class Base(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: dict[str, Any] = Field(default_factory=dict, description="the model (models.ModelConfig)")
    data: dict[str, Any] = Field(description="the data, one source (bench.data.DataConfig)")
    train: dict[str, Any] = Field(default_factory=dict, description="optimisation and budget (bench.config.TrainConfig)")


class ServingSpec(BaseModel):
    """Each variant's first finished run served under open-loop load after training, one row per offered
    request rate (``python -m bench.serve bench``; vLLM's benchmark semantics)."""

    model_config = ConfigDict(extra="forbid")
    request_rate: list[float] = Field(default_factory=lambda: [float("inf")], min_length=1,
                                      description="offered requests/s, one load test each (inf: all at once); "
                                      "several make a sweep whose goodput saturation point is reported")
    burstiness: float = Field(1.0, gt=0, description="gamma shape of the gaps between arrivals (1: Poisson)")
    max_concurrency: PositiveInt | None = Field(None, description="most requests in flight (null: no cap)")
    num_prompts: PositiveInt = Field(100, description="measured streamed requests per rate (p99 needs 100)")
    warmup: int = Field(4, ge=0, description="requests sent and awaited before each rate's, in no metric")
    prompt_len: PositiveInt = Field(32, description="prompt tokens (validation windows)")
    new_tokens: PositiveInt = Field(32, description="tokens generated per request, greedy, ignore_eos")
    goodput: dict[Literal["ttft", "tpot", "e2el"], float] = Field(
        default_factory=dict, description="SLOs in ms a request must all meet to count in goodput "
        "(default: none; goodput is then the completed requests/s)")
    percentiles: list[float] = Field(default_factory=lambda: [50.0, 90.0, 99.0], min_length=1,
                                     description="latency percentiles; pX needs ceil(100/(100-X)) samples")
    seed: int = Field(0, description="the arrival schedule's seed")
    timeout: float = Field(120.0, gt=0, description="seconds a request may take before it counts as failed")
    max_batch: PositiveInt | None = Field(None, description="the service's batch limit (default: max_concurrency, "
                                          "else the service's 8)")
    max_queue: PositiveInt | None = Field(None, description="the service's waiting-queue limit: beyond it, 503s "
                                          "(rejected) (default: no limit)")
    concurrency: list[PositiveInt] | PositiveInt | None = Field(
        None, description="old (closed-loop) key: one level is read as max_concurrency with request_rate [inf]; "
        "several are refused (sweep request_rate instead)")
    requests: PositiveInt | None = Field(None, description="old name of num_prompts")

    @field_validator("request_rate")
    @classmethod
    def _rates(cls, value: list[float]) -> list[float]:
        if any(not r > 0 for r in value):
            raise ValueError(f"request rates are positive requests/s or inf, got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"request rates repeat: {value}")
        return sorted(value)

    @field_validator("goodput")
    @classmethod
    def _slos(cls, value: dict) -> dict:
        if any(not v >= 0 for v in value.values()):
            raise ValueError(f"goodput SLOs are non-negative milliseconds, got {value}")
        return value

    @field_validator("percentiles")
    @classmethod
    def _percentiles(cls, value: list[float]) -> list[float]:
        if any(not 0 < p < 100 for p in value):
            raise ValueError(f"percentiles are in (0, 100), got {value}")
        return value

    @model_validator(mode="after")
    def _old_keys(self, info: ValidationInfo) -> ServingSpec:
        """concurrency and requests, the closed-loop generator's keys, read in the new ones' terms."""
        stored = (info.context or {}).get(STORED)
        if self.requests is not None:
            if "num_prompts" in self.model_fields_set and not stored:
                raise ValueError("requests is the old name of num_prompts: give num_prompts alone")
            self.num_prompts, self.requests = self.requests, None
        if self.concurrency is not None:
            levels = [self.concurrency] if isinstance(self.concurrency, int) else list(self.concurrency)
            if not stored:
                if len(levels) > 1:
                    raise ValueError(f"concurrency {levels}: the load generator is open-loop now (vLLM's): sweep "
                                     "request_rate (requests/s, e.g. [1, 4, inf]) and cap the requests in flight with "
                                     "max_concurrency (one number)")
                if {"max_concurrency", "request_rate"} & self.model_fields_set:
                    raise ValueError("concurrency is the old key for max_concurrency at request_rate [inf]: give "
                                     "max_concurrency and request_rate alone")
            self.max_concurrency, self.request_rate, self.concurrency = max(levels), [float("inf")], None
        return self

    def load_settings(self) -> dict[str, Any]:
        """The fields ``bench.serve.benchmark.LoadSettings`` takes."""
        return self.model_dump(exclude={"concurrency", "requests"})


VERDICT_NAMES = ("better", "worse", "equivalent")


class FindingSpec(BaseModel):
    """A published direction a study tests: what the literature found, where, and the verdicts that
    agree with it (``bench.findings`` collects them into the findings table)."""

    model_config = ConfigDict(extra="forbid")
    direction: str = Field(min_length=1, description="the published result in words")
    source: str = Field(min_length=1, description="who found it")
    expect: dict[str, str | list[str]] = Field(min_length=1, description="variant -> the verdict(s) against its "
                                               "reference that agree with the direction (better, worse, equivalent)")
    order: list[str] | None = Field(None, description="the variants' expected order of means, best first (e.g. MHA, "
                                    "GQA, MQA): checked on the means, reported beside the verdicts")
    sanity: bool = Field(False, description="true by construction: a check of the suite, not a finding")

    @field_validator("expect")
    @classmethod
    def _verdicts(cls, value: dict) -> dict:
        for variant, expected in value.items():
            for verdict in [expected] if isinstance(expected, str) else expected:
                if verdict not in VERDICT_NAMES:
                    raise ValueError(f"expect.{variant}: '{verdict}' is not a verdict that agrees with anything; "
                                     f"use {', '.join(VERDICT_NAMES)}")
        return value


class Spec(BaseModel):
    """A validated ablation study; ``file`` and ``sources`` are where it came from."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="also the output folder name")
    description: str = Field("", description="the study's question, shown in the report")
    base: Base = Field(description="what every variant starts from: model, data, train")
    variants: dict[str, dict[str, Any]] = Field(min_length=1, description="name -> overrides of base (dotted or "
                                                "nested keys); {} is base itself")
    ladder: list[str] | None = Field(None, description="a recipe ladder: ordered named changes, each applied on top "
                                     "of the previous step and compared with it (the first step is the baseline)")
    baseline: str | None = Field(None, description="the variant the others are compared with (default: the first)")
    compare: dict[str, str | None] = Field(default_factory=dict, description="variant -> the variant it is compared "
                                           "with (default: the baseline); null: it is a reference, compared with none")
    extrapolate_to: float | None = Field(None, gt=0, description="compute (FLOPs) at which the report also states "
                                         "compute multipliers; default 100× the largest trained budget")
    sweep: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values, crossed with every "
                                        "variant; every point trained on the eval seeds")
    cells: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key of base -> values, crossed: "
                                        "every variant trained in every cell (variant@key=value,...) and compared "
                                        "with its reference in the same cell")
    tune: dict[str, Any] | None = Field(None, description="dotted key -> values, crossed, plus tune_seeds: each "
                                        "variant's setting is chosen on tuning seeds, then trained on the eval seeds")
    seeds: int | list[int] | SeedRange = Field(2, description="evaluation seeds: a count (0..n-1), a list, or "
                                               "{min, max}: adaptive seeds")
    metric: MetricSpec | None = Field(None, description="what the verdicts test (default: accuracy for tasks, "
                                      "else val loss)")
    margin: float | None = Field(None, ge=0, description="equivalence margin of the metric (default 0.01 for losses "
                                 "and accuracy; 0, no equivalence claims, for tokens_to_target)")
    saturation: float | None = Field(None, description="the metric's bound: a comparison whose every seed on both "
                                     "sides is at or beyond it is saturated (default: accuracy 0.995)")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="rate of false verdicts (better, worse or equivalent)")
    paired_test: Literal["t", "permutation"] = Field("t", description="how per-seed differences are tested: a "
                                                     "paired t-test or the exact sign-flip permutation test")
    budget: dict[str, Any] | None = Field(None, description="shorthand for base.train's budget: {steps: N}, "
                                          "{tokens: N}, {flops: X} or {seconds: S}")
    kernels: KernelSpec | None = Field(None, description="components timed as kernels after training (bench.kernels)")
    serving: ServingSpec | None = Field(None, description="each variant served under load after training (bench.serve)")
    speed: SpeedSpec | None = Field(default_factory=SpeedSpec, description="each comparison's training steps timed "
                                    "side by side after training; null: none (and no training-speed claims)")
    finding: FindingSpec | None = Field(None, description="a published direction this study tests (bench.findings)")
    plugins: list[str] = Field(default_factory=list, description="modules to import that register components; "
                               "their source hash is part of each run's id")

    @model_validator(mode="before")
    @classmethod
    def _climb_ladder(cls, data: Any, info: ValidationInfo) -> Any:
        """ladder: [{name: overrides}, ...] becomes one variant per step holding every change up to it,
        each compared with the step before (unless compare says otherwise), the first the baseline.
        A spec read back from the store (``STORED``) holds the climbed form already."""
        if not isinstance(data, dict) or data.get("ladder") is None or (info.context or {}).get(STORED):
            return data
        steps = data["ladder"]
        if "variants" in data:
            raise ValueError("give ladder: or variants:, not both (a ladder's steps are its variants)")
        if not isinstance(steps, list) or len(steps) < 2 or not all(
                isinstance(step, dict) and len(step) == 1 and isinstance(next(iter(step.values())), dict | None)
                for step in steps):
            raise ValueError("ladder: expected a list of at least two steps, each {name: overrides}, e.g. "
                             "[{gpt2: {}}, {rope: {model.positional: rope}}, {rmsnorm: {model.norm: rmsnorm}}]")
        names = [next(iter(step)) for step in steps]
        if len(set(names)) != len(names):
            raise ValueError(f"ladder: step names repeat: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
        variants, climbed = {}, {}
        for step, name in zip(steps, names):
            climbed = deep_merge(climbed, expand_dotted(step[name] or {}))
            variants[name] = copy.deepcopy(climbed)
        compare = {later: earlier for earlier, later in zip(names, names[1:])}
        return {**data, "ladder": names, "variants": variants, "baseline": data.get("baseline") or names[0],
                "compare": {**compare, **(data.get("compare") or {})}}

    @model_validator(mode="before")
    @classmethod
    def _fill_cells(cls, data: Any, info: ValidationInfo) -> Any:
        """cells: {key: [values], ...}: every variant in every cell (the keys crossed), named
        ``variant@key=value,...``, its overrides with the cell's values merged over them; each compared
        with its reference (compare's entry, else the baseline) in the same cell, the baseline's other
        cells with none; the baseline its first cell. A spec read back from the store (``STORED``)
        holds this form already; a spec that cannot expand is left as written, for the validators
        (``_cells_form``, the names of baseline and compare) to say why."""
        if not isinstance(data, dict) or not data.get("cells") or (info.context or {}).get(STORED):
            return data
        cells, variants, compare = data["cells"], data.get("variants"), data.get("compare") or {}
        if (_cells_problem(cells) or data.get("ladder") is not None or data.get("sweep") or not isinstance(variants, dict)
                or not variants or not isinstance(compare, dict)
                or not all(isinstance(o, dict | None) for o in variants.values())
                or any(not isinstance(n, str) or CELL in n for n in variants)):
            return data
        baseline = data.get("baseline") or next(iter(variants))
        if baseline not in variants or any(k not in variants or (v is not None and v not in variants)
                                           for k, v in compare.items()):
            return data
        grid = cell_grid(cells)
        expanded, references = {}, {}
        for name, overrides in variants.items():
            reference = None if name == baseline else compare.get(name, baseline)
            for i, (label, cell) in enumerate(grid):
                expanded[f"{name}{CELL}{label}"] = deep_merge(expand_dotted(overrides or {}), expand_dotted(cell))
                if name != baseline or i:
                    references[f"{name}{CELL}{label}"] = f"{reference}{CELL}{label}" if reference else None
        tune = data.get("tune")
        if isinstance(tune, dict):  # a grid per variant: each variant's grid in each of its cells
            tune = {key: {f"{name}{CELL}{label}": copy.deepcopy(grids[name]) for name in variants for label, _ in grid}
                    if isinstance(grids, dict) and set(grids) == set(variants) else grids for key, grids in tune.items()}
        return {**data, "variants": expanded, "baseline": f"{baseline}{CELL}{grid[0][0]}", "compare": references,
                **({"tune": tune} if tune is not None else {})}

    @field_validator("metric", mode="before")
    @classmethod
    def _metric_form(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"name": value}
        name = value.get("name") if isinstance(value, dict) else None
        if isinstance(name, str) and name not in LEARNING_SPEED and not re.fullmatch(
                r"val_(loss|accuracy|bpb)(@\d+(_beyond)?)?|val_accuracy_\w+|val_recall_(i2t|t2i)", name):
            raise ValueError(f"unknown metric '{name}': val_loss, val_accuracy, val_bpb, online_loss, tokens_to_target, "
                             "an extra evaluation length's val_loss@N / val_loss@N_beyond (train.eval_lengths), "
                             "image questions' val_accuracy_<question type>, or a contrastive model's "
                             "val_recall_i2t / val_recall_t2i")
        return value

    @field_validator("paired_test", mode="before")
    @classmethod
    def _no_bootstrap(cls, value: Any) -> Any:
        if value == "bootstrap":
            raise ValueError("bootstrap is not offered: at 2 to 40 seeds a paired bootstrap's false better/worse rate "
                             "measured 7-12% at α = 5%; use permutation (an exact sign-flip test) or t")
        return value

    @field_validator("variants", mode="before")
    @classmethod
    def _empty_overrides(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds_form(cls, value: Any) -> Any:
        def whole(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if isinstance(value, dict):
            if set(value) != {"min", "max"} or not all(map(whole, value.values())) or not 2 <= value["min"] <= value["max"]:
                raise ValueError(f"adaptive seeds are {{min: M, max: N}} with 2 ≤ M ≤ N, got {value!r}")
            return SeedRange(**value)
        if (whole(value) and value >= 1) or (isinstance(value, list) and value and all(map(whole, value))):
            return value
        raise ValueError(f"expected a count (2), a list of seeds ([0, 1, 5]) or {{min: 2, max: 8}}, got {value!r}")

    @field_validator("sweep")
    @classmethod
    def _nonempty_lists(cls, value: dict) -> dict:
        for key, values in value.items():
            if not values:
                raise ValueError(f"sweep '{key}' has no values")
        return value

    @field_validator("cells")
    @classmethod
    def _cells_form(cls, value: dict, info: ValidationInfo) -> dict:
        if not value:
            return value
        problem = _cells_problem(value)
        if problem:
            raise ValueError(problem)
        for other, why in (("ladder", "a ladder's steps are compared with each other, not cell by cell"),
                           ("sweep", "a sweep trains every point and judges each variant at its best one; cells "
                                     "judge every cell")):
            if info.data.get(other):
                raise ValueError(f"give cells: or {other}:, not both ({why})")
        variants = list(info.data.get("variants") or {})
        marked = [name for name in variants if CELL in name]
        if marked and cell_variants(variants, value) is None:  # not the expanded form (as the store holds it)
            example = f"{variants[0].partition(CELL)[0] or 'gla'}{CELL}{cell_grid(value)[0][0]}"
            raise ValueError(f"variants.{marked[0]}: a variant's name cannot hold '{CELL}' in a study with cells: "
                             f"it joins a variant and its cell ({example}); rename the variant")
        return value

    @field_validator("tune")
    @classmethod
    def _tune_form(cls, value: dict | None) -> dict | None:
        if value is None:
            return value
        seeds = value.get("tune_seeds", 1)
        if not ((isinstance(seeds, int) and not isinstance(seeds, bool) and seeds >= 1)
                or (isinstance(seeds, list) and seeds and all(isinstance(x, int) for x in seeds))):
            raise ValueError(f"tune_seeds: expected a count (1) or a list of seeds ([1000, 1001]), got {seeds!r}")
        keys = {k: v for k, v in value.items() if k != "tune_seeds"}
        if not keys:
            raise ValueError("tune: names no key to tune, e.g. tune: {train.lr: [1e-3, 2e-3, 4e-3], tune_seeds: 1}")
        for key, values in keys.items():
            # one grid for every variant, or a grid per variant (e.g. learning rates of different optimizers)
            for grid in values.values() if isinstance(values, dict) else [values]:
                if not isinstance(grid, list) or len(grid) < 2:
                    raise ValueError(f"tune '{key}' needs a list of at least two values to choose from (or one "
                                     f"such list per variant), got {grid!r}")
        return value

    @model_validator(mode="after")
    def _tune_seeds_are_held_out(self) -> Spec:
        if self.tune is None:
            return self
        if self.sweep:
            raise ValueError("give tune: or sweep:, not both (tune chooses each variant's setting on held-out seeds; "
                             "sweep trains every point on the eval seeds)")
        for key, values in self.tune.items():
            if isinstance(values, dict) and set(values) != set(self.variants):
                missing, extra = sorted(set(self.variants) - set(values)), sorted(set(values) - set(self.variants))
                raise ValueError(f"tune '{key}' gives a grid per variant: " + "; ".join(
                    ([f"no grid for {', '.join(missing)}"] if missing else [])
                    + ([f"no variant named {', '.join(extra)}"] if extra else [])))
        evaluated = set(range(self.seeds.max)) if isinstance(self.seeds, SeedRange) else set(self.seed_list)
        shared = sorted(evaluated & set(self.tune_seed_list))
        if shared:
            raise ValueError(f"tune_seeds {shared} are also evaluation seeds: a setting chosen on the seeds that test "
                             "it wins by chance (choose tuning seeds outside the evaluation seeds, e.g. from 1000)")
        return self

    @model_validator(mode="after")
    def _muon_adamw_part_is_tuned_too(self) -> Spec:
        """A tuned train.lr must reach Muon's AdamW part (embeddings, head, norms): a fixed adamw_lr beside it
        compares a tuned baseline with a half-tuned Muon."""
        if self.tune is None:
            return self
        for variant in self.variants:
            grid = self.tune_grid(variant)
            optimizer = expand_dotted(self.variant_base(variant)).get("train", {}).get("optimizer")
            if ("train.lr" in grid and isinstance(optimizer, dict) and optimizer.get("name") == "muon"
                    and optimizer.get("adamw_lr") is not None and "train.optimizer.adamw_lr" not in grid):
                raise ValueError(f"variants.{variant}: muon's adamw_lr is fixed at {optimizer['adamw_lr']} while train.lr is "
                                 "tuned, so its AdamW part (embeddings, head, norms) is never tuned: leave adamw_lr out "
                                 "(tied to train.lr; with adjust_lr: match_rms_adamw one lr suits both parts) or tune it "
                                 "too (tune: {train.optimizer.adamw_lr: [...]})")
        return self

    def tune_grid(self, variant: str) -> dict[str, list[Any]]:
        """The keys tuned for `variant` and their candidate values (crossed)."""
        return {k: v[variant] if isinstance(v, dict) else v for k, v in (self.tune or {}).items() if k != "tune_seeds"}

    @property
    def tune_seed_list(self) -> list[int]:
        """Tuning seeds: a list as given, or a count of seeds from 1000 (apart from evaluation seeds)."""
        seeds = (self.tune or {}).get("tune_seeds", 1)
        return list(seeds) if isinstance(seeds, list) else [TUNE_SEED_START + i for i in range(seeds)]

    @field_validator("baseline", "compare")
    @classmethod
    def _names_are_variants(cls, value: str | dict[str, str] | None, info: ValidationInfo):
        variants = info.data.get("variants")
        if variants is None:  # the variants themselves are invalid and reported as such
            return value
        names = [] if value is None else [value] if isinstance(value, str) else [*value, *filter(None, value.values())]
        for name in names:
            if name not in variants:
                raise ValueError(f"'{name}' is not a variant; variants: {', '.join(variants)}")
        return value

    @model_validator(mode="after")
    def _default_baseline(self) -> Spec:
        if self.baseline is None:
            self.baseline = next(iter(self.variants))
        return self

    @model_validator(mode="after")
    def _finding_names_compared_variants(self) -> Spec:
        if self.finding is None:
            return self
        for name in [*self.finding.expect, *(self.finding.order or [])]:
            if name not in self.variants:
                raise ValueError(f"finding: '{name}' is not a variant; variants: {', '.join(self.variants)}")
        for name in self.finding.expect:
            if self.reference_of(name) is None:
                raise ValueError(f"finding: expect.{name}: '{name}' is compared with nothing (the baseline, or a "
                                 "reference of its own): name a variant that has a reference")
        return self

    @property
    def seed_list(self) -> list[int]:
        """The seeds every variant trains first (with adaptive seeds, the first `min`)."""
        if isinstance(self.seeds, SeedRange):
            return list(range(self.seeds.min))
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    def reference_of(self, variant: str) -> str | None:
        """The variant this one is compared with: compare's entry, else the baseline; None for the
        baseline and for variants that compare names as references of their own (null)."""
        if variant == self.baseline:
            return None
        return self.compare[variant] if variant in self.compare else self.baseline

    def variant_base(self, variant: str) -> dict[str, Any]:
        """base with the budget shorthand and the variant's overrides applied: {model, data, train}."""
        base = self.base.model_dump()
        if self.budget:
            base["train"] = {**base["train"], **self.budget}
        return deep_merge(base, expand_dotted(self.variants[variant]))

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Spec:
        """A copy whose design is worked out again from its own fields (an update changes the design)."""
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("design", None)
        return copied

    @cached_property
    def design(self) -> StudyDesign:
        """The study's design, worked out once from this validated spec: what analysis, the report, the
        runner and the findings read instead of the spec itself."""
        return StudyDesign(
            name=self.name, description=self.description, variants=tuple(self.variants), baseline=self.baseline,
            compare=copy.deepcopy(self.compare), references={v: self.reference_of(v) for v in self.variants},
            ladder=tuple(self.ladder) if self.ladder else None, metric=self.metric, alpha=self.alpha,
            margin=self.margin, saturation=self.saturation, paired_test=self.paired_test, seeds=tuple(self.seed_list),
            max_seeds=self.seeds.max if isinstance(self.seeds, SeedRange) else None, sweep=copy.deepcopy(self.sweep),
            tune={k: copy.deepcopy(v) for k, v in (self.tune or {}).items() if k != "tune_seeds"},
            grids={v: copy.deepcopy(self.tune_grid(v)) for v in self.variants} if self.tune else {},
            tune_seeds=tuple(self.tune_seed_list) if self.tune else (), extrapolate_to=self.extrapolate_to,
            finding=self.finding, cells=copy.deepcopy(self.cells),
            cell_variants=(cell_variants(list(self.variants), self.cells) or {}) if self.cells else {})


@dataclass(frozen=True)
class StudyDesign:
    """What a study compares and how it decides, from its validated spec (``Spec.design``, the one place
    these are worked out: the default baseline, each variant's reference, the seeds, the tune grids).
    Analysis, the report, the runner and the findings read it; none of them reads the spec's keys.
    Treat it as read-only: its mappings and lists are copies, so a change to one changes no spec."""

    name: str
    description: str
    variants: tuple[str, ...]  # in the spec's order
    baseline: str
    references: Mapping[str, str | None]  # every variant -> the variant it is compared with (None: with none)
    compare: Mapping[str, str | None]  # the references the spec names itself
    ladder: tuple[str, ...] | None  # a recipe ladder's steps, in order (they are the variants)
    metric: MetricSpec | None  # None: accuracy for tasks, else val loss (``bench.metrics.metric_of``)
    alpha: float
    margin: float | None  # None: the metric's default margin
    saturation: float | None  # None: the metric's default bound
    paired_test: str
    seeds: tuple[int, ...]  # the seeds every variant trains first
    max_seeds: int | None  # adaptive seeds: inconclusive comparisons get more, up to this many
    sweep: Mapping[str, list[Any]]  # dotted key -> values, crossed with every variant
    tune: Mapping[str, Any]  # the tuned keys as the spec gives them (tune_seeds aside): what the report shows
    grids: Mapping[str, Mapping[str, list[Any]]]  # variant -> its tune grid (empty: nothing is tuned)
    tune_seeds: tuple[int, ...]
    extrapolate_to: float | None
    finding: FindingSpec | None
    cells: Mapping[str, list[Any]] = field(default_factory=dict)  # cells: dotted key -> values, crossed (empty: none)
    cell_variants: Mapping[str, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)  # variant@cell -> both

    @property
    def tuned(self) -> bool:
        """Whether each variant's setting is chosen on tuning seeds (``tune:``)."""
        return bool(self.grids)

    @property
    def adaptive(self) -> bool:
        """Whether inconclusive comparisons get more seeds (``seeds: {min, max}``)."""
        return self.max_seeds is not None

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """(variant, reference) of every variant compared with another, in the spec's order."""
        return tuple((v, ref) for v in self.variants if (ref := self.references.get(v)))

    def reference_of(self, variant: str) -> str | None:
        """The variant `variant` is compared with; None for the baseline and references of their own."""
        return self.references.get(variant)

    def cell_of(self, variant: str) -> tuple[str, dict[str, Any]] | None:
        """A study with cells: the variant as the spec names it and the cell's values ({dotted key: value})
        of an expanded variant ("gla@n_embd=64,seq_len=128" -> ("gla", {"model.n_embd": 64, ...})); None for
        any other name."""
        found = self.cell_variants.get(variant)
        return (found[0], dict(found[1])) if found else None

    @property
    def cell_grid(self) -> list[tuple[str, dict[str, Any]]]:
        """Every cell in order (the first key outermost), each with its label ("n_embd=64,seq_len=128")."""
        return cell_grid(self.cells) if self.cells else []

    @property
    def cell_names(self) -> tuple[str, ...]:
        """The variants as the spec names them, before cells expanded them (the variants where it has none)."""
        return tuple(dict.fromkeys(self.cell_variants[v][0] for v in self.variants)) if self.cell_variants else self.variants

    def in_cell(self, variant: str, label: str) -> str:
        """The expanded name of the spec's `variant` in the cell labelled `label`."""
        return f"{variant}{CELL}{label}"

    def tune_grid(self, variant: str) -> Mapping[str, list[Any]]:
        """The keys tuned for `variant` and their candidate values (empty where nothing is tuned)."""
        return self.grids.get(variant, {})

    def rule(self, metric: MetricSpec) -> Design:
        """The decision rule the study asks for on `metric`: its α, test and adaptive seeds, with the
        metric's default margin and saturation bound where the spec gives none."""
        return Design(alpha=self.alpha, margin=metric.default_margin if self.margin is None else self.margin,
                      paired_test=self.paired_test, min_seeds=len(self.seeds) if self.adaptive else None,
                      max_seeds=self.max_seeds,
                      bound=metric.default_bound if self.saturation is None else self.saturation)


def _compose(text: str, filename: str) -> tuple[Any, yaml.Node]:
    try:
        data = yaml.safe_load(text)
        return data, yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark else filename
        raise SpecError(f"{where}: malformed YAML: {getattr(e, 'problem', None) or e}") from None


def _read(path: Path, sources: SourceMap, seen: tuple[Path, ...] = ()) -> dict:
    """The raw spec dict with `extends` resolved (child wins); records each file for locating keys."""
    if path in seen:
        raise SpecError(f"{path}: extends itself through {' → '.join(map(str, seen))}")
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"{path}: cannot read spec ({e.strerror})") from None
    data, node = _compose(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}:1: a spec is a mapping of keys (name, base, variants, ...), got {type(data).__name__}")
    sources.documents.append((str(path), node))
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise SpecError(f"{sources.locate(('extends',))}: extends: expected a path to another spec")
    inherited = _read((path.parent / parent).resolve(), sources, (*seen, path))
    # key by key: the spec's own `name` must not trigger the component-replacement rule
    merged = {**inherited, **{k: deep_merge(inherited[k], v) if k in inherited else v for k, v in data.items()}}
    if "variants" in data:  # a child's variants replace the parent's list, keeping the child's order
        merged["variants"] = {k: deep_merge(inherited.get("variants", {}).get(k, {}), v or {})
                              for k, v in data["variants"].items()}
    return merged


def parse_set(assignment: str) -> tuple[str, Any]:
    """'base.train.steps=200' → ('base.train.steps', 200); values are YAML (numbers, lists, mappings)."""
    if "=" not in assignment:
        raise SpecError(f"--set {assignment}: expected KEY=VALUE, e.g. --set base.train.steps=200")
    key, raw = assignment.split("=", 1)
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", key):
        raise SpecError(f"--set {assignment}: '{key}' is not a dotted key")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise SpecError(f"--set {assignment}: value is not valid YAML ({e})") from None


def load_spec(path: str | Path, overrides: list[str] = ()) -> tuple[Spec, SourceMap]:
    """Read, merge (extends, --set) and validate a spec; SpecError names file:line and the dotted key."""
    path = Path(path)
    sources = SourceMap()
    raw = _read(path.resolve(), sources)
    sources.documents[0] = (str(path), sources.documents[0][1])  # the path as the user wrote it
    for assignment in overrides:
        key, value = parse_set(assignment)
        raw = set_dotted(raw, key, value)
        sources.set_keys[key] = f"--set {assignment}"
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(format_validation_error(e, sources)) from None
    return spec, sources


_UNION_MEMBER = re.compile(r"^(int|float|str|bool|none|list\[.*\]|dict\[.*\]|literal\[.*\])$", re.I)


def problems(error: ValidationError) -> list[tuple[tuple[str, ...], str]]:
    """(dotted location, message) per problem; a union's per-member errors fold into one."""
    out: list[tuple[tuple[str, ...], str]] = []
    alternatives: dict[tuple[str, ...], list[str]] = {}
    given: dict[tuple[str, ...], object] = {}
    for problem in error.errors():
        loc = tuple(str(p) for p in problem["loc"] if not str(p).startswith("function-"))
        if loc and _UNION_MEMBER.match(loc[-1]) and problem["type"] != "extra_forbidden":
            alternatives.setdefault(loc[:-1], []).append(loc[-1])
            given[loc[:-1]] = problem.get("input")
            continue
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        elif problem["type"] == "missing":
            message = "required key is missing"
        out.append((loc, message))
    for loc, kinds in alternatives.items():
        out.append((loc, f"expected {' or '.join(kinds)}, got {given[loc]!r}"))
    return out


def format_validation_error(error: ValidationError, sources: SourceMap) -> str:
    """One line per problem: 'file:line: dotted.key: what was expected'."""
    return "\n".join(f"{sources.locate(loc, loc[:-1], ())}: {'.'.join(loc) or '(top level)'}: {message}"
                     for loc, message in problems(error))
