"""The OpenAI-compatible API driven by the official openai client against a live server on the loopback
interface; overload (503 with Retry-After), disconnects, stop strings, nucleus sampling; a trained run
served as it trained (its dtype, its kernel choices, its post-training quantization)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn
import yaml

from bench.data.tokenizers import CharTokenizer
from bench.serve.app import create_app
from bench.serve.engine import Engine, nucleus
from bench.serve.openai_api import StopMatcher
from models import build_model
from tests.conftest import tiny

openai = pytest.importorskip("openai")

ALPHABET = sorted("abcdefghijk ")


def tiny_model():
    return build_model(tiny(vocab_size=len(ALPHABET), block_size=64, positional="rope"), seed=0).eval()


def greedy(m, prompt: list[int], n: int) -> list[int]:
    return m.generate(torch.tensor([prompt]), n, temperature=0)[0, len(prompt):].tolist()


@contextlib.contextmanager
def live(app):
    """The app served by uvicorn on a free loopback port, in a thread; its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:  # wait on the server's state (a generous bound for a crashed start)
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


class Gate:
    """Holds every decode step until opened (a forward pre-hook on the model): the engine's state is
    then what the test arranged, however busy the machine is."""

    def __init__(self, model):
        self.open, self.holding = threading.Event(), threading.Event()
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        if args[0].shape[1] == 1:  # a decode step
            self.holding.set()
            self.open.wait()


def wait_for(condition, what: str) -> None:
    """Poll a condition the engine thread is blocked behind (so no notification comes)."""
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


def counter(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", trust_env=False).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def server():
    m = tiny_model()
    tokenizer = CharTokenizer(ALPHABET)
    engine = Engine(m, max_batch=4)
    with live(create_app(engine, tokenizer, max_tokens=64, name="tiny")) as url:
        yield url, m, tokenizer, engine


# -- the openai client round trip --------------------------------------------------------------------------


def test_the_openai_client_gets_whole_and_streamed_completions(server):
    url, m, tokenizer, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [model.id for model in client.models.list()] == ["tiny"]

    ids = tokenizer.encode("abc de").tolist()
    expected = greedy(m, ids, 8)
    whole = client.completions.create(model="tiny", prompt="abc de", max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.model == "tiny"
    assert whole.choices[0].text == tokenizer.decode(expected) and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (6, 8, 14)

    stream = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) == 8 and "".join(texts) == whole.choices[0].text  # a chunk per token
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None] * 7 + ["length"]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 8  # usage alone, last


def test_the_stream_ends_with_done_and_carries_token_ids(server):
    url, m, _, _ = server
    body = {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, trust_env=False) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) == 5  # no usage chunk unless asked for
    assert [json.loads(e)["choices"][0]["token_ids"][0] for e in events[:-1]] == greedy(m, [1, 2, 3], 4)


@pytest.mark.parametrize("kwargs, error, param, message", [
    ({"prompt": "abz"}, "BadRequestError", "prompt", "'z'"),
    ({"prompt": "ab", "n": 2}, "BadRequestError", "n", "not supported"),
    ({"prompt": "ab", "max_tokens": 0}, "BadRequestError", "max_tokens", "greater than or equal to 1"),
    ({"prompt": "ab", "max_tokens": 70}, "BadRequestError", "prompt", "exceeds this model's 64 tokens"),
    ({"prompt": ["ab", "cd"]}, "BadRequestError", "prompt", "one prompt per request"),
    ({"prompt": "ab", "model": "gpt-4"}, "NotFoundError", "model", "does not exist"),
], ids=["unknown-char", "n", "zero-tokens", "too-long", "two-prompts", "unknown-model"])
def test_a_bad_request_gets_openais_error_object_and_the_service_keeps_serving(server, kwargs, error, param, message):
    url, m, tokenizer, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(getattr(openai, error)) as caught:
        client.completions.create(**{"model": "tiny", "temperature": 0, **kwargs})
    body = caught.value.body
    assert body["param"] == param and message in body["message"] and body["type"] == "invalid_request_error"
    again = client.completions.create(model="tiny", prompt="ab", max_tokens=3, temperature=0)
    assert again.choices[0].text == tokenizer.decode(greedy(m, tokenizer.encode("ab").tolist(), 3))


