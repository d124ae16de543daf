"""The plugin manager: discovers plugins through entry points, wires registries, picks the platform.

Entry points in the group ``tokenmill`` name plugin modules. Loading is idempotent and
never fails as a whole: a plugin that cannot be imported, or that was built for an
incompatible contract, is recorded in :attr:`PluginManager.failures` with a one-line
reason, and the others still load. ``TOKENMILL_PLUGINS`` (comma-separated entry-point
names) restricts which plugins load; the core's built-ins always load.
"""
from __future__ import annotations

import os
import threading
import traceback
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from tokenmill import builtin, hookspecs
from tokenmill.extensions import one_line
from tokenmill.platform import Availability, Platform
from tokenmill.version import CONTRACT_VERSION, __version__, contract_compatible

ENTRY_POINT_GROUP = "tokenmill"
CORE_NAME = "tokenmill"
REGISTRIES = ("platforms", "attention_backends", "kernels", "quantization_methods",
              "guided_decoding_backends", "model_architectures")


class PlatformUnavailable(ValueError):
    """The requested platform is unknown or cannot run here; the message says why."""


@dataclass
class PluginInfo:
    """A loaded plugin: its entry-point name, distribution, version, contract and registrations."""

    name: str
    dist: str
    version: str
    contract: str
    module: Any
    registrations: dict[str, int] = field(default_factory=dict)


@dataclass
class PluginFailure:
    """A plugin that did not load: the exception and a one-line reason."""

    name: str
    dist: str
    version: str
    error: BaseException | None
    reason: str
    traceback: str = ""


def safe_availability(platform: Platform) -> Availability:
    """``platform.availability()``, turning an exception (a plugin bug) into "unavailable" with the error."""
    try:
        avail = platform.availability()
    except Exception as exc:  # noqa: BLE001 - one broken platform must not break selection
        return Availability(False, f"availability() raised {one_line(exc)}")
    if not isinstance(avail, Availability):
        return Availability(bool(avail), "" if avail else "availability() returned a false value without a reason")
    return avail


