"""OpenAI's completions API over the engine: ``POST /v1/completions`` and ``GET /v1/models``.

What vLLM, TGI, SGLang and llama.cpp serve, so that the openai client, ``vllm bench serve`` and any
load tester drive archbench's engine unchanged. A completion is returned whole, or streamed as
server-sent events: one chunk per generated token (its text, and archbench's ``token_ids``), the last
one with its ``finish_reason``, then with ``stream_options.include_usage`` a chunk of usage alone,
then ``data: [DONE]``. Errors are OpenAI's error object (``{"error": {message, type, param, code}}``):
400 for a request the model cannot serve, 404 for another model's id, 503 with Retry-After when the
queue is full.

Not supported, and refused by name when asked for: several prompts or choices (n, best_of), echo,
logprobs, suffix, penalties and logit_bias. These models have no end-of-sequence token: a completion
stops at max_tokens or at a stop string (``ignore_eos`` is accepted and changes nothing).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pydantic
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bench.data.tokenizers import Tokenizer
from bench.serve.served import Refused, Served, sse

OWNER = "archbench"


class StreamOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(pydantic.BaseModel):
    """The body of POST /v1/completions (OpenAI's fields; ``top_k``, ``ignore_eos`` as vLLM takes them;
    ``image`` archbench's, a base64 PNG for a vision-language model)."""

    model_config = pydantic.ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = pydantic.Field(16, ge=1)  # null: as many as the model's positions leave (vLLM's)
    temperature: float = pydantic.Field(1.0, ge=0, le=2)
    top_p: float = pydantic.Field(1.0, gt=0, le=1)
    top_k: int | None = None  # -1 or None: no top-k
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    image: str | None = None
    user: str | None = None  # accepted, unused
    # OpenAI's fields this service does not implement: refused unless left at their defaults
    n: int = 1
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


UNSUPPORTED = {"n": 1, "best_of": (None, 1), "echo": False, "logprobs": None, "suffix": None,
               "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": (None, {})}


def error(e: Refused) -> JSONResponse:
    """OpenAI's error object for a refusal."""
    kind = {400: "invalid_request_error", 404: "invalid_request_error", 503: "server_error"}.get(e.status, "server_error")
    body = {"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


class StopMatcher:
    """The text of the generated tokens as it becomes safe to send: text that may be the start of a
    stop string is held back until it is not; at a stop string the completion ends, without it."""

    def __init__(self, tokenizer: Tokenizer | None, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int) -> str:
        """The text newly safe to send after this token (maybe ""); sets ``stopped`` at a stop string."""
        self.ids.append(token)
        if self.tokenizer is None:
            return ""
        self.text = self.tokenizer.decode(self.ids)
        if self.text.endswith("\ufffd"):  # a character's first bytes: wait for the rest
            return ""
        found = [i for s in self.stop if (i := self.text.find(s, max(0, self.sent - len(s) + 1))) >= 0]
        if found:
            self.stopped, self.text = True, self.text[:min(found)]
            return self.release()
        held = max((n for s in self.stop for n in range(min(len(s) - 1, len(self.text)), 0, -1)
                    if self.text.endswith(s[:n])), default=0)
        safe, self.sent = self.text[self.sent:len(self.text) - held], max(self.sent, len(self.text) - held)
        return safe

    def release(self) -> str:
        """Whatever is still held back (the completion ended without a stop string)."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


def openai_routes(served: Served) -> APIRouter:
    """The OpenAI-compatible routes over `served`."""
    router = APIRouter()
    engine, metrics = served.engine, served.engine.metrics
    created = int(time.time())

    def model_card() -> dict[str, Any]:
        return {"id": served.name, "object": "model", "created": created, "owned_by": OWNER,
                "max_model_len": served.max_tokens}

    def refuse(e: Refused) -> JSONResponse:
        served.count(e)
        return error(e)

    @router.get("/v1/models")
    async def models() -> JSONResponse:
        if engine.error is not None:  # not ready: readiness probes read this
            return error(Refused(503, f"the engine stopped: {engine.error!r}", code="engine_stopped"))
        return JSONResponse({"object": "list", "data": [model_card()]})

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        try:
            body = CompletionRequest.model_validate_json(await request.body())
        except pydantic.ValidationError as e:
            first = e.errors()[0]
            return refuse(Refused(400, f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}",
                                  str(first["loc"][0]) if first["loc"] else None))
        try:
            ids, stop = checked(body, served)
            sequence, tokens = served.submit(
                ids, body.max_tokens, image=served.image(body.image), temperature=body.temperature,
                top_k=None if body.top_k in (None, -1) else body.top_k, top_p=body.top_p, seed=body.seed)
        except Refused as e:
            return refuse(e)
        completion = Completion(served, body, ids, stop)
        if body.stream:
            return StreamingResponse(completion.chunks(sequence, tokens), media_type="text/event-stream")
        text, token_ids = "", []
        async with served.watching(request, sequence):
            async for piece, token in completion.pieces(sequence, tokens):
                text, token_ids = text + piece, [*token_ids, token]
        if engine.error is not None:
            return refuse(Refused(503, f"the engine stopped: {engine.error!r}", code="engine_stopped"))
        metrics.requests.labels(status="ok").inc()
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": completion.finish_reason,
                  "token_ids": token_ids}
        return JSONResponse({**completion.head(), "choices": [choice], "usage": completion.usage()})

    return router


def checked(body: CompletionRequest, served: Served) -> tuple[list[int], list[str]]:
    """The prompt's token ids and the stop strings, or the refusal of what this service cannot do."""
    if body.model is not None and body.model != served.name:
        raise Refused(404, f"The model `{body.model}` does not exist; this service serves `{served.name}`", "model",
                      code="model_not_found")
    for name, default in UNSUPPORTED.items():
        if getattr(body, name) not in (default if isinstance(default, tuple) else (default,)):
            raise Refused(400, f"{name}: not supported by this service (leave it at {default!r})", name)
    if body.stream_options is not None and not body.stream:
        raise Refused(400, "stream_options: only allowed when stream is true", "stream_options")
    if body.top_k is not None and body.top_k != -1 and body.top_k < 1:
        raise Refused(400, "top_k: must be at least 1, or -1 for no top-k", "top_k")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise Refused(400, f"prompt: one prompt per request ({len(prompt)} given)", "prompt")
        prompt = prompt[0]
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise Refused(400, f"stop: at most 4 stop strings ({len(stop)} given)", "stop")
    if stop and served.tokenizer is None:
        raise Refused(400, "stop: this run's data has no text tokenizer, so no text to match stop strings in", "stop")
    text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
    if body.max_tokens is None:  # what the model's positions leave after the prompt (and an image's prefix)
        ids = served.prompt_ids(text, ids, 1, "prompt")
        body.max_tokens = served.max_tokens - len(ids) - served.engine.image_positions
    return served.prompt_ids(text, ids, body.max_tokens, "prompt"), stop


class Completion:
    """One completion's identity, its text as it is generated, its finish reason and usage."""

    def __init__(self, served: Served, body: CompletionRequest, prompt: list[int], stop: list[str]):
        self.served, self.body, self.prompt = served, body, prompt
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.matcher = StopMatcher(served.tokenizer, stop)
        self.finish_reason: str | None = None

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.served.name}

    def usage(self) -> dict[str, int]:
        completion = len(self.matcher.ids)
        return {"prompt_tokens": len(self.prompt), "completion_tokens": completion,
                "total_tokens": len(self.prompt) + completion}

    async def pieces(self, sequence, tokens) -> AsyncIterator[tuple[str, int]]:
        """(text newly safe to send, token) per generated token, until max_tokens or a stop string; the
        last piece carries what was held back; finish_reason is set when the last one is yielded."""
        while (token := await tokens.get()) is not None:
            piece = self.matcher.add(token)
            if self.matcher.stopped:
                sequence.stopped = True  # leaves the batch at the next step
                self.finish_reason = "stop"
            elif len(self.matcher.ids) >= self.body.max_tokens:
                piece += self.matcher.release()
                self.finish_reason = "length"
            yield piece, token
            if self.finish_reason is not None:
                return

    async def chunks(self, sequence, tokens) -> AsyncIterator[str]:
        """The streamed completion: a chunk per token, usage (if asked), [DONE]."""
        usage = self.body.stream_options is not None and self.body.stream_options.include_usage
        extra = {"usage": None} if usage else {}
        engine = self.served.engine
        try:
            async for piece, token in self.pieces(sequence, tokens):
                choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": self.finish_reason,
                          "token_ids": [token]}
                yield sse({**self.head(), "choices": [choice], **extra})
            if self.finish_reason is None:  # the engine stopped before the completion ended
                message = f"the engine stopped: {engine.error!r}" if engine.error is not None else "the completion ended early"
                engine.metrics.requests.labels(status="error").inc()
                yield sse({"error": {"message": message, "type": "server_error", "param": None, "code": "engine_stopped"}})
            else:
                engine.metrics.requests.labels(status="ok").inc()
                if usage:
                    yield sse({**self.head(), "choices": [], "usage": self.usage()})
            yield sse("[DONE]")
        finally:
            sequence.cancelled = True  # a client that went away frees its place in the batch and its cache
