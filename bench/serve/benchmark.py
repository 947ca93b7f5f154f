"""Each variant of a study served under load: ``python -m bench.serve bench RESULTS_DIR``.

For every variant's first finished run (lowest seed), and every concurrency level, a fresh service
process is started on the loopback interface (so each level's peaks are its own), driven with the
same prompts (windows of the run's validation split), scraped for its KV-cache and batch peaks, and
stopped. One row per (variant, concurrency) goes into the store's ``serving`` table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import socket
import subprocess
import sys
import time
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
from bench.serve.loadgen import drive, summarise
from bench.store import Store
from models.config import prefix_positions

STARTUP_SECONDS = 120.0  # a service that does not answer /health within this long failed to start


@dataclass
class LoadSettings:
    """What each variant is driven with (a spec's ``serving:``, or the command line)."""

    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    requests: int = 32
    prompt_len: int = 32
    new_tokens: int = 32
    timeout: float = 120.0
    max_batch: int | None = None  # the service's --max-batch (default: the largest concurrency)

    def key(self) -> str:
        """A short hash of the settings: a spec's serving section is measured once per machine and key."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def served_runs(results, variants: list[str] | None = None) -> list[dict[str, Any]]:
    """Per variant, its finished trained run of the lowest seed (post-training quantized variants keep
    no checkpoint of their own and are left out)."""
    runs = results.runs
    runs = runs[(runs["status"] == "finished") & (runs["kind"] == "train") & runs["current"]]
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
    """n prompts of prompt_len tokens: windows of the run's validation split (the same for every variant);
    for image questions, each validation question (up to its answer) with its image as a base64 PNG."""
    data = load_dataset(run.data)
    seq_len = data.seq_len or prompt_len
    windows, targets, *images = data.val_batches(n, seq_len, n)[0]
    if len(windows) < n:
        raise ValueError(f"the validation split has {len(windows)} windows, fewer than --requests {n}")
    if not images:
        return windows[:, :prompt_len].tolist()
    asked = [int((row >= 0).nonzero()[0]) + 1 for row in targets]  # through the position that answers
    return [{"tokens": windows[i, :asked[i]].tolist(),
             "image": tensor_png(images[0][i])} for i in range(n)]


def prompt_tokens(prompt: list[int] | dict) -> int:
    """A prompt's token count (a vision-language request's: its tokens', not its image's)."""
    return len(prompt["tokens"] if isinstance(prompt, dict) else prompt)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_service(run_dir: Path, max_batch: int) -> Iterator[str]:
    """A service process for the run on a free loopback port; its URL. Stopped (killed if need be) on exit."""
    port = _free_port()
    command = [sys.executable, "-m", "bench.serve", str(run_dir), "--host", "127.0.0.1", "--port", str(port),
               "--max-batch", str(max_batch)]
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


def scrape(url: str) -> dict[str, float]:
    """The service's gauges and counters by name (histograms left out), from GET /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10.0, trust_env=False).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if family.type in ("gauge", "counter")}


def serve_variant(run_dir: Path, prompts: list[list[int]], settings: LoadSettings) -> list[dict[str, Any]]:
    """One row per concurrency level: throughput, latency percentiles, peaks and errors."""
    max_batch = settings.max_batch or max(settings.concurrency)
    rows = []
    for concurrency in settings.concurrency:
        with running_service(run_dir, max_batch) as url:
            batching = httpx.get(f"{url}/health", timeout=10.0, trust_env=False).json()["batching"]
            outcomes, wall = asyncio.run(drive(url, prompts, concurrency=concurrency,
                                               new_tokens=settings.new_tokens, timeout=settings.timeout))
            gauges = scrape(url)
        errors = sorted({o.error for o in outcomes if o.error})
        rows.append({"settings_key": settings.key(), "concurrency": concurrency, "prompt_len": max(map(prompt_tokens, prompts)), "new_tokens": settings.new_tokens,
                     "max_batch": max_batch, "batching": batching, **summarise(outcomes, wall),
                     "kv_cache_bytes_peak": gauges.get("archbench_kv_cache_bytes_peak"),
                     "max_batched": gauges.get("archbench_max_batched_sequences"),
                     "error_examples": errors[:3]})
    return rows


def benchmark_study(results_dir: str | Path, settings: LoadSettings, variants: list[str] | None = None) -> list[dict]:
    """Serve each variant's run under load (see the module docstring); store and return the rows."""
    results_dir = Path(results_dir)
    results = load(results_dir)
    if results.studies.empty:
        raise ValueError(f"{results_dir}: no study recorded in this store")
    study = str(results.studies["name"].iloc[0])
    chosen = served_runs(results, variants)
    if not chosen:
        raise ValueError(f"{results_dir}: no finished trained run to serve")
    environment = hardware.environment()
    out = []
    store = Store(results_dir)
    try:
        for entry in chosen:
            run_dir = results_dir / "runs" / entry["run_id"]
            run = RunConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
            prompts = prompts_for(run, settings.requests, settings.prompt_len)
            longest = max(map(prompt_tokens, prompts)) + prefix_positions(run.model)  # an image's prefix too
            if longest + settings.new_tokens > run.model.block_size:
                raise ValueError(f"prompts of {longest} positions (--prompt-len, or the data's questions, and an "
                                 f"image's prefix) + --new-tokens {settings.new_tokens} exceed {entry['variant']}'s "
                                 f"block_size {run.model.block_size}")
            rows = serve_variant(run_dir, prompts, settings)
            store.add_serving(study, entry["run_id"], entry["variant"], rows, environment)
            for row in rows:
                print(f"serving {entry['variant']} (seed {entry['seed']}) at concurrency {row['concurrency']}: "
                      f"{row['tokens_per_s']:.0f} tokens/s, {row['requests_per_s']:.2f} requests/s, "
                      f"p99 time to first token {_ms(row['ttft_p99_s'])}, p99 inter-token {_ms(row['itl_p99_s'])}, "
                      f"{row['max_batched']:.0f} batched at most, {row['errors']} errors", flush=True)
            out += [{"variant": entry["variant"], "run_id": entry["run_id"], **row} for row in rows]
    finally:
        store.close()
    return out


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{1e3 * seconds:.1f} ms"


def main(argv: list[str]) -> int:
    """``python -m bench.serve bench ...`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m bench.serve bench",
                                     description="Benchmark a study's runs as services under concurrent load.")
    parser.add_argument("results_dir", help="a study's results folder (results/<name>)")
    parser.add_argument("--variants", nargs="+", help="these variants only (default: every trained one)")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--max-batch", type=int, default=None, help="the service's --max-batch (default: the largest concurrency)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take before it counts as an error")
    args = parser.parse_args(argv)
    for name in ("requests", "prompt_len", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.concurrency) < 1:
        parser.error("--concurrency levels must be at least 1")

    settings = LoadSettings(concurrency=args.concurrency, requests=args.requests, prompt_len=args.prompt_len,
                            new_tokens=args.new_tokens, timeout=args.timeout, max_batch=args.max_batch)
    try:
        benchmark_study(args.results_dir, settings, variants=args.variants)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
