"""Assemble the checks for a plugin, run them, and build the capability report.

Both front ends use this module: ``tokenmill conformance PLUGIN`` (see
:mod:`tokenmill.commands.conformance_cmd`) and ``pytest --pyargs tokenmill.conformance
--plugin PLUGIN`` (see ``conftest.py`` here), so they run the very same checks.
"""
from __future__ import annotations

from typing import Callable, Iterable

from tokenmill.conformance.attention_checks import attention_checks
from tokenmill.conformance.e2e_checks import e2e_checks
from tokenmill.conformance.kernel_checks import kernel_checks
from tokenmill.conformance.platform_checks import platform_checks
from tokenmill.conformance.quant_checks import quant_checks
from tokenmill.conformance.results import Check, Report, Result, Skip
from tokenmill.conformance.target import INTERPRETER_DTYPES, Target, describe_target, load_target, summarize_target

GRIDS = ("small", "standard", "full")


def _setup_checks(target: Target) -> list[Check]:
    def loaded():
        assert not target.load_error, f"plugin {target.name!r} did not load: {target.load_error}"
        return f"contract {getattr(target.module, 'TOKENMILL_CONTRACT', '?')}"

    def hooks():
        if target.module is None:
            raise Skip("the plugin did not load")
        assert not target.hook_errors, "; ".join(target.hook_errors)
        assert target.platform_names(), "the plugin registers no platform, kernel or attention backend"
        return (f"{len(target.platforms)} platform(s), {len(target.backends)} attention backend(s), "
                f"{len(target.kernels)} kernel(s)")

    checks = [Check("setup/load", "setup", "the plugin loads and declares a compatible contract", loaded),
              Check("setup/hooks", "setup", "the plugin's hooks return registrations without raising", hooks)]
    if target.interpret:
        def interpreter():
            assert not target.interpret_error, target.interpret_error
            return "TRITON_INTERPRET=1: Triton kernels run on CPU tensors"
        checks.append(Check("setup/interpreter", "setup", "Triton's interpreter is in effect", interpreter))
    return checks


def _device(target: Target, platform, name: str):
    """``(device, reason to skip device checks or None)`` for the platform ``name``."""
    if target.interpret:
        return "cpu", None
    if platform is None:
        return None, f"platform {name} is not installed"
    avail = platform.availability()
    if not avail:
        hint = " (--interpret checks Triton kernels on CPU tensors)" if _uses_triton(target) else ""
        return None, f"platform {name} is not available here: {avail.reason}{hint}"
    return platform.device(), None


def _uses_triton(target: Target) -> bool:
    mods = [getattr(k.fn, "__module__", "") or "" for k in target.kernels]
    mods += [getattr(b, "__module__", "") or "" for b in (*target.backends, *target.quant_methods)]
    return any("triton" in m for m in mods)


def build_checks(target: Target, grid: str | None = None) -> list[Check]:
    """Every check for ``target``; ``grid``: ``small``, ``standard`` or ``full`` attention grid.

    The default grid is ``small`` under the interpreter and ``standard`` on a device.
    """
    if grid is not None and grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    size = grid or ("small" if target.interpret else "standard")
    checks = _setup_checks(target)
    if target.module is None:
        return checks
    for name in target.platform_names():
        platform = target.platform(name)
        if platform is not None and any(platform is p for p in target.platforms):
            checks += platform_checks(target, platform)
        device, device_skip = _device(target, platform, name)
        declared = list(platform.capabilities.dtypes) if platform is not None else ["float32"]
        dtype_skips: dict[str, str] = {}
        dtypes = declared
        if target.interpret:
            dtypes = [d for d in declared if d in INTERPRETER_DTYPES]
            dtype_skips = {d: f"{d} is not checked under Triton's interpreter (it mishandles {d}); "
                              f"run the suite on the device" for d in declared if d not in INTERPRETER_DTYPES}
        checks += kernel_checks(target, name, device, device_skip, dtypes, dtype_skips)
        checks += attention_checks(target, name, device, device_skip, dtypes, dtype_skips, size)
        checks += quant_checks(target, platform, name, device, device_skip, dtypes, dtype_skips)
        checks += e2e_checks(target, platform, name, device, device_skip, dtypes)
    seen: dict[str, int] = {}
    for check in checks:
        n = seen.get(check.id, 0)
        seen[check.id] = n + 1
        if n:
            check.id = f"{check.id}#{n + 1}"
    return checks


def select(checks: list[Check], patterns: Iterable[str] | None) -> list[Check]:
    """Keep the checks whose id contains any of ``patterns`` (all when none given)."""
    patterns = [p for p in (patterns or []) if p]
    if not patterns:
        return checks
    return [c for c in checks if any(p in c.id for p in patterns)]


def run_checks(target: Target, checks: list[Check], progress: Callable[[Result], None] | None = None) -> Report:
    report = Report(target.name, describe_target(target))
    for check in checks:
        result = check.run()
        report.results.append(result)
        if progress is not None:
            progress(result)
    report.facts.update(summarize_target(target))
    return report


def run_suite(plugin: str, interpret: bool = False, grid: str | None = None, patterns: Iterable[str] | None = None,
              progress: Callable[[Result], None] | None = None) -> Report:
    """Load ``plugin`` (entry-point name, module or ``.py`` path), run its checks, return the report."""
    target = load_target(plugin, interpret=interpret)
    return run_checks(target, select(build_checks(target, grid), patterns), progress)
