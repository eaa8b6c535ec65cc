"""An OpenAI-compatible HTTP server for a pretrained model (FastAPI + uvicorn, SSE streaming).

    python -m infer.serve --model smollm2-135m-instruct --port 8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
      -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}'

One request decodes at a time on a single worker thread (the jitted loop of `infer.decoding`);
tokens travel to the event loop through a queue, and a client that goes away cancels its
decode between two tokens. `create_app(lm, ...)` serves an already loaded model (tests,
notebooks). The continuously batched, paged engine is a later step.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import random
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from infer.api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    error_body,
)
from infer.decoding import stream_token_ids

Emit = Callable[[tuple], None]


class StopStrings:
    """Cuts streamed text at the first stop string, holding back what may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Returns (text safe to send, whether a stop string was reached)."""
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[: min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if s.startswith(text[-k:]):
                    hold = k
                    break
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return rest


@dataclasses.dataclass
class Generation:
    """One request's decodes: a prompt, limit and seed per choice, run one after another."""

    prompts: list[list[int]]
    limits: list[int]
    seeds: list[int]
    temperature: float
    top_p: float
    stops: list[str]

    def run(self, lm, emit: Emit, cancel: threading.Event) -> None:
        for index, (ids, limit, seed) in enumerate(
            zip(self.prompts, self.limits, self.seeds, strict=True)
        ):
            emit(("start", index))
            decoder, stopper = lm.tokenizer.stream_decoder(), StopStrings(self.stops)
            count, stopped = 0, False
            tokens = stream_token_ids(
                lm.model,
                ids,
                limit,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=seed,
                stop_ids=lm.tokenizer.stop_ids,
            )
            for token in tokens:
                if cancel.is_set():
                    return
                count += 1
                text, stopped = stopper.push(decoder.push(token))
                if text:
                    emit(("text", index, text))
                if stopped:
                    break
            if not stopped:
                text, stopped = stopper.push(decoder.flush())
                text += "" if stopped else stopper.flush()
                if text:
                    emit(("text", index, text))
            reason = "length" if count == limit and not stopped else "stop"
            emit(("finish", index, reason, count))


