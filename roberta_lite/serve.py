"""Serve adapters over HTTP: one frozen base, any number of adapters, every request batched with the others.

    pip install -e ".[serve]"
    python -m roberta_lite.serve --model roberta-base --adapter sentiment=weights/adapters/imdb-houlsby \\
        --adapter nli=runs/mnli-lora [--host 127.0.0.1] [--port 8000] [--precision fp32] [--admin-token SECRET]
    curl -s localhost:8000/v1/predict -d '{"adapter": "sentiment", "inputs": ["A wonderful film."]}'

API (JSON; every error is a 4xx or 5xx {"error": "one line"}):
    POST /v1/predict        {"adapter": NAME, "inputs": [TEXT or [TEXT, TEXT_PAIR], ...]} -> {"outputs": [...]}, one
                            object per input, the one `python -m roberta_lite.predict` prints for it
                            (a token-classification adapter: {"entities": [...]}; single texts only)
    GET  /v1/adapters       {"adapters": [{"name", "kind", "task", "labels", "merged"}, ...]}
    PUT  /v1/adapters/NAME  {"source": DIR_OR_HUB_ID} (needs --admin-token, sent as Authorization: Bearer TOKEN)
    DELETE /v1/adapters/NAME                               (likewise)
    GET  /health            {"status": "ok", "adapters": N}
    GET  /metrics           Prometheus text: requests and errors by adapter, passes, rows and adapters per pass,
                            queue wait and latency histograms

Requests arriving within --batch-window-ms of each other (or up to --batch-tokens tokens) share forward passes,
whatever their adapters (batcher.py). A full queue answers 503 with Retry-After. SIGTERM (or Ctrl-C) stops
accepting connections, answers what is in flight and exits 0.

From Python: `serve("roberta-base", {"sentiment": "weights/adapters/imdb-houlsby"}, port=8000)`, or
`make_app(load_service(...))` for any ASGI server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass

try:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route
except ImportError as e:  # the serve extra is optional: say how to get it, in one line
    raise ImportError(f"roberta_lite.serve needs the serve extra ({e.name} is missing): "
                      f"pip install -e \".[serve]\"") from None

from roberta_lite.batcher import AdapterGone, Batcher, QueueFull
from roberta_lite.api import Model
from roberta_lite.runtime import base_dtype, limit_heap_growth, resolve_base, select_device
from roberta_lite.serve_metrics import Metrics
from roberta_lite.tokenizer import Tokenizer
from roberta_lite.weights import CheckpointError

NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")  # adapter names: they appear in URLs and metric labels
log = logging.getLogger("roberta_lite.serve")
LOAD_ERRORS = (CheckpointError, FileNotFoundError, ValueError, KeyError, RuntimeError, OSError)


@dataclass
class Limits:
    """What one request may hold; over a limit is a 4xx that names it."""
    max_body_bytes: int = 1 << 20
    max_inputs: int = 64
    max_chars: int = 50_000


class BadRequest(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def one_line(e: BaseException) -> str:
    text = " ".join(str(e.args[0] if isinstance(e, KeyError) and e.args else e).split())
    return text or type(e).__name__


# ---------------------------------------------------------------------------------------------- the model

class Service:
    """The model, its adapters and the batcher: what the HTTP routes act on."""

    def __init__(self, model: Model, tokenizer: Tokenizer, max_length: int, limits: Limits,
                 admin_token: str | None, **batching):
        self.model, self.limits, self.admin_token = model, limits, admin_token
        self.metrics = Metrics()
        self.batcher = Batcher(model, tokenizer, max_length, self.metrics, **batching)
        self.adapters = self._describe()  # replaced whole (never mutated) after each change, by the worker

    def _describe(self) -> dict[str, dict]:
        m = self.model
        return {n: {"name": n, "kind": m.adapter_configs[n].kind, "task": m.heads[n].task,
                    "labels": list(m.heads[n].labels), "merged": m.merged_adapter == n} for n in m.adapter_names}

    def add(self, name: str, source: str) -> dict:
        """On the worker: load (or replace) adapter `name`; a failed load leaves the model as it was."""
        if self.model.merged_adapter is not None:
            raise BadRequest(f"adapter {self.model.merged_adapter!r} is merged into the base, so it must stay the "
                             f"only one served", 409)
        try:
            self.model.load_adapter(source, name=name, replace=True)
        except LOAD_ERRORS as e:
            raise BadRequest(f"adapter {name!r} from {source!r}: {one_line(e)}", 422) from None
        finally:
            self.model.active_adapter = None  # requests always name theirs; and an active adapter cannot be deleted
        self.adapters = self._describe()
        return self.adapters[name]

    def delete(self, name: str) -> dict:
        """On the worker, after every request queued before: remove adapter `name`."""
        if name not in self.model.adapter_configs:
            raise BadRequest(f"adapter {name!r} is not served", 404)
        if self.model.merged_adapter == name:
            raise BadRequest(f"adapter {name!r} is merged into the base and cannot be removed while serving", 409)
        self.model.delete_adapter(name)
        self.adapters = self._describe()
        return {"deleted": name}


def load_service(model: str, adapters: dict[str, str], *, device: str = "auto", precision: str = "auto",
                 max_length: int | None = None, merge: str | None = None, limits: Limits | None = None,
                 admin_token: str | None = None, quantize: str | None = None, **batching) -> Service:
    """Load the base once and every adapter onto it (names -> directories or hub ids). `merge`: a LoRA adapter to
    fold into the base weights, allowed when it is the only one. `batching`: Batcher's window, max_tokens,
    max_rows, max_queue, batching."""
    for name in adapters:
        if not NAME.match(name):
            raise ValueError(f"--adapter {name!r}: a name is 1-64 letters, digits, '_' or '-'")
    root, _ = resolve_base(model)
    dev = select_device(device)
    net = Model.from_pretrained(root, dtype=base_dtype(precision, dev, quantize), device=dev)
    for name, source in adapters.items():
        try:
            net.load_adapter(source, name=name)
        except LOAD_ERRORS as e:
            raise ValueError(f"--adapter {name}={source}: {one_line(e)}") from None
    net.active_adapter = None
    if merge is not None:
        if merge not in net.adapter_configs or len(net.adapter_names) != 1:
            raise ValueError(f"--merge {merge}: a merged LoRA must be the only adapter served (every example of a "
                             f"pass runs through the merged base weights)")
        try:
            net.merge_adapter(merge)
        except (KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"--merge {merge}: {one_line(e)}") from None
    if quantize is not None:  # after merging: a LoRA is merged into the float weights, then quantized with them
        net.quantize(quantize)
    net.to(dev).eval()
    limit = net.config.max_tokens
    if max_length is not None and not 2 <= max_length <= limit:
        raise ValueError(f"--max-length {max_length}: must lie in 2..{limit} for this model")
    return Service(net, Tokenizer.from_pretrained(root), max_length or limit, limits or Limits(), admin_token,
                   **batching)


# ---------------------------------------------------------------------------------------------- requests

def parse_json(body: bytes):
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"invalid JSON: {one_line(e)}") from None
    except RecursionError:
        raise BadRequest("invalid JSON: nested too deeply") from None


def parse_predict(req, service: Service) -> tuple[str, list[str | tuple[str, str]]]:
    """(adapter, inputs) from a /v1/predict body's JSON, or BadRequest naming what is wrong."""
    if not isinstance(req, dict):
        raise BadRequest(f"expected a JSON object {{\"adapter\": ..., \"inputs\": [...]}}, got {_kind(req)}")
    extra = sorted(set(req) - {"adapter", "inputs"})
    if extra:
        raise BadRequest(f"unknown field {extra[0]!r} (expected 'adapter' and 'inputs')")
    for key in ("adapter", "inputs"):
        if key not in req:
            raise BadRequest(f"missing field {key!r}")
    adapter, inputs = req["adapter"], req["inputs"]
    if not isinstance(adapter, str):
        raise BadRequest(f"'adapter' must be a string, got {_kind(adapter)}")
    if adapter not in service.adapters:
        raise BadRequest(f"adapter {adapter[:100]!r} is not served (serving: "
                         f"{', '.join(service.adapters) or 'none'})", 404)
    if not isinstance(inputs, list):
        raise BadRequest(f"'inputs' must be a list of texts or [text, text_pair] pairs, got {_kind(inputs)}")
    lim = service.limits
    if not inputs:
        raise BadRequest("'inputs' is empty")
    if len(inputs) > lim.max_inputs:
        raise BadRequest(f"'inputs' has {len(inputs)} items, over the limit of {lim.max_inputs} (--max-inputs)", 413)
    out, tags = [], service.adapters[adapter]["task"] == "token-classification"
    for i, x in enumerate(inputs):
        if isinstance(x, list) and len(x) == 2 and all(isinstance(t, str) for t in x) and tags:
            raise BadRequest(f"inputs[{i}]: adapter {adapter!r} tags tokens and takes single texts, not pairs")
        if isinstance(x, list) and len(x) == 2 and all(isinstance(t, str) for t in x):
            texts, x = x, (x[0], x[1])
        elif isinstance(x, str):
            texts = [x]
        else:
            what = f"a list of {len(x)}" if isinstance(x, list) and len(x) != 2 else _kind(x)
            raise BadRequest(f"inputs[{i}]: expected a text or a pair [text, text_pair] of texts, got {what}")
        for t in texts:
            if len(t) > lim.max_chars:
                raise BadRequest(f"inputs[{i}]: {len(t)} characters, over the limit of {lim.max_chars} "
                                 f"(--max-chars)", 413)
        out.append(x)
    return adapter, out


