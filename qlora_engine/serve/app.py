"""The HTTP API on FastAPI: OpenAI's `GET /v1/models`, `POST /v1/chat/completions` and
`POST /v1/completions`, plus `POST /v1/adapters` and `DELETE /v1/adapters/{name}` to load and unload
adapters while serving, `GET /health` and `GET /stats`.

A request is validated here (pydantic: a wrong type or value is a 400 naming the parameter), its
prompt tokenized (the chat template for chat) and checked against the context, then handed to the
engine; the answer comes back as one JSON object or as server-sent events. Every error has OpenAI's
shape, {"error": {"message", "type", "param", "code"}}, with a 4xx status for anything the client
can fix; a 500 means a bug. Two extensions to OpenAI's parameters, as vLLM names them:
`return_token_ids` (the prompt's and the answer's token ids in the response) and `ignore_eos` (for
benchmarks). Touches nothing but the engine and the adapter registry it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError, RunError
from ..generate import prompt_ids
from .adapters import AdapterRegistry, NameTaken, UnknownModel
from .engine import Engine, Sequence
from .sampling import SamplingParams

log = logging.getLogger("qlora_engine.serve")

Int = Annotated[int, Strict()]
Number = Annotated[float, Strict()]  # strict float still takes an int, as JSON means it
# parameters OpenAI defines that this server does not implement: a request that sets one is refused
UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "functions", "logit_bias", "presence_penalty", "frequency_penalty",
               "best_of", "echo", "suffix")  # fmt: skip


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v):
        parts_ok = isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in v)
        if not isinstance(v, str) and not parts_ok:
            raise ValueError("only text is supported: a string, or a list of {\"type\": \"text\", \"text\": ...} parts")
        return v

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class _Generation(BaseModel):
    """The parameters chat and completions share."""

    model_config = ConfigDict(extra="allow")  # clients send fields this server ignores (user, metadata, ...)

    model: str
    max_tokens: Int | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0.0, le=2.0)
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: Int | None = Field(None, ge=-(2**63), lt=2**63)  # OpenAI's: a 64-bit integer
    n: Int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop sequences are allowed, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    def check_supported(self) -> None:
        """A 400 for what OpenAI defines and this server does not do."""
        if self.n != 1:
            raise ApiError(400, f"n={self.n}: this server returns one choice per request (n=1)", param="n")
        extra = self.model_extra or {}
        for key in UNSUPPORTED:
            if extra.get(key) not in (None, False, 0, 0.0, [], {}):
                raise ApiError(400, f"{key} is not supported by this server; leave it out", param=key)
        fmt = extra.get("response_format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            raise ApiError(400, "response_format: only {\"type\": \"text\"} is supported by this server",
                           param="response_format")  # fmt: skip


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(None, ge=1)


class CompletionRequest(_Generation):
    prompt: str | list[str]


class LoadAdapter(BaseModel):
    name: str
    path: str


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc[1:] if not str(p).startswith(("function-", "list[", "str", "int", "float"))]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or None


class Server:
    """What the routes serve: the engine, the registry, the tokenizer and the base's name."""

    def __init__(self, engine: Engine, registry: AdapterRegistry, tokenizer, base_name: str, context: int,
                 base_path: str):  # fmt: skip
        self.engine, self.registry, self.tokenizer = engine, registry, tokenizer
        self.base_name, self.context, self.base_path = base_name, context, base_path
        self.created = int(time.time())

    def models(self) -> list[dict]:
        out = [{"id": self.base_name, "object": "model", "created": self.created, "owned_by": "qlora_engine",
                "root": self.base_path, "parent": None}]  # fmt: skip
        for a in self.registry.adapters():
            out.append({"id": a.name, "object": "model", "created": a.created, "owned_by": "qlora_engine",
                        "root": str(a.path), "parent": self.base_name})  # fmt: skip
        return out