class PluginManager:
    """Discovery and wiring at start-up. Call :meth:`load` (idempotent), then read the registries."""

    def __init__(self, allowlist: list[str] | None = None, entry_point_group: str = ENTRY_POINT_GROUP):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.group = entry_point_group
        if allowlist is None:
            env = os.environ.get("TOKENMILL_PLUGINS", "").strip()
            allowlist = [s.strip() for s in env.split(",") if s.strip()] if env else None
        self.allowlist = allowlist
        self.plugins: list[PluginInfo] = []
        self.failures: list[PluginFailure] = []
        self._loaded = False
        self._lock = threading.Lock()
        self._cache: dict[str, list] = {}

    # -- discovery -------------------------------------------------------------------------
    def load(self) -> "PluginManager":
        """Register the built-ins and every allowed entry-point plugin; safe to call twice."""
        with self._lock:
            if self._loaded:
                return self
            self._register(CORE_NAME, CORE_NAME, __version__, builtin)
            found = sorted(entry_points(group=self.group), key=lambda e: e.name)
            for ep in found:
                if self.allowlist is not None and ep.name not in self.allowlist:
                    continue
                if any(p.name == ep.name for p in self.plugins) or any(f.name == ep.name for f in self.failures):
                    continue
                dist = ep.dist.name if ep.dist else ""
                version = ep.dist.version if ep.dist else ""
                try:
                    module = ep.load()
                except BaseException as exc:  # noqa: BLE001 - a broken plugin must not stop the others
                    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                        raise
                    self.failures.append(PluginFailure(ep.name, dist, version, exc, one_line(exc),
                                                       traceback.format_exc()))
                    continue
                self._register(ep.name, dist, version, module)
            for name in self.allowlist or ():
                if name != CORE_NAME and not any(ep.name == name for ep in found):
                    self.failures.append(PluginFailure(
                        name, "", "", None,
                        f"named in TOKENMILL_PLUGINS but no entry point {name!r} is installed in group {self.group!r}"))
            self._loaded = True
            return self

    def register_module(self, name: str, module: Any, dist: str = "", version: str = "") -> bool:
        """Register a plugin module directly (tests, embedding); same checks as entry points."""
        with self._lock:
            self._cache.clear()
            return self._register(name, dist or name, version, module)

    def _register(self, name: str, dist: str, version: str, module: Any) -> bool:
        contract = getattr(module, "TOKENMILL_CONTRACT", None)
        if contract is None:
            reason = (f"plugin {name!r} does not declare TOKENMILL_CONTRACT; "
                      f"this tokenmill speaks contract {CONTRACT_VERSION}")
        elif not contract_compatible(str(contract)):
            reason = (f"plugin {name!r} was built for plugin contract {contract}, "
                      f"but this tokenmill ({__version__}) speaks contract {CONTRACT_VERSION}")
        else:
            reason = ""
        if reason:
            self.failures.append(PluginFailure(name, dist, version, None, reason))
            return False
        try:
            self.pm.register(module, name=name)
        except Exception as exc:  # e.g. a hookimpl whose arguments do not match its hookspec
            self.failures.append(PluginFailure(name, dist, version, exc, one_line(exc), traceback.format_exc()))
            return False
        # pluggy's check_pending() would raise for the whole manager; refuse only this plugin.
        unknown = sorted(c.name for c in self.pm.get_hookcallers(module) or ()
                         if not c.has_spec() and any(i.plugin is module and not i.optionalhook
                                                     for i in c.get_hookimpls()))
        if unknown:
            self.pm.unregister(module)
            self.failures.append(PluginFailure(
                name, dist, version, None,
                f"plugin {name!r} implements unknown hook(s) {', '.join(unknown)}; "
                f"contract {CONTRACT_VERSION} hooks are: {', '.join('tokenmill_' + r for r in REGISTRIES)}"))
            return False
        info = PluginInfo(name, dist, version, str(contract), module)
        self.plugins.append(info)
        return True

    # -- registries ------------------------------------------------------------------------
    def _collect(self, registry: str) -> list:
        """Call one registry hook on every plugin (once) and remember who registered what."""
        if registry in self._cache:
            return self._cache[registry]
        self.load()
        items: list = []
        for info in self.plugins:
            impl = getattr(info.module, f"tokenmill_{registry}", None)
            if impl is None:
                info.registrations.setdefault(registry, 0)
                continue
            caller = self.pm.subset_hook_caller(f"tokenmill_{registry}",
                                                remove_plugins=[p.module for p in self.plugins if p is not info])
            try:
                results = [x for res in caller() for x in (res or [])]
            except Exception as exc:  # noqa: BLE001
                self.failures.append(PluginFailure(info.name, info.dist, info.version, exc,
                                                   f"tokenmill_{registry} raised {one_line(exc)}",
                                                   traceback.format_exc()))
                results = []
            if registry == "platforms":
                bad = [x for x in results if not isinstance(x, Platform)]
                if bad:  # selection would crash on them later, far from the culprit
                    self.failures.append(PluginFailure(
                        info.name, info.dist, info.version, None,
                        f"tokenmill_platforms returned {len(bad)} object(s) that are not Platform instances: {bad[0]!r}"))
                    results = [x for x in results if isinstance(x, Platform)]
                for platform in results:
                    platform.plugin_name = info.name
                    platform.plugin_version = info.version
            info.registrations[registry] = len(results)
            items.extend((info.name, x) for x in results)
        self._cache[registry] = items
        return items

    def collect_all(self) -> None:
        """Fill every plugin's registration counts (for reports)."""
        for registry in REGISTRIES:
            self._collect(registry)

    def registered(self, registry: str) -> list[tuple[str, Any]]:
        """``(plugin name, registered object)`` pairs of one registry, in registration order (reports)."""
        return list(self._collect(registry))

    def platforms(self) -> list[Platform]:
        """Every registered platform, highest priority first."""
        return sorted((p for _, p in self._collect("platforms")), key=lambda p: -p.priority)

    def attention_backends(self) -> list[type]:
        return [b for _, b in self._collect("attention_backends")]

    def kernel_impls(self) -> list:
        return [k for _, k in self._collect("kernels")]

    def quantization_methods(self) -> list:
        return [q for _, q in self._collect("quantization_methods")]

    def guided_decoding_backends(self) -> list:
        return [g for _, g in self._collect("guided_decoding_backends")]

    def model_architectures(self) -> dict[str, type]:
        """Architecture name -> model class; later registrations replace earlier ones."""
        return {name: cls for _, (name, cls) in self._collect("model_architectures")}

    # -- selection -------------------------------------------------------------------------
    def select_platform(self, device: str = "auto") -> Platform:
        """``auto``: the available platform with the highest priority; a name: that one, or fail with why."""
        platforms = self.platforms()
        if device == "auto":
            reasons = []
            for p in platforms:
                avail = safe_availability(p)
                if avail:
                    return p
                reasons.append(f"{p.name}: {avail.reason}")
            raise PlatformUnavailable("no available platform; " + "; ".join(reasons or ["none installed"]))
        for p in platforms:
            if p.name == device:
                avail = safe_availability(p)
                if not avail:
                    raise PlatformUnavailable(f"platform {device!r} is not available: {avail.reason}")
                return p
        known = ", ".join(p.name for p in platforms) or "none"
        hint = ""
        failed = [f for f in self.failures if f.name == device]
        if failed:
            hint = f" (its plugin failed to load: {failed[0].reason})"
        raise PlatformUnavailable(f"unknown platform {device!r}{hint}; installed platforms: {known}")

    def kernels(self, platform_name: str, dtype: str | None = None, core_only: bool = False):
        """The resolved :class:`~tokenmill.ops.registry.Kernels` for a platform and dtype.

        ``core_only`` ignores what plugins registered: the core's reference ops everywhere
        (benchmarks against the reference path, debugging a suspect kernel).
        """
        from tokenmill.ops.registry import Kernels

        impls = [k for name, k in self._collect("kernels") if not core_only or name == CORE_NAME]
        return Kernels(platform_name, impls, dtype)

    def attention_backend(self, platform_name: str, spec, core_only: bool = False) -> type:
        """The highest-priority backend serving ``platform_name`` that supports ``spec``; else ValueError with reasons.

        ``core_only`` considers only the core's own (reference) backends.
        """
        from tokenmill.attention.interface import UnsupportedAttention

        backends = [b for name, b in self._collect("attention_backends") if not core_only or name == CORE_NAME]
        candidates = [b for b in backends if platform_name in b.device_types or "*" in b.device_types]
        candidates.sort(key=lambda b: (-b.priority, "*" in b.device_types))
        reasons = []
        for backend in candidates:
            why = backend.supports(spec)
            if why is None:
                return backend
            reasons.append(why)
        raise UnsupportedAttention(f"no attention backend for {platform_name!r} supports {spec}: "
                                   + ("; ".join(reasons) or "none registered"))


_manager: PluginManager | None = None
_manager_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide, loaded plugin manager."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = PluginManager().load()
        return _manager


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests that change ``TOKENMILL_PLUGINS``)."""
    global _manager
    with _manager_lock:
        _manager = None
