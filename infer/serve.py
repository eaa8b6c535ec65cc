"""An OpenAI-compatible HTTP server for a pretrained model (FastAPI + uvicorn, SSE streaming).

    python -m infer.serve --model smollm2-135m-instruct --port 8000
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \
      -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}'

Requests go through `infer.engine.Engine` (continuous batching over a paged KV cache, on its
own thread); tokens travel to the event loop through a queue per request, where they become
text and SSE chunks. A client that goes away cancels its sequences, which frees their slots and
KV blocks. GET /metrics serves Prometheus metrics. `create_app(lm, ...)` serves an already
loaded model (tests, notebooks).
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
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from infer.api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    error_body,
)
from infer.engine import Engine, EngineConfig, QueueFull
from infer.engine import Request as EngineRequest
from infer.sampling import SamplingParams


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


class Job:
    """One API call's choices as engine requests, turned into text events on the event loop.

    `await run()` submits them and gives an async iterator of ("start", i), ("text", i, text,
    logprob entries), ("finish", i, reason, completion tokens) and ("error", message) events.
    A choice cut by a stop string is cancelled in the engine at once.
    """

    def __init__(self, lm, engine: Engine, requests: list[EngineRequest], stops: list[str]):
        self.lm, self.engine, self.requests, self.stops = lm, engine, requests, stops
        self._raw: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for index, request in enumerate(requests):

            def on_event(event, index=index):
                with contextlib.suppress(RuntimeError):  # the loop is gone: shutting down
                    loop.call_soon_threadsafe(self._raw.put_nowait, (index, event))

            request.on_event = on_event

    def cancel(self) -> None:
        for request in self.requests:
            self.engine.cancel(request)

    def _token_entry(self, token: int, logprob: float, top) -> dict[str, Any]:
        def piece(t: int) -> str:
            return self.lm.tokenizer.decode([t], skip_special_tokens=False)

        entry = {"token": piece(token), "logprob": logprob}
        entry["top_logprobs"] = [{"token": piece(t), "logprob": lp} for t, lp in top]
        return entry

    async def run(self) -> AsyncIterator[tuple]:
        """Submits the choices (APIError 429 / 400 if refused); their events, interleaved."""
        try:
            self.engine.submit(*self.requests)
        except QueueFull as e:
            raise APIError(
                429,
                f"the server is busy: {e}; retry later",
                code="rate_limit_exceeded",
                type="rate_limit_error",
            ) from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return self._text_events()

    async def _text_events(self) -> AsyncIterator[tuple]:
        n = len(self.requests)
        open_choices = set(range(n))
        try:
            decoders = [self.lm.tokenizer.stream_decoder() for _ in range(n)]
            stoppers = [StopStrings(self.stops) for _ in range(n)]
            for i in range(n):
                yield ("start", i)
            while open_choices:
                i, event = await self._raw.get()
                if i not in open_choices:
                    continue  # cut by a stop string already
                request = self.requests[i]
                if event[0] == "error":
                    yield ("error", event[1])
                    return
                if event[0] == "token":
                    _, token, logprob, top = event
                    text, stopped = stoppers[i].push(decoders[i].push(token))
                    entries = [] if top is None else [self._token_entry(token, logprob, top)]
                    if text or entries:
                        yield ("text", i, text, entries)
                    if stopped:
                        self.engine.cancel(request)
                        open_choices.discard(i)
                        yield ("finish", i, "stop", len(request.output))
                    continue
                _, reason, count = event
                open_choices.discard(i)
                if reason == "cancelled":
                    continue
                text, stopped = stoppers[i].push(decoders[i].flush())
                text += "" if stopped else stoppers[i].flush()
                if text:
                    yield ("text", i, text, [])
                yield ("finish", i, "stop" if stopped else reason, count)
        except Exception as e:  # reported to this client only; the engine lives on
            yield ("error", f"{type(e).__name__}: {e}")
        finally:
            self.cancel()


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
    if tuple(error.get("loc", ())) == ("body",) and isinstance(error.get("input"), bytes):
        # FastAPI parses the body as JSON only when Content-Type says so (curl -d sends a form).
        return APIError(400, "the request body must be a JSON object sent with "
                        "Content-Type: application/json")  # fmt: skip
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
    engine_config: EngineConfig | None = None,
    rag_index=None,
    rag_top_k: int = 3,
) -> FastAPI:
    """The OpenAI-compatible app for a loaded `LanguageModel` (and `SentenceEmbedder`).

    Args:
      lm: has `.model` (a `models.Decoder`) and `.tokenizer` (`models.tokenizer.Tokenizer`).
      model_name: the id clients pass as `model`.
      embedder: serves /v1/embeddings under `embedding_model_name` when given.
      api_key: when set, every endpoint but /health needs `Authorization: Bearer <api_key>`.
      max_queue: requests that may wait for a batch slot; more get 429.
      engine_config: the engine's sizes (default EngineConfig()); its max_queue is replaced.
      rag_index: an open `rag.index.Index`: chat requests are then grounded in its `rag_top_k`
        most relevant chunks (`rag.answer.augment_messages`), and responses carry a `sources`
        list (in the first chunk when streaming) that the reply's [n] citations refer to.

    Raises:
      ValueError: an engine configuration whose KV cache cannot hold one full context.
    """
    config = dataclasses.replace(engine_config or EngineConfig(), max_queue=max_queue)
    engine = Engine(lm.model, config)
    embed_worker = concurrent.futures.ThreadPoolExecutor(1, "jaxlm-embed")
    context = lm.model.cfg.max_seq_len
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()
        embed_worker.shutdown(wait=False, cancel_futures=True)

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

    def plan(req, prompts: list[list[int]]) -> Job:
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
        shared = dict(
            temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, logprobs=req.num_logprobs(),
            logit_bias=req.bias_pairs(lm.model.cfg.vocab_size),
        )  # fmt: skip
        eos = frozenset() if req.ignore_eos else lm.tokenizer.stop_ids
        stop_ids = eos | frozenset(req.stop_token_ids or ())
        requests = []
        for ids in prompts:
            for i in range(req.n):
                # Choice i draws with seed + i, wrapped to an int64 (what jax.random.key takes).
                params = SamplingParams(seed=(seed + i + 2**63) % 2**64 - 2**63, **shared)
                requests.append(EngineRequest(ids, limit or context - len(ids), params, stop_ids))
        return Job(lm, engine, requests, req.stop_strings())

    async def complete(request: Request, req, prompts: list[list[int]], chat: bool, sources=None):
        job = plan(req, prompts)
        events = await job.run()
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
            stream = _stream(events, job, base, chat, include_usage, prompt_tokens, sources)
            return StreamingResponse(stream, media_type="text/event-stream")
        n = len(job.requests)
        texts, entries = [""] * n, [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        completion_tokens = 0
        try:
            async for event in _until_disconnect(request, events, job):
                if event[0] == "text":
                    texts[event[1]] += event[2]
                    entries[event[1]] += event[3]
                elif event[0] == "finish":
                    reasons[event[1]] = event[2]
                    completion_tokens += event[3]
                elif event[0] == "error":
                    raise APIError(500, event[1], type="server_error")
        finally:
            job.cancel()
        logprobs = [None] * n
        if req.num_logprobs() is not None:
            logprobs = [_logprobs(e, chat) for e in entries]
        if chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": lp,
                    "finish_reason": reason,
                }
                for i, (text, reason, lp) in enumerate(zip(texts, reasons, logprobs, strict=True))
            ]
        else:
            choices = [
                {"index": i, "text": text, "logprobs": lp, "finish_reason": reason}
                for i, (text, reason, lp) in enumerate(zip(texts, reasons, logprobs, strict=True))
            ]
        response = {
            **base,
            "object": "chat.completion" if chat else "text_completion",
            "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens),
        }
        if sources is not None:
            response["sources"] = sources
        return response

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: ChatCompletionRequest):
        check_model(req.model, model_name)
        messages = [m.as_template_message() for m in req.messages]
        sources = None
        if rag_index is not None:
            from rag.answer import augment_messages, render_sources

            try:  # embedding the query is blocking work: off the event loop
                messages, hits = await asyncio.get_running_loop().run_in_executor(
                    embed_worker, augment_messages, rag_index, messages, rag_top_k
                )
            except ValueError as e:  # no user message to ground
                raise APIError(400, str(e), param="messages") from e
            sources = render_sources(hits)[1]
        try:
            ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:  # no chat template, or the template refused the conversation
            raise APIError(400, str(e), param="messages") from e
        return await complete(request, req, [ids], chat=True, sources=sources)

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest):
        check_model(req.model, model_name)
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
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
        loop = asyncio.get_running_loop()
        vectors = await loop.run_in_executor(embed_worker, embedder.embed, texts)
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
        stats = engine.stats()
        return {"status": "ok", "model": model_name, **stats}

    @app.get("/metrics")
    async def metrics():
        body, content_type = engine.metrics.render()
        return Response(body, media_type=content_type)

    return app


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _logprobs(entries: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    """Per-token log-probabilities in the chat or the legacy completions format."""
    if chat:
        content = [
            {**e, "bytes": list(e["token"].encode()),
             "top_logprobs": [{**t, "bytes": list(t["token"].encode())} for t in e["top_logprobs"]]}
            for e in entries
        ]  # fmt: skip
        return {"content": content}
    offsets, position = [], 0
    for e in entries:
        offsets.append(position)
        position += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


async def _until_disconnect(request: Request, events, job: Job) -> AsyncIterator[tuple]:
    """The job's events; stops (and cancels the job) when the client goes away."""
    iterator = aiter(events)
    pending = asyncio.ensure_future(anext(iterator))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=0.5)
            if not done:
                if await request.is_disconnected():
                    job.cancel()
                    return
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            yield event
            pending = asyncio.ensure_future(anext(iterator))
    finally:
        pending.cancel()
        await events.aclose()


