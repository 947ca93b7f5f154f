"""The serving engine, its HTTP service, the load generator and the serving benchmark."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from bench.serve.engine import Engine, Sequence
from bench.serve.loadgen import check_loopback, summarise, Outcome
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
    after = _metrics(client)
    ok, bad = "archbench_requests_total[('status', 'ok')]", "archbench_requests_total[('status', 'bad_request')]"
    assert after[ok] == before.get(ok, 0) + 1 and after[bad] == before.get(bad, 0) + 1
    assert after["archbench_tokens_generated_total"] == before["archbench_tokens_generated_total"] + 5
    assert after["archbench_time_to_first_token_seconds_count"] == before["archbench_time_to_first_token_seconds_count"] + 1
    assert after["archbench_inter_token_latency_seconds_count"] == before["archbench_inter_token_latency_seconds_count"] + 4
    assert after["archbench_kv_cache_bytes_peak"] > 0 and after["archbench_kv_cache_bytes"] == 0  # nothing held when idle
    assert client.get("/health").json() | {"running": 0} == {"status": "ok", "model": "tiny", "batching": "continuous",
                                                             "max_batch": 4, "running": 0, "waiting": 0}


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


# -- the load generator and the benchmark -------------------------------------------------------------------


def test_the_load_generator_targets_only_the_loopback_interface():
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000"):
        check_loopback(url)
    for url in ("http://10.0.0.2:8000", "http://example.com", "http://0.0.0.0:8000"):
        with pytest.raises(ValueError, match="loopback"):
            check_loopback(url)


def test_summaries_are_percentiles_over_the_requests_that_succeeded():
    outcomes = [Outcome(True, [0.1, 0.2, 0.4]), Outcome(True, [0.3, 0.4, 0.5]), Outcome(False, [], "boom")]
    row = summarise(outcomes, 2.0)
    assert row["errors"] == 1 and row["requests_per_s"] == 1.0 and row["tokens_per_s"] == 3.0
    # gaps 0.1, 0.2, 0.1, 0.1: numpy's linear p99 is 0.1 + 0.97·0.1
    assert row["ttft_p50_s"] == pytest.approx(0.2) and row["itl_p99_s"] == pytest.approx(0.197)


def test_a_spec_with_serving_serves_each_variant_under_load_and_the_report_shows_it(tmp_path):
    import yaml

    from bench.results import load
    from bench.run import main

    spec = {"name": "tiny-serving", "base": {
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "positional": "rope"},
        "data": {"source": "markov", "vocab_size": 16, "n_train_tokens": 20000, "n_val_tokens": 4096, "doc_len": 256},
        "train": {"batch_size": 4, "seq_len": 32, "eval_every": 10, "eval_batches": 2, "device": "cpu", "dtype": "float32"}},
        "budget": {"steps": 10}, "seeds": 1,
        "variants": {"mha": {}, "mqa": {"model.attention": "mqa"}, "gla": {"model.attention": "gla"}},
        "serving": {"concurrency": [1, 3], "requests": 4, "prompt_len": 8, "new_tokens": 4}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path), "--out", str(tmp_path / "out")]) == 0
    serving = load(tmp_path / "out").serving
    assert sorted(zip(serving["variant"], serving["concurrency"])) == [
        ("gla", 1), ("gla", 3), ("mha", 1), ("mha", 3), ("mqa", 1), ("mqa", 3)]
    for column in ("requests_per_s", "tokens_per_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "itl_p50_s", "itl_p90_s",
                   "itl_p99_s", "kv_cache_bytes_peak", "max_batched", "errors"):
        assert serving[column].notna().all(), column
    assert (serving["errors"] == 0).all() and (serving["tokens_per_s"] > 0).all()
    assert serving.loc[serving["concurrency"] == 3, "max_batched"].min() >= 2
    # MQA holds a quarter of MHA's keys and values (1 kv head of 2): its peak is smaller at equal load
    peaks = serving[serving["concurrency"] == 1].set_index("variant")["kv_cache_bytes_peak"]
    assert peaks["mqa"] == peaks["mha"] / 2
    # a recurrent mixer holds its state, whatever the length: 2 heads × 8 key × 16 value channels, fp32
    assert peaks["gla"] == 2 * 8 * 16 * 4
    batched = serving[(serving["variant"] == "gla") & (serving["concurrency"] == 3)].iloc[0]
    assert batched["kv_cache_bytes_peak"] == batched["max_batched"] * peaks["gla"]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Serving under load" in html and "most batched" in html and "Not served under load" not in html

    # the same from the command line, for one variant; a variant with no trained run is refused by name
    from bench.serve.__main__ import main as serve

    assert serve(["bench", str(tmp_path / "out"), "--variants", "mqa", "--concurrency", "2", "--requests", "2",
                  "--prompt-len", "4", "--new-tokens", "2"]) == 0
    again = load(tmp_path / "out").serving
    assert len(again) == 7 and again.iloc[-1][["variant", "concurrency", "requests", "new_tokens"]].tolist() == ["mqa", 2, 2, 2]
    assert serve(["bench", str(tmp_path / "out"), "--variants", "gqa"]) == 2


def test_a_stopped_service_leaves_no_process_behind(tmp_path):
    from bench.serve.benchmark import running_service

    run_dir = _trained_run(tmp_path)
    before = _children()  # earlier tests may have left helpers of their own (a resource tracker)
    with running_service(run_dir, max_batch=2) as url:
        import httpx

        assert httpx.get(f"{url}/health", trust_env=False).json()["status"] == "ok"
        service = _children() - before
        assert service
    time.sleep(0.2)
    assert not (_children() & service)


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


def _trained_run(tmp_path):
    """A finished run's folder: config.yaml and checkpoint.pt of a tiny model."""
    import yaml

    from bench.checkpoint import save_checkpoint
    from bench.config import resolve_run

    run = resolve_run(dict(n_layer=1, n_head=2, n_embd=32, block_size=32),
                      dict(source="markov", vocab_size=16, n_train_tokens=20000, n_val_tokens=4096, doc_len=256),
                      dict(batch_size=4, seq_len=32, device="cpu", dtype="float32"))
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(run.model_dump(mode="json")))
    save_checkpoint(folder / "checkpoint.pt", {"model": build_model(run.model, seed=0).state_dict(), "step": 1})
    return folder


def test_a_recurrent_state_is_budgeted_per_sequence_not_per_token():
    m = model(attention="mamba2")
    engine = Engine(m)
    state = sum(block.attn.state_bytes(4) for block in m.blocks)
    assert (engine.bytes_per_token, engine.sequence_bytes) == (0, state)
    assert Engine(m, kv_budget_bytes=state).fits_alone(60) and not Engine(m, kv_budget_bytes=state - 1).fits_alone(1)
