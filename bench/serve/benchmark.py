"""Each variant of a study served under load: ``python -m bench.serve bench RESULTS_DIR``.

For every variant's first finished run (lowest seed) and every offered request rate of the sweep, a
fresh service process is started on the loopback interface (so each rate's queue and peaks are its
own), read for what it serves with (GET /health: device, dtype, kernel, quantization, batching),
driven by the open-loop load generator (``bench.serve.loadgen``: scheduled arrivals at the rate, after
warm-up requests that count nowhere) with the same prompts (windows of the run's validation split),
scraped for its KV-cache and batch peaks, and stopped. One row per (variant, rate) goes into the
store's ``serving`` table, each with its sweep's saturation point (``bench.serve.sweep``).

``--target URL`` drives an external OpenAI-compatible server (vLLM, or a service started by hand)
with a variant's prompts instead: nothing is started, the rows name the target and ``engine:
external``, and the model is ``--model`` or the first that GET /v1/models lists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import math
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench import hardware
from bench.config import RunConfig
from bench.data import load_dataset
from bench.pictures import tensor_png
from bench.results import load
from bench.serve.loadgen import (DEFAULT_PERCENTILES, SLO_METRICS, WarmupFailed, check_loopback, drive,
                                 needed_samples, percentile_name, summarise)
from bench.serve.sweep import annotate, rate_text
from bench.store import Store
from models.config import prefix_positions

STARTUP_SECONDS = 120.0  # a service that does not answer /health within this long failed to start
SERVICE_MAX_BATCH = 8  # the service's own --max-batch default
HEALTH_FIELDS = ("device", "dtype", "kernel", "quantization")  # what a row records of what served it


@dataclass
class LoadSettings:
    """What each variant is driven with (a spec's ``serving:``, or the command line)."""

    request_rate: list[float] = field(default_factory=lambda: [math.inf])  # offered requests/s, one row each
    burstiness: float = 1.0  # the gamma shape of the gaps between arrivals (1: Poisson)
    max_concurrency: int | None = None  # the most requests in flight (None: no cap)
    num_prompts: int = 100  # measured requests per rate
    warmup: int = 4  # requests sent and awaited first, in no metric
    prompt_len: int = 32
    new_tokens: int = 32
    goodput: dict[str, float] = field(default_factory=dict)  # SLOs in ms: ttft, tpot, e2el
    percentiles: list[float] = field(default_factory=lambda: list(DEFAULT_PERCENTILES))
    seed: int = 0  # the arrival schedule's
    timeout: float = 120.0
    max_batch: int | None = None  # the service's --max-batch (default: max_concurrency, else the service's 8)
    max_queue: int | None = None  # the service's --max-queue (default: the service's: no bound)

    def __post_init__(self):
        self.request_rate = sorted(float(r) for r in self.request_rate)
        problems = [f"request rates must be positive: {r}" for r in self.request_rate if not r > 0]
        problems += [f"goodput SLOs are on {', '.join(SLO_METRICS)}, not {k}" for k in self.goodput if k not in SLO_METRICS]
        problems += [f"a goodput SLO is a non-negative number of ms: {k}:{v}" for k, v in self.goodput.items() if not v >= 0]
        for p in self.percentiles:
            try:
                needed_samples(p)
            except ValueError as e:
                problems.append(str(e))
        if not self.burstiness > 0:
            problems.append(f"burstiness must be positive, got {self.burstiness}")
        for name in ("num_prompts", "prompt_len", "new_tokens", "max_concurrency", "max_batch", "max_queue"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be at least 1, got {value}")
        if self.warmup < 0:
            problems.append(f"warmup must be 0 or more, got {self.warmup}")
        if len(set(self.request_rate)) != len(self.request_rate):
            problems.append(f"request rates repeat: {', '.join(map(rate_text, self.request_rate))}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def service_max_batch(self) -> int:
        return self.max_batch or self.max_concurrency or SERVICE_MAX_BATCH

    def key(self) -> str:
        """A short hash of the settings: a spec's serving section is measured once per machine and key."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def served_runs(results, variants: list[str] | None = None) -> list[dict[str, Any]]:
    """Per variant, its finished run of the lowest seed (a post-training quantized variant's run serves
    its float run's checkpoint, quantized as it was evaluated: bench.serve.model)."""
    runs = results.runs
    runs = runs[(runs["status"] == "finished") & runs["kind"].isin(["train", "quantize"]) & runs["current"]]
    if "role" in runs:
        runs = runs[runs["role"].fillna("eval") == "eval"]
    if variants:
        unknown = sorted(set(variants) - set(runs["variant"]))
        if unknown:
            raise ValueError(f"no finished trained run of {', '.join(unknown)}; "
                             f"trained variants: {', '.join(sorted(set(runs['variant'])))}")
        runs = runs[runs["variant"].isin(variants)]
    chosen = runs.sort_values("seed").groupby("variant", sort=False).head(1)
    return [{"variant": r["variant"], "run_id": r["run_id"], "seed": int(r["seed"])} for _, r in chosen.iterrows()]


def prompts_for(run: RunConfig, n: int, prompt_len: int) -> list[list[int]] | list[dict]:
    """n prompts of prompt_len tokens: windows of the run's validation split (the same for every variant),
    cycled where the split has fewer than n; for image questions, each validation question (up to its
    answer) with its image as a base64 PNG."""
    data = load_dataset(run.data)
    seq_len = data.seq_len or prompt_len
    windows, targets, *images = data.val_batches(n, seq_len, n)[0]
    if not images:
        distinct = windows[:, :prompt_len].tolist()
    else:
        asked = [int((row >= 0).nonzero()[0]) + 1 for row in targets]  # through the position that answers
        distinct = [{"tokens": windows[i, :asked[i]].tolist(), "image": tensor_png(images[0][i])}
                    for i in range(len(windows))]
    if not distinct:
        raise ValueError("the validation split has no window to prompt with")
    return [distinct[i % len(distinct)] for i in range(n)]


def prompt_tokens(prompt: list[int] | dict) -> int:
    """A prompt's token count (a vision-language request's: its tokens', not its image's)."""
    return len(prompt["tokens"] if isinstance(prompt, dict) else prompt)


def _distinct(prompts: list) -> int:
    return len({json.dumps(p, sort_keys=True) for p in prompts})


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_service(run_dir: Path, max_batch: int, max_queue: int | None = None) -> Iterator[str]:
    """A service process for the run on a free loopback port; its URL. Stopped (killed if need be) on exit."""
    port = _free_port()
    command = [sys.executable, "-m", "bench.serve", str(run_dir), "--host", "127.0.0.1", "--port", str(port),
               "--max-batch", str(max_batch)]
    if max_queue is not None:
        command += ["--max-queue", str(max_queue)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the service for {run_dir} exited with {process.returncode}: "
                                   f"{(process.stderr.read() or '').strip()[-500:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1.0, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service for {run_dir} did not answer /health within {STARTUP_SECONDS:g} s")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()


def health(url: str) -> dict[str, Any]:
    """GET /health's JSON object ({} where there is none: an external server's is often empty)."""
    try:
        body = httpx.get(f"{url}/health", timeout=10.0, trust_env=False).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def first_model(url: str) -> str:
    """The first model id GET /v1/models lists (an OpenAI-compatible server's)."""
    try:
        response = httpx.get(f"{url}/v1/models", timeout=10.0, trust_env=False)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{url}/v1/models lists no model ({type(e).__name__}: {e}); give --model") from None


def scrape(url: str) -> dict[str, float]:
    """The service's gauges and counters by name (histograms left out), from GET /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10.0, trust_env=False).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if family.type in ("gauge", "counter")}


def measure(url: str, prompts: list, settings: LoadSettings, rate: float, *, external: bool = False,
            model: str | None = None) -> dict[str, Any]:
    """One row: the service at `url` driven at `rate` (see the module docstring)."""
    served = health(url)
    measurement = asyncio.run(drive(url, prompts, new_tokens=settings.new_tokens, request_rate=rate,
                                    burstiness=settings.burstiness, max_concurrency=settings.max_concurrency,
                                    warmup=settings.warmup, seed=settings.seed, timeout=settings.timeout,
                                    model=model, external=external))
    gauges = {} if external else scrape(url)
    # an external target's rows never stand for a spec's serving section (bench.run skips what is measured)
    return {"settings_key": settings.key() + ("@external" if external else ""),
            "engine": "external" if external else "archbench",
            "target": url if external else None, "model": model or served.get("model"),
            "prompt_len": max(map(prompt_tokens, prompts)), "new_tokens": settings.new_tokens,
            "distinct_prompts": _distinct(prompts), "seed": settings.seed,
            "max_batch": None if external else settings.service_max_batch,
            "max_queue": served.get("max_queue", settings.max_queue),  # the service's own default where not given
            "batching": served.get("batching"), **{k: served.get(k) for k in HEALTH_FIELDS},
            **summarise(measurement.outcomes, measurement.duration, goodput=settings.goodput,
                        percentiles=settings.percentiles, request_rate=rate, burstiness=settings.burstiness,
                        max_concurrency=settings.max_concurrency, warmup=len(measurement.warmup)),
            "kv_cache_bytes_peak": gauges.get("archbench_kv_cache_bytes_peak"),
            "max_batched": gauges.get("archbench_max_batched_sequences")}


def serve_variant(run_dir: Path | None, prompts: list, settings: LoadSettings, *, target: str | None = None,
                  model: str | None = None) -> list[dict[str, Any]]:
    """One row per offered rate (lowest first; a fresh service for each, or `target`), each with the
    sweep's id and saturation point."""
    rows = []
    for rate in settings.request_rate:
        if target is not None:
            rows.append(measure(target, prompts, settings, rate, external=True, model=model))
        else:
            with running_service(run_dir, settings.service_max_batch, settings.max_queue) as url:
                rows.append(measure(url, prompts, settings, rate))
    sweep = uuid.uuid4().hex[:12]
    for row in rows:
        row["sweep_id"] = sweep
    annotate(rows)
    return rows


def benchmark_study(results_dir: str | Path, settings: LoadSettings, variants: list[str] | None = None, *,
                    target: str | None = None, model: str | None = None) -> list[dict]:
    """Serve each variant's run under load (see the module docstring); store, print and return the rows.
    With `target`, drive that server once with the (first) variant's prompts instead."""
    results_dir = Path(results_dir)
    results = load(results_dir)
    if results.studies.empty:
        raise ValueError(f"{results_dir}: no study recorded in this store")
    study = str(results.studies["name"].iloc[0])
    chosen = served_runs(results, variants)
    if not chosen:
        raise ValueError(f"{results_dir}: no finished trained run to serve")
    if target is not None:
        if variants and len(variants) > 1:
            raise ValueError("--target drives one server: name at most one variant, whose prompts it is sent")
        chosen = chosen[:1]
        model = model or first_model(target)
    environment = hardware.environment()
    out = []
    store = Store(results_dir)
    try:
        for entry in chosen:
            run_dir = results_dir / "runs" / entry["run_id"]
            run = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
            prompts = prompts_for(run, settings.num_prompts, settings.prompt_len)
            longest = max(map(prompt_tokens, prompts)) + prefix_positions(run.model)  # an image's prefix too
            if target is None and longest + settings.new_tokens > run.model.block_size:
                raise ValueError(f"prompts of {longest} positions (--prompt-len, or the data's questions, and an "
                                 f"image's prefix) + --new-tokens {settings.new_tokens} exceed {entry['variant']}'s "
                                 f"block_size {run.model.block_size}")
            served = entry["variant"] if target is None else model
            try:
                rows = serve_variant(run_dir, prompts, settings, target=target, model=model)
            except WarmupFailed as e:
                raise ValueError(f"{served}: {e}") from None
            if target is not None:
                for row in rows:
                    row["prompts_of"] = entry["variant"]
            store.add_serving(study, entry["run_id"] if target is None else None, served, rows, environment)
            for row in rows:
                print(describe(served, entry["seed"] if target is None else None, row), flush=True)
            print(f"{served}: saturation at {rate_text(rows[0]['saturation_rate'])} requests/s offered ("
                  f"{rows[0]['saturation_note']})" if rows[0]["saturation_rate"] is not None
                  else f"{served}: {rows[0]['saturation_note']}", flush=True)
            out += [{"variant": served, "run_id": entry["run_id"] if target is None else None, **row} for row in rows]
    finally:
        store.close()
    return out


def describe(served: str, seed: int | None, row: dict) -> str:
    """A row as the command prints it."""
    cap = f"at most {row['max_concurrency']} in flight" if row["max_concurrency"] else "no cap in flight"
    arrivals = "all at once" if math.isinf(row["request_rate"]) else (
        "Poisson" if row["burstiness"] == 1 else f"gamma, burstiness {row['burstiness']:g}")
    where = f" at {row['target']}" if row.get("target") else ""
    goodput = ("" if row["request_goodput"] is None else
               f", goodput {row['request_goodput']:.2f}/s ({', '.join(f'{k} ≤ {v:g} ms' for k, v in row['goodput_slos'].items())})")
    lines = [f"serving {served}{f' (seed {seed})' if seed is not None else ''}{where} at {rate_text(row['request_rate'])} "
             f"requests/s offered ({arrivals}, {cap}; {row['num_prompts']} requests after {row['warmup']} warm-up, "
             f"excluded): {row['completed']} completed, {row['failed']} failed, {row['rejected']} rejected in "
             f"{row['duration']:.2f} s; {_rate(row['request_throughput'])} requests/s{goodput}, "
             f"{_rate(row['output_throughput'])} output tokens/s"]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL")):
        cells = [f"mean {_ms(row[f'mean_{name}_ms'])}", f"median {_ms(row[f'median_{name}_ms'])}"]
        cells += [f"{p} {_ms(row[f'{p}_{name}_ms'])}" for p in _percentile_keys(row)]
        lines.append(f"  {label}: {', '.join(cells)}")
    if row.get("max_batched") is not None:
        lines.append(f"  {row['max_batched']:.0f} batched at most, KV cache peak {row['kv_cache_bytes_peak']:.0f} bytes")
    if row["percentile_notes"]:
        lines.append(f"  (too few samples: {' · '.join(row['percentile_notes'])})")
    lines += [f"  error: {e}" for e in row["error_examples"]]
    return "\n".join(lines)


def _percentile_keys(row: dict) -> list[str]:
    return [percentile_name(p) for p in row["percentiles"]]


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} ms"


def _rate_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a request rate is a number of requests/s or inf, not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be positive, got {text}")
    return value


def _slo_arg(text: str) -> tuple[str, float]:
    name, _, value = text.partition(":")
    try:
        bound = float(value)
    except ValueError:
        bound = -1.0
    if name not in SLO_METRICS or not bound >= 0:
        raise argparse.ArgumentTypeError(f"a goodput SLO is KEY:MS with KEY one of {', '.join(SLO_METRICS)} and MS "
                                         f"a non-negative number of milliseconds, not {text!r}")
    return name, bound


def parser() -> argparse.ArgumentParser:
    """``python -m bench.serve bench``'s command line."""
    p = argparse.ArgumentParser(prog="python -m bench.serve bench",
                                description="Benchmark a study's runs as services under open-loop load "
                                            "(vLLM's benchmark semantics), one row per offered request rate.")
    p.add_argument("results_dir", help="a study's results folder (results/<name>)")
    p.add_argument("--variants", nargs="+", help="these variants only (default: every trained one)")
    p.add_argument("--request-rate", nargs="+", type=_rate_arg, default=[math.inf], metavar="RATE",
                   help="offered requests/s, one row each (inf: all at once; default inf); several make a sweep "
                        "whose saturation point is reported")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="the gamma shape of the gaps between arrivals (1: Poisson; lower: burstier)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight (default: no cap)")
    p.add_argument("--num-prompts", type=int, default=100, help="measured requests per rate (default 100: p99 needs 100)")
    p.add_argument("--warmup", type=int, default=4, help="requests sent and awaited first, in no metric (default 4)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request (max_tokens, ignore_eos)")
    p.add_argument("--goodput", nargs="+", type=_slo_arg, default=[], metavar="KEY:MS",
                   help="SLOs a request must all meet to count in goodput: ttft:MS tpot:MS e2el:MS (any subset)")
    p.add_argument("--percentiles", nargs="+", type=float, default=list(DEFAULT_PERCENTILES),
                   help="latency percentiles (default 50 90 99; pX needs ceil(100/(100-X)) samples)")
    p.add_argument("--seed", type=int, default=0, help="the arrival schedule's seed")
    p.add_argument("--max-batch", type=int, default=None,
                   help="the service's --max-batch (default: --max-concurrency, else the service's 8)")
    p.add_argument("--max-queue", type=int, default=None, help="the service's --max-queue: beyond it, 503s (rejected)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take before it counts as failed")
    p.add_argument("--target", default=None, metavar="URL",
                   help="drive this OpenAI-compatible server (e.g. vLLM) with the variant's prompts; start nothing")
    p.add_argument("--model", default=None, help="the model name sent to --target (default: the first of /v1/models)")
    for old, new in (("--concurrency", "--max-concurrency N (with --request-rate inf for the closed-loop test it was)"),
                     ("--requests", "--num-prompts")):
        p.add_argument(old, nargs="+", default=None, help=argparse.SUPPRESS, dest=f"old_{old[2:]}", metavar=new)
    return p


def main(argv: list[str]) -> int:
    """``python -m bench.serve bench ...`` (see the module docstring)."""
    p = parser()
    args = p.parse_args(argv)
    if args.old_concurrency is not None:
        p.error("--concurrency is gone: the load generator is open-loop (vLLM's): give --request-rate (requests/s, "
                "or inf) and --max-concurrency N for a cap on requests in flight")
    if args.old_requests is not None:
        p.error("--requests is now --num-prompts")
    if args.model is not None and args.target is None:
        p.error("--model names the model of a --target server")
    if args.target is not None:
        try:
            check_loopback(args.target)
        except ValueError:
            print(f"note: --target {args.target} is not on this machine: you are load-testing another host",
                  file=sys.stderr)
    try:
        settings = LoadSettings(request_rate=args.request_rate, burstiness=args.burstiness,
                                max_concurrency=args.max_concurrency, num_prompts=args.num_prompts, warmup=args.warmup,
                                prompt_len=args.prompt_len, new_tokens=args.new_tokens, goodput=dict(args.goodput),
                                percentiles=args.percentiles, seed=args.seed, timeout=args.timeout,
                                max_batch=args.max_batch, max_queue=args.max_queue)
    except ValueError as e:
        p.error(str(e))
    try:
        benchmark_study(args.results_dir, settings, variants=args.variants, target=args.target, model=args.model)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
