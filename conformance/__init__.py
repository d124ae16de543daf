"""The conformance suite: what "supported" means for a tokenmill hardware plugin.

Run it against any installed plugin (entry-point name), an importable module or a
``.py`` file, in either of two ways that run the same checks::

    tokenmill conformance cuda [--interpret] [--report report.md]
    pytest --pyargs tokenmill.conformance --plugin cuda [--interpret]

It discovers what the plugin registers and checks the platform contract, every
attention backend against the reference (prefill, decode, mixed ragged and chunked
batches over a grid of block sizes, GQA ratios, head sizes and dtypes, plus what it
must refuse), every kernel override against the reference op, and end-to-end greedy
generation of tiny local models against the reference platform. ``--interpret`` runs
Triton kernels on CPU tensors under Triton's interpreter, so GPU plugins are checked on
machines without a GPU (checks that need the device are skipped, with the reason).

From Python: ``report = run_suite("cpu"); print(report.table()); report.ok``.
"""
from tokenmill.conformance.results import FAIL, PASS, SKIP, Check, Report, Result, Skip
from tokenmill.conformance.suite import build_checks, run_checks, run_suite
from tokenmill.conformance.target import PluginNotFound, Target, load_target

__all__ = ["FAIL", "PASS", "SKIP", "Check", "PluginNotFound", "Report", "Result", "Skip", "Target",
           "build_checks", "load_target", "run_checks", "run_suite"]
