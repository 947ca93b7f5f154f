"""A bounded async load generator for the service: a fixed number of streamed requests, at most
`concurrency` in flight, each with a timeout; it only ever targets the loopback interface.

Per request it records the time to the first token and the gaps between tokens (from the
server-sent events); per run, throughput and the latency percentiles the serving table stores.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
import numpy as np

LOOPBACK_NAMES = {"localhost"}


def check_loopback(url: str) -> None:
    """Refuse any target but this machine's loopback interface (a benchmark is not a load test of others)."""
    host = urlparse(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host in LOOPBACK_NAMES
    if not loopback:
        raise ValueError(f"the load generator only targets the loopback interface, not {host!r}")


@dataclass
class Outcome:
    """One request: whether it succeeded, when its tokens arrived (seconds from sending it)."""

    ok: bool
    arrivals: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] if self.arrivals else None

    @property
    def gaps(self) -> list[float]:
        return list(np.diff(self.arrivals)) if len(self.arrivals) > 1 else []


Prompt = list[int] | dict  # token ids, or a request's fields (a vision-language model's: tokens and image)


async def _one(client: httpx.AsyncClient, prompt: Prompt, new_tokens: int) -> Outcome:
    start = time.perf_counter()
    outcome = Outcome(ok=False)
    fields = prompt if isinstance(prompt, dict) else {"tokens": prompt}
    body = {**fields, "max_new_tokens": new_tokens, "stream": True}
    try:
        async with client.stream("POST", "/generate", json=body) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return outcome
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if "token" in event:
                    outcome.arrivals.append(time.perf_counter() - start)
                elif event.get("done"):
                    outcome.ok = True
                elif "error" in event:
                    outcome.error = event["error"]
    except (httpx.HTTPError, asyncio.TimeoutError) as e:
        outcome.error = f"{type(e).__name__}: {e}"
    return outcome


async def drive(url: str, prompts: list[Prompt], *, concurrency: int, new_tokens: int,
                timeout: float = 120.0) -> tuple[list[Outcome], float]:
    """Send every prompt (one streamed request each) with at most `concurrency` in flight; return the
    outcomes and the wall time from the first request to the last answer."""
    check_loopback(url)
    gate = asyncio.Semaphore(concurrency)

    async def bounded(client, prompt):
        async with gate:
            try:
                return await asyncio.wait_for(_one(client, prompt, new_tokens), timeout)
            except asyncio.TimeoutError:
                return Outcome(ok=False, error=f"no answer within {timeout:g} s")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, trust_env=False) as client:
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(bounded(client, p) for p in prompts))
        return list(outcomes), time.perf_counter() - start


def summarise(outcomes: list[Outcome], wall: float) -> dict[str, float | int | None]:
    """Throughput (requests/s and generated tokens/s over the wall time) and the p50/p90/p99 of the
    time to first token and of the inter-token latency, over the requests that succeeded."""
    ok = [o for o in outcomes if o.ok]
    ttft = [o.ttft for o in ok if o.ttft is not None]
    gaps = [g for o in ok for g in o.gaps]
    row: dict[str, float | int | None] = {
        "requests": len(outcomes), "errors": len(outcomes) - len(ok), "seconds": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else None,
        "tokens_per_s": sum(len(o.arrivals) for o in ok) / wall if wall > 0 else None,
    }
    for name, values in (("ttft", ttft), ("itl", gaps)):
        for q in (50, 90, 99):
            row[f"{name}_p{q}_s"] = float(np.percentile(values, q)) if values else None
    return row
