"""The FastAPI app: OpenAI's /v1/models, /v1/completions, /v1/chat/completions, plus /health and
the chat page at /.

Handlers only validate, tokenize and translate: generation happens on the scheduler's
thread, whose events come back through an asyncio queue per request. Every failure is
answered in OpenAI's error JSON with a 4xx/5xx status, never a traceback. A client that
disconnects cancels its job (streaming: the response generator is closed; otherwise the
handler polls for the disconnect while it waits).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from simplified_slm.errors import SLMError
from simplified_slm.serving.protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields
from simplified_slm.serving.scheduler import Job, Sampling, Scheduler
from simplified_slm.tokenizers.chat_template import ChatTemplate

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 512       # chat: up to the context, capped here
UNBOUNDED_CONTEXT_TOKENS = 8192     # prompt + output bound for models without a context limit
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    max_batch: int = 8
    max_queue: int = 64
    api_key: str | None = None
    request_timeout_s: float = 300.0
    max_body_bytes: int = 1 << 20


def context_tokens(model: Any) -> int:
    """Prompt + output tokens one request may use."""
    return (model.max_context or getattr(model.config, "max_position_embeddings", None)
            or UNBOUNDED_CONTEXT_TOKENS)


class Mailbox:
    """Hands scheduler events (from its thread) to the event loop, waking the loop once per
    burst: a decode step's events for every request arrive in one call instead of one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.items, self.lock = loop, [], threading.Lock()

    def post(self, queue: asyncio.Queue, event: tuple) -> None:
        with self.lock:
            self.items.append((queue, event))
            if len(self.items) > 1:
                return  # the flush scheduled by the first item will take this one too
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    def _flush(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, event in items:
            queue.put_nowait(event)


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413, declared or streamed."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            error = APIError(413, f"the request body exceeds {self.limit} bytes", code="body_too_large")
            return await JSONResponse(error.body(), error.status)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI re-raises HTTPException from body reading
                raise HTTPException(413, f"the request body exceeds {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def create_app(model: Any, tokenizer: Any, config: ServerConfig, chat: ChatTemplate) -> FastAPI:
    scheduler = Scheduler(model, tokenizer, max_batch=config.max_batch, max_queue=config.max_queue)
    context = context_tokens(model)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        app.state.mailbox = Mailbox(asyncio.get_running_loop())
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="simplified-slm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = scheduler
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(APIError(400, message, param=loc[0] if loc else None).body(), 400)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, err: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return JSONResponse(APIError(err.status_code, str(err.detail), type=kind).body(), err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, "internal server error; see the server log", type="server_error").body(),
                            500)

    def authorized(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise APIError(401, "missing or incorrect API key; send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": config.model_name, **scheduler.load()}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(files("simplified_slm.serving").joinpath("static/chat.html").read_text("utf-8"))

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                            "owned_by": "simplified-slm", "context_length": context}]}

    def encode(text: str, param: str) -> list[int]:
        try:  # JSON can spell lone surrogates ("\\ud800"); no tokenizer or reply could carry them
            text.encode("utf-8")
            ids = tokenizer.encode_ids(text)
        except UnicodeEncodeError:
            raise APIError(400, f"{param} is not valid Unicode text (it holds lone surrogates)", param=param) from None
        except SLMError as err:
            raise APIError(400, f"{param}: {err}", param=param) from None
        if not ids:
            raise APIError(400, f"{param} encodes to no tokens; give a non-empty {param}", param=param)
        return ids

    def submit(body: SamplingFields, prompts: list[list[int]], max_tokens: int | None, default_max: int,
               stop: list[str], param: str) -> tuple[Job, asyncio.Queue]:
        longest = max(len(p) for p in prompts)
        if longest >= context:
            raise APIError(400, f"the {param} has {longest} tokens but the model's context is {context}; "
                           "shorten it", param=param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max, context - longest)
        if longest + max_tokens > context:
            raise APIError(400, f"this model's context is {context} tokens; the request asks for {longest + max_tokens}"
                           f" ({longest} in the {param}, {max_tokens} for the completion); lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        if len(prompts) * body.n > config.max_batch:
            raise APIError(400, f"n x prompts = {len(prompts) * body.n} exceeds the server's --max-batch "
                           f"{config.max_batch}", param="n")
        queue: asyncio.Queue = asyncio.Queue()
        mailbox = app.state.mailbox

        def emit(event: tuple) -> None:
            mailbox.post(queue, event)

        sampling = Sampling(max_tokens, body.temperature, body.top_p, body.top_k, body.seed, tuple(stop))
        job = Job(prompts, body.n, sampling, emit, time.monotonic() + config.request_timeout_s)
        scheduler.submit(job)
        return job, queue

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Any:
        texts = body.prompts()
        prompts = [encode(t, "prompt") for t in texts]
        job, queue = submit(body, prompts, body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, body.stop_list(), "prompt")
        echo = [texts[i // body.n] if body.echo else "" for i in range(job.rows)]
        reply = Reply("cmpl", "text_completion", config.model_name, job, queue, sum(map(len, prompts)), chat=False)
        if body.stream:
            return reply.stream(echo, include_usage=body.include_usage())
        return await reply.collect(request, echo)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            text = chat.render(messages)
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from None
        prompts = [encode(text, "messages")]
        job, queue = submit(body, prompts, body.token_limit(), CHAT_DEFAULT_MAX_TOKENS,
                            body.stop_list() + chat.extra_stop, "messages")
        reply = Reply("chatcmpl", "chat.completion", config.model_name, job, queue, len(prompts[0]), chat=True)
        if body.stream:
            return reply.stream(None, include_usage=body.include_usage())
        return await reply.collect(request, None)

    return app


class Reply:
    """Turns one job's scheduler events into an OpenAI response, whole or streamed."""

    def __init__(self, prefix: str, kind: str, model_name: str, job: Job, queue: asyncio.Queue,
                 prompt_tokens: int, chat: bool) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.kind, self.model, self.job, self.queue, self.chat = kind, model_name, job, queue, chat
        self.prompt_tokens = prompt_tokens
        self.created = int(time.time())

    def usage(self) -> dict:
        done = self.job.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def _envelope(self, choices: list[dict], kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    async def _events_now(self, timeout: float | None = None) -> list[tuple]:
        """The next event (waiting up to `timeout`; [] when none came) plus all already queued.

        Taking what piled up in one go keeps the event loop's per-token work from growing
        with the batch: a streamed reply then sends the tokens of several steps as one chunk.
        """
        try:
            first = await asyncio.wait_for(self.queue.get(), timeout) if timeout else await self.queue.get()
        except asyncio.TimeoutError:
            return []
        events = [first]
        while not self.queue.empty():
            events.append(self.queue.get_nowait())
        return events

    async def collect(self, request: Request, echo: list[str] | None) -> JSONResponse | None:
        texts = list(echo) if echo else [""] * self.job.rows
        reasons: list[str | None] = [None] * self.job.rows
        done, next_check = False, time.monotonic() + DISCONNECT_POLL_S
        try:
            while not done:
                events = await self._events_now(DISCONNECT_POLL_S)
                if time.monotonic() >= next_check:  # events keep coming, so check on a clock
                    if await request.is_disconnected():
                        return None
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                for event in events:
                    if event[0] == "error":
                        raise event[1]
                    if event[0] in ("delta", "finish"):
                        texts[event[1]] += event[2]
                    if event[0] == "finish":
                        reasons[event[1]] = event[3]
                    done = done or event[0] == "done"
        finally:
            self.job.cancelled = True  # stops generation if we left early; harmless after done
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return JSONResponse({**self._envelope(choices, self.kind), "usage": self.usage()})

    def _chunk(self, index: int, text: str | None, reason: str | None, first: bool = False) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
            return self._envelope([choice], "chat.completion.chunk")
        return self._envelope([{"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}],
                              self.kind)

    def stream(self, echo: list[str] | None, include_usage: bool) -> StreamingResponse:
        return StreamingResponse(self._events(echo, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, echo: list[str] | None, include_usage: bool) -> AsyncIterator[str]:
        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload)}\n\n"

        open_choices = self.job.rows
        try:
            for i in range(self.job.rows):
                if self.chat:
                    yield sse(self._chunk(i, None, None, first=True))
                elif echo and echo[i]:
                    yield sse(self._chunk(i, echo[i], None))
            while open_choices:
                pending: dict[int, str] = {}  # deltas that arrived together go out as one chunk
                out = []
                for event in await self._events_now():
                    if event[0] == "error":
                        yield "".join(out) + sse(event[1].body())
                        return
                    if event[0] == "delta":
                        pending[event[1]] = pending.get(event[1], "") + event[2]
                    elif event[0] == "finish":
                        open_choices -= 1
                        chunk = self._chunk(event[1], pending.pop(event[1], "") + event[2], event[3])
                        if not open_choices:  # every response carries usage: the last chunk has it
                            chunk["usage"] = self.usage()
                        out.append(sse(chunk))
                text = "".join([sse(self._chunk(i, delta, None)) for i, delta in pending.items()] + out)
                if text:
                    yield text
            if include_usage:
                yield sse({**self._envelope([], self._chunk(0, None, None)["object"]), "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancelled = True
