"""Benchmarks behind ``tokenmill bench``: each module defines ``add_arguments`` and ``run``."""
