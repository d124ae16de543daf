"""tokenmill-example-plugin: an out-of-tree plugin for the platform ``example`` (entry point ``tokenmill_example.plugin``)."""

__version__ = "0.1.0"
