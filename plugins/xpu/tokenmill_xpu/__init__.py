"""tokenmill-xpu: the Intel GPU platform plugin (entry point ``tokenmill_xpu.plugin``)."""

__version__ = "0.1.0"
