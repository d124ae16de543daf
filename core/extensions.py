"""Optional extension modules of torch: used by a plugin when they are usable, skipped with a reason.

A vendor's extension of torch may refuse to run on a torch whose major.minor differs from its
own, and may fail to import for reasons of its own (a missing shared library, a clash with
another installed package). A plugin that can use one asks, in this order: is it installed
(found without importing it), which version do its package metadata give, does the plugin's own
gate accept that build, does it match torch, and does it import. The first "no" is the reason
it is skipped (``tokenmill plugins`` and the conformance report show it); the import happens only
after the version checks, and at most once per cache.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from importlib import metadata
from typing import Any


def one_line(exc: BaseException) -> str:
    """``"Type: first line of the message"``, for reasons shown on one line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def major_minor(version: str) -> tuple[str, ...]:
    """``("2", "8")`` of ``"2.8.10+xpu"``: the part of a version an extension must share with torch."""
    return tuple(version.split("+", 1)[0].split(".")[:2])


def installed_version(module: str, dist: str) -> str | None:
    """The version of distribution ``dist`` when import name ``module`` is found (not imported);
    None when it is not installed, ``""`` when it is found without package metadata."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return ""


def optional_extension(module: str, dist: str, instead: str, cache: dict,
                       gate: Callable[[str], str | None] | None = None) -> tuple[Any, str]:
    """``(the imported module, "dist version")`` when it is usable, else ``(None, why not)``.

    ``instead`` says what serves when it is not installed or does not match torch (``"torch
    paths serve"``); ``gate(version)`` is the plugin's own condition on the build (None: accepted,
    else what is wrong with it, e.g. ``"is not the ... build"``). ``cache`` keeps the import's
    outcome, so a module is imported at most once per cache (a plugin passes one of its own).
    """
    import torch

    version = installed_version(module, dist)
    if version is None:
        return None, f"{dist} is not installed; skipped ({instead})"
    if not version:
        return None, f"{dist} found without package metadata; skipped"
    problem = gate(version) if gate is not None else None
    if problem:
        return None, f"{dist} {version} {problem}; skipped"
    if major_minor(version) != major_minor(torch.__version__):
        return None, f"{dist} {version} does not match torch {torch.__version__}; skipped ({instead})"
    if "result" not in cache:
        try:
            cache["result"] = (importlib.import_module(module), None)
        except Exception as exc:  # noqa: BLE001 - any import failure means: do not use it
            cache["result"] = (None, one_line(exc))
    loaded, error = cache["result"]
    if loaded is None:
        return None, f"{dist} {version} failed to import ({error}); skipped"
    return loaded, f"{dist} {version}"
