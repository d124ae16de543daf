"""The ``tokenmill`` command line: each subcommand lives in ``tokenmill.commands.<name>``.

A command module defines ``add_arguments(parser)`` and ``run(args) -> int``; it is imported
only when its subcommand runs, so ``tokenmill plugins`` never pays for torch or FastAPI.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "serve": ("serve", "serve a model behind an OpenAI-compatible HTTP API"),
    "router": ("router", "data-parallel replicas behind SGLang's router (tokenmill[router])"),
    "generate": ("generate", "generate text from a model, offline"),
    "bench": ("bench", "benchmarks: throughput, prefix, serve"),
    "quantize": ("quantize", "quantize a float checkpoint (gptq, awq, fp8; round-to-nearest)"),
    "plugins": ("plugins_cmd", "list installed plugins, their platforms and registrations"),
    "conformance": ("conformance_cmd", "run the conformance suite against a plugin"),
    "new-plugin": ("new_plugin", "scaffold a new hardware plugin package"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="Serve LLMs fast, on any accelerator.")
    from tokenmill.version import __version__

    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:]
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen command's module is imported
            importlib.import_module(f"tokenmill.commands.{module}").add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser = build_parser()
    args = parser.parse_args()
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    module = importlib.import_module(f"tokenmill.commands.{args._module}")
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:  # configuration errors: one clear line, no traceback
        print(f"tokenmill {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
