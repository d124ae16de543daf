"""What a load balancer asks of a worker: SGLang's worker endpoints, answered from our engine.

SGLang's router (``sglang-router``) talks to each worker over HTTP. When it registers a worker
it reads ``/get_server_info`` (or ``/server_info``) and ``/get_model_info`` (or ``/model_info``);
it health-checks ``/health``; its ``power_of_two`` policy polls ``/get_load`` (a list with one
entry per data-parallel rank, whose ``num_tokens`` it sums); ``POST /flush_cache`` on the router
fans out to every worker; its ``/engine_metrics`` scrapes every worker's ``/metrics``. The
routes below answer those with the same field names SGLang's own server uses, filled from the
engine core's real state (never constants), so the router treats a tokenmill replica like an
SGLang one. Like ``/health`` and ``/metrics`` they are open without an API key, except
``/flush_cache``, which changes state; being open, they name the model as ``/v1/models``
does (its served name) and never the checkpoint's or tokenizer's place on disk.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from tokenmill.api.errors import error_body
from tokenmill.version import __version__

#: Paths the router reads without credentials (it sends none to its workers by default).
ROUTER_OPEN_PATHS = frozenset({"/get_server_info", "/server_info", "/get_model_info", "/model_info", "/get_load"})


def _model_facts(model_path: str) -> dict:
    """``model_type`` and ``architectures`` from the checkpoint's config.json (empty if unreadable)."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"model_type": cfg.get("model_type"), "architectures": cfg.get("architectures") or []}


def add_worker_routes(app: FastAPI, engine, model_names: tuple[str, ...], model_path: str) -> None:
    """Register the router-facing routes on ``app`` for ``engine`` (an :class:`AsyncEngine`).

    ``model_path`` is read here (config.json) and not shown: ``model_path`` and
    ``tokenizer_path`` in the answers are the served name, ``model_names[0]``.
    """
    info = engine.info
    facts = _model_facts(model_path)
    name = model_names[0]

    def server_info() -> dict:
        return {
            "model_path": name, "tokenizer_path": name, "served_model_name": name, "model_id": name,
            "version": __version__, "dp_size": 1,
            "tp_size": getattr(info, "tensor_parallel_size", 1),
            "max_total_num_tokens": info.num_kv_tokens, "max_total_tokens": info.num_kv_tokens,
            "max_running_requests": getattr(info, "max_num_seqs", None) or None,
            "max_prefill_tokens": getattr(info, "max_num_batched_tokens", None) or None,
            "context_length": info.max_model_len, "page_size": info.block_size, "device": info.platform,
            "attention_backend": info.attention_backend,
        }

    def model_info() -> dict:
        return {"model_path": name, "tokenizer_path": name, "served_model_name": name,
                "is_generation": True, "weight_version": "default", "max_context_length": info.max_model_len,
                "max_req_input_len": info.max_model_len - 1, "vocab_size": info.vocab_size, **facts}

    def dead() -> JSONResponse:
        return JSONResponse(error_body(503, f"engine core is not running: {engine.dead or 'process exited'}",
                                       None, "engine_dead"), 503)

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info():
        return server_info()

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def get_model_info():
        return model_info()

    @app.get("/get_load")
    async def get_load():
        """One entry (this worker is one data-parallel rank): requests and KV tokens in use."""
        try:
            s = await engine.stats(timeout=5.0)
        except Exception:
            return dead()
        used_tokens = (s.num_blocks - s.num_free_blocks) * info.block_size
        return [{"dp_rank": 0, "num_reqs": s.num_running + s.num_waiting, "num_waiting_reqs": s.num_waiting,
                 "num_tokens": used_tokens}]

    @app.post("/flush_cache")
    async def flush_cache():
        """Drop every unreferenced block from the prefix cache (blocks in use stay)."""
        try:
            freed = await engine.flush_cache(timeout=10.0)
        except Exception:
            return dead()
        return {"message": f"Cache flushed: {freed} cached blocks freed.", "freed_blocks": freed}
