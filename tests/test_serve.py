"""The serving engine and its HTTP service (the load generator and the serving benchmark: test_loadgen.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from bench.serve.engine import Engine, Sequence
from models import build_model
from tests.conftest import tiny

fastapi_testclient = pytest.importorskip("fastapi.testclient")


def model(**overrides):
    return build_model(tiny(**{"block_size": 64, "positional": "rope", **overrides}), seed=0).eval()


class Collector:
    """A sequence's emit callback: the tokens, and an event set once the sequence is done."""

    def __init__(self):
        self.tokens, self.done = [], threading.Event()

    def __call__(self, token):
        if token is None:
            self.done.set()
        else:
            self.tokens.append(token)


def greedy(m, prompt: list[int], n: int) -> list[int]:
    return m.generate(torch.tensor([prompt]), n, temperature=0)[0, len(prompt):].tolist()


# -- the engine: continuous batching equals decoding each request alone ------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"attention": {"name": "gqa", "n_kv_head": 2}}, {"positional": "learned"},
                                       {"attention": "gla", "hybrid": {"attention": "mha", "every": 2}}],
                         ids=["mha-rope", "gqa-rope", "mha-learned", "gla-mha-hybrid"])
def test_continuous_batching_generates_what_each_request_generates_alone(overrides):
    m = model(**overrides)
    prompts = [[1, 2, 3], [5, 8, 13, 21, 34, 5, 8], [7] * 12, [4, 9, 16, 25]]
    lengths = [10, 4, 12, 6]  # the second leaves early; the last joins while the others decode
    engine = Engine(m, max_batch=4).start()
    collectors = [Collector() for _ in prompts]
    try:
        for prompt, n, c in zip(prompts[:3], lengths, collectors):
            engine.submit(Sequence(prompt, n, c))
        while len(collectors[0].tokens) < 3:  # the batch is decoding
            time.sleep(0.001)
        engine.submit(Sequence(prompts[3], lengths[3], collectors[3]))
        assert all(c.done.wait(30) for c in collectors)
    finally:
        engine.stop()
    for prompt, n, c in zip(prompts, lengths, collectors):
        assert c.tokens == greedy(m, prompt, n)
    assert engine.batching == "continuous" and engine.max_batched >= 3
    assert engine.running == [] and engine.cache is None  # every sequence left; nothing held


def test_the_kv_budget_bounds_the_batch_and_everyone_is_still_served():
    m = model()
    per_token = Engine(m).bytes_per_token
    assert per_token == 2 * 2 * 32 * 4  # keys and values, 2 layers, 32 wide, fp32
    # room for two sequences of 4 + 8 tokens at once, not three
    engine = Engine(m, max_batch=8, kv_budget_bytes=2 * 12 * per_token).start()
    collectors = [Collector() for _ in range(5)]
    try:
        for i, c in enumerate(collectors):
            engine.submit(Sequence([i + 1, 2, 3, 4], 8, c))
        assert all(c.done.wait(30) for c in collectors)
    finally:
        engine.stop()
    assert engine.max_batched == 2
    assert engine.peak_kv_bytes <= 2 * 12 * per_token
    assert engine.fits_alone(24) and not engine.fits_alone(25)  # the service refuses what could never fit

    for i, c in enumerate(collectors):
        assert c.tokens == greedy(m, [i + 1, 2, 3, 4], 8)


def test_a_request_larger_than_the_kv_budget_is_refused():
    from bench.serve.app import create_app

    engine = Engine(model(), kv_budget_bytes=10 * 2 * 2 * 32 * 4)  # ten tokens
    with fastapi_testclient.TestClient(create_app(engine, None, max_tokens=64)) as client:
        response = client.post("/generate", json={"tokens": [1, 2, 3], "max_new_tokens": 8})
        assert response.status_code == 400 and "budget" in response.json()["error"]
        assert client.post("/generate", json={"tokens": [1, 2], "max_new_tokens": 8}).status_code == 200


def test_a_model_that_cannot_batch_rows_at_different_positions_is_served_one_at_a_time():
    m = model()
    m.new_cache = lambda: None  # as a model whose attention has no KV cache
    engine = Engine(m, max_batch=4)
    assert engine.batching.startswith("one at a time") and engine.max_batch == 1
    engine.start()
    collectors = [Collector(), Collector()]
    try:
        engine.submit(Sequence([1, 2, 3], 5, collectors[0]))
        engine.submit(Sequence([4, 5], 5, collectors[1]))
        assert all(c.done.wait(30) for c in collectors)
    finally:
        engine.stop()
    assert collectors[0].tokens == greedy(m, [1, 2, 3], 5) and engine.max_batched == 1


def test_sampling_is_reproducible_by_seed():
    m = model()
    outputs = []
    for seed in (3, 3, 4):
        engine = Engine(m).start()
        c = Collector()
        try:
            engine.submit(Sequence([1, 2, 3], 12, c, temperature=1.0, top_k=10, seed=seed))
            assert c.done.wait(30)
        finally:
            engine.stop()
        outputs.append(c.tokens)
    assert outputs[0] == outputs[1] != outputs[2]


# -- the HTTP service -------------------------------------------------------------------------------------


