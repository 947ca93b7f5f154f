"""An open-loop load generator for an OpenAI-compatible completions service, with vLLM's semantics
(``vllm/benchmarks/serve.py``).

Arrivals: request i is sent at a scheduled time, whether or not earlier requests have finished (so
queueing under overload shows in the latencies). The gaps between sends are drawn from a gamma
distribution with shape ``burstiness`` and scale ``1 / (rate · burstiness)`` (mean ``1 / rate``,
variance ``1 / (rate² · burstiness)``; burstiness 1 is a Poisson process) from a seeded numpy
Generator, so a schedule is reproducible; rate ``inf`` sends every request at once. An optional
``max_concurrency`` caps the requests in flight: a semaphore taken after the scheduled arrival, around
the send (as vLLM does). ``warmup`` requests are sent and awaited first and enter no metric.

Each request is ``POST /v1/completions`` with token ids as the prompt, ``max_tokens`` new tokens,
``temperature`` 0, ``ignore_eos``, streamed with ``stream_options.include_usage``. Per request:

- TTFT: from the send to the first content chunk (a chunk whose choice carries text or token ids, or
  no finish reason);
- ITL: every gap between consecutive content chunks (pooled over requests);
- E2EL: from the send to the last chunk with a choice (vLLM's ``latency``);
- TPOT: (E2EL − TTFT) / (output tokens − 1), for requests with more than one output token; output
  tokens from ``usage.completion_tokens`` when the server gives it, else the content chunks counted.

A 503 (or 429: the server's queue is full) is ``rejected``; any other failure is ``failed``; so
completed + failed + rejected = sent. ``summarise`` names its keys as vLLM's results do
(``mean_ttft_ms``, ``median_ttft_ms``, ``std_ttft_ms``, ``p99_ttft_ms``, …, ``request_throughput``,
``request_goodput``); a percentile pX is given only with at least ceil(100 / (100 − X)) samples (p50
needs 2, p90 10, p99 100), else None with a note saying why.

Without ``external``, only the loopback interface is a target (``check_loopback``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from urllib.parse import urlparse

import httpx
import numpy as np

LOOPBACK_NAMES = {"localhost"}
COMPLETIONS = "/v1/completions"
REJECTED_STATUS = (503, 429)  # the server is full: try again later (Retry-After)
SLO_METRICS = ("ttft", "tpot", "e2el")  # what --goodput may bound, in milliseconds
METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


def check_loopback(url: str) -> None:
    """Refuse any target but this machine's loopback interface (a benchmark is not a load test of others)."""
    host = urlparse(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host in LOOPBACK_NAMES
    if not loopback:
        raise ValueError(f"the load generator only targets the loopback interface, not {host!r} "
                         "(--target URL drives an external server)")


# -- arrivals ---------------------------------------------------------------------------------------------


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """When each of n requests is sent, in seconds from the first (which is sent at 0): gaps drawn from
    gamma(shape=burstiness, scale=1/(rate·burstiness)) by a numpy Generator seeded with `seed`; all at 0
    when the rate is infinite."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"the request rate and burstiness must be positive, got {rate} and {burstiness}")
    if n <= 0:
        return np.zeros(0)
    if math.isinf(rate):
        return np.zeros(n)
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


# -- one request ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request: whether it completed, when its content chunks arrived and when its last chunk did
    (seconds from sending it), the tokens it counted, and why it failed or was rejected."""

    ok: bool
    arrivals: list[float] = field(default_factory=list)  # content chunks
    last: float | None = None  # the last chunk with a choice (E2EL)
    output_tokens: int | None = None  # usage.completion_tokens, where the server gave it
    prompt_tokens: int = 0
    error: str | None = None
    rejected: bool = False
    sent_at: float | None = None  # seconds from the start of the run

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] if self.arrivals else None

    @property
    def itl(self) -> list[float]:
        return [float(g) for g in np.diff(self.arrivals)] if len(self.arrivals) > 1 else []

    @property
    def e2el(self) -> float | None:
        return self.last if self.last is not None else (self.arrivals[-1] if self.arrivals else None)

    @property
    def tokens(self) -> int:
        """Output tokens: the server's count where it gave one, else the content chunks."""
        return self.output_tokens if self.output_tokens is not None else len(self.arrivals)

    @property
    def tpot(self) -> float | None:
        """(E2EL − TTFT) / (output tokens − 1); None with one output token or none."""
        if not self.ok or self.tokens <= 1 or self.ttft is None:
            return None
        return (self.e2el - self.ttft) / (self.tokens - 1)


Prompt = list[int] | dict  # token ids, or a request's fields (a vision-language model's: tokens and image)


