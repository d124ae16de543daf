"""tokenmill-cpu: the CPU platform plugin (entry point ``tokenmill_cpu.plugin``)."""

__version__ = "0.1.0"
