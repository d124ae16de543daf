"""Rewriting checkpoints tensor by tensor: what the quantizer and the dequantized test copies share.

:data:`QUANTIZABLE` matches the linear weights a quantizer converts in the five
architectures (attention and MLP projections, Mixtral's experts); embeddings, norms,
the router (``block_sparse_moe.gate``) and ``lm_head`` stay float, as the real tools
leave them by default.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

QUANTIZABLE = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


def is_quantizable(name: str) -> bool:
    return QUANTIZABLE.search(name) is not None


def rewrite_checkpoint(src, dst, fn: Callable[[str, torch.Tensor], dict], config_update: dict | None = None,
                       config_remove: tuple[str, ...] = ()) -> Path:
    """Copy the checkpoint ``src`` to ``dst`` with each tensor replaced by ``fn(name, tensor)``.

    ``fn`` returns ``{name: tensor}`` (several for a quantized weight, none to drop it).
    Every other file is copied; ``config.json`` gets ``config_update`` merged in and the
    keys ``config_remove`` dropped. Writes one ``model.safetensors``.
    """
    from safetensors.torch import save_file

    from tokenmill.models.loader import checkpoint_files, iterate_weights

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    files = checkpoint_files(src)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("model.safetensors.index.json",
                                                                          "config.json", ".complete"):
            shutil.copy2(f, dst / f.name)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in iterate_weights(files, progress=False):
        for k, v in fn(name, tensor).items():
            out[k] = v.contiguous()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    for key in config_remove:
        config.pop(key, None)
    config.update(config_update or {})
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dst
