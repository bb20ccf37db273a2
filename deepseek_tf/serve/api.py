"""The FastAPI application: OpenAI's chat and text completions (streamed as server-sent
events when `stream` is true), `/v1/models`, `/health`, `/metrics` and the simple
`POST /generate`.

Every refused request gets OpenAI's error JSON (`{"error": {"message", "type", "param",
"code"}}`): 400 for a bad body, an unknown model or a prompt the cache cannot hold, 429
when the queue is full, 504 after `timeout` seconds. A client that disconnects cancels
its completions (their rows leave the batch at the next step).

Example:
    >>> app = create_app(Service(engine, tok, profile, "tiny", timeout=60))
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from deepseek_tf.generate.decode import SERVING_MAX_NEW_TOKENS
from deepseek_tf.generate.text import chat_prompt_ids, prompt_ids
from deepseek_tf.serve.engine import QueueFull, Row
from deepseek_tf.serve.protocol import (ChatRequest, CompletionRequest, GenerateRequest,
                                        Sampling, error_body, validation_message)


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/generate")


class ApiError(Exception):
    """A refused request: HTTP status + OpenAI's error fields."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


class Service:
    """What the endpoints share.

    Args:
      engine: the running `engine.Engine`.
      tok: the run's tokenizer.
      profile: the run's chat profile (`generate.text.chat_profile`): the chat template of
        `/v1/chat/completions` and the stop strings of every endpoint.
      model_name: the one model id this server answers to.
      timeout: seconds a request may take (queueing included).
      metrics: an optional `metrics.Metrics`.
    """

    def __init__(self, engine, tok, profile, model_name: str, timeout: float = 300.0,
                 metrics=None):
        self.engine, self.tok, self.profile = engine, tok, profile
        self.model_name, self.timeout, self.metrics = model_name, timeout, metrics
        self.started = int(time.time())

    def check_model(self, name: str):
        if name != self.model_name:
            raise ApiError(400, f"model {name!r} is not served here; this server serves "
                                f"{self.model_name!r} (GET /v1/models)", param="model",
                           code="model_not_found")

    def chat_ids(self, req: ChatRequest):
        if self.profile.template is None:
            raise ApiError(400, "this run has no chat template; use /v1/completions",
                           param="messages")
        msgs = [(m.role, m.text()) for m in req.messages]
        body = msgs[1:] if msgs[0][0] == "system" else msgs
        for k, (role, _) in enumerate(body):
            want = ("assistant",) if k % 2 else ("user", "tool")
            if role not in want:
                raise ApiError(400, f"messages: after an optional first system message, "
                                    f"user (or tool) and assistant turns alternate and the "
                                    f"last is user or tool; message {k + len(msgs) - len(body)} "
                                    f"is {role!r}", param="messages")
        if len(body) % 2 == 0:
            raise ApiError(400, "messages: the last message must be from the user (or a "
                                "tool)", param="messages")
        return chat_prompt_ids(msgs, self.tok, self.profile.template)

    def rows(self, prompts: list, opts: Sampling, max_tokens: int | None, loop) -> list[Row]:
        """One row per prompt and choice; 400 if a prompt and its tokens overflow the cache."""
        limit, events, rows = self.engine.max_length, asyncio.Queue(), []
        for ids in prompts:
            room = limit - len(ids)
            if room < 1:
                raise ApiError(400, f"the prompt has {len(ids)} tokens; this server's context "
                                    f"holds {limit} (prompt + new tokens): shorten it",
                               param="messages", code="context_length_exceeded")
            if max_tokens is not None and max_tokens > room:
                raise ApiError(400, f"the prompt has {len(ids)} tokens and max_tokens is "
                                    f"{max_tokens}: together more than this server's context "
                                    f"of {limit}; lower max_tokens to at most {room}",
                               param="max_tokens", code="context_length_exceeded")
            new = max_tokens or min(SERVING_MAX_NEW_TOKENS, room)
            for k in range(opts.n):
                rows.append(Row(ids, new, opts.temperature, opts.top_k, opts.top_p,
                                -1 if opts.seed is None else opts.seed + k,
                                self.profile.stop_strings + opts.stops(), loop, events,
                                len(rows)))
        return rows

    def submit(self, rows: list[Row], prompts: list):
        if len(rows) > self.engine.max_queue:
            raise ApiError(400, f"the request asks for {len(rows)} completions (prompts x n); "
                                f"this server queues at most {self.engine.max_queue}", param="n")
        try:
            self.engine.submit(rows)
        except QueueFull as e:
            raise ApiError(429, str(e), "rate_limit_error", code="queue_full") from e
        if self.metrics:
            self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))

    async def events(self, rows: list[Row], request: Request | None = None):
        """Yields the rows' (index, kind, value) events until all are done; cancels the
        rows on timeout, on a disconnect (polled when `request` is given) or if the
        consumer stops."""
        deadline, left = time.monotonic() + self.timeout, len(rows)
        try:
            while left:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    raise ApiError(504, f"the request took longer than the server's timeout "
                                        f"of {self.timeout:g} s", "timeout_error",
                                   code="timeout")
                try:
                    event = await asyncio.wait_for(rows[0].events.get(), min(wait, 0.5))
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                if event[1] == "error":
                    raise ApiError(500, event[2], "server_error")
                left -= event[1] == "done"
                yield event
        finally:
            for r in rows:
                r.cancelled = True  # no effect on a finished row

    async def collect(self, rows: list[Row], request: Request) -> list[tuple[str, str]]:
        """(text, finish_reason) per row."""
        texts = [""] * len(rows)
        async for i, kind, value in self.events(rows, request):
            if kind == "text":
                texts[i] += value
        return [(t, r.finish_reason) for t, r in zip(texts, rows)]


