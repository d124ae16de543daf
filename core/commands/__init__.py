"""Subcommands of the ``tokenmill`` CLI, one module each (see :mod:`tokenmill.cli`)."""