def request_body(prompt: Prompt, new_tokens: int, model: str | None) -> dict:
    """The JSON body of one streamed completion (token ids; an image as archbench's extension field)."""
    fields = dict(prompt) if isinstance(prompt, dict) else {"tokens": prompt}
    body = {"prompt": fields.pop("tokens"), "max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, **fields}
    if model is not None:
        body["model"] = model
    return body


def _error_message(text: str) -> str:
    """An error body as one line: OpenAI's error object's message, or the text."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text[:200]
    if isinstance(error, dict):
        return str(error.get("message"))[:200]
    return str(error)[:200] if error is not None else text[:200]


def _is_content(choice: dict) -> bool:
    """A chunk that carries a token: text or token ids, or (a token that decoded to nothing) no finish reason."""
    return bool(choice.get("text")) or bool(choice.get("token_ids")) or choice.get("finish_reason") is None


async def send(client: httpx.AsyncClient, prompt: Prompt, new_tokens: int, *, model: str | None = None,
               clock: Callable[[], float] = time.perf_counter) -> Outcome:
    """One streamed completion; its outcome (see the module docstring)."""
    fields = prompt if isinstance(prompt, dict) else {"tokens": prompt}
    outcome = Outcome(ok=False, prompt_tokens=len(fields["tokens"]))
    finished = False
    start = clock()
    try:
        async with client.stream("POST", COMPLETIONS, json=request_body(prompt, new_tokens, model)) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                outcome.rejected = response.status_code in REJECTED_STATUS
                outcome.error = f"HTTP {response.status_code}: {_error_message(text)}"
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                now = clock() - start
                event = json.loads(data)
                if event.get("error") is not None:
                    outcome.error = _error_message(data)
                    break
                if choices := event.get("choices"):
                    choice = choices[0]
                    if _is_content(choice):
                        outcome.arrivals.append(now)
                    outcome.last = now
                    finished = finished or choice.get("finish_reason") is not None
                if usage := event.get("usage"):
                    outcome.output_tokens = usage.get("completion_tokens", outcome.output_tokens)
                    outcome.prompt_tokens = usage.get("prompt_tokens") or outcome.prompt_tokens
    except (httpx.HTTPError, ValueError) as e:  # ValueError: a chunk that is not JSON
        outcome.error = f"{type(e).__name__}: {e}"
    if outcome.error is None and not outcome.arrivals:
        outcome.error = "the stream carried no token"
    elif outcome.error is None and not finished:
        outcome.error = "the stream ended without a finish reason or [DONE]"
    outcome.ok = outcome.error is None
    return outcome


# -- a run ------------------------------------------------------------------------------------------------


@dataclass
class Measurement:
    """A run's measured requests (warm-up left out), its duration (first scheduled send to last answer),
    and the warm-up requests' outcomes."""

    outcomes: list[Outcome]
    duration: float
    warmup: list[Outcome] = field(default_factory=list)


class WarmupFailed(RuntimeError):
    """Every warm-up request failed: the target does not serve these requests (the reason is the first's)."""


async def drive(url: str, prompts: Sequence[Prompt], *, new_tokens: int, request_rate: float = math.inf,
                burstiness: float = 1.0, max_concurrency: int | None = None, warmup: int = 0, seed: int = 0,
                timeout: float = 120.0, model: str | None = None, external: bool = False,
                transport: httpx.AsyncBaseTransport | None = None,
                clock: Callable[[], float] = time.perf_counter) -> Measurement:
    """Send `warmup` requests (the prompts' first, cycled) and await them; then send one request per
    prompt at its scheduled time (``arrival_times``), at most `max_concurrency` in flight when given,
    each allowed `timeout` seconds. `external`: `url` may be any host (else loopback only)."""
    if not external:
        check_loopback(url)
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    # no connection pool limit but the cap: httpx's default of 100 connections would close the loop
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency or 64)

    async def limited(client, prompt, start: float) -> Outcome:
        if gate is not None:
            await gate.acquire()
        try:
            sent_at = time.perf_counter() - start
            try:
                outcome = await asyncio.wait_for(send(client, prompt, new_tokens, model=model, clock=clock), timeout)
            except asyncio.TimeoutError:
                outcome = Outcome(ok=False, error=f"no answer within {timeout:g} s")
            outcome.sent_at = sent_at
            return outcome
        finally:
            if gate is not None:
                gate.release()

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout, pool=None), limits=limits,
                                 trust_env=False, transport=transport) as client:
        warm_prompts = [prompts[i % len(prompts)] for i in range(warmup)] if prompts else []
        warm = list(await asyncio.gather(*(limited(client, p, time.perf_counter()) for p in warm_prompts)))
        if warm and not any(o.ok or o.rejected for o in warm):
            raise WarmupFailed(f"every warm-up request to {url}{COMPLETIONS} failed: {warm[0].error}")
        offsets = arrival_times(len(prompts), request_rate, burstiness, seed)
        start = time.perf_counter()
        tasks = []
        for prompt, offset in zip(prompts, offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(client, prompt, start)))
        outcomes = list(await asyncio.gather(*tasks))
        return Measurement(outcomes, time.perf_counter() - start, warm)