class Engine:
    """A single worker thread with admission control: one decode runs, max_queue may wait."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.in_flight = 0  # admitted and not finished; touched only on the event loop
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "jaxlm-decode")
        self._cancels: set[threading.Event] = set()
        self.cancelled = 0  # jobs stopped early by their client; written by the worker only

    def _admit(self) -> None:
        if self.in_flight > self.max_queue:
            raise APIError(
                429,
                f"the server is busy: {self.in_flight - 1} requests are already waiting "
                f"(--max-queue {self.max_queue}); retry later",
                code="rate_limit_exceeded",
                type="rate_limit_error",
            )
        self.in_flight += 1

    def _submit(self, fn: Callable[[], Any]) -> asyncio.Future:
        self._admit()
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn)

        def done(_):
            self.in_flight -= 1

        future.add_done_callback(done)
        return future

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Runs fn on the worker (after the requests ahead of it) and returns its result."""
        return await self._submit(fn)

    def start(self, work: Callable[[Emit, threading.Event], None]):
        """Queues work(emit, cancel); returns (event queue, cancel flag). Ends with ("end",)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down)
                cancel.set()

        def run() -> None:
            try:
                if not cancel.is_set():
                    work(emit, cancel)
                if cancel.is_set():
                    self.cancelled += 1
            except Exception as e:  # reported to this client only; the worker lives on
                emit(("error", f"{type(e).__name__}: {e}"))
            finally:
                self._cancels.discard(cancel)
                emit(("end",))

        self._cancels.add(cancel)
        self._submit(run)
        return events, cancel

    def close(self) -> None:
        for cancel in list(self._cancels):
            cancel.set()
        self._executor.shutdown(wait=False, cancel_futures=True)


async def _events(events: asyncio.Queue) -> AsyncIterator[tuple]:
    while (event := await events.get())[0] != "end":
        yield event


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class _APIKeyMiddleware:
    """Answers 401 to any request but /health without `Authorization: Bearer <key>`."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            if dict(scope["headers"]).get(b"authorization") != self.expected:
                message = "missing or invalid API key: send 'Authorization: Bearer <key>'"
                body = error_body(message, code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _validation_error(exc: RequestValidationError) -> APIError:
    error = exc.errors()[0] if exc.errors() else {}
    if error.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {error.get('msg')}")
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    # Union members add their type names to the location; keep only the field path.
    param = ".".join(p for p in loc if p.isidentifier() or p.isdigit()) or None
    message = error.get("msg", "invalid request")
    if "input" in error and error.get("type") != "missing":
        message += f" (got {json.dumps(error['input'], default=str)[:80]})"
    return APIError(400, f"{param or 'body'}: {message}", param=param)


def create_app(
    lm,
    *,
    model_name: str = "model",
    embedder=None,
    embedding_model_name: str | None = None,
    api_key: str | None = None,
    max_queue: int = 64,
) -> FastAPI:
    """The OpenAI-compatible app for a loaded `LanguageModel` (and `SentenceEmbedder`).

    Args:
      lm: has `.model` (a `models.Decoder`) and `.tokenizer` (`models.tokenizer.Tokenizer`).
      model_name: the id clients pass as `model`.
      embedder: serves /v1/embeddings under `embedding_model_name` when given.
      api_key: when set, every endpoint but /health needs `Authorization: Bearer <api_key>`.
      max_queue: requests that may wait behind the running one; more get 429.
    """
    engine = Engine(max_queue)
    context = lm.model.cfg.max_seq_len
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="jaxlm", lifespan=lifespan)
    app.state.engine = engine
    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return await api_error(request, _validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        body = error_body(f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(body, status_code=500)

    def check_model(name: str, served: str | None) -> None:
        if name != served:
            known = [n for n in (model_name, embedding_model_name) if n]
            raise APIError(
                404,
                f"the model {name!r} does not exist here; this server has {known}",
                param="model",
                code="model_not_found",
            )

    def plan(req, prompts: list[list[int]]) -> Generation:
        limit = req.token_limit()
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            if len(ids) >= context or (limit and len(ids) + limit > context):
                asked = f" + {limit} completion tokens" if limit else ""
                raise APIError(
                    400,
                    f"this model's context is {context} tokens; the prompt has {len(ids)}"
                    f"{asked}: shorten the prompt or lower max_tokens",
                    param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                    code="context_length_exceeded",
                )
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        expanded = [ids for ids in prompts for _ in range(req.n)]
        return Generation(
            prompts=expanded,
            limits=[limit or context - len(ids) for ids in expanded],
            # Choice i draws with seed + i, wrapped to an int64 (what jax.random.key takes).
            seeds=[(seed + i % req.n + 2**63) % 2**64 - 2**63 for i in range(len(expanded))],
            temperature=req.temperature,
            top_p=req.top_p,
            stops=req.stop_strings(),
        )

    async def complete(request: Request, req, prompts: list[list[int]], chat: bool):
        job = plan(req, prompts)
        events, cancel = engine.start(lambda emit, c: job.run(lm, emit, c))
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        prompt_tokens = sum(len(ids) for ids in prompts)
        base = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model_name,
        }
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = _stream(events, cancel, base, chat, include_usage, prompt_tokens)
            return StreamingResponse(stream, media_type="text/event-stream")
        texts = [""] * len(job.prompts)
        reasons: list[str | None] = [None] * len(job.prompts)
        completion_tokens = 0
        try:
            async for event in _events_until_disconnect(request, events, cancel):
                if event[0] == "text":
                    texts[event[1]] += event[2]
                elif event[0] == "finish":
                    reasons[event[1]] = event[2]
                    completion_tokens += event[3]
                elif event[0] == "error":
                    raise APIError(500, event[1], type="server_error")
        finally:
            cancel.set()
        if chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": reason,
                }
                for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
            ]
        else:
            choices = [
                {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))
            ]
        return {
            **base,
            "object": "chat.completion" if chat else "text_completion",
            "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens),
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: ChatCompletionRequest):
        check_model(req.model, model_name)
        if req.logprobs:
            raise APIError(400, "logprobs are not supported yet", param="logprobs")
        messages = [m.as_template_message() for m in req.messages]
        try:
            ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:  # no chat template, or the template refused the conversation
            raise APIError(400, str(e), param="messages") from e
        return await complete(request, req, [ids], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest):
        check_model(req.model, model_name)
        if req.logprobs is not None or req.echo:
            raise APIError(400, "logprobs and echo are not supported yet", param="logprobs")
        prompt = req.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        vocab = lm.model.cfg.vocab_size
        prompts = []
        for p in prompt:
            if isinstance(p, str):
                prompts.append(lm.tokenizer.encode(p, add_special_tokens=True))
            elif max(p) >= vocab:
                raise APIError(400, f"token id {max(p)} >= vocab size {vocab}", param="prompt")
            else:
                prompts.append(list(p))
        return await complete(request, req, prompts, chat=False)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        check_model(req.model, embedding_model_name if embedder is not None else None)
        texts = [req.input] if isinstance(req.input, str) else req.input
        vectors = await engine.call(lambda: embedder.embed(texts))
        tokens = sum(len(embedder.tokenizer.encode(t, add_special_tokens=True)) for t in texts)

        def encode(v: np.ndarray):
            v = np.asarray(v, np.float32)
            if req.encoding_format == "base64":
                return base64.b64encode(v.tobytes()).decode()
            return v.tolist()

        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": encode(v)}
                for i, v in enumerate(vectors)
            ],
            "model": embedding_model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @app.get("/v1/models")
    async def models():
        names = [model_name] + ([embedding_model_name] if embedder is not None else [])
        data = [
            {"id": n, "object": "model", "created": created, "owned_by": "jaxlm"} for n in names
        ]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "in_flight": engine.in_flight}

    return app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def _events_until_disconnect(request: Request, events, cancel) -> AsyncIterator[tuple]:
    """The worker's events; stops (and cancels the decode) when the client goes away."""
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                cancel.set()
                return
            continue
        if event[0] == "end":
            return
        yield event


