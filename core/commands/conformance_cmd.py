"""``tokenmill conformance PLUGIN``: run the conformance suite against a plugin and report.

Exit status 0 when no check failed (skips each give their reason), 1 when one did.
"""
from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("plugin", help="entry-point name of an installed plugin (cpu, cuda, ...), an importable "
                                       "module, or the path of a plugin .py file")
    parser.add_argument("--report", metavar="FILE.md", help="also write the capability report as Markdown")
    parser.add_argument("--interpret", action="store_true",
                        help="run Triton kernels and attention on CPU tensors under Triton's interpreter, "
                             "so GPU plugins are checked without their device (device checks are skipped)")
    parser.add_argument("--grid", choices=("small", "standard", "full"), default=None,
                        help="attention grid: small (default with --interpret), standard (default), full product")
    parser.add_argument("-k", "--select", action="append", metavar="TEXT",
                        help="run only checks whose id contains TEXT (repeatable)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the final table")


def run(args) -> int:
    from tokenmill.conformance.target import enable_interpreter

    if args.interpret:
        enable_interpreter()  # first: Triton decides at import whether to interpret
    from tokenmill.conformance.suite import run_suite

    def progress(result):
        if not args.quiet:
            print(f"{result.status.upper():4}  {result.check.id}  ({result.seconds:.1f}s)", flush=True)

    report = run_suite(args.plugin, interpret=args.interpret, grid=args.grid, patterns=args.select,
                       progress=progress)
    if not args.quiet:
        print()
    print(report.table())
    if args.report:
        with open(args.report, "w") as f:
            f.write(report.markdown() + "\n")
        print(f"Markdown report written to {args.report}", file=sys.stderr)
    return 0 if report.ok else 1
