"""``POST /v1/embeddings``: the model's pooled final hidden states, in OpenAI's shape.

Each input runs as a pooling request through the engine (``SamplingParams.pooling``): the
prompt is computed once, its final-norm hidden states are pooled, nothing is generated and
no KV blocks stay behind. How the states are pooled comes from ``serve --embedding-pooling``:

- ``last``: the last token's state (decoder embedding models: e5-mistral, gte-Qwen, SFR);
- ``mean``: the average over the input's tokens;
- ``auto`` (default): what the checkpoint's sentence-transformers pooling config
  (``1_Pooling/config.json``) names, else ``last`` (in a causal model only the last token has
  seen the whole input).

Vectors are L2-normalized, as OpenAI's are. ``dimensions`` is honoured only when it equals
the model's hidden size: cutting a vector short is meaningful only for models trained for it.
"""
from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path
from typing import Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from tokenmill.api.errors import bad_request
from tokenmill.api.serving import Serving
from tokenmill.sampling_params import SamplingParams

#: Most inputs in one request (OpenAI's bound).
MAX_INPUTS = 2048
POOLING_CHOICES = ("auto", "last", "mean")


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None
    add_special_tokens: bool = True

    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


def resolve_pooling(choice: str, model_path: str) -> str:
    """``last`` or ``mean`` for ``--embedding-pooling CHOICE`` on the checkpoint at ``model_path``."""
    if choice not in POOLING_CHOICES:
        raise ValueError(f"--embedding-pooling must be one of {', '.join(POOLING_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice
    try:
        cfg = json.loads((Path(model_path) / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError):
        return "last"
    if cfg.get("pooling_mode_mean_tokens"):
        return "mean"
    return "last"


def hidden_size(model_path: str) -> int | None:
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = cfg.get("hidden_size") or (cfg.get("text_config") or {}).get("hidden_size")
    return size if isinstance(size, int) else None


async def _inputs(srv: Serving, req: EmbeddingRequest) -> list[tuple[str | None, list[int]]]:
    x = req.input
    if isinstance(x, str):
        items = [x]
    elif not x:
        raise bad_request("input must not be empty.", "input")
    elif isinstance(x[0], int):
        items = [x]
    else:
        items = list(x)
    if len(items) > MAX_INPUTS:
        raise bad_request(f"input holds {len(items)} items; at most {MAX_INPUTS} are allowed.", "input")
    for i, item in enumerate(items):
        if isinstance(item, str) and not item:
            raise bad_request(f"input[{i}] is an empty string.", "input")
    # Tokenized off the event loop (in one hop) unless the texts are short together.
    encoded = iter(await srv.encode_many([t for t in items if isinstance(t, str)], req.add_special_tokens, "input"))
    return [(item, next(encoded)) if isinstance(item, str) else (None, list(item)) for item in items]


def _encode(vec: list[float], fmt: str):
    if fmt == "float":
        return vec
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()


def _normalized(vec: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vec))
    return [v / norm for v in vec] if norm > 0 else vec


async def create_embedding(srv: Serving, req: EmbeddingRequest, pooling: str, size: int | None):
    srv.check_model(req.model)
    srv.log_unknown(req, "embeddings")
    if req.encoding_format not in ("float", "base64"):
        raise bad_request(f"encoding_format must be 'float' or 'base64', got {req.encoding_format[:40]!r}.",
                          "encoding_format")
    if req.dimensions is not None and req.dimensions != size:
        raise bad_request(f"dimensions {req.dimensions} is not supported: this model's embeddings have {size} "
                          f"dimensions and it was not trained to shorten them; leave dimensions out.", "dimensions")
    params = SamplingParams(max_tokens=0, pooling=pooling, temperature=0.0)
    prompts = await _inputs(srv, req)
    for _, ids in prompts:
        srv.check_prompt(ids, params, "input")
    sub = srv.submit("embd", prompts, params, False, None)
    finals = await srv.final_outputs(sub)
    data = []
    for rid, (i, _) in sorted(sub.prompts.items(), key=lambda kv: kv[1][0]):
        vec = finals[rid].pooled
        if vec is None:  # the engine finished the request without pooling it: never silently zeros
            raise RuntimeError(f"the engine returned no pooled state for {rid}")
        data.append({"object": "embedding", "index": i, "embedding": _encode(_normalized(vec), req.encoding_format)})
    n = sub.prompt_tokens
    return JSONResponse({"object": "list", "data": data, "model": req.model or srv.model_name,
                         "usage": {"prompt_tokens": n, "total_tokens": n}})
