"""The small model bundled inside the package, served when no model is named."""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "data" / "default-model"
DEFAULT_MODEL_NAME = "tokenmill-default"


def resolve_model(model: str | None) -> str:
    """``model`` as a local directory; ``None`` means the bundled default model."""
    if model is None:
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise ValueError(f"the bundled default model is missing from {DEFAULT_MODEL_DIR}; name a model directory")
        return str(DEFAULT_MODEL_DIR)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(f"model {model!r} is not a local directory (tokenmill loads local checkpoints only)")
    if not (path / "config.json").exists():
        raise ValueError(f"model directory {model!r} has no config.json")
    return str(path)
