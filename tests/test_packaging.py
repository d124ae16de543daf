"""Packaging: the non-editable wheels hold every module, the plugins are declared right, one command installs all.

The root pyproject maps ``tokenmill`` to ``core/`` (and ``tokenmill.api``, ``tokenmill.conformance``)
through ``package-dir`` and lets setuptools discover the subpackages under that mapping; an
editable install would hide a subpackage missing from a real wheel, so this builds real wheels
(from a copy of the sources, with the installed setuptools, no network) and reads their file lists.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = ("cpu", "cuda", "rocm", "xpu", "tpu")
ROOT_PACKAGES = {"core": "tokenmill", "api": "tokenmill/api", "conformance": "tokenmill/conformance"}
IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", "*.pyc")

BUILD = """
import sys
from setuptools import build_meta
print(build_meta.build_wheel(sys.argv[1]))
"""


def _build_wheel(src: Path, work: Path) -> zipfile.ZipFile:
    out = subprocess.run([sys.executable, "-c", BUILD, str(work / "wheel")], cwd=src, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return zipfile.ZipFile(work / "wheel" / out.stdout.strip().splitlines()[-1])


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts and ".egg-info" not in str(p))


@pytest.fixture(scope="module")
def root_wheel(tmp_path_factory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("root-src")
    shutil.copy(ROOT / "pyproject.toml", src)
    for extra in ("README.md", "LICENSE"):
        if (ROOT / extra).exists():
            shutil.copy(ROOT / extra, src)
    for folder in ROOT_PACKAGES:
        shutil.copytree(ROOT / folder, src / folder, ignore=IGNORE)
    return _build_wheel(src, tmp_path_factory.mktemp("root-out"))


def test_root_wheel_holds_every_module_of_every_subpackage(root_wheel):
    names = set(root_wheel.namelist())
    missing = []
    for folder, target in ROOT_PACKAGES.items():
        for path in _sources(ROOT / folder):
            wanted = f"{target}/{path.relative_to(ROOT / folder).as_posix()}"
            if wanted not in names:
                missing.append(wanted)
    assert not missing, "not in the wheel (is the subpackage discoverable under package-dir?):\n" + "\n".join(missing)
    assert "tokenmill/commands/plugins_cmd.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "tokenmill = tokenmill.cli:main" in root_wheel.read(entry_points).decode()


def test_root_wheel_has_no_stray_top_level_packages(root_wheel):
    tops = {n.split("/")[0] for n in root_wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tokenmill"}


@pytest.mark.parametrize("name", PLATFORMS)
def test_plugin_pyproject(name):
    project = tomllib.loads((ROOT / "plugins" / name / "pyproject.toml").read_text())["project"]
    assert project["name"] == f"tokenmill-{name}"
    assert project["version"] == "0.1.0"
    assert project["dependencies"] == ["tokenmill"]  # no torch pin: each platform brings its own torch
    assert project["entry-points"]["tokenmill"] == {name: f"tokenmill_{name}.plugin"}


def test_plugin_wheels(tmp_path):
    for name in PLATFORMS:
        src = tmp_path / f"src-{name}"
        shutil.copytree(ROOT / "plugins" / name, src, ignore=IGNORE)
        wheel = _build_wheel(src, tmp_path / f"out-{name}")
        names = set(wheel.namelist())
        for module in ("__init__", "plugin", "platform"):
            assert f"tokenmill_{name}/{module}.py" in names
        eps = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        assert f"[tokenmill]\n{name} = tokenmill_{name}.plugin" in eps
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                    if line.startswith("Requires-Dist:") and "extra ==" not in line]
        assert requires == ["tokenmill"]  # torch comes from the platform's own build, never pinned here


def test_plugins_declare_the_current_contract():
    from tokenmill.version import CONTRACT_VERSION

    import importlib

    for name in PLATFORMS:
        assert importlib.import_module(f"tokenmill_{name}.plugin").TOKENMILL_CONTRACT == CONTRACT_VERSION


def test_root_extras_and_the_install_command_cover_every_plugin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for name in PLATFORMS:
        # tpu: the plugin's xla extra pins torch-xla and the torch it accepts (same minor)
        assert project["optional-dependencies"][name] == [f"tokenmill-{name}" + ("[xla]" if name == "tpu" else "")]
    tpu = tomllib.loads((ROOT / "plugins" / "tpu" / "pyproject.toml").read_text())["project"]
    assert tpu["optional-dependencies"]["xla"] == ["torch-xla[tpu]>=2.9,<2.10", "torch>=2.9,<2.10"]
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements-dev.txt").read_text().splitlines()]
    lines = [line for line in lines if line]
    assert lines[0] == "-c constraints.txt"
    assert "-e .[dev,cpu,router,ray]" in lines
    local = {Path(line[3:]) for line in lines if line.startswith("-e ") and line != "-e .[dev,cpu,router,ray]"}
    expected = {Path("plugins") / n for n in PLATFORMS}
    expected |= {p.relative_to(ROOT) for p in (ROOT / "tests" / "plugins").iterdir() if (p / "pyproject.toml").exists()}
    expected |= {p.relative_to(ROOT) for p in (ROOT / "examples").iterdir() if (p / "pyproject.toml").exists()}
    assert local == expected
    assert any(line.startswith("torch==") for line in (ROOT / "constraints.txt").read_text().splitlines())


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "pip install -r requirements-dev.txt" in first_block
    assert "tokenmill serve" in first_block and "/v1/chat/completions" in first_block
    assert ".venv/bin/pytest -q" in first_block
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in ci
    assert '"$venv/bin/pip" install --progress-bar off -r requirements-dev.txt' in ci
    assert '"$venv/bin/pytest" -q' in ci
