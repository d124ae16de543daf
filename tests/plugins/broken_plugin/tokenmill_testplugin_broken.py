"""Test fixture plugin whose import fails: the manager must report it and load the others."""
from __future__ import annotations

TOKENMILL_CONTRACT = "1.0"

raise RuntimeError("tokenmill-testplugin-broken fails to import on purpose (a test fixture)")
