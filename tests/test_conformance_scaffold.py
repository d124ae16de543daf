"""The plugin author's path: a scaffolded plugin and the example out-of-tree plugin pass the suite.

Both are installed the way users install them (pip, entry point), but into a private
``--target`` folder put on ``PYTHONPATH``, so the shared environment stays untouched.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.commands.new_plugin import scaffold

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tokenmill-example-plugin"
CLI = [sys.executable, "-m", "tokenmill"]


def _pip_install_target(package: Path, target: Path) -> dict:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(package)], check=True, capture_output=True, timeout=300)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run(args, env, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, cwd=cwd, timeout=900)


def test_new_plugin_installs_lists_and_passes_unchanged(tmp_path):
    out = subprocess.run(CLI + ["new-plugin", "acme"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    pkg = tmp_path / "tokenmill-acme"
    assert "pip install -e tokenmill-acme" in out.stdout
    for rel in ("pyproject.toml", "README.md", "tokenmill_acme/plugin.py", "tokenmill_acme/platform.py",
                "tests/test_conformance.py"):
        assert (pkg / rel).is_file(), rel
    assert 'acme = "tokenmill_acme.plugin"' in (pkg / "pyproject.toml").read_text()
    env = _pip_install_target(pkg, tmp_path / "site")
    listed = _run(["plugins"], env, tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "tokenmill-acme" in listed.stdout and "acme" in listed.stdout
    suite = _run(["conformance", "acme", "-q"], env, tmp_path)
    assert suite.returncode == 0, suite.stdout[-4000:] + suite.stderr[-2000:]
    assert " 0 failed" in suite.stdout
    assert "e2e/acme/engine-llama" in suite.stdout  # the engine really ran on the new platform
    # The scaffold's own test runs the same suite.
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert test.returncode == 0, test.stdout[-3000:]


def test_scaffold_validates_names_and_keeps_existing_files(tmp_path):
    with pytest.raises(ValueError, match="lowercase"):
        scaffold("Acme", tmp_path / "x")
    with pytest.raises(ValueError, match="lowercase"):
        scaffold("class", tmp_path / "x")
    root = scaffold("my_accel", tmp_path / "pkg")
    assert (root / "tokenmill_my_accel" / "platform.py").read_text().count("class MyAccelPlatform(Platform)") == 1
    assert 'name = "tokenmill-my-accel"' in (root / "pyproject.toml").read_text()
    with pytest.raises(ValueError, match="--force"):
        scaffold("my_accel", tmp_path / "pkg")
    scaffold("my_accel", tmp_path / "pkg", force=True)


def test_example_out_of_tree_plugin_passes(tmp_path):
    try:
        importlib.metadata.distribution("tokenmill-example-plugin")
        env = dict(os.environ)  # CI installs it with pip install -e
    except importlib.metadata.PackageNotFoundError:
        env = _pip_install_target(EXAMPLE, tmp_path / "site")
    suite = _run(["conformance", "example", "-q"], env, tmp_path)
    assert suite.returncode == 0, suite.stdout[-4000:] + suite.stderr[-2000:]
    assert " 0 failed" in suite.stdout
    # Its own attention (with its own cache layout) and kernels were checked, not just the reference.
    assert "attention/example/example/bfloat16/mixed-" in suite.stdout
    assert "kernel/example/silu_and_mul/float32" in suite.stdout