# -- metrics ----------------------------------------------------------------------------------------------


def needed_samples(p: float) -> int:
    """The fewest samples a p-th percentile is reported from: ceil(100 / (100 − p)) (p50: 2, p90: 10, p99: 100)."""
    if not 0 < p < 100:
        raise ValueError(f"a percentile is in (0, 100), got {p}")
    return math.ceil(Fraction(100) / (Fraction(100) - Fraction(str(p))))


def percentile_name(p: float) -> str:
    """vLLM's spelling: p99, p99.9."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def _ms(values: list[float], fn) -> float | None:
    return float(fn(values)) * 1e3 if values else None


def meets(outcome: Outcome, slos: dict[str, float]) -> bool:
    """Whether a completed request meets every given SLO (milliseconds; ``ttft``, ``tpot``, ``e2el``); a
    request with one output token has no TPOT and meets a TPOT bound (as vLLM counts it)."""
    if not outcome.ok:
        return False
    values = {"ttft": outcome.ttft, "tpot": outcome.tpot or 0.0, "e2el": outcome.e2el}
    return all(values[name] * 1e3 <= bound for name, bound in slos.items())


def summarise(outcomes: list[Outcome], duration: float, *, goodput: dict[str, float] | None = None,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES, request_rate: float = math.inf,
              burstiness: float = 1.0, max_concurrency: int | None = None, warmup: int = 0) -> dict:
    """A run's row, named as vLLM's results are (see the module docstring). `goodput`: SLOs in ms by
    metric (``ttft``, ``tpot``, ``e2el``, any subset); without any, ``request_goodput`` is None."""
    unknown = set(goodput or {}) - set(SLO_METRICS)
    if unknown:
        raise ValueError(f"goodput SLOs are on {', '.join(SLO_METRICS)}, not {', '.join(sorted(unknown))}")
    done = [o for o in outcomes if o.ok]
    rejected = sum(o.rejected for o in outcomes)
    samples = {"ttft": [o.ttft for o in done], "tpot": [t for o in done if (t := o.tpot) is not None],
               "itl": [g for o in done for g in o.itl], "e2el": [o.e2el for o in done]}
    output = sum(o.tokens for o in done)
    prompt = sum(o.prompt_tokens for o in done)
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: None)
    row: dict = {
        "num_prompts": len(outcomes), "warmup": warmup, "completed": len(done), "failed": len(outcomes) - len(done) - rejected,
        "rejected": rejected, "duration": duration, "request_rate": float(request_rate), "burstiness": burstiness,
        "max_concurrency": max_concurrency, "total_input_tokens": prompt, "total_output_tokens": output,
        "request_throughput": per_s(len(done)), "output_throughput": per_s(output),
        "total_token_throughput": per_s(prompt + output),
        "request_goodput": per_s(sum(meets(o, goodput) for o in outcomes)) if goodput else None,
        "goodput_slos": dict(goodput or {}), "percentiles": [float(p) for p in percentiles],
    }
    notes: dict[tuple[str, int, str], list[str]] = {}
    for name in METRICS:
        values = samples[name]
        row[f"mean_{name}_ms"] = _ms(values, np.mean)
        row[f"median_{name}_ms"] = _ms(values, np.median)
        row[f"std_{name}_ms"] = _ms(values, np.std)
        for p in percentiles:
            need = needed_samples(p)
            enough = len(values) >= need
            row[f"{percentile_name(p)}_{name}_ms"] = float(np.percentile(values, p)) * 1e3 if enough else None
            if not enough:
                what = (f"inter-token gaps; {len(values)} measured" if name == "itl" else
                        f"requests; {len(values)} with a TPOT" if name == "tpot" else f"requests; {len(values)} completed")
                notes.setdefault((percentile_name(p), need, what), []).append(name)
    row["percentile_notes"] = [f"{p} of {', '.join(names)} needs ≥{need} {what}" for (p, need, what), names in notes.items()]
    row["error_examples"] = sorted({o.error for o in outcomes if o.error})[:3]
    return row