async def _stream(events, cancel, base, chat: bool, include_usage: bool, prompt_tokens: int):
    """SSE chunks in OpenAI's order; a cancelled stream (client gone) cancels the decode."""

    def chunk(index: int, delta: dict[str, Any] | str, reason: str | None = None) -> str:
        if chat:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": reason}
        body = {**base, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return _sse(body)

    completion_tokens = 0
    try:
        async for event in _events(events):
            kind = event[0]
            if kind == "start" and chat:
                yield chunk(event[1], {"role": "assistant"})
            elif kind == "text":
                yield chunk(event[1], {"content": event[2]} if chat else event[2])
            elif kind == "finish":
                completion_tokens += event[3]
                yield chunk(event[1], {} if chat else "", event[2])
            elif kind == "error":
                yield _sse(error_body(event[1], type="server_error"))
                return
        if include_usage:
            usage = _usage(prompt_tokens, completion_tokens)
            yield _sse({**base, "choices": [], "usage": usage})
        yield _sse("[DONE]")
    finally:
        cancel.set()


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from infer.decoding import load_model_or_exit

    parser = argparse.ArgumentParser(prog="python -m infer.serve", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--embedding-model", default="all-minilm-l6-v2", help="'' serves no embeddings"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("JAXLM_API_KEY"))
    parser.add_argument("--max-queue", type=int, default=64)
    args = parser.parse_args(argv)

    lm = load_model_or_exit(args)
    embedder = None
    if args.embedding_model:
        embedder = load_model_or_exit(
            argparse.Namespace(model=args.embedding_model, dtype="float32")
        )
    app = create_app(
        lm,
        model_name=args.model,
        embedder=embedder,
        embedding_model_name=args.embedding_model or None,
        api_key=args.api_key,
        max_queue=args.max_queue,
    )
    print(
        f"serving {args.model} (context {lm.model.cfg.max_seq_len} tokens)"
        + (f" and embeddings from {args.embedding_model}" if embedder else "")
        + f" at http://{args.host}:{args.port}/v1"
        + (" (API key required)" if args.api_key else ""),
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
