"""``tokenmill plugins`` as a user runs it: a subprocess, on this machine's real installation."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tokenmill.commands.plugins_cmd import _platform_report, format_report
from tokenmill.platform import Availability, Platform

PLATFORM_PLUGINS = ("cpu", "cuda", "rocm", "xpu", "tpu")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TOKENMILL_PLUGINS", "TOKENMILL_TEST_FAKEACCEL")}
    return subprocess.run([sys.executable, "-m", "tokenmill", "plugins", *args], env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def report() -> dict:
    out = _run("--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_json_has_the_three_sections(report):
    assert set(report) >= {"plugins", "platforms", "failures"}
    for plugin in report["plugins"]:
        assert set(plugin["registrations"]) == {"platforms", "attention_backends", "kernels", "quantization_methods",
                                                "guided_decoding_backends", "model_architectures"}


def test_lists_the_five_platform_plugins(report):
    plugins = {p["name"]: p for p in report["plugins"]}
    for name in PLATFORM_PLUGINS:
        assert plugins[name]["dist"] == f"tokenmill-{name}"
        assert plugins[name]["version"] == "0.1.0"
        assert plugins[name]["platforms"] == [name]
        assert plugins[name]["registrations"]["platforms"] == 1
    assert plugins["tpu"]["device_types"] == ["xla"]
    assert plugins["rocm"]["device_types"] == ["cuda"]


def test_cpu_available_and_the_accelerators_not_on_this_machine(report):
    torch = pytest.importorskip("torch")
    platforms = {p["name"]: p for p in report["platforms"]}
    cpu = platforms["cpu"]
    assert cpu["available"] and cpu["reason"] == ""
    assert 0 < cpu["memory"]["free"] <= cpu["memory"]["total"]
    assert cpu["dist_backend"] == "gloo"
    assert report["auto"] == "cpu"
    expected = {}
    if torch.version.cuda is None:
        expected["cuda"] = "torch built without CUDA (torch.version.cuda is None)"
    if getattr(torch.version, "hip", None) is None:
        expected["rocm"] = "torch built without ROCm (torch.version.hip is None)"
    if not torch.xpu.is_available():
        expected["xpu"] = "no Intel XPU device visible (torch.xpu.is_available() is False)"
    try:
        import importlib.util

        if importlib.util.find_spec("torch_xla") is None:
            expected["tpu"] = "torch_xla is not installed"
    except ValueError:
        pass
    if len(expected) < 4:
        pytest.skip("this machine has an accelerator stack installed")
    for name, reason in expected.items():
        assert platforms[name]["available"] is False
        assert platforms[name]["reason"] == reason
        assert platforms[name]["memory"] is None


def test_failed_plugins_are_listed_with_one_line_errors(report):
    failures = {f["name"]: f for f in report["failures"]}
    assert failures["testbroken"]["reason"].startswith("RuntimeError: ")
    assert "0.9" in failures["testold"]["reason"]
    assert all("\n" not in f["reason"] for f in report["failures"])


def test_table_output():
    out = _run()
    assert out.returncode == 0, out.stderr
    text = out.stdout
    plugins, rest = text.split("Platforms", 1)
    platforms, failed = rest.split("Failed plugins:", 1)
    for name in PLATFORM_PLUGINS:
        assert f"tokenmill-{name}" in plugins
    assert "cpu" in platforms and "yes" in platforms
    assert all(name in platforms for name in PLATFORM_PLUGINS)
    assert "auto -> cpu" in platforms
    assert "testbroken (tokenmill-testplugin-broken 0.1.0): RuntimeError:" in failed


class _Broken(Platform):
    name = "broken"

    def availability(self):
        raise RuntimeError("no driver")

    def describe(self):
        raise RuntimeError("cannot describe")


class _BadMemory(Platform):
    name = "badmem"

    def availability(self):
        return Availability(True)

    def memory_info(self):
        raise OSError("no meminfo")


def test_report_survives_raising_platforms():
    broken = _platform_report(_Broken())
    assert broken["available"] is False and "RuntimeError: no driver" in broken["reason"]
    assert broken["describe"] == {"error": "RuntimeError: cannot describe"}
    bad = _platform_report(_BadMemory())
    assert bad["available"] and bad["memory"] is None and bad["memory_error"] == "OSError: no meminfo"
    text = format_report({"plugins": [], "platforms": [broken, bad], "failures": [], "auto": "badmem"}, verbose=True)
    assert "no: availability() raised RuntimeError: no driver" in text
    assert "badmem: memory_info() raised OSError: no meminfo" in text
