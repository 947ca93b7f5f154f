"""Run an ablation study: ``python -m bench.run ablations/attention.yaml``.

Trains every variant × sweep point × seed of the spec (skipping finished runs, resuming interrupted
ones), stores everything in results/<name>/results.db, and prints each comparison's verdict. With
adaptive seeds (``seeds: {min, max}``) it trains `min` seeds first, then one more seed at a time for
the comparisons still inconclusive, up to `max`. A spec with an error exits with status 2 and a
message naming the file, line and key.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
from pathlib import Path

import pandas as pd
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench import hardware, parallel
from bench.analysis import FLOAT, StudyAnalysis, StudySummary, analyse, study_tuning, summarise
from bench.config import budget_steps
from bench.executor import EXECUTORS, ExecutorUnavailable, executor_class
from bench.formatting import count, p_value, significant
from bench.plan import Plan, expand, preparation
from bench.progress import Progress
from bench.report import write_report
from bench.spec import SourceMap, Spec, SpecError, StudyDesign, load_spec
from bench.store import DONE, Results, Store, load
from bench.tracking import TRACKERS, StudyTracking, TrackingUnavailable, require_trackers
from models import flops_per_token, param_counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="a YAML spec, e.g. ablations/attention.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the expanded run table; train nothing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any spec key, e.g. --set base.train.steps=200 (repeatable)")
    p.add_argument("--only", nargs="+", metavar="VARIANT", help="run only these variants")
    p.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="these seeds instead of the spec's")
    p.add_argument("--out", help="results folder (default results/<name>)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="train on this device")
    p.add_argument("--workers", type=_workers, default=1, metavar="N|auto",
                   help="local processes sharing the store (each with cores/N threads); auto: the number that "
                        "trains the most steps per second here, measured once per machine and model shape")
    p.add_argument("--executor", type=_executor, default="local", metavar="NAME",
                   help=f"{' | '.join(sorted(EXECUTORS))} | module:Class: local processes, or ray (a local Ray "
                        "instance, or a cluster with --ray-address), or an executor of your own (bench.executor)")
    p.add_argument("--ray-address", help="with --executor ray: auto (a running cluster) or HOST:PORT")
    p.add_argument("--log", nargs="+", choices=sorted(TRACKERS), default=[], metavar="TRACKER",
                   help="also stream each run's step metrics (as stored) to tensorboard and/or wandb: one tracker "
                        "run per run, under the results folder (wandb offline unless WANDB_MODE is set); needs "
                        "pip install 'archbench[tensorboard]' / 'archbench[wandb]'; the store is unaffected")
    return p.parse_args(argv)


def _executor(text: str) -> str:
    """--executor: a registered name or module:Class that resolves to an executor."""
    try:
        executor_class(text)
    except ExecutorUnavailable as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--executor {text}: ")) from None
    return text


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of processes or auto, got {text!r}")
    return int(text)


def resolve_workers(args: argparse.Namespace, plan: Plan, world, console: Console) -> int:
    """--workers as a number: `auto` measured on the plan's first training run (one process under
    torchrun, with Ray, or when nothing trains)."""
    if args.workers != "auto":
        return args.workers
    if world.size > 1 or args.executor != "local" or not plan.train_runs:
        return 1
    from bench.workers import workers_decision  # torch: not needed to plan or dry-run

    decision = workers_decision(plan.train_runs[0].config)
    console.print(f"workers: {decision['workers']} ({decision['reason']})", markup=False, highlight=False)
    return decision["workers"]


def estimated_seconds(plan: Plan, store: Store | None) -> list[float | None]:
    """Each run's training time on this machine: its FLOPs at this machine's measured peak and the
    median MFU of runs already finished here (30% before any has)."""
    mfus = []
    if store is not None:
        mfus = store.finished_mfus(hardware.machine_id())
    mfu = statistics.median(mfus) if mfus else 0.3
    estimates = []
    for r in plan.runs:
        if r.kind == "quantize" or r.pending:  # a pending run's size is known once its data is prepared
            estimates.append(None)
            continue
        steps = budget_steps(r.config)
        if steps is None:
            estimates.append(r.config.train.seconds)
            continue
        device = hardware.resolve_device(r.config.train.device)
        peak = hardware.peak_matmul_flops(device, hardware.training_dtype(device, r.config.train.dtype))
        train = r.config.train
        per_token = flops_per_token(r.config.model, seq_len=r.config.seq_len)
        flops = steps * train.batch_size * r.config.seq_len * per_token
        evals = steps // train.eval_every + 1  # forward only: a third of a training step's FLOPs per token
        flops += evals * (train.val_sequences or 256) * r.config.seq_len * per_token / 3 * (1 + len(train.eval_lengths))
        estimates.append(flops / (peak * mfu))
    return estimates


def _processes(run) -> str:
    distributed = run.config.train.distributed
    if not distributed or run.kind != "train":
        return ""
    return f" ×{distributed.nproc} {distributed.label}"


def print_plan(plan: Plan, console: Console, store: Store | None) -> None:
    table = Table(title=f"{plan.spec.name}: {len(plan.runs)} runs", title_justify="left")
    for column in ("variant", "sweep", "seed", "kind", "params", "active", "FLOPs/token", "steps", "est. time"):
        table.add_column(column)
    total = 0.0
    for r, seconds in zip(plan.runs, estimated_seconds(plan, store)):
        total += seconds or 0
        sizes = ["after data"] * 3
        if not r.pending:
            counts = param_counts(r.config.model)
            sizes = [count(counts["total"]), count(counts["active"]),
                     count(flops_per_token(r.config.model, seq_len=r.config.seq_len))]
        steps = budget_steps(r.config) if r.kind == "train" and not (r.pending and r.config.train.flops) else None
        table.add_row(escape(r.variant), escape(", ".join(f"{k}={v}" for k, v in r.sweep.items()) or "-"),
                      str(r.seed), r.kind + _processes(r), *sizes,
                      str(steps) if steps else ("-" if r.kind == "quantize" else "time" if r.config.train.seconds
                                                else "after data"),
                      (f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s") if seconds else "-")
    console.print(table)
    for device, dtype in sorted({(r.config.train.device, r.config.train.dtype) for r in plan.runs}):
        reason = hardware.dtype_reason(device, dtype)
        if reason:
            console.print(f"dtype: auto on {device} → {reason}", markup=False, highlight=False)
    for step in preparation(plan):
        console.print(f"preparing the data will {step}", markup=False, highlight=False)
    pending = [r.pending for r in plan.runs if r.pending]
    if pending:
        console.print(f"{len(pending)} runs: {pending[0]} (their size, FLOPs and time are known then)",
                      markup=False, highlight=False)
    if plan.spec.kernels is not None:
        sections = [name for name, value in plan.spec.kernels if isinstance(value, BaseModel)]
        console.print(f"then times kernels: {', '.join(sections)}")
    design = plan.spec.design
    if design.tuned and plan.runs and plan.runs[0].role == "tune":
        variants = {r.variant for r in plan.runs}
        counts = sorted({math.prod(len(v) for v in design.tune_grid(variant.removesuffix(FLOAT)).values())
                         for variant in variants})
        points = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"  # grids per variant may differ
        per_run = total / len(plan.runs)
        more = len(variants) * len(design.seeds)
        total += more * per_run
        console.print(f"tuning: {points} points × tuning seeds {list(design.tune_seeds)} per variant; then each "
                      f"variant trains at its chosen setting on seeds {list(design.seeds)}: {more} more runs, about "
                      f"{more * per_run / 60:.1f} min", markup=False, highlight=False)
    console.print(f"estimated total on this machine: {total / 60:.1f} min" + (" for the runs of known size" if pending else "")
                  + " (nothing was trained or downloaded)")
    first, most = len(design.seeds), design.max_seeds
    if design.adaptive and most > first:
        per_seed = total / first
        console.print(f"adaptive seeds: comparisons still inconclusive after {first} seeds get one more seed at a "
                      f"time, up to {most}: at most {(most - first) * len(plan.runs) // first} more "
                      f"runs, about {per_seed * (most - first) / 60:.1f} min more")
    print_plugin_warnings(plan, console)


def print_plugin_warnings(plan: Plan, console: Console) -> None:
    """Warn about a plugin component whose FLOPs or initialisation would mislead the study."""
    from models.plugin_checks import plugin_warnings

    # each distinct model once; a run whose vocabulary is known only after the data is prepared too: no check reads it
    models = {repr(r.config.model): r.config.model for r in plan.runs}
    for warning in dict.fromkeys(w for model in models.values() for w in plugin_warnings(model)):
        console.print(f"warning: {warning}", markup=False, highlight=False, style="yellow")


def current_runs(results: Results, design: StudyDesign) -> pd.DataFrame:
    """The runs of the study's current plan in the store (any machine)."""
    runs = results.runs
    return runs[runs["current"] & (runs["study"] == design.name)]


