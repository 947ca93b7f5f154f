"""What both of the service's APIs share (archbench's /generate and OpenAI's /v1): a served engine
with its tokenizer and limits, how a request's prompt and image are checked, how it joins the engine
(refused with 503 and Retry-After past the queue bound), and how a caller that disconnects frees its
place."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import Request

from bench.data.tokenizers import Tokenizer
from bench.pictures import ImageRefused, image_tensor
from bench.serve.engine import Engine, Overloaded, Sequence


class Refused(ValueError):
    """A request the service refuses: its HTTP status, the reason, the field at fault and headers."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.headers, self.code = status, param, headers or {}, code


class Served:
    """What both APIs serve: the engine, the tokenizer, the limits, and how a request joins the engine."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer | None, max_tokens: int, name: str):
        self.engine, self.tokenizer, self.max_tokens, self.name = engine, tokenizer, max_tokens, name

    def prompt_ids(self, text: str | None, ids: list[int] | None, new_tokens: int, field: str = "prompt") -> list[int]:
        """The prompt's token ids (from text or ids), refused (400) when the model cannot serve it."""
        engine, vocab = self.engine, self.engine.model.config.vocab_size
        if ids is not None:
            unknown = [t for t in ids if not 0 <= t < vocab]
            if unknown:
                raise Refused(400, f"token ids must be in [0, {vocab}): {unknown[:5]} are not", field)
        elif self.tokenizer is None:
            raise Refused(400, "this run's data has no text tokenizer: give the prompt as token ids", field)
        else:
            try:
                ids = [int(t) for t in self.tokenizer.encode(text)]
            except ValueError as e:  # a character outside a char tokenizer's alphabet
                raise Refused(400, f"prompt: {e}", field) from None
        if not ids:
            raise Refused(400, "the prompt is empty", field)
        if len(ids) + new_tokens + engine.image_positions > self.max_tokens:
            image = f" + the image's {engine.image_positions} positions" if engine.image_positions else ""
            raise Refused(400, f"prompt ({len(ids)} tokens) + max_new_tokens ({new_tokens}){image} exceeds "
                               f"this model's {self.max_tokens} {'positions' if image else 'tokens'}", field)
        if not engine.fits_alone(len(ids) + new_tokens):
            raise Refused(400, f"prompt + max_new_tokens ({len(ids) + new_tokens} tokens) would need "
                               f"{engine.bytes_for(len(ids) + new_tokens)} bytes of cache, more than "
                               f"this service's budget of {engine.kv_budget_bytes}", field)
        return ids

    def image(self, png: str | None) -> torch.Tensor | None:
        """The request's image as the model reads it; refused unless the model reads images and it fits."""
        vision = self.engine.model.config.vision
        if vision is None:
            if png is not None:
                raise Refused(400, "image: this model reads no images (it was trained on text alone)", "image")
            return None
        if png is None:
            raise Refused(400, f"image: this model reads an image with its prompt: give 'image', a base64 PNG of "
                               f"{vision['image_size']}×{vision['image_size']} pixels, {vision['channels']} channel(s)",
                          "image")
        try:
            return image_tensor(png, vision["channels"], vision["image_size"])
        except ImageRefused as e:
            raise Refused(400, str(e), "image") from None

    def submit(self, ids: list[int], new_tokens: int, **sampling) -> tuple[Sequence, asyncio.Queue]:
        """Queue a sequence; its tokens arrive on the returned queue (None once done). Refused with 503
        (and Retry-After) when the engine has stopped or its queue is full."""
        if self.engine.error is not None:
            raise Refused(503, f"the engine stopped: {self.engine.error!r}", code="engine_stopped")
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        sequence = Sequence(ids, new_tokens, lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t), **sampling)
        try:
            self.engine.submit(sequence)
        except Overloaded as e:
            raise Refused(503, str(e), headers={"Retry-After": str(e.retry_after)}, code="overloaded") from None
        return sequence, tokens

    @staticmethod
    @asynccontextmanager
    async def watching(request: Request, sequence: Sequence):
        """While a whole (not streamed) answer is collected: a caller that disconnects cancels its
        sequence, which frees its place in the batch and its cache."""
        watch = asyncio.create_task(cancel_on_disconnect(request, sequence))
        try:
            yield
        finally:
            watch.cancel()

    def count(self, refusal: Refused) -> None:
        """Count a refused request in /metrics (the engine counts those it turns away as overloaded)."""
        if refusal.code != "overloaded":
            self.engine.metrics.requests.labels(status="error" if refusal.status >= 500 else "bad_request").inc()

    def text(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else None


async def cancel_on_disconnect(request: Request, sequence: Sequence) -> None:
    """Wait for the client to go away (the body is read already, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    sequence.cancelled = True


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