async def _stream(
    events, job: Job, base, chat: bool, include_usage: bool, prompt_tokens: int, sources=None
):
    """SSE chunks in OpenAI's order; a cancelled stream (client gone) cancels the job. With
    retrieval, the first chunk (the assistant role) also carries the `sources`."""

    def chunk(index, delta, reason: str | None = None, entries=None, extra=None) -> str:
        logprobs = None if entries is None else _logprobs(entries, chat)
        if chat:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": reason}
        body = {**base, "choices": [choice], **(extra or {})}
        if include_usage:
            body["usage"] = None
        return _sse(body)

    completion_tokens = 0
    try:
        async for event in events:
            kind = event[0]
            if kind == "start" and chat:
                extra = {"sources": sources} if sources is not None and event[1] == 0 else None
                yield chunk(event[1], {"role": "assistant"}, extra=extra)
            elif kind == "text":
                entries = event[3] or None
                yield chunk(event[1], {"content": event[2]} if chat else event[2], None, entries)
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
        job.cancel()
        await events.aclose()


def capacity_statement(engine: Engine) -> str:
    """What the server says about its KV cache at start-up."""
    c = engine.capacity()
    return (
        f"KV cache: {c['blocks']} blocks x {c['block_size']} tokens = {c['tokens']} tokens "
        f"({c['bytes'] / 2**20:.1f} MiB, {engine.config.kv_dtype}); at most "
        f"{c['max_seqs_at_full_context']} sequences of the full context "
        f"({engine.model_cfg.max_seq_len} tokens) at once; batch of {c['max_batch']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from infer.decoding import load_model_or_exit

    parser = argparse.ArgumentParser(prog="python -m infer.serve", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--max-seq-len", type=int, default=None, help="serve a shorter context than the model's"
    )
    parser.add_argument(
        "--embedding-model", default="all-minilm-l6-v2", help="'' serves no embeddings"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("JAXLM_API_KEY"))
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    parser.add_argument(
        "--num-blocks", type=int, default=None,
        help="KV-cache blocks (default: --max-batch sequences of the whole context)",
    )  # fmt: skip
    parser.add_argument("--kv-dtype", default="float32", choices=("float32", "bfloat16", "int8"))
    parser.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per call")
    parser.add_argument("--prefill-batch", type=int, default=8, help="prompts prefilled together")
    parser.add_argument("--no-prefix-cache", action="store_true")
    parser.add_argument(
        "--rag-index", default=None, help="a rag index dir: ground chat answers in it (docs/rag.md)"
    )
    parser.add_argument("--rag-top-k", type=int, default=3, help="sources added per request")
    args = parser.parse_args(argv)

    lm = load_model_or_exit(args)
    embedder = None
    if args.embedding_model:
        embedder = load_model_or_exit(
            argparse.Namespace(model=args.embedding_model, dtype="float32")
        )
    engine_config = EngineConfig(
        max_batch=args.max_batch, block_size=args.block_size, num_blocks=args.num_blocks,
        kv_dtype=args.kv_dtype, prefill_chunk=args.prefill_chunk, prefill_batch=args.prefill_batch,
        prefix_cache=not args.no_prefix_cache,
    )  # fmt: skip
    rag_index = None
    if args.rag_index:
        from rag.api import open_index

        try:
            rag_index = open_index(args.rag_index)
        except (OSError, ValueError) as e:
            print(f"error: cannot open --rag-index {args.rag_index}: {e}", file=sys.stderr)
            return 2
    try:
        app = create_app(
            lm,
            model_name=args.model,
            embedder=embedder,
            embedding_model_name=args.embedding_model or None,
            api_key=args.api_key,
            max_queue=args.max_queue,
            engine_config=engine_config,
            rag_index=rag_index,
            rag_top_k=args.rag_top_k,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(capacity_statement(app.state.engine), flush=True)
    print(
        f"serving {args.model} (context {lm.model.cfg.max_seq_len} tokens)"
        + (f" and embeddings from {args.embedding_model}" if embedder else "")
        + f" at http://{args.host}:{args.port}/v1"
        + (" (API key required)" if args.api_key else "")
        + (f", answering from the index {args.rag_index}" if rag_index else ""),
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
