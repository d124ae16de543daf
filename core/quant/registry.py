"""Which quantization method serves a model: the checkpoint's format or ``--quantization``, per platform.

The checkpoint's format is the ``quant_method`` of ``config.json``'s
``quantization_config`` (older AutoGPTQ checkpoints keep it in ``quantize_config.json``:
read as ``gptq``). ``--quantization`` names an online mode for a float checkpoint
(``int8``, ``w8a8``, ``fp8``), or repeats the checkpoint's own format; it cannot turn
one stored format into another. Among the registered classes for that format serving
the platform, the highest priority whose ``available()`` is None and whose constructor
accepts the configuration wins; a faster class that refuses a configuration falls back
to the next (finally the core's reference, whose refusal is the error the user sees).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: ``--quantization`` values meaning "no quantization".
NONE_VALUES = (None, "", "none")
#: Spellings of a format in configs and on the command line.
ALIASES = {"compressed_tensors": "compressed-tensors", "ct": "compressed-tensors", "int8-weight-only": "int8"}


def normalize(name: str | None) -> str | None:
    if name is None:
        return None
    name = str(name).strip().lower()
    return ALIASES.get(name, name)


def checkpoint_quantization(model_dir) -> dict | None:
    """The checkpoint's quantization config (with ``quant_method``), or None for a float checkpoint."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    qcfg = config.get("quantization_config")
    if qcfg is None and (model_dir / "quantize_config.json").exists():
        qcfg = {"quant_method": "gptq", **json.loads((model_dir / "quantize_config.json").read_text())}
    if qcfg is None:
        return None
    if not isinstance(qcfg, dict) or not qcfg.get("quant_method"):
        raise ValueError(f"{cfg_path}: quantization_config has no quant_method; cannot tell its format")
    return qcfg


def _serves(cls, platform_name: str) -> bool:
    types = tuple(getattr(cls, "device_types", ()) or ())
    return platform_name in types or "*" in types


def candidates(methods: list[tuple[str, type]], key: str, platform_name: str, kind: str) -> list[tuple[str, type]]:
    """``(plugin, class)`` serving format/mode ``key`` on the platform, best first; ``kind``: checkpoint|online."""
    attr = "checkpoint_formats" if kind == "checkpoint" else "online_modes"
    found = [(p, c) for p, c in methods if key in getattr(c, attr, ()) and _serves(c, platform_name)]
    found.sort(key=lambda pc: (-pc[1].priority, "*" in pc[1].device_types))
    return found


def known_keys(methods: list[tuple[str, type]], kind: str) -> list[str]:
    attr = "checkpoint_formats" if kind == "checkpoint" else "online_modes"
    return sorted({k for _, c in methods for k in getattr(c, attr, ())} - {"none"})


def resolve_quantization(methods: list[tuple[str, type]], platform, dtype, quant_config: dict | None,
                         requested: str | None = None):
    """The method instance for this model on ``platform``, or None (float, unquantized).

    ``methods``: every registered ``(plugin, class)``. Raises ``ValueError`` naming what is
    unsupported: an unknown format or mode, a format no class serves on this platform, or
    parameters the format's implementations refuse.
    """
    requested = normalize(requested)
    if quant_config is not None:
        key = normalize(quant_config["quant_method"])
        kind = "checkpoint"
        if requested not in NONE_VALUES and requested != key:
            raise ValueError(f"the checkpoint is quantized with {key!r}; --quantization {requested!r} cannot "
                             f"change a stored format (leave it unset or pass {key!r})")
        if requested == "none":
            raise ValueError(f"the checkpoint is quantized with {key!r}; it cannot be served unquantized")
    elif requested in NONE_VALUES:
        return None
    else:
        key, kind = requested, "online"
    found = candidates(methods, key, platform.name, kind)
    if not found:
        everywhere = candidates(methods, key, "*", kind) or [
            (p, c) for p, c in methods if key in getattr(c, "checkpoint_formats" if kind == "checkpoint"
                                                          else "online_modes", ())]
        if everywhere:
            raise ValueError(f"quantization {key!r} has no implementation for platform {platform.name!r} "
                             f"(registered for: {', '.join(sorted({t for _, c in everywhere for t in c.device_types}))})")
        what = "checkpoint format" if kind == "checkpoint" else "--quantization mode"
        hint = ""
        if kind == "online" and key in known_keys(methods, "checkpoint"):
            hint = f" ({key!r} is a checkpoint format: quantize the checkpoint first, e.g. `tokenmill quantize`)"
        raise ValueError(f"unsupported {what} {key!r}{hint}; supported: "
                         f"{', '.join(known_keys(methods, kind)) or 'none'}")
    errors = []
    for plugin, cls in found:
        why = cls.available(platform)
        if why:
            errors.append(f"{cls.__name__} ({plugin}): {why}")
            continue
        try:
            method = cls(key, quant_config, dtype)
        except ValueError as exc:
            errors.append(str(exc))
            if (plugin, cls) == found[-1]:
                raise
            log.info("quantization %s: %s (%s) refused the configuration (%s); trying the next implementation",
                     key, cls.__name__, plugin, exc)
            continue
        method.provider = plugin
        return method
    raise ValueError(f"no implementation of quantization {key!r} can run on {platform.name!r}: " + "; ".join(errors))


def resolve_float_method(methods: list[tuple[str, type]], platform, dtype):
    """The implementation of unquantized linears (online mode ``none``) for ``platform`` and ``dtype``.

    A plugin registers a faster float linear (weights repacked once at load for its
    matmul library, say) as a class serving ``none`` on its platform at a priority above
    the core's ``F.linear`` method; a class whose ``available()`` gives a reason or whose
    constructor refuses the dtype (``ValueError``) is passed over for the next.
    """
    from tokenmill.quant.unquantized import UNQUANTIZED

    for plugin, cls in candidates(methods, "none", platform.name, "online"):
        why = cls.available(platform)
        if why:
            log.info("float linears: %s (%s) unavailable: %s", cls.__name__, plugin, why)
            continue
        try:
            method = cls("none", None, dtype)
        except ValueError as exc:
            log.info("float linears: %s (%s) refused: %s", cls.__name__, plugin, exc)
            continue
        method.provider = plugin
        return method
    return UNQUANTIZED


def implementation_table(methods: list[tuple[str, type]], platforms: list) -> list[dict]:
    """For ``tokenmill plugins``: which class serves each format/mode on each platform (config aside)."""
    rows = []
    for kind in ("checkpoint", "online"):
        floats = ["none"] if kind == "online" and any("none" in c.online_modes for _, c in methods) else []
        for key in known_keys(methods, kind) + floats:
            for platform in platforms:
                chosen, skipped = None, []
                for plugin, cls in candidates(methods, key, platform.name, kind):
                    try:
                        why = cls.available(platform)
                    except Exception as exc:  # noqa: BLE001 - a report never crashes on a plugin bug
                        why = f"available() raised {type(exc).__name__}: {exc}"
                    if why:
                        skipped.append(f"{cls.__name__}: {why}")
                        continue
                    chosen = (plugin, cls)
                    break
                rows.append({"format": key, "kind": kind, "platform": platform.name,
                             "implementation": chosen[1].__name__ if chosen else None,
                             "plugin": chosen[0] if chosen else None,
                             "priority": chosen[1].priority if chosen else None,
                             "skipped": skipped})
    return rows
