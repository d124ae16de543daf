"""Test fixture plugin built for plugin contract 0.9: the manager must refuse it, naming both versions."""
from __future__ import annotations

from tokenmill.hookspecs import hookimpl
from tokenmill.platform import Availability, Platform

TOKENMILL_CONTRACT = "0.9"


class OldPlatform(Platform):
    """Would always be available and outrank everything, were it ever registered."""

    name = "oldaccel"
    priority = 10_000

    def availability(self) -> Availability:
        return Availability(True)


@hookimpl
def tokenmill_platforms():
    return [OldPlatform()]
