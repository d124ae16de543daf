"""The plugin under test: find it, load it, and list what it registers.

A plugin is named by its entry-point name in the group ``tokenmill`` (``cpu``,
``cuda``), by an importable module (``my_pkg.plugin``) or by the path of a ``.py`` file;
the last two let an author run the suite before packaging. Everything installed is
loaded, as the engine would, but only the plugin's own registrations are checked.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from tokenmill.plugins import ENTRY_POINT_GROUP, PluginManager
from tokenmill.version import CONTRACT_VERSION

#: Dtypes Triton's interpreter computes correctly (it mishandles bfloat16).
INTERPRETER_DTYPES = ("float32", "float16")
INTERPRET_ENV = "TRITON_INTERPRET"


class PluginNotFound(ValueError):
    """No plugin by that name; the message lists what is installed."""


def enable_interpreter() -> str | None:
    """Set ``TRITON_INTERPRET=1`` for this process; the reason it cannot take effect, if any.

    Triton reads the variable when it is imported, so it must be set before anything
    imports ``triton`` (the CLI and the pytest plugin do it first thing).
    """
    os.environ[INTERPRET_ENV] = "1"
    if "triton" in sys.modules:
        try:
            import triton.language as tl
            from triton.runtime.interpreter import InterpretedFunction
        except Exception:  # noqa: BLE001 - a Triton without these: trust the variable
            return None
        # Triton's own library functions were decorated at import: interpreted or compiled for good.
        if not isinstance(tl.cdiv, InterpretedFunction):
            return ("triton was imported before interpreter mode was enabled; run the suite in a fresh "
                    f"process or set {INTERPRET_ENV}=1 yourself")
    return None


@dataclass
class Target:
    """A loaded plugin and its registrations (``kernels``: KernelImpl; ``backends`` and
    ``quant_methods``: classes)."""

    name: str
    pm: PluginManager
    module: object | None
    load_error: str = ""
    dist: str = ""
    version: str = ""
    platforms: list = field(default_factory=list)
    backends: list = field(default_factory=list)
    kernels: list = field(default_factory=list)
    quant_methods: list = field(default_factory=list)
    hook_errors: list[str] = field(default_factory=list)
    interpret: bool = False
    interpret_error: str | None = None

    def platform_names(self) -> list[str]:
        """Its own platforms, then any other platform its kernels or backends serve."""
        names = [p.name for p in self.platforms]
        served = [k.device_type for k in self.kernels] + [t for b in self.backends for t in b.device_types]
        served += [t for q in self.quant_methods for t in q.device_types]
        for name in served:
            if name != "*" and name not in names:
                names.append(name)
        return names

    def platform(self, name: str):
        """The :class:`Platform` named ``name``: the plugin's own, else any installed one, else None."""
        for p in self.platforms:
            if p.name == name:
                return p
        for p in self.pm.platforms():
            if p.name == name:
                return p
        return None

    def kernels_for(self, platform_name: str) -> list:
        return [k for k in self.kernels if k.device_type in (platform_name, "*")]

    def backends_for(self, platform_name: str) -> list:
        return [b for b in self.backends if platform_name in b.device_types or "*" in b.device_types]

    def quant_methods_for(self, platform_name: str) -> list:
        return [q for q in self.quant_methods if platform_name in q.device_types or "*" in q.device_types]


def _call_hook(module, hook: str, errors: list[str]) -> list:
    impl = getattr(module, hook, None)
    if impl is None:
        return []
    try:
        return [x for x in (impl() or []) if x is not None]
    except Exception as exc:  # noqa: BLE001 - reported as a failed setup check
        errors.append(f"{hook}() raised {type(exc).__name__}: {exc}")
        return []


