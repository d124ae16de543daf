"""``tokenmill serve``: start the engine core process, then uvicorn with the API app."""
from __future__ import annotations

import gc
import logging
import os
import sys

log = logging.getLogger(__name__)


def run_server(args) -> int:
    """Serve until interrupted. Configuration problems raise ValueError (one clear line);
    an engine core that fails to start is reported and gives exit code 1."""
    from tokenmill.commands.engine_args import engine_kwargs
    from tokenmill.config import EngineConfig
    from tokenmill.engine.core_process import CoreClient, CoreStartupError
    from tokenmill.default_model import DEFAULT_MODEL_NAME, resolve_model

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = resolve_model(args.model)
    names = args.served_model_name or [DEFAULT_MODEL_NAME if args.model is None else args.model]
    api_key = args.api_key or os.environ.get("TOKENMILL_API_KEY") or None
    if args.max_body_bytes <= 0:
        raise ValueError(f"--max-body-bytes must be positive, got {args.max_body_bytes}")
    if args.max_n < 1:
        raise ValueError(f"--max-n must be at least 1, got {args.max_n}")
    for flag in ("request_timeout", "shutdown_timeout", "engine_stall_timeout"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if args.engine_restarts < 0:
        raise ValueError(f"--engine-restarts must be 0 or more, got {args.engine_restarts}")
    if not args.chat_template_timeout > 0:
        raise ValueError(f"--chat-template-timeout must be positive, got {args.chat_template_timeout}")
    config = EngineConfig.from_kwargs(model, tokenizer=args.tokenizer, served_model_name=names[0],
                                      max_waiting=args.max_waiting, **engine_kwargs(args))
    # The core loads the model while this process loads the tokenizer (both import torch).
    core = CoreClient(config, startup_timeout=args.startup_timeout, wait=False)
    engine = None
    try:
        import uvicorn

        from tokenmill.api.app import AppSettings, build_app
        from tokenmill.api.async_engine import AsyncEngine
        from tokenmill.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(args.tokenizer or model)
        except Exception as exc:  # missing or broken tokenizer files: say which directory
            raise ValueError(f"cannot load a tokenizer from {args.tokenizer or model}: {exc}") from None
        try:
            core.wait_ready()
        except CoreStartupError as exc:
            print(f"tokenmill serve: error: {exc}", file=sys.stderr, flush=True)
            return 1
        server = None
        gave_up: list[str] = []

        def on_fatal(reason: str) -> None:
            gave_up.append(reason)
            if server is not None:
                server.should_exit = True  # graceful: responses already failed with 503 still go out

        engine = AsyncEngine(core, tokenizer, request_timeout=args.request_timeout,
                             stall_timeout=args.engine_stall_timeout, max_restarts=args.engine_restarts,
                             restart=lambda: CoreClient(config, startup_timeout=args.startup_timeout),
                             on_fatal=on_fatal)
        app = build_app(engine, AppSettings(tuple(names), model, api_key, args.max_body_bytes,
                                            args.tool_call_parser, max_n=args.max_n, store_path=args.store,
                                            embedding_pooling=args.embedding_pooling,
                                            trust_request_chat_template=args.trust_request_chat_template,
                                            chat_template_timeout=args.chat_template_timeout))
        info = core.info
        print(f"tokenmill serve: model {names[0]} ({model}) on {info.platform}, KV cache {info.num_kv_tokens:,} "
              f"tokens ({info.num_blocks} blocks of {info.block_size}), max_model_len {info.max_model_len}, "
              f"attention {info.attention_backend}; listening on http://{args.host}:{args.port}"
              f"{' (API key required)' if api_key else ''}", flush=True)
        # What start-up built (tokenizer, transformers, the app) lives as long as the process: moved out
        # of the collector's sight, the first full collection under load no longer scans it all
        # (it stalled every stream for ~200 ms, a burst of requests' TTFT p99 with it).
        gc.collect()
        gc.freeze()
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                                               timeout_keep_alive=30, access_log=args.access_log,
                                               timeout_graceful_shutdown=args.shutdown_timeout))
        server.run()
        if gave_up:
            print(f"tokenmill serve: error: the engine core died and was not restarted: {gave_up[0]}",
                  file=sys.stderr, flush=True)
            return 1
    finally:
        (engine.core if engine is not None else core).close()
    return 0