# -- stop strings and sampling -----------------------------------------------------------------------------


def test_a_stop_string_ends_the_completion_without_it_whole_and_streamed(server):
    url, m, tokenizer, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    full = tokenizer.decode(greedy(m, tokenizer.encode("abc").tolist(), 20))
    stop = full[5:7]  # a stop string that occurs (first) at or before character 5
    cut = full.index(stop)
    whole = client.completions.create(model="tiny", prompt="abc", max_tokens=20, temperature=0, stop=[stop, "zz"])
    assert whole.choices[0].text == full[:cut] and whole.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="tiny", prompt="abc", max_tokens=20, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:cut] and chunks[-1].choices[0].finish_reason == "stop"


def test_the_stop_matcher_holds_back_what_may_start_a_stop_string():
    tokenizer = CharTokenizer(ALPHABET)
    matcher = StopMatcher(tokenizer, ["cde"])
    sent = [matcher.add(int(t)) for t in tokenizer.encode("abcdcde")]
    # "c" waits (it may start "cde"), "cd" waits, "cdc": "cd" goes out, the last "c" waits; "cde": stop
    assert sent == ["a", "b", "", "", "cd", "", ""] and matcher.stopped and matcher.text == "abcd"
    matcher = StopMatcher(tokenizer, ["cde"])
    assert [matcher.add(int(t)) for t in tokenizer.encode("abc")] == ["a", "b", ""] and matcher.release() == "c"


def test_nucleus_keeps_the_fewest_most_likely_tokens_reaching_top_p():
    probs = torch.tensor([0.1, 0.5, 0.25, 0.15])
    assert torch.allclose(nucleus(probs, 0.7), torch.tensor([0.0, 0.5, 0.25, 0.0]) / 0.75)
    assert torch.allclose(nucleus(probs, 0.75), torch.tensor([0.0, 0.5, 0.25, 0.0]) / 0.75)  # reached exactly
    assert torch.allclose(nucleus(probs, 0.01), torch.tensor([0.0, 1.0, 0.0, 0.0]))  # the most likely stays
    assert torch.allclose(nucleus(probs, 1.0), probs)


# -- overload and disconnects ------------------------------------------------------------------------------


@pytest.fixture
def gated():
    """A service with one place in the batch and one in the queue, whose decode steps wait on a gate."""
    m = tiny_model()
    engine = Engine(m, max_batch=1, max_queue=1)
    with live(create_app(engine, CharTokenizer(ALPHABET), max_tokens=64, name="tiny")) as url:
        gate = Gate(m)  # after the warm-up
        try:
            yield url, engine, gate
        finally:
            gate.open.set()


def test_past_the_queue_bound_a_request_gets_503_with_retry_after_and_the_service_keeps_serving(gated):
    url, engine, gate = gated
    answers = {}

    def send(name):
        answers[name] = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 3, "temperature": 0},
                                   timeout=120, trust_env=False)

    threads = [threading.Thread(target=send, args=(name,)) for name in ("running", "waiting")]
    threads[0].start()
    wait_for(gate.holding.is_set, "the first request decoding")
    threads[1].start()
    assert engine.wait_until(lambda e: e.waiting.qsize() == 1)
    refused = httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 3}, trust_env=False)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "overloaded"
    assert counter(url, "archbench_requests_total", status="overloaded") == 1
    gate.open.set()
    for t in threads:
        t.join()
    assert [answers[n].status_code for n in ("running", "waiting")] == [200, 200]  # nobody lost
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "ab", "max_tokens": 3}, trust_env=False).status_code == 200