def usage(prompts: list, rows: list[Row]) -> dict:
    done = sum(len(r.tokens) for r in rows)
    return {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": done,
            "total_tokens": sum(len(p) for p in prompts) + done}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(service: Service) -> FastAPI:
    """The FastAPI app of a `Service`."""
    app = FastAPI(title="deepseek_tf", docs_url=None, redoc_url=None)
    s = service

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, e: RequestValidationError):
        message, param = validation_message(e.errors())
        if param is None and "json" not in request.headers.get("content-type", ""):
            message = "send a JSON object with Content-Type: application/json"
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), "not_found_error" if e.status_code == 404
                                       else "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def bug(_, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}",
                                       "server_error"), status_code=500)

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        path = request.url.path
        if s.metrics and path != "/metrics":  # known paths only: a scanner adds no series
            label = path if path in ENDPOINTS else "/v1/models/{name}" if path.startswith(
                "/v1/models/") else "other"
            s.metrics.requests.labels(label, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": s.model_name, "max_length": s.engine.max_length,
                "queue_depth": s.engine.queue_depth(), "active": s.engine.active_rows()}

    @app.get("/metrics")
    async def metrics():
        if s.metrics is None:
            raise ApiError(404, "metrics are off", "not_found_error")
        return Response(s.metrics.render(), media_type=s.metrics.content_type)

    def model_card():
        return {"id": s.model_name, "object": "model", "created": s.started,
                "owned_by": "deepseek_tf"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        s.check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        s.check_model(req.model)
        prompts = [s.chat_ids(req)]
        return await _answer(request, req, prompts, req.max_completion_tokens or req.max_tokens,
                             "chat.completion", "chatcmpl")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        s.check_model(req.model)
        prompts = [prompt_ids(p, s.tok) for p in req.prompts()]
        return await _answer(request, req, prompts, req.max_tokens, "text_completion", "cmpl")

    async def _answer(request, req, prompts, max_tokens, kind, prefix):
        rows = s.rows(prompts, req, max_tokens, asyncio.get_running_loop())
        s.submit(rows, prompts)
        head = {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": s.model_name}
        chat_ = kind == "chat.completion"
        echo = [p for p in req.prompts() for _ in range(req.n)] \
            if getattr(req, "echo", False) else None
        if req.stream:
            return StreamingResponse(_stream(req, rows, prompts, head, chat_, echo),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        choices = []
        for i, (text, reason) in enumerate(await s.collect(rows, request)):
            if chat_:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "finish_reason": reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": (echo[i] if echo else "") + text,
                                "finish_reason": reason, "logprobs": None})
        return {**head, "object": kind, "choices": choices, "usage": usage(prompts, rows)}

    async def _stream(req, rows, prompts, head, chat_, echo):
        kind = "chat.completion.chunk" if chat_ else "text_completion"

        def chunk(i, delta=None, reason=None):
            if chat_:
                choice = {"index": i, "delta": delta or {}, "finish_reason": reason,
                          "logprobs": None}
            else:
                choice = {"index": i, "text": (delta or {}).get("content", ""),
                          "finish_reason": reason, "logprobs": None}
            return sse({**head, "object": kind, "choices": [choice]})

        for i in range(len(rows)):
            if chat_:
                yield chunk(i, {"role": "assistant", "content": ""})
            elif echo:
                yield chunk(i, {"content": echo[i]})
        try:
            async for i, what, value in s.events(rows):
                yield chunk(i, {"content": value}) if what == "text" else chunk(i, reason=value)
        except ApiError as e:
            yield sse(e.body)
            return
        if req.include_usage():
            yield sse({**head, "object": kind, "choices": [], "usage": usage(prompts, rows)})
        yield "data: [DONE]\n\n"

    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request):
        ids = prompt_ids(req.prompt, s.tok, s.profile.template if req.chat else None)
        opts = Sampling(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                        seed=req.seed)
        rows = s.rows([ids], opts, req.max_new_tokens, asyncio.get_running_loop())
        s.submit(rows, [ids])
        (text, reason), = await s.collect(rows, request)
        return {"prompt": req.prompt, "completion": text, "num_tokens": len(rows[0].tokens),
                "stop_reason": reason}

    return app
