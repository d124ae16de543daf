"""Test fixture plugin: the fake platform ``fakeaccel``, one kernel for it, one model architecture.

Harmless when installed: ``fakeaccel`` is available only when ``TOKENMILL_TEST_FAKEACCEL=1``,
its kernel serves only the platform ``fakeaccel``, and its architecture name is made up.
"""
from __future__ import annotations

import os

from tokenmill.hookspecs import hookimpl
from tokenmill.platform import Availability, Capabilities, MemoryInfo, Platform

TOKENMILL_CONTRACT = "1.0"
ENABLE_ENV = "TOKENMILL_TEST_FAKEACCEL"
ARCHITECTURE = "TestGoodForCausalLM"


class FakeAccelPlatform(Platform):
    """A pretend accelerator that computes on the host; outranks every real platform when enabled."""

    name = "fakeaccel"
    torch_device_type = "cpu"
    priority = 500
    dist_backend = "gloo"
    capabilities = Capabilities(dtypes=("float32",))

    def availability(self) -> Availability:
        if os.environ.get(ENABLE_ENV) == "1":
            return Availability(True)
        return Availability(False, f"test fixture platform; set {ENABLE_ENV}=1 to enable it")

    def memory_info(self) -> MemoryInfo:
        return MemoryInfo(free=1 << 30, total=2 << 30)


def silu_and_mul(x):
    """Same contract as the reference op: ``silu(x[:, :I]) * x[:, I:]``."""
    import torch

    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


class FixtureModel:
    """A placeholder architecture: registered only to show up in the model registry."""

    def __init__(self, hf_config, ctx):
        raise NotImplementedError(f"{ARCHITECTURE} is a test fixture, not a model")


@hookimpl
def tokenmill_platforms():
    return [FakeAccelPlatform()]


@hookimpl
def tokenmill_kernels():
    from tokenmill.ops.registry import KernelImpl

    return [KernelImpl("silu_and_mul", "fakeaccel", silu_and_mul, provider="testgood")]


@hookimpl
def tokenmill_model_architectures():
    return [(ARCHITECTURE, FixtureModel)]
