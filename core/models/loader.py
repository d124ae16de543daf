"""Build a model from a local HF checkpoint directory and stream its safetensors weights into it.

Only safetensors checkpoints load (one ``model.safetensors``, any single ``*.safetensors``,
or shards listed by ``model.safetensors.index.json``); pickled ``*.bin`` / ``*.pt``
checkpoints are refused because loading them can run arbitrary code. Tensors are read one
at a time, so peak host memory stays about one tensor above the model itself.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterator

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_config(model_dir):
    """The HF config of a local checkpoint directory (never touches the network)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)


def resolve_dtype(dtype, hf_config=None) -> torch.dtype:
    """``"auto"`` (the checkpoint's dtype, float32 if it names none), ``"float32"``, ``"bfloat16"``, ``"float16"``.

    A torch dtype or the aliases ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"half"``, ``"float"`` are accepted too.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; supported: auto, {', '.join(_DTYPES)}")
        return dtype
    aliases = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    name = aliases.get(str(dtype).lower(), str(dtype).lower())
    if name == "auto":
        cfg_dtype = None
        if hf_config is not None:
            cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if cfg_dtype is None:
            return torch.float32
        cfg_name = str(cfg_dtype).removeprefix("torch.")
        if cfg_name not in _DTYPES:
            raise ValueError(f"checkpoint dtype {cfg_name} is not supported; pass one of {', '.join(_DTYPES)}")
        return _DTYPES[cfg_name]
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; supported: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def checkpoint_files(model_dir) -> list[Path]:
    """The safetensors files of a checkpoint, in load order; ``ValueError`` if there are none."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / f for f in sorted(set(weight_map.values()))]
        missing = [str(f.name) for f in files if not f.exists()]
        if missing:
            raise ValueError(f"{index} lists shards that are missing: {', '.join(missing)}")
        return files
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(f"{model_dir} holds only pickled checkpoint files ({', '.join(pickled)}); "
                         "only safetensors checkpoints are supported (convert it with "
                         "transformers' save_pretrained(..., safe_serialization=True))")
    raise ValueError(f"no safetensors weights found in {model_dir}")


def _show_progress() -> bool:
    env = os.environ.get("TOKENMILL_PROGRESS")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "")
    return sys.stderr.isatty()


def iterate_weights(files: list[Path], progress: bool | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, cpu tensor)`` for every tensor of ``files``, one at a time, with a tqdm bar on stderr."""
    from safetensors import safe_open
    from tqdm import tqdm

    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    total = sum(len(h.keys()) for h in handles)
    show = _show_progress() if progress is None else progress
    with tqdm(total=total, desc="Loading weights", unit="tensor", file=sys.stderr, disable=not show) as bar:
        for handle in handles:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
                bar.update(1)


def process_weights_after_loading(model) -> None:
    """Let every linear layer's quantization method quantize or repack what was loaded."""
    from tokenmill.models.layers import Linear

    for module in model.modules():
        if isinstance(module, Linear):
            module.method.process_weights_after_loading(module)


def load_model(model_dir, ctx, architectures: dict[str, type]):
    """Build the model of the checkpoint at ``model_dir`` on ``ctx.device`` in ``ctx.dtype`` and load its weights.

    ``architectures`` maps names from ``config.json``'s ``architectures`` to model classes.
    ``ctx.quantization`` is the quantization method its linear layers use (None: float);
    after loading, each layer's method post-processes its weights.
    The returned model is in eval mode and has ``hf_config`` set.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ValueError(f"{model_dir} is not a model directory (no config.json)")
    hf_config = load_config(model_dir)
    names = list(getattr(hf_config, "architectures", None) or [])
    cls = next((architectures[n] for n in names if n in architectures), None)
    if cls is None:
        raise ValueError(f"unsupported architecture {', '.join(names) or '(none given in config.json)'}; "
                         f"supported: {', '.join(sorted(architectures))}")
    files = checkpoint_files(model_dir)
    with torch.no_grad():
        model = cls(hf_config, ctx)
        model.load_weights(iterate_weights(files))
        process_weights_after_loading(model)
    model.eval()
    model.hf_config = hf_config
    return model