@pytest.fixture
def service():
    from bench.data.tokenizers import CharTokenizer
    from bench.serve.app import create_app

    m = model(vocab_size=12)
    tokenizer = CharTokenizer(sorted("abcdefghijk "))
    engine = Engine(m, max_batch=4)
    with fastapi_testclient.TestClient(create_app(engine, tokenizer, max_tokens=64, name="tiny")) as client:
        yield client, m, tokenizer


def test_the_service_generates_what_the_model_generates_whole_and_streamed(service):
    client, m, tokenizer = service
    # as curl -d sends it: a form content type, a JSON body
    body = client.post("/generate", content='{"prompt": "abc de", "max_new_tokens": 8}',
                       headers={"content-type": "application/x-www-form-urlencoded"}).json()
    ids = tokenizer.encode("abc de").tolist()
    assert body["tokens"] == greedy(m, ids, 8) and body["text"] == tokenizer.decode(body["tokens"])
    assert body["prompt_tokens"] == 6
    with client.stream("POST", "/generate", json={"tokens": ids, "max_new_tokens": 8, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert len(events) == 9 and '"done": true' in events[-1]
    assert [int(e.split('"token": ')[1].split(",")[0]) for e in events[:-1]] == body["tokens"]


def test_concurrent_requests_are_batched_and_answered_like_single_ones(service):
    client, m, _ = service
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10], [3, 3, 3, 3, 3, 3]]
    answers = [None] * len(prompts)

    def ask(i):
        answers[i] = client.post("/generate", json={"tokens": prompts[i], "max_new_tokens": 12}).json()["tokens"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [greedy(m, p, 12) for p in prompts]
    gauges = _metrics(client)
    assert gauges["archbench_max_batched_sequences"] >= 2


def _metrics(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {s.name + (str(sorted(s.labels.items())) if s.labels and "bucket" not in s.name else ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_parse_as_prometheus_text_and_move(service):
    client, _, _ = service
    before = _metrics(client)
    client.post("/generate", json={"tokens": [1, 2], "max_new_tokens": 5})
    client.post("/generate", json={"tokens": []})
    # an answer is sent after its rows left the cache; wait on the engine's state, never on time
    assert client.app.state.engine.wait_until(lambda e: e.idle)
    after = _metrics(client)
    ok, bad = "archbench_requests_total[('status', 'ok')]", "archbench_requests_total[('status', 'bad_request')]"
    assert after[ok] == before.get(ok, 0) + 1 and after[bad] == before.get(bad, 0) + 1
    assert after["archbench_tokens_generated_total"] == before["archbench_tokens_generated_total"] + 5
    assert after["archbench_time_to_first_token_seconds_count"] == before["archbench_time_to_first_token_seconds_count"] + 1
    assert after["archbench_inter_token_latency_seconds_count"] == before["archbench_inter_token_latency_seconds_count"] + 4
    assert after["archbench_kv_cache_bytes_peak"] > 0 and after["archbench_kv_cache_bytes"] == 0  # nothing held when idle
    assert client.get("/health").json() | {"running": 0} == {"status": "ok", "model": "tiny", "batching": "continuous",
                                                             "max_batch": 4, "max_queue": None, "running": 0,
                                                             "waiting": 0}


@pytest.mark.parametrize("body, status, message", [
    ({"tokens": []}, 400, "empty"),
    ({"prompt": ""}, 400, "empty"),
    ({}, 400, "one of the two"),
    ({"prompt": "ab", "tokens": [1]}, 400, "one of the two"),
    ({"tokens": [1, 99]}, 400, "[0, 12)"),
    ({"prompt": "abz"}, 400, "'z'"),
    ({"tokens": [1] * 60, "max_new_tokens": 10}, 400, "exceeds this model's 64 tokens"),
    ({"tokens": [1], "max_new_tokens": "ten"}, 422, "max_new_tokens"),
    ({"tokens": ["one"]}, 422, "tokens"),
    ({"tokens": [1], "temperature": -1.0}, 422, "temperature"),
    ({"tokens": [1], "colour": "red"}, 422, "colour"),
    ('{"tokens": [1, 2', 422, "Invalid JSON"),
], ids=["empty-ids", "empty-text", "no-prompt", "both", "unknown-id", "unknown-char", "too-long", "non-numeric",
        "non-numeric-id", "negative-temperature", "unknown-field", "not-json"])
def test_a_bad_request_gets_a_4xx_json_error_and_the_service_keeps_serving(service, body, status, message):
    client, m, _ = service
    response = client.post("/generate", content=body) if isinstance(body, str) else client.post("/generate", json=body)
    assert response.status_code == status and message in response.json()["error"]
    assert client.post("/generate", json={"tokens": [1, 2], "max_new_tokens": 3}).json()["tokens"] == greedy(m, [1, 2], 3)


def test_a_recurrent_state_is_budgeted_per_sequence_not_per_token():
    m = model(attention="mamba2")
    engine = Engine(m)
    state = sum(block.attn.state_bytes(4) for block in m.blocks)
    assert (engine.bytes_per_token, engine.sequence_bytes) == (0, state)
    assert Engine(m, kv_budget_bytes=state).fits_alone(60) and not Engine(m, kv_budget_bytes=state - 1).fits_alone(1)
