"""Static layering rules, checked on the source (ast) and, where it is about imports, at run time.

- the core never imports a plugin (``tokenmill_*``) or ``tokenmill.api``;
- the scheduler and the KV-cache bookkeeping import no torch, directly or through other tokenmill modules;
- plugins never import each other;
- importing a plugin module imports neither torch_xla nor intel_extension_for_pytorch (nor torch).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "core"
#: import-name prefix -> source folder, as the root pyproject's package-dir maps them (longest first)
PACKAGE_DIRS = {"tokenmill.api": ROOT / "api", "tokenmill.conformance": ROOT / "conformance", "tokenmill": CORE}
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists())
BOOKKEEPING = sorted({*CORE.glob("engine/scheduler.py"), *CORE.glob("kv/*.py"), *CORE.glob("engine/sequence.py"),
                      *CORE.glob("request.py"), *CORE.glob("block_table.py")})


def _module_name(path: Path) -> str:
    for prefix, folder in PACKAGE_DIRS.items():
        if folder in path.parents or path.parent == folder:
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            return ".".join([prefix, *parts])
    raise ValueError(path)


def _module_path(name: str) -> Path | None:
    for prefix, folder in PACKAGE_DIRS.items():
        if name == prefix or name.startswith(prefix + "."):
            rest = name[len(prefix):].lstrip(".").split(".") if name != prefix else []
            base = folder.joinpath(*rest)
            for candidate in (base.with_suffix(".py") if rest else None, base / "__init__.py"):
                if candidate is not None and candidate.exists():
                    return candidate
            return None
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, module_level_only: bool = False) -> set[str]:
    """Absolute names imported by ``path`` (``from a import b`` yields ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path) if any(f in path.parents for f in PACKAGE_DIRS.values()) else ""
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(ast.Module(body=[sub], type_ignores=[]))
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1] if child.level > 1 else base
                    mod = ".".join([*base, child.module] if child.module else base)
                else:
                    mod = child.module or ""
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in child.names if a.name != "*")
            elif (isinstance(child, ast.Call) and getattr(child.func, "attr", getattr(child.func, "id", None))
                  in ("import_module", "__import__") and child.args and isinstance(child.args[0], ast.Constant)
                  and isinstance(child.args[0].value, str)):
                found.add(child.args[0].value)
            visit(child)

    visit(tree)
    return found


def tokenmill_closure(start: Path) -> dict[str, list[str]]:
    """Every tokenmill module that importing ``start`` executes, with the chain that reaches it."""
    chains: dict[str, list[str]] = {}
    todo = [(_module_name(start), [_module_name(start)])]
    while todo:
        name, chain = todo.pop()
        parts = name.split(".")
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        for i in range(1, len(parts) + 1):
            mod = ".".join(parts[:i])
            path = _module_path(mod)
            if path is None or mod in chains:
                continue
            chains[mod] = chain if mod == name else [*chain[:-1], mod]
            for imported in imports(path, module_level_only=True):
                if imported.startswith("tokenmill") and _module_path(imported) is not None:
                    todo.append((imported, [*chains[mod], imported]))
    return chains


def _all_py(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts and ".egg-info" not in str(p))


def test_the_rules_have_something_to_check():
    assert len(_all_py(CORE)) > 10
    assert {p.name for p in PLUGINS} == {"cpu", "cuda", "rocm", "xpu", "tpu"}
    assert any(p.name == "scheduler.py" for p in BOOKKEEPING)
    assert any(p.parent.name == "kv" for p in BOOKKEEPING)


def _is_api(name: str) -> bool:
    return name == "tokenmill.api" or name.startswith("tokenmill.api.")


def test_core_never_imports_a_plugin_or_the_api():
    bad = []
    for path in _all_py(CORE):
        # The CLI's subcommands are the one entry layer above both: `tokenmill serve` starts the
        # API server, lazily, inside run(); nothing else in the core may reach the API.
        is_command = path.parent == CORE / "commands"
        top_level = imports(path, module_level_only=True)
        for name in imports(path):
            if name.startswith("tokenmill_"):
                bad.append(f"{path.relative_to(ROOT)} imports the plugin {name}")
            elif _is_api(name) and (not is_command or name in top_level):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", BOOKKEEPING, ids=lambda p: str(p.relative_to(ROOT)))
def test_bookkeeping_imports_no_torch(path):
    direct = [n for n in imports(path) if n.split(".")[0] in ("torch", "numpy", "triton")]
    assert not direct, f"{path.relative_to(ROOT)} imports {direct}"
    for mod, chain in tokenmill_closure(path).items():
        torchy = [n for n in imports(_module_path(mod), module_level_only=True) if n.split(".")[0] == "torch"]
        assert not torchy, f"{' -> '.join(chain)} imports torch"


def test_bookkeeping_imports_no_torch_at_run_time():
    names = [_module_name(p) for p in BOOKKEEPING]
    code = (f"import importlib, json, sys\nfor n in {names!r}: importlib.import_module(n)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_closure_resolver_sees_through_packages():
    # a sanity check of the checker itself: the scheduler reaches the KV manager through tokenmill.kv
    chains = tokenmill_closure(CORE / "engine" / "scheduler.py")
    assert "tokenmill" in chains and "tokenmill.kv" in chains and "tokenmill.kv.manager" in chains


def test_plugins_never_import_each_other():
    bad = []
    for plugin in PLUGINS:
        own = f"tokenmill_{plugin.name}"
        for path in _all_py(plugin):
            for name in imports(path):
                top = name.split(".")[0]
                if top.startswith("tokenmill_") and top != own:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_importing_plugins_imports_no_vendor_stack():
    modules = [f"tokenmill_{p.name}.{m}" for p in PLUGINS for m in ("plugin", "platform")]
    code = (f"import importlib, json, sys\nfor n in {modules!r}: importlib.import_module(n)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'torch_xla', 'intel_extension_for_pytorch', 'triton'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_asking_availability_imports_no_ipex():
    code = ("import json, sys\nfrom tokenmill_xpu.platform import XpuPlatform\nfrom tokenmill_tpu.platform import "
            "TpuPlatform\np = XpuPlatform(); p.availability(); p.describe(); TpuPlatform().availability()\n"
            "print(json.dumps('intel_extension_for_pytorch' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) is False


def test_checker_catches_torch_reached_through_another_module(tmp_path, monkeypatch):
    core = tmp_path / "core"
    (core / "kv").mkdir(parents=True)
    (core / "__init__.py").write_text("")
    (core / "kv" / "__init__.py").write_text("from .pool import Pool\n")
    (core / "kv" / "pool.py").write_text("from tokenmill import util\nclass Pool: ...\n")
    (core / "util.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import numpy\n"
                                  "def f():\n    import triton\nimport torch\n")
    monkeypatch.setitem(PACKAGE_DIRS, "tokenmill", core)
    chains = tokenmill_closure(core / "kv" / "pool.py")
    assert chains["tokenmill.util"] == ["tokenmill.kv.pool", "tokenmill.util"]
    assert imports(core / "util.py", module_level_only=True) == {"torch", "typing", "typing.TYPE_CHECKING"}
    assert imports(core / "util.py") == {"torch", "triton", "typing", "typing.TYPE_CHECKING"}
    assert imports(core / "kv" / "__init__.py") == {"tokenmill.kv.pool", "tokenmill.kv.pool.Pool"}
