"""``tokenmill serve [PATH]``: an OpenAI-compatible HTTP server (the bundled model without PATH)."""
from __future__ import annotations

import argparse

from tokenmill.commands.engine_args import add_engine_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="local checkpoint directory (default: the bundled model, served as 'tokenmill-default')")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (also read from $TOKENMILL_API_KEY); "
                        "/health and /metrics stay open")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use for the model (default: the path, or 'tokenmill-default')")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="refuse new requests with 503 + Retry-After while this many are waiting")
    p.add_argument("--max-body-bytes", type=int, default=16 << 20, help="largest request body (default 16 MiB)")
    p.add_argument("--max-n", type=int, default=128,
                   help="largest n (and best_of) one request may ask for (default 128, as OpenAI)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="honour a chat_template sent in a request (rendered in a sandboxed worker process under "
                        "--chat-template-timeout); off: such a request is a 400")
    p.add_argument("--chat-template-timeout", type=float, default=5.0,
                   help="seconds a chat template may render before it is stopped (default 5): a request's own "
                        "template, and the model's, which stops itself at the deadline")
    p.add_argument("--startup-timeout", type=float, default=None,
                   help="seconds to wait for the engine to load (default: no limit)")
    p.add_argument("--store", default=None, metavar="PATH",
                   help="keep chat completions sent with store: true in this SQLite database, served by "
                        "GET/POST/DELETE /v1/chat/completions[/{id}[/messages]] (default: off)")
    p.add_argument("--embedding-pooling", default="auto", choices=["auto", "last", "mean"],
                   help="how /v1/embeddings pools the final hidden states: the last token's, their mean, or "
                        "auto: the checkpoint's sentence-transformers pooling config, else last (default auto)")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="fail a request (504) that has not finished this many seconds after it arrived, freeing "
                        "its KV blocks (default: no limit)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds to let requests in flight finish before they are cut off "
                        "(default 30)")
    p.add_argument("--engine-stall-timeout", type=float, default=60.0,
                   help="/health answers 503 once the engine core's step loop has been silent this long "
                        "(hung, not dead) (default 60)")
    p.add_argument("--engine-restarts", type=int, default=3,
                   help="restart a dead engine core at most this many times (requests in flight fail with 503); "
                        "after that the server exits with status 1 (default 3; 0: exit at once)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every HTTP request")
    from tokenmill.guided.tool_parsers import TOOL_PARSERS

    p.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="how tool_choice 'auto' reads tool calls from the output (default: the format the chat "
                        "template uses; hermes for the bundled model)")
    add_engine_arguments(p)
    from tokenmill.commands.router import add_router_arguments

    add_router_arguments(p)


def run(args) -> int:
    if args.data_parallel_size != 1:  # N replicas behind SGLang's router
        from tokenmill.commands import router

        return router.run(args)
    from tokenmill.api.server import run_server

    return run_server(args)
