"""tokenmill-tpu: the Google TPU platform plugin through torch-xla (entry point ``tokenmill_tpu.plugin``)."""

__version__ = "0.1.0"
