"""tokenmill-cuda: the NVIDIA GPU platform plugin (entry point ``tokenmill_cuda.plugin``)."""

__version__ = "0.1.0"
