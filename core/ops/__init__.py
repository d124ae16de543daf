"""Ops: the reference implementations and the registry that resolves per-platform overrides."""