def current_summary(results: Results, design: StudyDesign) -> StudySummary:
    """The verdicts of the study's current plan from the store, its machines' runs pooled: what adaptive
    seeds decide on."""
    return summarise(current_runs(results, design), design, curves=results.metrics)


def print_summary(analyses: list[StudyAnalysis], console: Console) -> None:
    """The end-of-run verdicts on each machine (``analysis.analyse``): the noise floor, one line per
    comparison, then the numbers."""
    if not analyses:
        console.print("no finished runs to summarise")
        return
    for analysis in analyses:
        if len(analyses) > 1:
            console.print(f"On {analysis.machine}:", markup=False, highlight=False)
        _print_verdicts(analysis.summary, console)


def _print_verdicts(summary: StudySummary, console: Console) -> None:
    variants = summary.variants
    metric = summary.metric
    console.print(summary.noise.sentence(summary.metric_name), markup=False, highlight=False)
    console.print(f"Verdicts on {summary.metric_label}: {summary.design.describe()}.", markup=False, highlight=False)
    for c in summary.comparisons:
        console.print(f"- {c.sentence()}", markup=False, highlight=False)
    table = Table(title=f"{summary.metric_name} over seeds against each reference", title_justify="left")
    for column in ("variant", "vs", "verdict", "Δ", "95% CI", "test", "n", "p", "p (adj.)", "MDE",
                   f"{summary.metric_name} (mean ± sd)", "params", "tokens/s", "failed/diverged"):
        table.add_column(column)
    by_variant = variants.set_index("variant")
    rows = [(c.variant, c) for c in summary.comparisons]
    compared = {c.variant for c in summary.comparisons}
    rows += [(v, None) for v in variants["variant"] if v not in compared]  # the baseline and untested ones
    for variant, c in rows:
        row = by_variant.loc[variant]
        style = {"better": "green", "worse": "red", "saturated": "yellow"}.get(c.verdict if c else "", "")
        own = "(baseline)" if variant == variants["variant"].iloc[0] else "(reference)"  # baseline first
        cells = [escape(variant), escape(c.reference) if c else own if not row["reference"] else "–",
                 f"[{style}]{c.verdict}[/{style}]" if c and style else (c.verdict if c else "–"),
                 significant(c.delta, sign=True) if c else "–",
                 f"{significant(c.ci_low, sign=True)} to {significant(c.ci_high, sign=True)}" if c else "–",
                 c.test if c else "–", str(c.n) if c else str(row["n"]), p_value(c.p) if c else "–",
                 p_value(c.p_adjusted) if c else "–", significant(c.mde) if c else "–",
                 f"{significant(row[f'{metric}_mean'], 4)} ± {significant(row[f'{metric}_sd'], 2)}",
                 count(row["params"]), count(row["tokens_per_s"]), f"{row['failed']}/{row['diverged']}"]
        table.add_row(*cells)
    console.print(table)