def _import_path(path: Path):
    name = f"tokenmill_conformance_target_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginNotFound(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_target(plugin: str, interpret: bool = False) -> Target:
    """Load every installed plugin plus ``plugin`` (entry-point name, module or ``.py`` path)."""
    interpret_error = enable_interpreter() if interpret else None
    installed = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
    pm = PluginManager(allowlist=installed).load()
    module, dist, version, load_error = None, "", "", ""
    info = next((p for p in pm.plugins if p.name == plugin), None)
    failure = next((f for f in pm.failures if f.name == plugin), None)
    if info is not None:
        module, dist, version = info.module, info.dist, info.version
    elif failure is not None:
        load_error, dist, version = failure.reason, failure.dist, failure.version
    else:
        path = Path(plugin)
        try:
            if plugin.endswith(".py") or os.sep in plugin:
                if not path.is_file():
                    raise PluginNotFound(f"no plugin file {plugin}")
                module = _import_path(path.resolve())
            else:
                module = importlib.import_module(plugin)
        except ModuleNotFoundError as exc:
            if exc.name != plugin:
                raise
            raise PluginNotFound(f"no plugin {plugin!r}: not an entry point in the group {ENTRY_POINT_GROUP!r} "
                                 f"(installed: {', '.join(installed) or 'none'}), nor an importable module "
                                 f"or .py file") from None
        dist = getattr(module, "__name__", plugin)
        if not pm.register_module(plugin, module, dist=dist):
            failure = next(f for f in reversed(pm.failures) if f.name == plugin)
            load_error, module = failure.reason, None
    target = Target(plugin, pm, module, load_error, dist, version, interpret=interpret,
                    interpret_error=interpret_error)
    if module is not None:
        target.platforms = _call_hook(module, "tokenmill_platforms", target.hook_errors)
        for p in target.platforms:
            p.plugin_name, p.plugin_version = plugin, version
        target.backends = _call_hook(module, "tokenmill_attention_backends", target.hook_errors)
        target.kernels = _call_hook(module, "tokenmill_kernels", target.hook_errors)
        target.quant_methods = _call_hook(module, "tokenmill_quantization_methods", target.hook_errors)
    return target


def summarize_target(target: Target) -> dict:
    """Facts known only after the checks ran: the plugin module's optional ``conformance_summary()``
    (a plain function returning a dict, e.g. which vendor ops the checks actually called)."""
    summary = getattr(target.module, "conformance_summary", None)
    if not callable(summary):
        return {}
    try:
        return {str(k): str(v) for k, v in summary().items()}
    except Exception as exc:  # noqa: BLE001 - optional and informational
        return {"conformance_summary() raised": f"{type(exc).__name__}: {exc}"}


def describe_target(target: Target) -> dict:
    """Facts for the report's header: registrations, each platform's ``describe()``, and the
    plugin module's optional ``conformance_facts()`` (a plain function returning a dict)."""
    facts = {
        "distribution": f"{target.dist} {target.version}".strip() or "(not packaged)",
        "contract": f"{getattr(target.module, 'TOKENMILL_CONTRACT', '?')} (core speaks {CONTRACT_VERSION})",
        "platforms": ", ".join(target.platform_names()) or "none",
        "attention backends": ", ".join(f"{b.name or b.__name__} {list(b.device_types)}" for b in target.backends)
        or "none (the reference serves)",
        "kernels": ", ".join(sorted({f"{k.op}@{k.device_type}" for k in target.kernels}))
        or "none (the reference ops serve)",
        "quantization methods": ", ".join(
            f"{q.__name__} {sorted(set(q.checkpoint_formats) | set(q.online_modes))} {list(q.device_types)} "
            f"priority {q.priority}" for q in target.quant_methods) or "none (the core's reference serves)",
        "mode": "Triton interpreter on CPU tensors" if target.interpret else "on the platform's device",
    }
    for platform in target.platforms:
        try:
            described = platform.describe()
        except Exception as exc:  # noqa: BLE001 - reported by the platform checks
            described = {"describe() raised": f"{type(exc).__name__}: {exc}"}
        facts[f"platform {platform.name}"] = ", ".join(f"{k}={v}" for k, v in described.items()) or "-"
    extra = getattr(target.module, "conformance_facts", None)
    if callable(extra):
        try:
            facts.update({str(k): str(v) for k, v in extra().items()})
        except Exception as exc:  # noqa: BLE001 - optional and informational
            facts["conformance_facts() raised"] = f"{type(exc).__name__}: {exc}"
    try:
        import torch

        facts["torch"] = torch.__version__
    except Exception:  # noqa: BLE001
        pass
    return facts