def test_a_streaming_client_that_disconnects_frees_its_slot_and_cache(gated):
    url, engine, gate = gated
    body = {"prompt": "abc", "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, trust_env=False) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))  # the prefill's token
        wait_for(gate.holding.is_set, "a decode step")
        assert len(engine.running) == 1 and engine.cache is not None
    assert json.loads(first[6:])["choices"][0]["token_ids"]
    sequence = engine.running[0]
    wait_for(lambda: sequence.cancelled, "the server noticing the disconnect")
    gate.open.set()
    assert engine.wait_until(lambda e: e.idle)
    assert len(sequence.generated) < 40 and counter(url, "archbench_requests_total", status="cancelled") == 1
    assert counter(url, "archbench_kv_cache_bytes") == 0


def test_a_waiting_client_that_disconnects_frees_its_slot_and_cache(gated):
    url, engine, gate = gated
    body = json.dumps({"prompt": "abc", "max_tokens": 40, "temperature": 0}).encode()
    with socket.create_connection(urlparse_port(url)) as raw:  # a whole answer, abandoned before it comes
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(gate.holding.is_set, "a decode step")
        sequence = engine.running[0]
    wait_for(lambda: sequence.cancelled, "the server noticing the disconnect")
    gate.open.set()
    assert engine.wait_until(lambda e: e.idle)
    assert len(sequence.generated) < 40 and counter(url, "archbench_kv_cache_bytes") == 0


def urlparse_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


# -- a trained run served as it trained --------------------------------------------------------------------


def _run_folder(folder, run, state: dict):
    from bench.checkpoint import save_checkpoint

    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(run.model_dump(mode="json")))
    save_checkpoint(folder / "checkpoint.pt", state)
    return folder


def test_a_run_is_served_in_its_dtype_with_its_kernel_choices_and_its_quantization(tmp_path):
    from fastapi.testclient import TestClient

    from bench.config import resolve_run
    from bench.plan import run_id
    from bench.serve.service import build_service

    run = resolve_run(dict(n_layer=1, n_head=2, n_embd=32, block_size=32, attention={"name": "mha", "backend": "auto"}),
                      dict(source="markov", vocab_size=16, n_train_tokens=20000, n_val_tokens=4096, doc_len=256),
                      dict(batch_size=4, seq_len=32, device="cpu", dtype="bfloat16"))
    weights = build_model(run.model, seed=0).state_dict()
    folder = _run_folder(tmp_path / "runs" / run_id(run), run, {"model": weights, "step": 1, "device": "cpu",
                                                                "dtype": "bfloat16"})
    with TestClient(build_service(folder)) as client:
        health = client.get("/health").json()
        engine = client.app.state.engine
        tokens = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 6, "temperature": 0}).json()
    assert (health["device"], health["dtype"], health["quantization"]) == ("cpu", "bfloat16", None)
    # every kind of call the engine makes chose its kernel at warm-up: prefill, a step, a merged batch's step
    assert health["kernel"].startswith("auto: ") and all(
        kind in health["kernel"] for kind in ("(prefill)", "(decode)", "(decode (ragged))"))
    model = build_model(run.model, seed=0).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tokens["choices"][0]["token_ids"] == greedy(model, [1, 2, 3], 6)  # what bf16 autocast generates
        # its cache as bf16 holds it: 2 bytes per key and value channel
        assert engine.bytes_per_token == 2 * run.model.n_embd * 2

    # a post-training quantized variant: its float run's checkpoint, quantized as its evaluation quantizes it
    quantized = run.model_copy(update={"model": run.model.model_copy(update={"quantization": "int8_dynamic"})})
    folder_q = tmp_path / "runs" / run_id(quantized, "quantize")
    folder_q.mkdir()
    (folder_q / "config.yaml").write_text(yaml.safe_dump(quantized.model_dump(mode="json")))
    with TestClient(build_service(folder_q, dtype="float32")) as client:
        health = client.get("/health").json()
        answer = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 6, "temperature": 0})
    assert (health["dtype"], health["quantization"]) == ("float32", "int8_dynamic") and answer.status_code == 200


def test_max_tokens_null_generates_what_the_models_positions_leave(server):
    url, m, _, _ = server
    body = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": None, "temperature": 0},
                      trust_env=False).json()
    assert body["usage"]["completion_tokens"] == 64 - 3 and body["choices"][0]["token_ids"] == greedy(m, [1, 2, 3], 61)
