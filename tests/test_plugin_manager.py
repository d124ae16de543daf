"""The plugin manager, through real entry points.

The five platform plugins and the three fixture plugins in tests/plugins/ are installed by
requirements-dev.txt; these tests find them the way a user's installation does.
"""
from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from tokenmill.hookspecs import hookimpl
from tokenmill.platform import Availability, Platform
from tokenmill.plugins import (PlatformUnavailable, PluginManager, get_plugin_manager, reset_plugin_manager,
                               safe_availability)
from tokenmill.version import CONTRACT_VERSION

PLATFORM_PLUGINS = ("cpu", "cuda", "rocm", "xpu", "tpu")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("TOKENMILL_PLUGINS", raising=False)
    monkeypatch.delenv("TOKENMILL_TEST_FAKEACCEL", raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def pm() -> PluginManager:
    return PluginManager().load()


def _failure(pm: PluginManager, name: str):
    found = [f for f in pm.failures if f.name == name]
    assert len(found) == 1, f"expected one failure for {name!r}, got {pm.failures}"
    return found[0]


def _module(name: str, contract: str | None = CONTRACT_VERSION, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    if contract is not None:
        module.TOKENMILL_CONTRACT = contract
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


# -- discovery ---------------------------------------------------------------------------------

def test_entry_points_discover_every_installed_plugin(pm):
    names = [p.name for p in pm.plugins]
    assert names[0] == "tokenmill"  # the core's built-ins come first, through the same hooks
    for name in (*PLATFORM_PLUGINS, "testgood"):
        assert name in names
    by_name = {p.name: p for p in pm.plugins}
    assert by_name["cuda"].dist == "tokenmill-cuda"
    assert by_name["cuda"].version == "0.1.0"
    assert by_name["testgood"].contract == CONTRACT_VERSION


def test_broken_plugin_is_reported_and_the_others_still_load(pm):
    failure = _failure(pm, "testbroken")
    assert failure.dist == "tokenmill-testplugin-broken"
    assert failure.reason.startswith("RuntimeError: tokenmill-testplugin-broken fails to import on purpose")
    assert "\n" not in failure.reason
    assert "raise RuntimeError" in failure.traceback
    assert {p.name for p in pm.platforms()} >= {"cpu", "cuda", "rocm", "xpu", "tpu", "fakeaccel"}


def test_contract_mismatch_is_refused_with_both_versions(pm):
    failure = _failure(pm, "testold")
    assert "0.9" in failure.reason and CONTRACT_VERSION in failure.reason
    assert "testold" not in [p.name for p in pm.plugins]
    assert "oldaccel" not in [p.name for p in pm.platforms()]  # its hooks never ran


@pytest.mark.parametrize("contract, accepted", [("1.0", True), ("1.7", False), ("2.0", False), ("0.9", False),
                                                ("one", False), (None, False)])
def test_contract_check_on_direct_registration(contract, accepted):
    pm = PluginManager(allowlist=[]).load()
    ok = pm.register_module("direct", _module("direct", contract))
    assert ok is accepted
    if not accepted:
        reason = _failure(pm, "direct").reason
        assert CONTRACT_VERSION in reason
        assert (str(contract) in reason) if contract else "does not declare TOKENMILL_CONTRACT" in reason


def test_load_is_idempotent(pm):
    plugins, failures = list(pm.plugins), list(pm.failures)
    platforms = pm.platforms()
    assert pm.load() is pm
    assert pm.plugins == plugins and pm.failures == failures
    assert pm.platforms() == platforms  # same objects: the hooks ran once
    assert sorted(p.name for p in platforms) == sorted(set(p.name for p in platforms))


def test_unknown_hook_refuses_only_that_plugin():
    @hookimpl
    def tokenmill_platform():  # typo: the hook is tokenmill_platforms
        return []

    pm = PluginManager(allowlist=["cpu"]).load()
    assert pm.register_module("typo", _module("typo", tokenmill_platform=tokenmill_platform)) is False
    reason = _failure(pm, "typo").reason
    assert "tokenmill_platform" in reason and "tokenmill_platforms" in reason
    pm.pm.check_pending()  # nothing unknown is left registered
    assert [p.name for p in pm.platforms()] == ["cpu"]


def test_a_raising_registry_hook_is_reported_and_the_rest_still_collected():
    @hookimpl
    def tokenmill_platforms():
        raise RuntimeError("boom")

    pm = PluginManager(allowlist=["cpu"]).load()
    assert pm.register_module("raiser", _module("raiser", tokenmill_platforms=tokenmill_platforms))
    assert [p.name for p in pm.platforms()] == ["cpu"]
    assert "tokenmill_platforms raised RuntimeError: boom" in _failure(pm, "raiser").reason


# -- registries --------------------------------------------------------------------------------

def test_registration_counts_and_owners(pm):
    pm.collect_all()
    by_name = {p.name: p for p in pm.plugins}
    assert by_name["testgood"].registrations["platforms"] == 1
    assert by_name["testgood"].registrations["kernels"] == 1
    assert by_name["testgood"].registrations["model_architectures"] == 1
    for name in PLATFORM_PLUGINS:
        assert by_name[name].registrations["platforms"] == 1
    owners = {p.name: (p.plugin_name, p.plugin_version) for p in pm.platforms()}
    assert owners["fakeaccel"] == ("testgood", "0.1.0")
    assert owners["rocm"] == ("rocm", "0.1.0")
    assert "TestGoodForCausalLM" in pm.model_architectures()


def test_kernels_prefer_a_plugin_impl_over_the_reference(pm):
    torch = pytest.importorskip("torch")
    fake = pm.kernels("fakeaccel")
    assert fake.providers["silu_and_mul"] == "testgood"
    assert {op: who for op, who in fake.providers.items() if op != "silu_and_mul"} == \
        {op: "reference" for op in fake.providers if op != "silu_and_mul"}
    cpu = pm.kernels("cpu")
    assert "testgood" not in cpu.providers.values()  # the fixture's kernel serves only fakeaccel
    reference = PluginManager(allowlist=[]).load().kernels("cpu")
    assert set(reference.providers.values()) == {"reference"}
    x = torch.randn(4, 16)
    torch.testing.assert_close(fake.silu_and_mul(x), reference.silu_and_mul(x))


# -- selection ---------------------------------------------------------------------------------

def test_auto_picks_the_highest_priority_available_platform(pm, monkeypatch):
    available = [p for p in pm.platforms() if p.availability()]
    assert available and pm.select_platform("auto") is available[0]
    assert pm.select_platform("auto").name != "fakeaccel"
    monkeypatch.setenv("TOKENMILL_TEST_FAKEACCEL", "1")
    chosen = pm.select_platform("auto")
    assert chosen.name == "fakeaccel" and chosen.priority > max(p.priority for p in available)


def test_forcing_an_unavailable_platform_fails_with_its_reason(pm):
    with pytest.raises(PlatformUnavailable, match="platform 'fakeaccel' is not available: .*TOKENMILL_TEST_FAKEACCEL"):
        pm.select_platform("fakeaccel")
    assert pm.select_platform("cpu").name == "cpu"


def test_forcing_cuda_without_cuda_fails_with_its_reason(pm):
    torch = pytest.importorskip("torch")
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    with pytest.raises(PlatformUnavailable, match=r"'cuda' is not available: torch built without CUDA"):
        pm.select_platform("cuda")


def test_unknown_platform_names_the_installed_ones_and_failed_plugins(pm):
    with pytest.raises(PlatformUnavailable, match="unknown platform 'nope'.*installed platforms: .*cpu"):
        pm.select_platform("nope")
    with pytest.raises(PlatformUnavailable, match="its plugin failed to load: RuntimeError"):
        pm.select_platform("testbroken")


class _Raising(Platform):
    name = "raising"
    priority = 10_000

    def availability(self) -> Availability:
        raise RuntimeError("driver exploded")


def test_a_raising_availability_is_unavailable_not_a_crash():
    @hookimpl
    def tokenmill_platforms():
        return [_Raising()]

    pm = PluginManager(allowlist=["cpu"]).load()
    pm.register_module("raising", _module("raising", tokenmill_platforms=tokenmill_platforms))
    assert pm.select_platform("auto").name == "cpu"
    with pytest.raises(PlatformUnavailable, match="availability\\(\\) raised RuntimeError: driver exploded"):
        pm.select_platform("raising")
    assert not safe_availability(_Raising())


# -- allowlist ---------------------------------------------------------------------------------

def test_allowlist_hides_every_other_plugin():
    pm = PluginManager(allowlist=["cpu", "testgood"]).load()
    assert [p.name for p in pm.plugins] == ["tokenmill", "cpu", "testgood"]
    assert pm.failures == []  # the broken and old plugins were never imported
    assert sorted(p.name for p in pm.platforms()) == ["cpu", "fakeaccel"]


def test_allowlist_from_the_environment(monkeypatch):
    monkeypatch.setenv("TOKENMILL_PLUGINS", " cpu , missingplugin ")
    pm = get_plugin_manager()
    assert [p.name for p in pm.plugins] == ["tokenmill", "cpu"]
    assert "no entry point 'missingplugin' is installed" in _failure(pm, "missingplugin").reason


def test_allowlisted_out_plugins_are_not_even_imported():
    code = ("import json, sys; from tokenmill.plugins import PluginManager; pm = PluginManager().load(); "
            "print(json.dumps([m for m in sys.modules if m.startswith('tokenmill_')]))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TOKENMILL_TEST_FAKEACCEL"}
    env["TOKENMILL_PLUGINS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["tokenmill_cpu", "tokenmill_cpu.plugin"]


def test_a_platform_hook_returning_junk_is_reported():
    @hookimpl
    def tokenmill_platforms():
        return ["not a platform"]

    pm = PluginManager(allowlist=["cpu"]).load()
    pm.register_module("junk", _module("junk", tokenmill_platforms=tokenmill_platforms))
    assert [p.name for p in pm.platforms()] == ["cpu"]
    assert "not Platform instances: 'not a platform'" in _failure(pm, "junk").reason
