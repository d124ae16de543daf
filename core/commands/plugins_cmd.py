"""``tokenmill plugins``: what is installed, what each plugin registered, which platforms can run here.

Five sections: loaded plugins with their registration counts per registry, platforms
in ``--device auto`` order with availability (and the reason when unavailable), which
quantization implementation serves each checkpoint format and online mode on each
platform, the guided-decoding (structured output) backends, and plugins that failed to
load with a one-line error. ``--json`` prints the same as one object
``{"plugins": [...], "platforms": [...], "quantization": [...], "guided": [...], "failures": [...],
"auto": ...}``.
A platform whose ``availability()``, ``memory_info()`` or ``describe()`` raises is
reported with the error; it never stops the report.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, is_dataclass

from tokenmill.plugins import REGISTRIES, get_plugin_manager, safe_availability

#: Column titles of the registration counts, in REGISTRIES order.
REGISTRY_TITLES = {
    "platforms": "platforms",
    "attention_backends": "attention",
    "kernels": "kernels",
    "quantization_methods": "quantization",
    "guided_decoding_backends": "guided",
    "model_architectures": "models",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one machine-readable JSON object")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also print each platform's details (describe()) and failure tracebacks")


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _platform_report(p) -> dict:
    avail = safe_availability(p)
    entry: dict = {
        "name": p.name,
        "plugin": p.plugin_name,
        "plugin_version": p.plugin_version,
        "torch_device_type": p.torch_device_type,
        "priority": p.priority,
        "dist_backend": p.dist_backend,
        "available": bool(avail),
        "reason": avail.reason,
        "capabilities": None,
        "memory": None,
        "describe": {},
    }
    try:
        caps = p.capabilities
        entry["capabilities"] = asdict(caps) if is_dataclass(caps) else dict(vars(caps))
    except Exception as exc:  # noqa: BLE001 - a report never crashes on a plugin bug
        entry["capabilities_error"] = _error(exc)
    if avail:
        try:
            mem = p.memory_info()
            entry["memory"] = {"free": int(mem.free), "total": int(mem.total)}
        except Exception as exc:  # noqa: BLE001
            entry["memory_error"] = _error(exc)
    try:
        entry["describe"] = dict(p.describe() or {})
    except Exception as exc:  # noqa: BLE001
        entry["describe"] = {"error": _error(exc)}
    return entry


def collect_report() -> dict:
    """The whole report as plain data (what ``--json`` prints)."""
    pm = get_plugin_manager()
    pm.collect_all()
    platforms = [_platform_report(p) for p in pm.platforms()]
    plugins = []
    for info in pm.plugins:
        mine = [p for p in platforms if p["plugin"] == info.name]
        plugins.append({
            "name": info.name,
            "dist": info.dist,
            "version": info.version,
            "contract": info.contract,
            "platforms": [p["name"] for p in mine],
            "device_types": sorted({p["torch_device_type"] for p in mine}),
            "available": [p["name"] for p in mine if p["available"]],
            "registrations": {r: info.registrations.get(r, 0) for r in REGISTRIES},
        })
    failures = [{"name": f.name, "dist": f.dist, "version": f.version, "reason": f.reason,
                 "traceback": f.traceback} for f in pm.failures]
    auto = next((p["name"] for p in platforms if p["available"]), None)
    return {"plugins": plugins, "platforms": platforms, "quantization": _quant_report(pm),
            "guided": _guided_report(pm), "failures": failures, "auto": auto}


def _quant_report(pm) -> list[dict]:
    from tokenmill.quant.registry import implementation_table

    try:
        return implementation_table(pm.registered("quantization_methods"), pm.platforms())
    except Exception as exc:  # noqa: BLE001 - a report never crashes on a plugin bug
        return [{"format": "?", "kind": "?", "platform": "?", "implementation": None, "plugin": None,
                 "priority": None, "skipped": [f"table failed: {_error(exc)}"]}]


def _guided_report(pm) -> list[dict]:
    from tokenmill.guided.manager import AUTO_ORDER

    latest = {cls.name: (plugin, cls) for plugin, cls in pm.registered("guided_decoding_backends")}
    out = []
    for name, (plugin, cls) in latest.items():
        try:
            why = cls.available()
        except Exception as exc:  # noqa: BLE001 - a report never crashes on a plugin bug
            why = f"available() raised {_error(exc)}"
        out.append({"name": name, "plugin": plugin, "kinds": list(getattr(cls, "kinds", ())),
                    "available": not why, "reason": why or "",
                    "auto_rank": AUTO_ORDER.index(name) if name in AUTO_ORDER else None})
    return out


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def format_report(report: dict, verbose: bool = False) -> str:
    """The human-readable tables."""
    lines = ["Plugins (entry-point group 'tokenmill'):"]
    rows = [["PLUGIN", "DISTRIBUTION", "VERSION", "CONTRACT", *REGISTRY_TITLES.values()]]
    for p in report["plugins"]:
        rows.append([p["name"], p["dist"], p["version"] or "-", p["contract"],
                     *(str(p["registrations"][r]) for r in REGISTRIES)])
    lines += _table(rows)

    lines += ["", "Platforms (--device auto takes the first available):"]
    rows = [["PLATFORM", "PLUGIN", "DEVICE", "PRIORITY", "DIST", "MEMORY GiB", "AVAILABLE"]]
    for p in report["platforms"]:
        if p["memory"]:
            memory = f"{_gib(p['memory']['free'])}/{_gib(p['memory']['total'])}"
        else:
            memory = "error" if "memory_error" in p else "-"
        available = "yes" if p["available"] else f"no: {p['reason']}"
        rows.append([p["name"], p["plugin"], p["torch_device_type"], str(p["priority"]), p["dist_backend"],
                     memory, available])
    if len(rows) > 1:
        lines += _table(rows)
    else:
        lines.append("  (none installed)")
    lines.append(f"  auto -> {report['auto'] or 'nothing available'}")
    if verbose:
        for p in report["platforms"]:
            facts = ", ".join(f"{k}={v}" for k, v in p["describe"].items())
            lines.append(f"  {p['name']}: {facts or '-'}")
            if "memory_error" in p:
                lines.append(f"  {p['name']}: memory_info() raised {p['memory_error']}")

    lines += ["", "Quantization (checkpoint formats and --quantization modes: implementation per platform):"]
    rows = [["FORMAT", "KIND", "IMPLEMENTATION", "PLUGIN", "PRIORITY", "PLATFORMS"]]
    groups: dict[tuple, list[str]] = {}
    for q in report.get("quantization", []):
        impl = q["implementation"] or ("none: " + "; ".join(q["skipped"]) if q["skipped"] else "none")
        key = (q["format"], q["kind"], impl, q["plugin"] or "-", "-" if q["priority"] is None else str(q["priority"]))
        groups.setdefault(key, []).append(q["platform"])
    rows += [[*key, ",".join(names)] for key, names in groups.items()]
    lines += _table(rows) if len(rows) > 1 else ["  (none registered)"]

    lines += ["", "Guided decoding backends (--structured-output-backend; auto tries xgrammar, then outlines):"]
    rows = [["BACKEND", "PLUGIN", "KINDS", "AVAILABLE"]]
    for g in report.get("guided", []):
        rows.append([g["name"], g["plugin"], ",".join(g["kinds"]), "yes" if g["available"] else f"no: {g['reason']}"])
    lines += _table(rows) if len(rows) > 1 else ["  (none registered)"]

    if report["failures"]:
        lines += ["", "Failed plugins:"]
        for f in report["failures"]:
            where = f" ({f['dist']} {f['version']})".replace(" )", ")") if f["dist"] else ""
            lines.append(f"  {f['name']}{where}: {f['reason']}")
            if verbose and f["traceback"]:
                lines += ["    " + t for t in f["traceback"].rstrip().splitlines()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = collect_report()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_report(report, verbose=args.verbose))
    return 0
