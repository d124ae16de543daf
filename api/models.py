"""``/v1/models``: list the served names, retrieve one, and refuse deletion (OpenAI's shape).

OpenAI deletes only fine-tuned models its caller owns. A server has no fine-tuned models to
give away: deleting a served name is refused with 403 (the model stays served), and an
unknown id is a 404 ``model_not_found``, as every other endpoint reports it.
"""
from __future__ import annotations

from fastapi import FastAPI

from tokenmill.api.errors import APIError


def add_model_routes(app: FastAPI, srv, model_names: tuple[str, ...], created: int) -> None:
    """Register ``GET /v1/models``, ``GET /v1/models/{id}`` and ``DELETE /v1/models/{id}``."""

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "tokenmill", "root": name,
                "parent": None, "max_model_len": srv.max_model_len}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [card(name) for name in model_names]}

    # ``:path``: served names may hold slashes (``org/model``), as the SDK sends them unescaped.
    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        srv.check_model(model_id, param=None)
        return card(model_id)

    @app.delete("/v1/models/{model_id:path}")
    async def delete_model(model_id: str):
        srv.check_model(model_id, param=None)
        raise APIError(403, f"The model `{model_id}` is served by this server and cannot be deleted: only "
                            f"fine-tuned models a caller owns can be deleted, and this server holds none.",
                       None, "model_not_deletable")