def print_failures(runs: pd.DataFrame, console: Console) -> None:
    for _, row in runs[runs["current"] & (runs["status"] == "failed")].iterrows():
        console.print(f"failed: {escape(row['variant'])} seed {row['seed']}: {escape(str(row['reason']))}")


def time_kernels(spec, folder: Path, store: Store, console: Console) -> None:
    """The spec's kernels section, timed after training (alone on the machine) and stored once per machine;
    `backend: auto` runs the study's recorded choices where a call matches one of its runs' on this machine."""
    import hashlib

    from bench.autotune import KernelChoices
    from bench.kernels import run_kernels

    key = hashlib.sha256(spec.kernels.model_dump_json().encode()).hexdigest()[:16]
    if key in store.kernel_spec_hashes(spec.name, hardware.machine_id()):
        console.print("kernel timings for this machine are already stored")
        return
    console.print("timing kernels ...")
    runs = load(folder).runs
    here = runs[(runs["study"] == spec.name) & (runs["machine_id"] == hardware.machine_id())]
    recorded = [c for choices in here.get("attention_choices", []) if isinstance(choices, list) for c in choices]
    rows = run_kernels(spec.kernels, kernels=KernelChoices(recorded))
    store.add_kernels(spec.name, [{**row, "spec_hash": key} for row in rows], hardware.environment())
    timed = [r for r in rows if r["status"] == "ok"]
    console.print(f"stored {len(rows)} kernel rows ({len(timed)} timed, {len(rows) - len(timed)} with a reason)")


