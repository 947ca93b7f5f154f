"""The HTTP service over an engine (FastAPI): OpenAI's ``POST /v1/completions`` and ``GET /v1/models``
(bench.serve.openai_api), archbench's own ``POST /generate``, ``GET /health``, ``GET /metrics``.

A request gives a prompt as text (encoded with the run's tokenizer) or as token ids (and, for a
vision-language model, an image as a base64 PNG of the model's size and channels), and gets the
generated tokens (and text) back whole, or as server-sent events token by token (``stream``). A
request the model cannot serve gets a 4xx JSON error naming what is wrong; past the engine's queue
bound, a 503 with Retry-After; the service keeps serving. A caller that disconnects frees its place
in the batch and its cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bench.data.tokenizers import Tokenizer
from bench.serve.engine import Engine, Sequence
from bench.serve.openai_api import openai_routes
from bench.serve.served import Refused, Served, sse


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


def create_app(engine: Engine, tokenizer: Tokenizer | None, *, max_tokens: int, name: str = "",
               describe: Callable[[], dict] | None = None) -> FastAPI:
    """The service: `engine` (warmed up, started and stopped with the app), `tokenizer` for text prompts
    (None: token ids only), `max_tokens` the longest prompt + generation a request may ask for, `name`
    the served model's id, `describe` what /health states about how it runs (device, dtype, kernel,
    quantization: ``bench.serve.model.ServedRun.describe``)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="archbench serve", lifespan=lifespan)
    app.state.engine = engine
    metrics = engine.metrics
    served = Served(engine, tokenizer, max_tokens, name)
    app.include_router(openai_routes(served))

    def refuse(e: Refused) -> JSONResponse:
        served.count(e)
        return JSONResponse({"error": str(e)}, status_code=e.status, headers=e.headers)

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        try:  # the body is read as JSON whatever its content type says (curl -d sends a form's)
            body = GenerateRequest.model_validate_json(await request.body())
        except pydantic.ValidationError as e:
            return refuse(Refused(422, validation_message(e)))
        try:
            if (body.prompt is None) == (body.tokens is None):
                raise Refused(400, "give the prompt as 'prompt' (text) or 'tokens' (ids), one of the two")
            ids = served.prompt_ids(body.prompt, body.tokens, body.max_new_tokens)
            image = served.image(body.image)
            sequence, tokens = served.submit(ids, body.max_new_tokens, image=image, temperature=body.temperature,
                                             top_k=body.top_k, seed=body.seed)
        except Refused as e:
            return refuse(e)
        start = time.perf_counter()
        if body.stream:
            return StreamingResponse(_events(sequence, tokens, served), media_type="text/event-stream")
        generated = []
        async with served.watching(request, sequence):
            while (token := await tokens.get()) is not None:
                generated.append(token)
        if engine.error is not None:
            return refuse(Refused(503, f"the engine stopped: {engine.error!r}"))
        metrics.requests.labels(status="ok").inc()
        return JSONResponse({"tokens": generated, "text": served.text(generated), "prompt_tokens": len(ids),
                             "seconds": time.perf_counter() - start})

    @app.get("/health")
    async def health() -> JSONResponse:
        status = {"status": "ok" if engine.error is None else "error", "model": name, "batching": engine.batching,
                  "max_batch": engine.max_batch, "max_queue": engine.max_queue, "running": len(engine.running),
                  "waiting": engine.waiting.qsize(), **(describe() if describe is not None else {})}
        return JSONResponse(status, status_code=200 if engine.error is None else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def validation_message(e: pydantic.ValidationError) -> str:
    """A body's validation errors in one line: "max_new_tokens: Input should be a valid integer; ..."."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())


async def _events(sequence: Sequence, tokens: asyncio.Queue, served: Served) -> AsyncIterator[str]:
    """Server-sent events: one per token, then one with done: true (or an error)."""
    generated: list[int] = []
    try:
        while (token := await tokens.get()) is not None:
            generated.append(token)
            yield sse({"token": token, "text": served.text([token])})
        if served.engine.error is not None:
            yield sse({"error": f"the engine stopped: {served.engine.error!r}"})
            return
        served.engine.metrics.requests.labels(status="ok").inc()
        yield sse({"done": True, "tokens": generated, "text": served.text(generated)})
    finally:
        sequence.cancelled = True  # a client that went away frees its place in the batch
