"""pytest front end of the suite: ``pytest --pyargs tokenmill.conformance --plugin NAME``.

Registered with pytest through the ``pytest11`` entry point of the tokenmill distribution
(or load it by hand: ``pytest -p tokenmill.conformance.pytest_plugin``). It only adds
options and parametrizes the suite's own test, ``test_plugin.py`` in this package, so it
is inert in any other test session. Options: ``--plugin`` (entry-point name, module or .py path), ``--interpret`` (Triton
kernels on CPU tensors), ``--grid small|standard|full``, ``--conformance-report FILE.md``.
Each check is one test, named by the check's id; skips carry the check's reason. The
capability table is printed at the end of the session.
"""
from __future__ import annotations

import pytest

_STATE: dict = {}


def pytest_addoption(parser):
    group = parser.getgroup("tokenmill-conformance", "tokenmill conformance suite")
    group.addoption("--plugin", action="store", default=None, metavar="NAME",
                    help="plugin to check: entry-point name, importable module or path of a .py file")
    group.addoption("--interpret", action="store_true", default=False,
                    help="run Triton kernels on CPU tensors under Triton's interpreter (no GPU needed)")
    group.addoption("--grid", action="store", default=None, choices=("small", "standard", "full"),
                    help="attention grid size (default: small with --interpret, else standard)")
    group.addoption("--conformance-report", action="store", default=None, metavar="FILE",
                    help="also write the capability report as Markdown to FILE")


def pytest_configure(config):
    if config.getoption("--interpret", default=False):
        from tokenmill.conformance.target import enable_interpreter

        # Before anything imports Triton: its jit decides at import time whether to interpret.
        _STATE["interpret_error"] = enable_interpreter()


def _target(config):
    if "target" not in _STATE:
        plugin = config.getoption("--plugin")
        if not plugin:
            raise pytest.UsageError("tokenmill.conformance needs --plugin NAME (an entry-point name, module or .py file)")
        from tokenmill.conformance import build_checks, load_target
        from tokenmill.conformance.results import Report
        from tokenmill.conformance.target import describe_target

        target = load_target(plugin, interpret=config.getoption("--interpret"))
        _STATE["target"] = target
        _STATE["checks"] = build_checks(target, config.getoption("--grid"))
        _STATE["report"] = Report(target.name, describe_target(target))
    return _STATE["target"]


def pytest_generate_tests(metafunc):
    if "conformance_check" in metafunc.fixturenames:
        _target(metafunc.config)
        checks = _STATE["checks"]
        metafunc.parametrize("conformance_check", checks, ids=[c.id for c in checks])


@pytest.fixture
def conformance_report():
    return _STATE["report"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    report = _STATE.get("report")
    if report is None or not report.results:
        return
    from tokenmill.conformance.target import summarize_target

    report.facts.update(summarize_target(_STATE["target"]))
    terminalreporter.write_sep("=", "tokenmill conformance capability report")
    terminalreporter.write_line(report.table())
    path = config.getoption("--conformance-report")
    if path:
        with open(path, "w") as f:
            f.write(report.markdown() + "\n")
        terminalreporter.write_line(f"Markdown report written to {path}")