def build_app(server: Server, shutdown_timeout: float = 30.0, engine_thread: bool = True) -> FastAPI:
    """The routes. The engine starts on a thread of its own with the app, unless `engine_thread` is
    False: then the caller runs it (`Engine.run`); either way it stops with the app."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine_thread:
            server.engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(server.engine.stop, shutdown_timeout)

    app = FastAPI(title="qlora serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"type": "", "loc": (), "msg": "invalid request"}
        if err.get("type") == "json_invalid":
            why = (err.get("ctx") or {}).get("error", "")
            return error_response(ApiError(400, f"the request body is not valid JSON ({why}); send a JSON object"))
        param = _param(tuple(err.get("loc", ())))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if param is None:
            return error_response(ApiError(400, f"the request body must be a JSON object with the request's parameters: {msg}"))
        return error_response(ApiError(400, f"invalid value for {param}: {msg}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        log.exception("unexpected error")
        return error_response(ApiError(500, f"internal server error: {type(e).__name__}", kind="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def stats():
        return {**server.engine.snapshot(), "adapters": len(server.registry.names()),
                "adapter_bytes": server.registry.bank_bytes}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": server.models()}

    @app.post("/v1/adapters")
    async def load_adapter(body: LoadAdapter):
        try:
            server.registry.check_name(body.name)
        except NameTaken as e:
            raise ApiError(409, str(e), param="name", code="adapter_exists") from None
        except InputError as e:
            raise ApiError(400, str(e), param="name") from None
        try:
            prepared = await run_in_threadpool(server.registry.prepare, body.name, body.path)
            adapter = await asyncio.wrap_future(server.engine.call(server.registry.install, prepared, int(time.time())))
        except NameTaken as e:
            raise ApiError(409, str(e), param="name", code="adapter_exists") from None
        except InputError as e:
            raise ApiError(400, str(e).splitlines()[0], param="path") from None
        except OSError as e:  # unreadable files: the client's to fix, not a server error
            raise ApiError(400, f"{e.filename or body.path}: {e.strerror or e}", param="path") from None
        except RunError as e:
            raise ApiError(503, str(e), kind="server_error") from None
        return adapter.describe()

    @app.delete("/v1/adapters/{name:path}")
    async def unload_adapter(name: str):
        try:
            adapter = await asyncio.wrap_future(server.engine.call(server.registry.remove, name))
        except UnknownModel as e:
            raise ApiError(404, str(e), param="name", code="adapter_not_found") from None
        except RunError as e:
            raise ApiError(503, str(e), kind="server_error") from None
        return {"id": adapter.name, "object": "adapter", "deleted": True, "running_requests": adapter.users}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check_model(server, body.model)
        body.check_supported()
        messages = [m.as_dict() for m in body.messages]
        try:
            ids = await run_in_threadpool(lambda: prompt_ids(server.tokenizer, messages)[0].tolist())
        except Exception as e:  # noqa: BLE001 - a chat template refusing these messages (jinja raises its own errors)
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ApiError(400, f"the chat template cannot render these messages: {why}", param="messages") from None
        limit = body.max_completion_tokens or body.max_tokens
        return await _generate(server, request, body, ids, limit, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(server, body.model)
        body.check_supported()
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt: one prompt per request is supported, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        ids = await run_in_threadpool(lambda: server.tokenizer(prompt).input_ids)
        if not ids:
            raise ApiError(400, "prompt is empty", param="prompt")
        return await _generate(server, request, body, list(ids), body.max_tokens, chat=False)

    return app


def _check_model(server: Server, name: str) -> None:
    if name != server.base_name and name not in server.registry.names():
        known = ", ".join([server.base_name, *server.registry.names()])
        raise ApiError(404, f"The model `{name}` does not exist on this server (it has: {known})", param="model",
                       code="model_not_found")  # fmt: skip


async def _generate(server: Server, request: Request, body: _Generation, ids: list[int], limit: int | None, chat: bool):
    where = "messages" if chat else "prompt"
    n, ctx = len(ids), server.context
    if n >= ctx or (limit is not None and n + limit > ctx):
        asked = f"{n + limit} tokens ({n} in the {where}, {limit} in the completion)" if limit else f"{n} tokens in the {where}"
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens, but you requested {asked}; shorten the "
                            f"{where} or lower max_tokens", param=where, code="context_length_exceeded")  # fmt: skip
    params = SamplingParams(max_tokens=limit or ctx - n, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                            stop=body.stop, ignore_eos=body.ignore_eos)  # fmt: skip
    try:
        adapter = server.registry.acquire(body.model)
    except UnknownModel as e:  # unloaded since _check_model
        raise ApiError(404, str(e), param="model", code="model_not_found") from None
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event) -> None:  # on the engine thread
        with contextlib.suppress(RuntimeError):  # the event loop is gone: the server is stopping
            loop.call_soon_threadsafe(events.put_nowait, event)

    seq = Sequence(ids, params, adapter, emit, server.tokenizer)
    try:
        server.engine.submit(seq)
    except RunError as e:
        raise ApiError(503, str(e), kind="server_error") from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.model}  # fmt: skip
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(seq, events, head, chat, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})  # fmt: skip
    return await _collect(seq, events, request, head, chat, body.return_token_ids, ids)


def _usage(info: dict) -> dict:
    return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
            "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}  # fmt: skip


def _engine_error(payload) -> ApiError:
    status, message = payload
    return ApiError(status, message, kind="server_error" if status >= 500 else "invalid_request_error")


async def _collect(seq: Sequence, events: asyncio.Queue, request: Request, head: dict, chat: bool, token_ids: bool,
                   prompt: list[int]) -> JSONResponse:  # fmt: skip
    parts = []
    while True:
        try:
            kind, payload = await asyncio.wait_for(events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                seq.cancel()  # nobody will read the answer: free the slot
                return error_response(ApiError(499, "the client closed the connection"))
            continue
        if kind == "text":
            parts.append(payload)
        elif kind == "error":
            return error_response(_engine_error(payload))
        else:
            text = "".join(parts)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                       "finish_reason": payload["finish_reason"]} if chat else
                      {"index": 0, "text": text, "logprobs": None, "finish_reason": payload["finish_reason"]})  # fmt: skip
            out = {**head, "choices": [choice], "usage": _usage(payload)}
            if token_ids:
                out["prompt_token_ids"] = prompt
                choice["token_ids"] = payload["token_ids"]
            return JSONResponse(out)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(seq: Sequence, events: asyncio.Queue, head: dict, chat: bool, include_usage: bool):
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse({**head, "choices": [choice]})

    done = False
    try:
        if chat:
            yield chunk(None, None, role=True)
        while True:
            kind, payload = await events.get()
            if kind == "text":
                yield chunk(payload, None)
            elif kind == "error":
                done = True
                yield _sse(_engine_error(payload).body())
                yield "data: [DONE]\n\n"
                return
            else:
                done = True
                yield chunk(None, payload["finish_reason"])
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(payload)})
                yield "data: [DONE]\n\n"
                return
    finally:
        if not done:
            seq.cancel()  # the client went away mid-stream (or the server is stopping): free the slot
