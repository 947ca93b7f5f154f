"""Continuous batching over a GPT's KV cache.

One engine thread owns the model. Requests wait in a queue; between decode steps the engine admits
waiting requests while the batch has room (``max_batch`` sequences, and the KV cache the batch would
hold at its longest within ``kv_budget_bytes``): each is prefilled alone, its first token sampled,
and its cache merged into the running batch (``Cache.merge``: rows right-aligned, each at its own
positions). Each decode step runs every running sequence's last token through the model in one
forward pass; a sequence that is done leaves the batch (``cache.select``) without stalling the
others. Tokens go back to the caller through a callback as they are sampled.

A model whose attention cannot decode rows at different positions, or has no KV cache, is served
one sequence at a time (``batching`` says why).

The engine runs the model as the run trained it: on its device, under autocast to its dtype (weights
stay as trained). The waiting queue is bounded (``max_queue``): past it ``submit`` raises
``Overloaded`` and the service answers 503 instead of letting latency grow without bound. A sequence
whose caller went away (``cancelled``) leaves the batch at the next step, or the queue before its
prefill, and its cache rows with it. A finished sequence's rows leave the cache before its caller hears
it is done, so that whoever sees an answer sees the engine without it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from bench.serve.metrics import ServingMetrics
from models.config import prefix_positions
from models.gpt import GPT, Cache

Emit = Callable[[int | None], None]  # a sampled token id; None once the sequence is done


@dataclass
class Sequence:
    """One request being served: its prompt, sampling settings and what it has produced."""

    prompt: list[int]
    max_new_tokens: int
    emit: Emit
    image: torch.Tensor | None = None  # (1, channels, H, W) in [0, 1]: what a vision-language model reads
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0  # nucleus sampling: the most likely tokens whose probabilities sum to top_p
    seed: int | None = None
    generated: list[int] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None
    generator: torch.Generator | None = None
    cancelled: bool = False  # the caller went away: the sequence leaves at the next step
    stopped: bool = False  # the caller has what it asked for (a stop string): the sequence leaves too

    @property
    def done(self) -> bool:
        return self.cancelled or self.stopped or len(self.generated) >= self.max_new_tokens


class Overloaded(RuntimeError):
    """The waiting queue is full: the request is refused (503) rather than queued without bound."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the service is overloaded: {waiting} requests are waiting (its --max-queue); "
                         f"retry in {retry_after} s")
        self.retry_after = retry_after


