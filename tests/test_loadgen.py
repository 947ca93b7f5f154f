"""The open-loop load generator (vLLM's semantics), its metrics, the rate sweep's saturation point, and the
serving benchmark end to end on one tiny trained study.

Scripted servers are small ASGI apps under uvicorn on the loopback interface that speak the service's
OpenAI-compatible streaming protocol; tests wait on their counters (state), never on elapsed time."""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from bench.serve.loadgen import (Outcome, WarmupFailed, arrival_times, check_loopback, drive, needed_samples,
                                 request_body, send, summarise)
from bench.serve.sweep import annotate, saturation_point

uvicorn = pytest.importorskip("uvicorn")
fastapi = pytest.importorskip("fastapi")


# -- a scripted OpenAI-compatible server ------------------------------------------------------------------


def chunk(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def token_chunk(i: int, text: str = "a") -> str:
    return chunk({"object": "text_completion", "choices": [{"index": 0, "text": text, "token_ids": [i],
                                                            "finish_reason": None}]})


class ScriptedServer:
    """POST /v1/completions: each request recorded; `reject(i)` answers request i with 503 (Retry-After),
    `fail(i)` with a 500 error object; the rest wait while `hold` is set, then stream `tokens` tokens, a
    finish chunk, a usage chunk and [DONE]. Counters under a condition: received, in flight, the most in
    flight, finished, and how many had finished when each request arrived."""

    def __init__(self, tokens: int = 3, hold: bool = False, reject=lambda i: False, fail=lambda i: False):
        self.tokens, self.reject, self.fail = tokens, reject, fail
        self.changed = threading.Condition()
        self.received = self.in_flight = self.most_in_flight = self.finished = 0
        self.bodies, self.finished_at_arrival = [], []
        self.released = threading.Event()
        if not hold:
            self.released.set()
        app = fastapi.FastAPI()
        app.post("/v1/completions")(self._completions)
        app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": "scripted", "object": "model"}]})
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", backlog=1024))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the scripted server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.released.set()
        self.server.should_exit = True
        self.thread.join(30)

    def _update(self, **changes):
        with self.changed:
            for name, delta in changes.items():
                setattr(self, name, getattr(self, name) + delta)
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.changed.notify_all()

    def wait(self, condition, timeout: float = 30.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: condition(self), timeout)

    async def _completions(self, request: fastapi.Request):
        from fastapi.responses import JSONResponse, StreamingResponse

        body = await request.json()
        with self.changed:
            i = self.received
            self.bodies.append(body)
            self.finished_at_arrival.append(self.finished)
        self._update(received=1, in_flight=1)
        if self.reject(i):
            self._update(in_flight=-1, finished=1)
            return JSONResponse({"error": {"message": "the queue is full", "type": "overloaded", "param": None,
                                           "code": 503}}, status_code=503, headers={"Retry-After": "1"})
        if self.fail(i):
            self._update(in_flight=-1, finished=1)
            return JSONResponse({"error": {"message": "boom", "type": "server_error", "param": None, "code": 500}},
                                status_code=500)
        while not self.released.is_set():
            await asyncio.sleep(0.005)

        async def events():
            try:
                for k in range(self.tokens):
                    yield token_chunk(k)
                yield chunk({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
                yield chunk({"choices": [], "usage": {"prompt_tokens": len(body["prompt"]),
                                                      "completion_tokens": self.tokens,
                                                      "total_tokens": len(body["prompt"]) + self.tokens}})
                yield chunk("[DONE]")
            finally:
                self._update(in_flight=-1, finished=1)

        return StreamingResponse(events(), media_type="text/event-stream")


def in_thread(coroutine):
    """Run `coroutine` in a thread of its own; (thread, the list its result goes into)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(coroutine)), daemon=True)
    thread.start()
    return thread, result


PROMPTS = [[1, 2, 3], [4, 5], [6]]


def prompts(n: int) -> list[list[int]]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


# -- arrivals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_open_loop_arrivals_follow_the_rate_and_the_burstiness(burstiness):
    rate = 5.0
    times = arrival_times(2000, rate, burstiness, seed=7)
    gaps = np.diff(times)
    assert times[0] == 0 and len(gaps) == 1999 and (gaps >= 0).all()
    assert abs(gaps.mean() - 1 / rate) < 0.1 / rate  # within 10% of 1/rate
    # gamma(shape b, scale 1/(r·b)): variance 1/(r²·b); burstier (smaller b) means more variable gaps
    assert gaps.var() == pytest.approx(1 / (rate**2 * burstiness), rel=0.2)
    assert np.array_equal(times, arrival_times(2000, rate, burstiness, seed=7))  # a seed, a schedule
    assert not np.array_equal(times, arrival_times(2000, rate, burstiness, seed=8))
    assert not arrival_times(5, math.inf).any()  # inf: every request at once


def test_the_sender_does_not_wait_for_earlier_requests():
    """A server that answers nothing until released: every request is in flight at once (open loop; more
    than httpx's default pool of 100 connections, which would close the loop)."""
    n = 120
    with ScriptedServer(hold=True) as server:
        thread, result = in_thread(drive(server.url, prompts(n), new_tokens=3, request_rate=400.0))
        assert server.wait(lambda s: s.in_flight == n), f"only {server.in_flight} of {n} in flight"
        server.released.set()
        thread.join(60)
    (measurement,) = result
    assert sum(o.ok for o in measurement.outcomes) == n and server.most_in_flight == n


def test_max_concurrency_caps_the_requests_in_flight():
    n, cap = 12, 3
    with ScriptedServer(hold=True) as server:
        thread, result = in_thread(drive(server.url, prompts(n), new_tokens=3, request_rate=math.inf,
                                         max_concurrency=cap))
        assert server.wait(lambda s: s.in_flight == cap)
        time.sleep(0.3)  # a grace period for requests beyond the cap to show up (none may)
        assert server.received == cap
        server.released.set()
        thread.join(60)
    (measurement,) = result
    assert sum(o.ok for o in measurement.outcomes) == n and server.most_in_flight == cap


def test_a_request_is_a_streamed_completion_of_token_ids():
    body = request_body([5, 6, 7], 4, None)
    assert body == {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0.0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
    image = request_body({"tokens": [1], "image": "iVBOR"}, 2, "tiny")
    assert image["prompt"] == [1] and image["image"] == "iVBOR" and image["model"] == "tiny" and "tokens" not in image


# -- warm-up, rejections, failures ------------------------------------------------------------------------


def test_warmup_requests_are_sent_and_awaited_first_and_counted_nowhere():
    with ScriptedServer() as server:
        measurement = asyncio.run(drive(server.url, prompts(5), new_tokens=3, warmup=3))
    assert server.received == 8 and len(measurement.warmup) == 3 and len(measurement.outcomes) == 5
    assert min(server.finished_at_arrival[3:]) >= 3  # the measured requests came after the warm-up finished
    row = summarise(measurement.outcomes, measurement.duration, warmup=len(measurement.warmup))
    assert (row["completed"], row["num_prompts"], row["warmup"]) == (5, 5, 3)
    assert all(b["stream"] and b["ignore_eos"] and b["stream_options"] == {"include_usage": True} for b in server.bodies)


def test_503s_count_as_rejected_not_completed_and_nothing_is_lost():
    n = 12
    with ScriptedServer(reject=lambda i: i % 3 == 0, fail=lambda i: i == 1) as server:
        measurement = asyncio.run(drive(server.url, prompts(n), new_tokens=2, request_rate=200.0))
    row = summarise(measurement.outcomes, measurement.duration)
    assert (row["completed"], row["failed"], row["rejected"]) == (7, 1, 4)
    assert row["completed"] + row["failed"] + row["rejected"] == n == server.received
    assert any("HTTP 503: the queue is full" in e for e in row["error_examples"])
    assert any("HTTP 500: boom" in e for e in row["error_examples"])


def test_a_target_that_serves_nothing_fails_the_warmup_with_the_reason():
    with ScriptedServer(fail=lambda i: True) as server:
        with pytest.raises(WarmupFailed, match="HTTP 500: boom"):
            asyncio.run(drive(server.url, prompts(3), new_tokens=2, warmup=2))
        assert server.received == 2  # nothing measured after a failed warm-up


def test_the_load_generator_targets_only_the_loopback_interface():
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000"):
        check_loopback(url)
    for url in ("http://10.0.0.2:8000", "http://example.com", "http://0.0.0.0:8000"):
        with pytest.raises(ValueError, match="loopback"):
            check_loopback(url)
        with pytest.raises(ValueError, match="loopback"):
            asyncio.run(drive(url, prompts(1), new_tokens=1))


# -- metric definitions -----------------------------------------------------------------------------------


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def scripted_stream(script: list[tuple[float, str]], clock: Clock) -> httpx.MockTransport:
    """A transport whose one response streams `script`'s chunks, setting the clock to each one's time."""
    async def body():
        for at, text in script:
            clock.now = at
            yield text.encode()

    return httpx.MockTransport(lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"},
                                                              content=body()))


async def _send_scripted(script, clock):
    async with httpx.AsyncClient(base_url="http://127.0.0.1:1", transport=scripted_stream(script, clock)) as client:
        return await send(client, [1, 2], 3, clock=clock)


def test_metrics_of_a_scripted_stream_are_vllms():
    clock = Clock()
    outcome = asyncio.run(_send_scripted([
        (0.1, token_chunk(0)), (0.2, token_chunk(1)), (0.4, token_chunk(2, text="")),  # a token with no text
        (0.45, chunk({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})),  # not a token
        (0.46, chunk({"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}})),
        (0.47, chunk("[DONE]"))], clock))
    assert outcome.ok and outcome.arrivals == [0.1, 0.2, 0.4] and outcome.tokens == 3
    assert outcome.ttft == 0.1 and outcome.itl == pytest.approx([0.1, 0.2])
    assert outcome.e2el == 0.45  # the last chunk with a choice, as vLLM's latency
    assert outcome.tpot == pytest.approx((0.45 - 0.1) / 2)
    # the server counts two tokens per chunk: TPOT from usage.completion_tokens, ITL per chunk
    outcome = asyncio.run(_send_scripted([
        (0.1, token_chunk(0)), (0.3, token_chunk(1)),
        (0.3, chunk({"choices": [{"index": 0, "text": "", "finish_reason": "length"}],
                     "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}})),
        (0.3, chunk("[DONE]"))], clock))
    assert outcome.tokens == 4 and outcome.tpot == pytest.approx(0.2 / 3) and outcome.itl == pytest.approx([0.2])
    # no usage: the chunks counted; a stream cut before its end is a failure
    outcome = asyncio.run(_send_scripted([(0.1, token_chunk(0)), (0.2, token_chunk(1))], clock))
    assert not outcome.ok and outcome.tokens == 2 and "without a finish reason" in outcome.error
    # an error object in the stream fails the request
    outcome = asyncio.run(_send_scripted([(0.1, token_chunk(0)), (0.2, chunk({"error": {"message": "oom"}}))], clock))
    assert not outcome.ok and outcome.error == "oom"


def _outcome(arrivals, tokens=None, prompt=2):
    return Outcome(True, list(arrivals), last=arrivals[-1], output_tokens=tokens, prompt_tokens=prompt)


OUTCOMES = [_outcome([0.1, 0.2, 0.4], 3),  # TTFT 100 ms, ITL 100 and 200, TPOT 150, E2EL 400
            _outcome([0.3, 0.4, 0.5, 0.6]),  # TTFT 300, ITL 100 × 3, TPOT 100, E2EL 600 (tokens counted: 4)
            _outcome([0.2], 1),  # TTFT 200, no ITL and no TPOT (one token), E2EL 200
            Outcome(False, [0.1], error="boom"),  # failed: in no latency
            Outcome(False, error="HTTP 503: full", rejected=True)]


def test_summaries_name_and_compute_the_metrics_as_vllm_does():
    row = summarise(OUTCOMES, 2.0, request_rate=4.0, burstiness=1.0, max_concurrency=8, warmup=2)
    assert (row["completed"], row["failed"], row["rejected"], row["num_prompts"]) == (3, 1, 1, 5)
    assert row["request_throughput"] == 1.5 and row["output_throughput"] == 4.0  # (3 + 4 + 1) tokens / 2 s
    assert row["total_input_tokens"] == 6 and row["total_token_throughput"] == 7.0
    assert (row["request_rate"], row["burstiness"], row["max_concurrency"], row["warmup"]) == (4.0, 1.0, 8, 2)
    approx = pytest.approx
    assert (row["mean_ttft_ms"], row["median_ttft_ms"], row["std_ttft_ms"]) == (approx(200), approx(200),
                                                                               approx(math.sqrt(20000 / 3)))
    assert (row["mean_tpot_ms"], row["median_tpot_ms"], row["p50_tpot_ms"]) == (approx(125), approx(125), approx(125))
    assert (row["mean_itl_ms"], row["median_itl_ms"], row["p50_itl_ms"]) == (approx(120), approx(100), approx(100))
    assert (row["mean_e2el_ms"], row["median_e2el_ms"]) == (approx(400), approx(400))
    assert row["p50_ttft_ms"] == approx(200) and row["p90_ttft_ms"] is None and row["p99_itl_ms"] is None
    assert row["request_goodput"] is None  # no SLOs given


def test_goodput_counts_only_requests_that_meet_every_slo():
    # the first request meets the TTFT bound but not the TPOT one; the second misses TTFT; the third (one
    # token, no TPOT) meets both; failed and rejected requests are never good
    row = summarise(OUTCOMES, 2.0, goodput={"ttft": 250, "tpot": 120})
    assert row["request_goodput"] == 0.5 and row["goodput_slos"] == {"ttft": 250, "tpot": 120}
    assert summarise(OUTCOMES, 2.0, goodput={"ttft": 250})["request_goodput"] == 1.0
    assert summarise(OUTCOMES, 2.0, goodput={"e2el": 600})["request_goodput"] == 1.5  # a bound is inclusive
    with pytest.raises(ValueError, match="ttft, tpot, e2el"):
        summarise(OUTCOMES, 2.0, goodput={"latency": 1})


def test_percentiles_are_none_below_their_sample_threshold():
    assert [needed_samples(p) for p in (50, 75, 90, 99, 99.9)] == [2, 4, 10, 100, 1000]
    few = [_outcome([0.01 * (i + 1), 0.01 * (i + 1) + 0.005], 2) for i in range(16)]
    row = summarise(few, 1.0)
    assert row["p50_ttft_ms"] is not None and row["p90_ttft_ms"] is not None and row["p99_ttft_ms"] is None
    assert "p99 of ttft, e2el needs ≥100 requests; 16 completed" in row["percentile_notes"]
    assert "p99 of itl needs ≥100 inter-token gaps; 16 measured" in row["percentile_notes"]
    enough = summarise(few * 7, 1.0, percentiles=[99, 99.9])  # 112 requests
    assert enough["p99_ttft_ms"] == pytest.approx(np.percentile([o.ttft for o in few * 7], 99) * 1e3)
    assert enough["p99.9_ttft_ms"] is None and "p50_ttft_ms" not in enough
    lone = summarise(few[:1], 1.0)
    assert lone["median_ttft_ms"] == pytest.approx(10) and lone["p50_ttft_ms"] is None  # a median, not a p50


# -- the saturation point ---------------------------------------------------------------------------------


def test_the_saturation_point_is_where_goodput_stops_rising():
    rates = [1, 2, 4, 8, math.inf]
    # rising, then flat: beyond 4 requests/s goodput rises by less than 5% (4.05 < 1.05 × 3.9)
    assert saturation_point(rates, [1, 2, 3.9, 4.0, 4.05]).rate == 4
    assert saturation_point(rates[::-1], [4.05, 4.0, 3.9, 2, 1]).rate == 4  # the order given does not matter
    # overload collapse: the peak
    assert saturation_point(rates, [1, 2, 1.5, 1.0, 0.2]).rate == 2
    # never saturating: rising at the last rate swept
    found = saturation_point([1, 2, 4, 8], [1, 2, 4, 8])
    assert found.rate is None and "not saturated" in found.note and "up to 8 requests/s" in found.note
    found = saturation_point(rates, [0, 0, 0, 0, 3])  # only every request at once gives more: above 8
    assert found.rate is None and "saturates above 8 requests/s" in found.note and "in between" in found.note
    # every request failed (or missed an SLO): no goodput at all
    found = saturation_point(rates, [0, 0, 0, None, 0])
    assert found.rate is None and "no goodput at any rate" in found.note
    assert saturation_point([4], [3]).rate is None and "one rate swept" in saturation_point([4], [3]).note


def test_a_sweeps_rows_carry_its_saturation_point_from_goodput_or_throughput():
    rows = [{"request_rate": r, "request_throughput": t, "request_goodput": g, "goodput_slos": {"ttft": 100}}
            for r, t, g in ((1, 1, 1), (2, 2, 1.02), (math.inf, 9, 1.0))]
    assert annotate(rows).rate == 1 and {r["saturation_rate"] for r in rows} == {1}  # goodput, not throughput
    for r in rows:
        r["goodput_slos"] = {}
    assert annotate(rows).rate is None and rows[0]["saturation_note"].startswith("saturates above 2 requests/s")


# -- end to end: a tiny trained study served under load ---------------------------------------------------

SERVING = {"request_rate": ["inf"], "max_concurrency": 1, "num_prompts": 4, "warmup": 1, "prompt_len": 8,
           "new_tokens": 4}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One tiny study (MHA, MQA, GLA; 10 steps), trained once for this file, whose serving section serves
    each variant one request at a time (its KV-cache peaks are then exact)."""
    import yaml

    from bench.run import main

    tmp_path = tmp_path_factory.mktemp("serving")
    spec = {"name": "tiny-serving", "base": {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "positional": "rope"},
        "data": {"source": "markov", "vocab_size": 16, "n_train_tokens": 20000, "n_val_tokens": 4096, "doc_len": 256},
        "train": {"batch_size": 4, "seq_len": 32, "eval_every": 10, "eval_batches": 2, "device": "cpu", "dtype": "float32"}},
        "budget": {"steps": 10}, "seeds": 1, "speed": None,
        "variants": {"mha": {}, "mqa": {"model.attention": "mqa"}, "gla": {"model.attention": "gla"}},
        "serving": SERVING}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path), "--out", str(tmp_path / "out")]) == 0
    return tmp_path / "out"


def test_a_spec_with_serving_serves_each_variant_under_load_and_the_report_shows_it(study):
    from bench.results import load

    serving = load(study).serving
    assert sorted(serving["variant"]) == ["gla", "mha", "mqa"] and (serving["request_rate"] == math.inf).all()
    for column in ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p50_ttft_ms",
                   "median_tpot_ms", "median_itl_ms", "median_e2el_ms", "kv_cache_bytes_peak", "max_batched",
                   "duration", "saturation_note", "sweep_id", "device", "dtype", "max_queue"):
        assert serving[column].notna().all(), column
    assert serving["p99_ttft_ms"].isna().all()  # 4 requests: no p99
    assert (serving["completed"] == 4).all() and (serving["errors"] == 0).all() and (serving["warmup"] == 1).all()
    assert (serving["engine"] == "archbench").all() and serving["target"].isna().all()
    # one request at a time (max_concurrency 1): MQA holds half MHA's keys and values (1 kv head of 2)
    assert (serving["max_batched"] == 1).all() and (serving["max_batch"] == 1).all()
    peaks = serving.set_index("variant")["kv_cache_bytes_peak"]
    assert peaks["mqa"] == peaks["mha"] / 2
    # a recurrent mixer holds its state, whatever the length: 2 heads × 8 key × 16 value channels, fp32
    assert peaks["gla"] == 2 * 8 * 16 * 4
    assert serving["saturation_note"].str.startswith("one rate swept").all() and serving["saturation_rate"].isna().all()
    html = (study / "report.html").read_text()
    section = html[html.index("<h2>Serving under load"):]
    for text in ("goodput against offered load", "most batched", "TPOT median / p99", "1 warm-up requests",
                 "at most 1 in flight", ">inf<", "none (one rate swept"):
        assert text in section, text


def test_the_command_line_sweeps_rates_for_one_variant_and_stops_every_service(study, capsys, monkeypatch):
    import contextlib

    from bench.results import load
    from bench.serve import benchmark
    from bench.serve.__main__ import main as serve

    before, started, real = _children(), [], benchmark.running_service

    @contextlib.contextmanager
    def watched(*args, **kwargs):  # the service processes each rate started, seen while they run
        with real(*args, **kwargs) as url:
            started.append(_children() - before)
            yield url

    monkeypatch.setattr(benchmark, "running_service", watched)
    count = len(load(study).serving)
    assert serve(["bench", str(study), "--variants", "gla", "--request-rate", "inf", "50", "--max-concurrency", "3",
                  "--num-prompts", "4", "--warmup", "1", "--prompt-len", "4", "--new-tokens", "4", "--max-queue", "7",
                  "--goodput", "ttft:60000", "e2el:60000"]) == 0
    assert len(started) == 2 and all(started)  # a fresh service per rate ...
    assert not (_children() & set().union(*started))  # ... stopped, none left behind
    out = capsys.readouterr().out
    assert "serving gla (seed 0) at 50 requests/s offered (Poisson, at most 3 in flight; 4 requests after 1 " \
           "warm-up, excluded): 4 completed, 0 failed, 0 rejected" in out
    assert "at inf requests/s offered (all at once, at most 3 in flight" in out
    assert "p99 of ttft, e2el needs ≥100 requests; 4 completed" in out
    assert "gla: saturation at 50 requests/s offered" in out or "gla: saturates above 50 requests/s" in out
    rows = load(study).serving.iloc[count:]
    assert rows["request_rate"].tolist() == [50.0, math.inf] and rows["sweep_id"].nunique() == 1
    assert (rows["variant"] == "gla").all() and (rows["max_concurrency"] == 3).all() and (rows["new_tokens"] == 4).all()
    assert (rows["max_queue"] == 7).all()  # passed to the service, as its /health says
    assert (rows["max_batch"] == 3).all()  # --max-batch defaults to --max-concurrency
    assert rows["request_goodput"].tolist() == pytest.approx(rows["request_throughput"].tolist())  # every request good
    assert rows["saturation_rate"].iloc[0] in (50.0,) or pd_missing(rows["saturation_rate"].iloc[0])
    assert rows["max_batched"].max() >= 2  # all at once, 3 in flight: batched
    state = 2 * 8 * 16 * 4  # the recurrent state per sequence
    assert (rows["kv_cache_bytes_peak"] == rows["max_batched"] * state).all()
    # a variant with no trained run is refused by name; the closed-loop flags say what replaced them
    assert serve(["bench", str(study), "--variants", "gqa"]) == 2
    for old, new in ((["--concurrency", "4"], "--max-concurrency"), (["--requests", "4"], "--num-prompts")):
        with pytest.raises(SystemExit):
            serve(["bench", str(study), *old])
        assert new in capsys.readouterr().err


def pd_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def test_an_external_target_is_driven_with_a_variants_prompts_and_recorded_as_external(study):
    """--target: nothing is started; the model is the first /v1/models lists; the row names the target."""
    from bench.results import load
    from bench.serve.benchmark import LoadSettings, benchmark_study

    with ScriptedServer(tokens=4) as server:
        rows = benchmark_study(study, LoadSettings(request_rate=[100.0, math.inf], num_prompts=5, warmup=2,
                                                   prompt_len=4, new_tokens=4), variants=["mqa"], target=server.url)
    assert server.received == 2 * (5 + 2) and {b["model"] for b in server.bodies} == {"scripted"}
    assert [len(b["prompt"]) for b in server.bodies] == [4] * 14  # the variant's validation windows
    assert [(r["variant"], r["engine"], r["target"], r["prompts_of"]) for r in rows] == [
        ("scripted", "external", server.url, "mqa")] * 2
    assert all(r["completed"] == 5 and r["kv_cache_bytes_peak"] is None and r["device"] is None for r in rows)
    stored = load(study).serving
    assert stored.iloc[-1]["variant"] == "scripted" and pd_missing(stored.iloc[-1]["run_id"])


def _children() -> set[int]:
    """Live child processes of this one (from /proc)."""
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == me and stat[0] != "Z":
                found.add(int(entry))
    return found


def test_every_variant_with_a_finished_run_is_served_post_training_quantized_ones_too():
    from types import SimpleNamespace

    import pandas as pd

    from bench.serve.benchmark import served_runs

    runs = pd.DataFrame({
        "variant": ["mha", "mha", "int8", "gqa", "gqa"], "run_id": ["m1", "m0", "q0", "g0", "g1"],
        "seed": [1, 0, 0, 0, 1], "kind": ["train", "train", "quantize", "train", "train"],
        "status": ["finished", "finished", "finished", "failed", "finished"], "current": [True] * 5})
    chosen = served_runs(SimpleNamespace(runs=runs))
    assert sorted((c["variant"], c["run_id"]) for c in chosen) == [("gqa", "g1"), ("int8", "q0"), ("mha", "m0")]