def _kind(x) -> str:
    if isinstance(x, list):
        return "a list of " + ", ".join(sorted({_kind(v) for v in x})) if x else "an empty list"
    return {dict: "an object", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(x), type(x).__name__)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is over `limit` bytes: never read whole into memory first."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"request body of {declared} bytes is over the limit of {limit} (--max-body-bytes)", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"request body is over the limit of {limit} bytes (--max-body-bytes)", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def error(message: str, status: int, **headers) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def make_app(service: Service) -> Starlette:
    async def predict(request: Request):
        start, adapter, n = time.perf_counter(), "-", 0
        try:
            req = parse_json(await read_body(request, service.limits.max_body_bytes))
            if isinstance(req, dict) and isinstance(req.get("adapter"), str):
                adapter = req["adapter"]  # errors are counted by adapter when it is a served one
            adapter, inputs = parse_predict(req, service)
            n = len(inputs)
            outputs = await asyncio.wrap_future(service.batcher.submit(adapter, inputs))
            response = JSONResponse({"outputs": outputs})
        except BadRequest as e:
            response = error(str(e), e.status)
        except QueueFull as e:
            response = error(f"{e}; retry later", 503, **{"Retry-After": "1"})
        except AdapterGone as e:
            response = error(one_line(e), 404)
        except Exception as e:  # a failed forward pass: this request's answer, not the server's end
            log.exception("prediction failed")
            response = error(f"internal error: {type(e).__name__}: {one_line(e)}", 500)
        label = adapter if adapter in service.adapters else "-"
        service.metrics.request(label, response.status_code, n, time.perf_counter() - start)
        return response

    async def list_adapters(request: Request):
        return JSONResponse({"adapters": list(service.adapters.values())})

    async def admin(request: Request):
        if service.admin_token is None:
            return error("adapter administration is off: start the server with --admin-token", 403)
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {service.admin_token}".encode()):
            return error("missing or wrong admin token (send Authorization: Bearer TOKEN)", 401,
                         **{"WWW-Authenticate": "Bearer"})
        name = request.path_params["name"]
        if not NAME.match(name):
            return error(f"adapter name {name[:100]!r}: expected 1-64 letters, digits, '_' or '-'", 400)
        try:
            if request.method == "DELETE":
                return JSONResponse(await asyncio.wrap_future(service.batcher.call(lambda _: service.delete(name))))
            body = parse_json(await read_body(request, service.limits.max_body_bytes) or b"null")
            if not isinstance(body, dict) or not isinstance(body.get("source"), str) or set(body) != {"source"}:
                return error('expected a JSON object {"source": DIR_OR_HUB_ID}', 400)
            existed = name in service.adapters
            info = await asyncio.wrap_future(service.batcher.call(lambda _: service.add(name, body["source"])))
            return JSONResponse(info, status_code=200 if existed else 201)
        except BadRequest as e:
            return error(str(e), e.status)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "adapters": len(service.adapters)})

    async def metrics(request: Request):
        return PlainTextResponse(service.metrics.render(len(service.adapters)),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(request: Request, exc: HTTPException):
        return error(f"{request.method} {request.url.path}: {exc.detail}", exc.status_code)

    async def internal_error(request: Request, exc: Exception):
        log.error("%s %s failed: %s", request.method, request.url.path, exc, exc_info=exc)
        return error(f"internal error: {type(exc).__name__}: {one_line(exc)}", 500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        try:
            yield
        finally:  # after uvicorn has answered every request in flight
            await asyncio.to_thread(service.batcher.stop)

    routes = [Route("/v1/predict", predict, methods=["POST"]),
              Route("/v1/adapters", list_adapters, methods=["GET"]),
              Route("/v1/adapters/{name}", admin, methods=["PUT", "DELETE"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: internal_error})


# ---------------------------------------------------------------------------------------------- running

def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), so the address in use is known before the server starts."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: expected 0-65535 (0: any free port)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, which also tells the batcher to stop waiting for company when a signal stops it."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame):
        self.service.batcher.drain()  # requests in flight must not wait out a long batching window
        super().handle_exit(sig, frame)


def run(service: Service, sock: socket.socket, log_level: str = "warning"):
    """Serve on a bound socket until SIGTERM/SIGINT (signals are caught in the main thread only): then stop
    accepting connections, answer what is in flight, stop the worker."""
    config = uvicorn.Config(make_app(service), log_level=log_level, timeout_graceful_shutdown=None)
    _Uvicorn(config, service).run(sockets=[sock])


def serve(model: str, adapters: dict[str, str], host: str = "127.0.0.1", port: int = 8000, **options):
    """Load and serve until SIGTERM/SIGINT; `options` as load_service takes them."""
    service = load_service(model, adapters, **options)
    run(service, bind(host, port))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def adapter_spec(spec: str) -> tuple[str, str]:
    name, sep, source = spec.partition("=")
    if not sep or not name or not source:
        raise ValueError(f"--adapter {spec!r}: expected NAME=DIR_OR_HUB_ID")
    return name, source


def main(argv: list[str] | None = None) -> int:
    limit_heap_growth()
    p = _Parser(prog="python -m roberta_lite.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="base model directory or hub id")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR_OR_HUB_ID",
                   help="an adapter to serve under NAME (repeatable; all must share the base)")
    p.add_argument("--merge", metavar="NAME", help="fold this LoRA adapter into the base weights (it must be the "
                                                   "only adapter; adding others is then refused)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one; the address is printed)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="base model precision")
    p.add_argument("--quantize", choices=["int8"], help="run the frozen base in int8 on the CPU (after --merge)")
    p.add_argument("--max-length", type=int, help="truncate texts to this many tokens (default: the model's limit)")
    p.add_argument("--admin-token", help="enable PUT/DELETE /v1/adapters/NAME for requests bearing this token")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long a request waits for others to share its pass (default 5)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="token budget of one pass, padding included")
    p.add_argument("--batch-rows", type=int, default=64, help="most examples in one pass")
    p.add_argument("--no-batching", action="store_true", help="one request per pass (for comparison)")
    p.add_argument("--max-queue", type=int, default=1024, help="texts waiting before requests get 503")
    p.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes, help="largest request body")
    p.add_argument("--max-inputs", type=int, default=Limits.max_inputs, help="most inputs in one request")
    p.add_argument("--max-chars", type=int, default=Limits.max_chars, help="longest text, in characters")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    try:
        args = p.parse_args(argv)
        if not args.adapter:
            raise ValueError("give at least one --adapter NAME=DIR_OR_HUB_ID")
        adapters: dict[str, str] = {}
        for spec in args.adapter:
            name, source = adapter_spec(spec)
            if name in adapters:
                raise ValueError(f"--adapter {spec!r}: the name {name!r} is given twice")
            adapters[name] = source
        for flag in ("max_body_bytes", "max_inputs", "max_chars"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
        limits = Limits(args.max_body_bytes, args.max_inputs, args.max_chars)
        sock = bind(args.host, args.port)
        service = load_service(args.model, adapters, device=args.device, precision=args.precision,
                               max_length=args.max_length, merge=args.merge, limits=limits,
                               admin_token=args.admin_token, quantize=args.quantize,
                               window=args.batch_window_ms / 1000,
                               max_tokens=args.batch_tokens, max_rows=args.batch_rows, max_queue=args.max_queue,
                               batching=not args.no_batching)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    print(f"serving {len(adapters)} adapter(s) on http://{host}:{port}", file=sys.stderr, flush=True)
    # uvicorn re-raises the signal that stopped it once it has shut down; handled here, it ends in exit 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    run(service, sock, args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