class Engine:
    """Serves sequences from a model with continuous batching (see the module docstring)."""

    def __init__(self, model: GPT, *, max_batch: int = 8, kv_budget_bytes: int | None = None,
                 max_queue: int | None = None, dtype: torch.dtype = torch.float32,
                 metrics: ServingMetrics | None = None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = dtype  # the autocast dtype the model runs under (the run's)
        self.max_batch = max_batch
        self.kv_budget_bytes = kv_budget_bytes
        self.max_queue = max_queue  # most requests waiting to join the batch (None: no bound)
        self.metrics = metrics or ServingMetrics()
        self.batching = _batching(model)  # "continuous", or why sequences are served one at a time
        # one token of one sequence, every layer; and what a sequence holds whatever its length (a
        # recurrent mixer's state): as the model holds them under its dtype
        with self.autocast():
            self.bytes_per_token, state_bytes = _cache_bytes(model)
        self.image_positions = prefix_positions(model.config) if model.config.vision is not None else 0
        fusion = getattr(model, "fusion", None)  # cross-attention keeps each row's image keys and values too
        element = (next(model.parameters()).dtype if dtype == torch.float32 else dtype).itemsize
        self.sequence_bytes = state_bytes + (fusion.image_cache_bytes(element) if fusion is not None else 0)
        if self.batching != "continuous":
            self.max_batch = 1
        self.waiting: queue.Queue[Sequence] = queue.Queue()
        self.running: list[Sequence] = []
        self.cache: Cache | None = None
        self.max_batched = 0  # the most sequences one decode step has run
        self.peak_kv_bytes = 0  # the most bytes the batch's KV cache has held
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition()  # notified whenever the batch or the queue changes
        self.error: BaseException | None = None
        self.seconds_per_request = 1.0  # a running mean of request durations: the Retry-After estimate

    def autocast(self):
        """The context the model runs in: autocast to the run's dtype (nothing for float32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @property
    def idle(self) -> bool:
        """Nothing running, nothing waiting, no cache held."""
        return not self.running and self.waiting.empty() and self.cache is None

    def wait_until(self, condition: Callable[[Engine], bool], timeout: float = 60.0) -> bool:
        """Block until condition(engine) holds (checked at every change of the batch or queue), or the
        timeout; whether it holds. Tests and the service wait on state this way, not on time."""
        with self._changed:
            return self._changed.wait_for(lambda: condition(self), timeout)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> Engine:
        """Warm up, then serve from the engine thread."""
        self.warm_up()
        self._thread = threading.Thread(target=self._loop, name="archbench-engine", daemon=True)
        self._thread.start()
        return self

    @torch.no_grad()
    def warm_up(self) -> None:
        """Make each kind of call the engine makes once before the first request: a prefill, a decode
        step, a merged batch's step. Kernels are chosen and first-call costs paid here, not inside a
        request's latency; the metrics are untouched."""
        vision = self.model.config.vision
        images = {} if vision is None else {
            "images": torch.zeros(1, vision["channels"], vision["image_size"], vision["image_size"], device=self.device)}
        with self.autocast():
            caches = []
            for prompt in ([0, 0], [0]) if self.batching == "continuous" else ([0],):
                cache = self.model.new_cache()
                self.model(torch.tensor([prompt], device=self.device), cache=cache, **images)
                caches.append(cache)
            if caches[0] is None:
                return
            one = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self.model(one, cache=caches[0])  # a step of one sequence
            if len(caches) > 1:  # a step of rows at their own positions
                self.model(one.expand(len(caches), 1), cache=Cache.merge(caches))

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def submit(self, sequence: Sequence) -> None:
        """Queue a sequence (thread-safe); its tokens come back through sequence.emit. Raises
        ``Overloaded`` when ``max_queue`` requests are already waiting."""
        if self.max_queue is not None and self.waiting.qsize() >= self.max_queue:
            self.metrics.requests.labels(status="overloaded").inc()
            raise Overloaded(self.waiting.qsize(), self.retry_after())
        if sequence.temperature > 0:
            sequence.generator = torch.Generator(device=self.device)
            sequence.generator.manual_seed(sequence.seed if sequence.seed is not None else int(time.time_ns()))
        self.waiting.put(sequence)
        self.metrics.queue_depth.set(self.waiting.qsize())
        self._wake.set()
        self._notify()

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained by one batch: what a refused client should wait."""
        batches = (self.waiting.qsize() + self.max_batch - 1) // self.max_batch
        return max(1, round(batches * self.seconds_per_request))

    # -- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.no_grad(), self.autocast():
                while not self._stop.is_set():
                    self._admit()
                    if self.running:
                        self._step()
                    else:
                        self._wake.wait(0.1)
                        self._wake.clear()
        except BaseException as e:  # noqa: BLE001 - reported by /health; every waiting caller is released
            self.error = e
            for sequence in [*self.running, *self._drain()]:
                sequence.emit(None)
            self._notify()

    def _drain(self) -> list[Sequence]:
        out = []
        while not self.waiting.empty():
            out.append(self.waiting.get_nowait())
        return out

    def _admit(self) -> None:
        """Prefill waiting sequences, one at a time, while the batch has room for them."""
        joining: list[tuple[Sequence, Cache | None]] = []
        while len(self.running) + len(joining) < self.max_batch and not self.waiting.empty():
            # an empty batch always takes one (the service refuses a request that alone exceeds the budget)
            if (self.running or joining) and not self._fits([s for s, _ in joining], self.waiting.queue[0]):
                break
            sequence = self.waiting.get_nowait()
            self.metrics.queue_depth.set(self.waiting.qsize())
            if sequence.cancelled:  # its caller went away while it waited
                self.metrics.requests.labels(status="cancelled").inc()
                sequence.emit(None)
                self._notify()
                continue
            cache = self.model.new_cache()
            idx = torch.tensor([sequence.prompt], device=self.device)
            logits = self.model(idx, cache=cache, **self._image(sequence)).logits[:, -1]  # (1, vocab)
            self._emit(sequence, int(self._sample(logits, [sequence])[0]))
            if sequence.done:
                self._finish(sequence)
            else:
                joining.append((sequence, cache))
        if joining:
            caches = ([self.cache] if self.cache is not None else []) + [c for _, c in joining]
            self.cache = Cache.merge(caches) if self.batching == "continuous" else joining[0][1]
            self.running += [s for s, _ in joining]
            self._observe_batch()
        self._notify()

    def _fits(self, joining: list[Sequence], candidate: Sequence) -> bool:
        """Whether the batch's KV cache, with `candidate` in, stays within the budget at its longest:
        rows are right-aligned, so every row costs as much as the longest one."""
        if self.kv_budget_bytes is None:
            return True
        rows = [*self.running, *joining, candidate]
        longest = max(len(s.prompt) + s.max_new_tokens for s in rows)
        return len(rows) * self.bytes_for(longest) <= self.kv_budget_bytes

    def bytes_for(self, tokens: int) -> int:
        """What one sequence of this many text tokens holds in the cache (an image's prefix and keys included)."""
        return (tokens + self.image_positions) * self.bytes_per_token + self.sequence_bytes

    def fits_alone(self, tokens: int) -> bool:
        """Whether one sequence of this many tokens (prompt + new, and an image's prefix) fits the KV-cache budget."""
        return self.kv_budget_bytes is None or self.bytes_for(tokens) <= self.kv_budget_bytes

    def _image(self, sequence: Sequence) -> dict:
        """What the model reads besides the tokens: a request's image, on the device."""
        return {} if sequence.image is None else {"images": sequence.image.to(self.device)}

    def _step(self) -> None:
        """One decode step for every running sequence."""
        idx = torch.tensor([[s.generated[-1]] for s in self.running], device=self.device)  # (B, 1)
        if self.cache is None:  # no KV cache: recompute the whole sequence (one at a time)
            (sequence,) = self.running
            full = torch.tensor([sequence.prompt + sequence.generated], device=self.device)
            logits = self.model(full, **self._image(sequence)).logits[:, -1]
        else:
            logits = self.model(idx, cache=self.cache).logits[:, -1]  # (B, vocab)
        for sequence, token in zip(self.running, self._sample(logits, self.running).tolist()):
            if not (sequence.cancelled or sequence.stopped):
                self._emit(sequence, token)
        keep = [i for i, s in enumerate(self.running) if not s.done]
        finished = [s for s in self.running if s.done]
        if not keep:
            self.running, self.cache = [], None
        elif len(keep) < len(self.running):
            self.running = [self.running[i] for i in keep]
            self.cache.select(keep)
        self._observe_batch()
        for sequence in finished:  # after their rows left the cache: a caller that hears "done" sees them gone
            self._finish(sequence)
        self._notify()

    def _sample(self, logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
        """(B,) next tokens: the most likely where temperature is 0, else sampled (top_k, temperature)."""
        tokens = logits.argmax(dim=-1)
        for i, s in enumerate(sequences):
            if s.temperature > 0:
                row = logits[i].float() / s.temperature
                if s.top_k is not None:
                    kth = torch.topk(row, min(s.top_k, row.numel())).values[-1]
                    row = row.masked_fill(row < kth, float("-inf"))
                probs = F.softmax(row, dim=-1)
                if s.top_p < 1.0:
                    probs = nucleus(probs, s.top_p)
                tokens[i] = torch.multinomial(probs, 1, generator=s.generator)[0]
        return tokens

    def _emit(self, sequence: Sequence, token: int) -> None:
        now = time.perf_counter()
        if sequence.last_token_at is None:
            self.metrics.time_to_first_token.observe(now - sequence.submitted_at)
        else:
            self.metrics.inter_token_latency.observe(now - sequence.last_token_at)
        sequence.last_token_at = now
        sequence.generated.append(token)
        self.metrics.tokens_generated.inc()
        sequence.emit(token)

    def _finish(self, sequence: Sequence) -> None:
        seconds = time.perf_counter() - sequence.submitted_at
        if sequence.cancelled:
            self.metrics.requests.labels(status="cancelled").inc()
        self.metrics.request_duration.observe(seconds)
        self.seconds_per_request += 0.2 * (seconds - self.seconds_per_request)
        sequence.emit(None)

    def _observe_batch(self) -> None:
        self.max_batched = max(self.max_batched, len(self.running))
        self.metrics.running.set(len(self.running))
        self.metrics.max_batched.set(self.max_batched)
        held = self.cache.nbytes() if self.cache is not None else 0
        self.peak_kv_bytes = max(self.peak_kv_bytes, held)
        self.metrics.kv_cache_bytes.set(held)
        self.metrics.kv_cache_bytes_peak.set(self.peak_kv_bytes)


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (vocab,) kept on the smallest set of most likely tokens whose mass reaches top_p
    (Holtzman et al.'s nucleus; the most likely token always stays), renormalised."""
    ordered, order = probs.sort(descending=True)
    before = ordered.cumsum(0) - ordered  # the mass of the tokens more likely than each
    ordered = ordered.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(0, order, ordered)
    return kept / kept.sum()


@torch.no_grad()
def _cache_bytes(model: GPT) -> tuple[int, int]:
    """(cache bytes one more token of one sequence costs, bytes a sequence holds whatever its length),
    over all layers, as the model holds them — measured at one and two tokens ((0, 0): no cache)."""
    cache = model.new_cache()
    if cache is None:
        return 0, 0
    held = []
    for _ in range(2):
        model(torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device), cache=cache)
        held.append(cache.nbytes())
    per_token = held[1] - held[0]
    return per_token, held[0] - per_token


def _batching(model: GPT) -> str:
    """'continuous' when the model decodes rows at different positions over its KV cache, else why not."""
    cache = model.new_cache()
    if cache is None:
        return "one at a time: an attention of this model has no KV cache"
    if cache.refusal is not None:
        return f"one at a time: {cache.refusal()}"
    return "continuous"
