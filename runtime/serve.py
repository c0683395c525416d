"""`cortex-edge serve`: an OpenAI-compatible chat server whose conversations are durable sessions.

Endpoints: POST /v1/chat/completions (plain or server-sent events), GET /v1/models, GET /health.
One engine, one worker thread, a bounded queue (full: 503 with Retry-After). A request that names a
conversation (X-Session-Id header, else the `user` field) runs on that session: locked, loaded, one
turn, saved (the lock is the sessions' own, so a CLI chat on the same session waits too). A new
conversation is fed every message of the request; an existing one only the last user message, since
its state already holds the rest. Without a name the request is stateless: its messages go into a
fresh state and nothing is saved. A client that disconnects mid-stream: the turn is not committed.

What this leaves out: the engine (engine.py), the turn (chat.py), the files (session.py).
Needs the `serve` extra (starlette, uvicorn, sse-starlette); imported only by `cortex-edge serve`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

from cortex_edge.runtime import session as sess
from cortex_edge.runtime.chat import Chat, PromptError, clean_prompt
from cortex_edge.runtime.engine import Engine
from cortex_edge.runtime.errors import CortexError
from cortex_edge.runtime.sampling import Sampling

QUEUE = 16  # requests waiting for the engine before 503
RETRY_AFTER_S = 2
MAX_BODY = 4 << 20  # bytes of request JSON
MAX_TOKENS = 4096  # most tokens one answer may ask for
DEFAULT_MAX_TOKENS = 256
LOCK_WAIT_S = 60.0  # how long a request waits for a conversation another process holds
ROLES = ("system", "user", "assistant")
_DONE = object()


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request for the worker: its parsed fields and a channel back to the event loop."""
    conversation: str | None
    system: str | None
    history: list[dict]
    user: str
    sampling: Sampling
    max_tokens: int
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)  # the client left: drop the turn
    delivered: threading.Event = field(default_factory=threading.Event)  # the whole answer was handed over

    def send(self, item) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


