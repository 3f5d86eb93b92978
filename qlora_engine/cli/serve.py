"""`qlora serve`: one base, many LoRA adapters, an OpenAI-compatible HTTP API (FastAPI on uvicorn).

    qlora serve --model SmolLM2-135M-Instruct --adapter demo=runs/demo/adapter --port 8000

The port is taken first, then the model and every --adapter are loaded and checked before any
request is answered: a taken port or a bad adapter is a one-line error and exit 2. SIGTERM or Ctrl-C stops accepting connections, lets running requests
finish (up to --shutdown-timeout seconds; those left get an error), and exits 0.
"""

from __future__ import annotations

from . import args


def build_parser(prog: str = "qlora serve"):
    p = args.parser(prog, "Serve a base model and its LoRA adapters over an OpenAI-compatible API (/v1/chat/completions, "
                          "/v1/completions, /v1/models; /v1/adapters loads and unloads adapters while serving), batching "
                          "requests across adapters.")  # fmt: skip
    p.add_argument("--model", required=True, help="the base: a checkpoint directory or hub id")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter (PEFT directory) served under NAME; repeat for more")  # fmt: skip
    p.add_argument("--base", default="nf4", choices=["nf4", "bf16"],
                   help="base weights: nf4 (as QLoRA trains them) or bf16 (for adapters trained with base: bf16) [nf4]")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; there is no "
                                                       "authentication) [127.0.0.1]")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (printed) [8000]")
    p.add_argument("--base-name", help="the base's model id in the API [the --model value]")
    p.add_argument("--max-batch", type=int, default=32, help="most requests decoded together; more wait [32]")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM [30]")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info: one line per request) [info]")  # fmt: skip
    args.add_device(p)
    return p


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    from ..errors import InputError

    out = []
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq or not name or not path:
            raise InputError(f"--adapter {spec!r}: write it as NAME=DIR, e.g. --adapter demo=runs/demo/adapter")
        if name in [n for n, _ in out]:
            raise InputError(f"--adapter: the name {name!r} is given twice")
        out.append((name, path))
    return out


def listen(host: str, port: int):
    """A listening socket on host:port (port 0: a free one), or a one-line InputError."""
    import socket

    from ..errors import InputError

    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)
    except OSError as e:
        raise InputError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); choose another port "
                         "(--port 0 picks a free one)") from None  # fmt: skip
    return sock


def run(argv: list[str]) -> int:
    import signal
    import threading

    from ..errors import InputError, RunError
    from ..machine import resolve_device
    from ..progress import quiet_third_party

    a = build_parser().parse_args(argv)
    adapters = parse_adapters(a.adapter)
    if a.max_batch < 1 or not 0 <= a.port <= 65535 or a.shutdown_timeout < 0:
        raise InputError("--max-batch must be at least 1, --port in 0..65535 and --shutdown-timeout at least 0")
    quiet_third_party()
    try:
        import fastapi  # noqa: F401 - the app's, imported here to fail before the model loads
        import uvicorn
    except ImportError as e:
        raise RunError(f"qlora serve needs FastAPI and uvicorn, which are not installed ({e.name} is missing): "
                       "pip install fastapi uvicorn") from None  # fmt: skip

    from ..serve import build

    sock = listen(a.host, a.port)  # first: a taken port is known before the model loads
    try:
        app, server = build(a.model, adapters, a.base, resolve_device(a.device), a.max_batch, a.base_name,
                            a.shutdown_timeout, engine_thread=False)  # fmt: skip
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"qlora serve: {server.base_name} ({a.base}) with {len(adapters)} adapter(s) on http://{shown}:{port}/v1 "
          f"(context {server.context} tokens, up to {a.max_batch} requests a batch)", flush=True)  # fmt: skip
    config = uvicorn.Config(app, log_level=a.log_level, timeout_graceful_shutdown=a.shutdown_timeout or None)
    web = uvicorn.Server(config)
    # The model runs on this (the main) thread and uvicorn on another: on the CPU, torch's parallel
    # regions run 1.6x faster on the main thread. SIGTERM/SIGINT ask uvicorn for its graceful
    # shutdown (a second SIGINT forces it); its lifespan's end stops the engine, which ends run().
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, web.handle_exit)

    def serve_http():
        try:
            web.run(sockets=[sock])
        finally:
            server.engine.stop(0)  # uvicorn ended (or never started): so does the engine

    http = threading.Thread(target=serve_http, name="qlora-serve-http", daemon=True)
    http.start()
    try:
        server.engine.run()
        http.join()
    finally:
        print("qlora serve: stopped", flush=True)
    return 0
