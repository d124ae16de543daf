"""tokenmill-rocm: the AMD GPU platform plugin (entry point ``tokenmill_rocm.plugin``)."""

__version__ = "0.1.0"