def time_speed(spec: Spec, folder: Path, store: Store, console: Console) -> None:
    """The spec's speed section: each comparison's training steps timed side by side on this machine
    (after training, alone on it), at each side's first evaluation run; stored once per machine and pair."""
    import hashlib

    import torch

    from bench.config import RunConfig
    from bench.speed import paired_speed

    runs = load(folder).runs
    machine = hardware.machine_id()
    done = runs[runs["current"] & (runs["study"] == spec.name) & (runs["status"] == "finished") & (runs["kind"] == "train")
                & (runs["role"] != "tune") & (runs["machine_id"] == machine)].sort_values("seed")
    first = done.drop_duplicates("variant").set_index("variant")
    stored = store.kernel_spec_hashes(spec.name, machine)
    for variant, reference in spec.design.pairs:
        if variant not in first.index or reference not in first.index:
            continue
        a, b = first.loc[variant], first.loc[reference]
        if any(RunConfig.model_validate(r["config"]).train.distributed for r in (a, b)):
            continue  # a run on several processes is not one process's step
        key = hashlib.sha256(f"{spec.speed.model_dump_json()}|{a['run_id']}|{b['run_id']}".encode()).hexdigest()[:16]
        if key in stored:
            continue
        console.print(f"timing training steps: {variant} against {reference}, interleaved ...", markup=False, highlight=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(int(a["threads"]))  # as the runs trained (one per process with --workers 2)
        try:
            row = paired_speed(RunConfig.model_validate(a["config"]), RunConfig.model_validate(b["config"]), spec.speed)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: a row with the reason, not a crash
            row = {"component": "train_step", "status": "failed", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
        finally:
            environment = hardware.environment()  # the machine as the runs name it: with their thread count
            environment["hardware"] = {**environment["hardware"], "torch_threads": torch.get_num_threads()}
            torch.set_num_threads(threads)
        store.add_kernels(spec.name, [{**row, "name": variant, "reference": reference, "spec_hash": key}], environment)


def serve_under_load(spec, folder: Path, store: Store, console: Console) -> None:
    """The spec's serving section: each variant's run served under load (after training and kernels,
    alone on the machine), once per machine and settings: one row per variant and offered request rate,
    with each variant's saturation point."""
    from bench.serve.benchmark import LoadSettings, benchmark_study
    from bench.serve.sweep import rate_text

    settings = LoadSettings(**spec.serving.load_settings())
    if store.serving_measured(spec.name, hardware.machine_id(), settings.key()):
        console.print("serving measurements for this machine are already stored")
        return
    console.print(f"serving each variant under load at {', '.join(map(rate_text, settings.request_rate))} "
                  f"requests/s offered ...")
    benchmark_study(folder, settings)


def rounds(plan: Plan, study: Plan, sources: SourceMap, args: argparse.Namespace, folder: Path, world,
           console: Console):
    """The plans to execute in turn: `plan` (this invocation's part of the whole `study`: with tune:, the
    tuning runs), then with tune: each variant at its chosen setting on the evaluation seeds; then,
    with adaptive seeds, one more seed at a time for the variants in inconclusive comparisons (and
    their references), until every comparison is decisive or has `max` seeds. More seeds are selected
    from a plan already resolved, never planned again. Rank 0 decides; under torchrun every rank gets
    the same plan."""
    spec, design = study.spec, study.spec.design
    yield plan  # with tune:, the tuning runs
    evaluated = study  # the plan more seeds are selected from
    if design.tuned:
        chosen = None
        if world.main:
            tuning = study_tuning(current_runs(load(folder), design), design)
            chosen, none, flags = (tuning.chosen, tuning.none, tuning.flags) if tuning else ({}, {}, {})
            for variant, point in chosen.items():
                console.print(f"tuned {variant} on seeds {list(design.tune_seeds)}: "
                              + ", ".join(f"{k}={v}" for k, v in point.items()), markup=False, highlight=False)
                for flag in flags.get(variant, []):
                    console.print(f"  warning: {variant}: {flag}", markup=False, highlight=False)
            for variant, why in none.items():
                console.print(f"{variant}: {why}; it is not evaluated", markup=False, highlight=False)
        tuned = parallel.broadcast_object(chosen, world)
        evaluated = expand(spec, sources, only=args.only, seeds=args.seeds, device=args.device, tuned=tuned)
        yield evaluated
    if not design.adaptive or args.seeds:
        return
    for seed in range(len(design.seeds), design.max_seeds):
        pending = None
        if world.main:
            summary = current_summary(load(folder), design)
            waiting = [c for c in summary.comparisons if c.verdict == "inconclusive"]
            pending = [v for v in design.variants if v in summary.pending() and (not args.only or v in args.only)]
            if pending:
                console.print(f"seed {seed}: {len(waiting)} comparison(s) still inconclusive "
                              f"({', '.join(f'{c.variant} vs {c.reference}' for c in waiting)}): training seed {seed} "
                              f"of {', '.join(pending)}", markup=False, highlight=False)
        pending = parallel.broadcast_object(pending, world)
        if not pending:
            return
        yield evaluated.select(pending, [seed])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    world = parallel.world()  # under torchrun: rank 0 plans, claims, prints and stores; every rank trains
    console = Console(width=None if sys.stdout.isatty() else 160, quiet=not world.main)  # logs and pipes: wide
    try:
        if world.size > 1 and (args.workers != 1 or args.executor != "local"):
            raise SpecError("under torchrun the processes are one run's ranks: drop --workers and --executor")
        require_trackers(args.log)  # a missing extra fails here, before anything is prepared or trained
        spec, sources = load_spec(args.spec, args.set)
        design = spec.design
        if args.dry_run:  # reads, downloads and tokenizes nothing
            plan = expand(spec, sources, only=args.only, seeds=args.seeds, device=args.device, prepare=False,
                          tuning=design.tuned)
            folder = Path(args.out) if args.out else Path("results") / spec.name
            existing = Store(folder) if (folder / "results.db").exists() else None
            print_plan(plan, console, existing)
            return 0
        # the whole study, planned once (its data prepared): what its runs are compared on, whichever
        # variants this invocation runs
        study = expand(spec, sources, seeds=args.seeds, device=args.device, tuning=design.tuned)
        plan = study.select(args.only) if args.only else study
        identity = study.identity
    except (SpecError, TrackingUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folder = Path(args.out) if args.out else Path("results") / spec.name
    if world.size > 1:
        parallel.init_process_group(hardware.resolve_device(args.device or "auto"))

    store = Store(folder) if world.main else None
    if store:
        launcher = f"torchrun --nproc_per_node {world.size} -m bench.run " if world.size > 1 else "python -m bench.run "
        store.record_study(spec.name, spec.model_dump(mode="json"), launcher + shlex.join(argv), identity)
    kernel_error = None
    planned: set[str] = set()
    tracking = StudyTracking(args.log, spec.name, folder) if args.log and world.main else None
    try:
        executor = executor_class(args.executor)(workers=resolve_workers(args, plan, world, console),
                                                 address=args.ray_address)
        for round_plan in rounds(plan, study, sources, args, folder, world, console):
            planned |= {r.run_id for r in round_plan.runs}
            if store:
                store.add_runs(spec.name, round_plan.runs, identity)
            done = parallel.broadcast_object(
                {r.run_id for r in round_plan.runs if store and store.status(r.run_id) in DONE}, world)
            todo = [r for r in round_plan.runs if r.run_id not in done]
            console.print(f"{spec.name}: {len(round_plan.runs)} runs, {len(round_plan.runs) - len(todo)} already done "
                          f"→ {folder}")
            steps = sum(budget_steps(r.config) or 0 for r in todo if r.kind == "train") + sum(r.kind != "train" for r in todo)
            with Progress(len(todo), steps, console) as progress:
                events = tracking.follow(todo, progress) if tracking else progress
                executor.execute(Plan(spec, todo), folder, events if world.main else (lambda event: None))
        if world.main and world.size == 1 and spec.speed is not None:  # under torchrun the ranks are one run
            try:
                time_speed(spec, folder, store, console)
            except Exception as e:  # noqa: BLE001 - the trained runs are stored; summary and report still follow
                kernel_error = f"{type(e).__name__}: {e}"
                print(f"error: timing training speed failed ({kernel_error}); the trained runs are stored", file=sys.stderr)
        if world.main and spec.kernels is not None:
            try:
                time_kernels(spec, folder, store, console)
            except Exception as e:  # noqa: BLE001 - the trained runs are stored; summary and report still follow
                kernel_error = f"{type(e).__name__}: {e}"
                print(f"error: kernel timing failed ({kernel_error}); the trained runs are stored", file=sys.stderr)
        if world.main and spec.serving is not None:
            try:
                serve_under_load(spec, folder, store, console)
            except Exception as e:  # noqa: BLE001 - the trained runs are stored; summary and report still follow
                print(f"error: serving under load failed ({type(e).__name__}: {e}); the trained runs are stored; "
                      f"retry with: python -m bench.serve bench {folder}", file=sys.stderr)
    except KeyboardInterrupt:
        console.print("interrupted: rerun the same command to resume from the last checkpoints")
        return 130
    except ExecutorUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if tracking:
            tracking.close()
        if store:
            store.close()
    if world.size > 1:
        parallel.finish()
        if not world.main:
            return 0
    results = load(folder)
    runs = results.runs
    print_summary(analyse(current_runs(results, design), design, results.metrics), console)
    print_failures(runs, console)
    try:
        console.print(f"report: {write_report([folder])}")
    except Exception as e:  # noqa: BLE001 - the runs are stored; the report can be rewritten later
        print(f"error: the report could not be written ({type(e).__name__}: {e}); the results are in "
              f"{folder}/results.db — retry with: python -m bench.report {folder}", file=sys.stderr)
        return 1
    failed = runs["run_id"].isin(planned) & (runs["status"] == "failed")
    return 1 if failed.any() or kernel_error else 0


if __name__ == "__main__":
    sys.exit(main())
