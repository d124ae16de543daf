"""The tokenmill conformance suite against this plugin, found through its entry point."""
from tokenmill.conformance import run_suite


def test_conformance():
    report = run_suite("example")
    print(report.table())
    assert report.ok, report.table()
