"""The HTTP service over an engine: ``POST /generate``, ``GET /health``, ``GET /metrics`` (FastAPI).

A request gives a prompt as text (encoded with the run's tokenizer) or as token ids (and, for a
vision-language model, an image as a base64 PNG of the model's size and channels), and gets the
generated tokens (and text) back whole, or as server-sent events token by token (``stream``). A
request the model cannot serve gets a 4xx JSON ``{"error": ...}`` naming what is wrong; the service
keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pydantic
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bench.data.tokenizers import Tokenizer
from bench.pictures import ImageRefused, image_tensor
from bench.serve.engine import Engine, Sequence


class GenerateRequest(pydantic.BaseModel):
    """The body of POST /generate."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)
    prompt: str | None = None  # text, encoded with the run's tokenizer
    tokens: list[int] | None = None  # or token ids
    max_new_tokens: int = pydantic.Field(32, ge=1)
    temperature: float = pydantic.Field(0.0, ge=0)  # 0: greedy
    top_k: int | None = pydantic.Field(None, ge=1)
    seed: int | None = None  # the sampling seed (temperature > 0)
    stream: bool = False  # server-sent events, one per token
    image: str | None = None  # a base64 PNG, for a vision-language model (its size and channels)


class BadRequest(ValueError):
    """A request the service refuses (400), with the reason."""


def create_app(engine: Engine, tokenizer: Tokenizer | None, *, max_tokens: int, name: str = "") -> FastAPI:
    """The service: `engine` (started and stopped with the app), `tokenizer` for text prompts (None:
    token ids only), `max_tokens` the longest prompt + generation a request may ask for."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="archbench serve", lifespan=lifespan)
    metrics = engine.metrics
    vocab = engine.model.config.vocab_size

    def refuse(status: int, message: str) -> JSONResponse:
        metrics.requests.labels(status="bad_request").inc()
        return JSONResponse({"error": message}, status_code=status)

    def prompt_ids(body: GenerateRequest) -> list[int]:
        if (body.prompt is None) == (body.tokens is None):
            raise BadRequest("give the prompt as 'prompt' (text) or 'tokens' (ids), one of the two")
        if body.tokens is not None:
            ids = body.tokens
            unknown = [t for t in ids if not 0 <= t < vocab]
            if unknown:
                raise BadRequest(f"token ids must be in [0, {vocab}): {unknown[:5]} are not")
        elif tokenizer is None:
            raise BadRequest("this run's data has no text tokenizer: give the prompt as 'tokens'")
        else:
            try:
                ids = [int(t) for t in tokenizer.encode(body.prompt)]
            except ValueError as e:  # a character outside a char tokenizer's alphabet
                raise BadRequest(f"prompt: {e}") from None
        if not ids:
            raise BadRequest("the prompt is empty")
        if len(ids) + body.max_new_tokens + engine.image_positions > max_tokens:
            image = f" + the image's {engine.image_positions} positions" if engine.image_positions else ""
            raise BadRequest(f"prompt ({len(ids)} tokens) + max_new_tokens ({body.max_new_tokens}){image} exceeds "
                             f"this model's {max_tokens} {'positions' if image else 'tokens'}")
        if not engine.fits_alone(len(ids) + body.max_new_tokens):
            raise BadRequest(f"prompt + max_new_tokens ({len(ids) + body.max_new_tokens} tokens) would need "
                             f"{engine.bytes_for(len(ids) + body.max_new_tokens)} bytes of cache, more than "
                             f"this service's budget of {engine.kv_budget_bytes}")
        return ids

    def image_of(body: GenerateRequest) -> torch.Tensor | None:
        """The request's image as the model reads it; refused unless the model reads images and it fits."""
        vision = engine.model.config.vision
        if vision is None:
            if body.image is not None:
                raise BadRequest("image: this model reads no images (it was trained on text alone)")
            return None
        if body.image is None:
            raise BadRequest(f"image: this model reads an image with its prompt: give 'image', a base64 PNG of "
                             f"{vision['image_size']}×{vision['image_size']} pixels, {vision['channels']} channel(s)")
        try:
            return image_tensor(body.image, vision["channels"], vision["image_size"])
        except ImageRefused as e:
            raise BadRequest(str(e)) from None

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        if engine.error is not None:
            return JSONResponse({"error": f"the engine stopped: {engine.error!r}"}, status_code=503)
        try:  # the body is read as JSON whatever its content type says (curl -d sends a form's)
            body = GenerateRequest.model_validate_json(await request.body())
        except pydantic.ValidationError as e:
            return refuse(422, "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors()))
        try:
            ids, image = prompt_ids(body), image_of(body)
        except BadRequest as e:
            return refuse(400, str(e))
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        sequence = Sequence(ids, body.max_new_tokens, lambda t: loop.call_soon_threadsafe(tokens.put_nowait, t),
                            image=image, temperature=body.temperature, top_k=body.top_k, seed=body.seed)
        start = time.perf_counter()
        engine.submit(sequence)
        if body.stream:
            return StreamingResponse(_events(sequence, tokens, tokenizer, engine), media_type="text/event-stream")
        generated = []
        while (token := await tokens.get()) is not None:
            generated.append(token)
        if engine.error is not None:
            return JSONResponse({"error": f"the engine stopped: {engine.error!r}"}, status_code=503)
        metrics.requests.labels(status="ok").inc()
        return JSONResponse({"tokens": generated, "text": _text(tokenizer, generated), "prompt_tokens": len(ids),
                             "seconds": time.perf_counter() - start})

    @app.get("/health")
    async def health() -> JSONResponse:
        status = {"status": "ok" if engine.error is None else "error", "model": name, "batching": engine.batching,
                  "max_batch": engine.max_batch, "running": len(engine.running), "waiting": engine.waiting.qsize()}
        return JSONResponse(status, status_code=200 if engine.error is None else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _events(sequence: Sequence, tokens: asyncio.Queue, tokenizer: Tokenizer | None,
                  engine: Engine) -> AsyncIterator[str]:
    """Server-sent events: one per token, then one with done: true (or an error)."""
    generated: list[int] = []
    try:
        while (token := await tokens.get()) is not None:
            generated.append(token)
            yield _event({"token": token, "text": _text(tokenizer, [token])})
        if engine.error is not None:
            yield _event({"error": f"the engine stopped: {engine.error!r}"})
            return
        engine.metrics.requests.labels(status="ok").inc()
        yield _event({"done": True, "tokens": generated, "text": _text(tokenizer, generated)})
    finally:
        sequence.cancelled = True  # a client that went away frees its place in the batch


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _text(tokenizer: Tokenizer | None, ids: list[int]) -> str | None:
    return tokenizer.decode(ids) if tokenizer is not None else None