def _number(body: dict, name: str, lo: float, hi: float, default, integer: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not (lo <= v <= hi) or v != v:
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'} in [{lo}, {hi}]", name)
    return v


def parse(body, headers) -> dict:
    """The request's fields, validated; ApiError names the first bad one."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role in {ROLES} and string content",
                           "messages")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's", "messages")
    try:
        clean[-1]["content"] = clean_prompt(clean[-1]["content"])  # before any answer starts: a 400, not mid-stream
    except PromptError as e:
        raise ApiError(400, f"the last user message: {e}", "messages") from None
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of at most 4 non-empty strings", "stop")
    n = _number(body, "n", 1, 1, 1, integer=True)
    del n
    seed = _number(body, "seed", 0, 2**63 - 1, None, integer=True)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 1, MAX_TOKENS, DEFAULT_MAX_TOKENS, integer=True)
    sampling = Sampling(temperature=float(_number(body, "temperature", 0.0, 2.0, 0.7)),
                        top_p=float(_number(body, "top_p", 1e-9, 1.0, 0.95)), top_k=0, seed=seed,
                        repeat_penalty=float(_number(body, "repeat_penalty", 0.5, 2.0, 1.1)))
    sampling.validate()
    if not isinstance(body.get("stream", False), bool):
        raise ApiError(400, "'stream' must be a boolean", "stream")
    conv = headers.get("x-session-id") or body.get("user")
    if conv is not None:
        if not isinstance(conv, str):
            raise ApiError(400, "'user' must be a string", "user")
        try:
            sess.session_path(conv)
        except CortexError:
            raise ApiError(400, "a conversation id (X-Session-Id or 'user') must be 1-64 letters, digits, '_', "
                           "'-' or '.'", "user") from None
    system = None
    history = clean[:-1]
    if history and history[0]["role"] == "system":
        system, history = history[0]["content"], history[1:]
    return {"conversation": conv, "system": system, "history": history, "user": clean[-1]["content"],
            "sampling": sampling, "max_tokens": max_tokens, "stop": tuple(stop), "stream": body.get("stream", False),
            "model": body.get("model")}


class Server:
    """The engine, its worker thread and queue; build_app() wraps it in starlette."""

    def __init__(self, engine: Engine, model_id: str, api_key: str | None = None, queue_size: int = QUEUE):
        self.engine, self.model_id, self.api_key = engine, model_id, api_key
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.chat = Chat(engine)  # tokenizer and template, shared; each job gets its own state
        threading.Thread(target=self._work, daemon=True, name="cortex-edge-engine").start()

    # ------------------------------------------------------------ worker thread
    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                self._run(job)
            except ApiError as e:
                job.send(e)
            except CortexError as e:
                job.send(ApiError(400, str(e)))
            except Exception as e:  # a bug: the client gets a 500 with its name, the server goes on
                job.send(ApiError(500, f"internal error: {e.__class__.__name__}", kind="server_error"))
            finally:
                job.send(_DONE)

    def _run(self, job: Job) -> None:
        held = None
        if job.conversation is not None:
            try:
                held = sess.SessionFile(sess.session_path(job.conversation), wait_s=LOCK_WAIT_S)
            except sess.SessionError as e:
                raise ApiError(409, str(e), "user", "conversation_busy") from None
        try:
            state, turns, history = None, 0, job.history
            if held is not None:
                try:
                    state, extra, _ = held.load(self.engine)
                    turns = sess.turns(extra)
                    history = []  # the state holds the conversation: only the new message is fed
                except FileNotFoundError:
                    pass
                except sess.SessionError as e:
                    raise ApiError(409, f"conversation {job.conversation}: {e}", "user", "conversation_unusable") from None
            c = Chat(self.engine, state, turns, system=job.system if state is None else None, text_from=self.chat)
            gen = c.turn(job.user, job.sampling, job.max_tokens, stop=job.stop, history=history)
            try:
                for delta in gen:
                    if job.cancelled.is_set():
                        return  # the generator is closed unfinished: nothing committed, nothing saved
                    job.send(delta)
            except PromptError as e:
                raise ApiError(400, str(e), "messages") from None
            finally:
                gen.close()
            s = c.last
            job.send({"usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
                                "total_tokens": s.prompt_tokens + s.new_tokens},
                      "finish_reason": "length" if s.new_tokens >= job.max_tokens else "stop"})
            # commit only once the whole answer has been handed to the client's connection
            while not (job.delivered.wait(0.05) or job.cancelled.is_set()):
                pass
            if job.delivered.is_set() and not job.cancelled.is_set() and held is not None:
                held.save(self.engine, c.state, {"turns": c.turns})
        finally:
            if held is not None:
                held.close()

    # ------------------------------------------------------------ event loop side
    def check_auth(self, headers) -> None:
        if self.api_key is None:
            return
        got = headers.get("authorization", "")
        want = f"Bearer {self.api_key}"
        if not hmac.compare_digest(got.encode(), want.encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key",
                           kind="authentication_error")

    def submit(self, req: dict) -> Job:
        job = Job(conversation=req["conversation"], system=req["system"], history=req["history"], user=req["user"],
                  sampling=req["sampling"], max_tokens=req["max_tokens"], stop=req["stop"],
                  loop=asyncio.get_running_loop(), out=asyncio.Queue())
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(503, "the server is busy: try again shortly", code="server_busy",
                           kind="server_error") from None
        return job


def build_app(server: Server):
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def error(e: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": server.model_id, "queued": server.jobs.qsize()})

    async def models(request: Request):
        try:
            server.check_auth(request.headers)
        except ApiError as e:
            return error(e)
        now = int(time.time())
        return JSONResponse({"object": "list", "data": [
            {"id": mid, "object": "model", "created": now, "owned_by": "cortex-edge"}
            for mid in (server.model_id, "default")]})

    async def completions(request: Request):
        try:
            server.check_auth(request.headers)
            raw = await request.body()
            if len(raw) > MAX_BODY:
                raise ApiError(413, f"request body larger than {MAX_BODY} bytes")
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):
                raise ApiError(400, "the request body is not valid JSON") from None
            req = parse(body, request.headers)
            if req["model"] not in (server.model_id, "default"):
                raise ApiError(404, f"model {req['model']!r} does not exist (this server has {server.model_id!r} "
                               "and 'default')", "model", "model_not_found")
            job = server.submit(req)
        except ApiError as e:
            return error(e)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish=None, usage=None) -> str:
            d = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": server.model_id,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage is not None:
                d["usage"] = usage
            return json.dumps(d)

        if req["stream"]:
            async def events():
                try:
                    first = await job.out.get()
                    if isinstance(first, ApiError):  # before any token: a JSON error event, then the end
                        yield {"data": json.dumps(first.body())}
                        return
                    yield {"data": chunk({"role": "assistant", "content": ""})}
                    item = first
                    while item is not _DONE:
                        if isinstance(item, str):
                            yield {"data": chunk({"content": item})}
                        elif isinstance(item, ApiError):
                            yield {"data": json.dumps(item.body())}
                        else:
                            yield {"data": chunk({}, item["finish_reason"], item["usage"])}
                            yield {"data": "[DONE]"}
                            job.delivered.set()
                        item = await job.out.get()
                finally:  # a client gone mid-stream: the worker drops the turn
                    if not job.delivered.is_set():
                        job.cancelled.set()

            return EventSourceResponse(events(), ping=15)
        parts, final = [], None
        try:
            while (item := await job.out.get()) is not _DONE:
                if isinstance(item, ApiError):
                    return error(item)
                if isinstance(item, str):
                    parts.append(item)
                else:
                    final = item
                    job.delivered.set()
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": server.model_id,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                                          "finish_reason": final["finish_reason"] if final else "stop"}],
                             "usage": final["usage"] if final else None})

    async def not_found(request: Request, exc):
        return error(ApiError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found"))

    async def bad_method(request: Request, exc):
        return error(ApiError(405, f"{request.method} is not allowed on {request.url.path}"))

    return Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                             Route("/v1/chat/completions", completions, methods=["POST"])],
                     exception_handlers={404: not_found, 405: bad_method})


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(engine: Engine, model_id: str, host: str, port: int, api_key: str | None, queue_size: int = QUEUE,
        echo=print) -> None:
    import socket

    import uvicorn

    try:  # a port in use is one line, not uvicorn's log
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise CortexError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    app = build_app(Server(engine, model_id, api_key, queue_size))
    echo(f"cortex-edge serve: {model_id} on http://{host}:{port}/v1 (OpenAI chat API; "
         f"{'API key required' if api_key else 'no API key'}). Ctrl-C stops.")
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
