"""Helpers for tests and the conformance suite: tiny local checkpoints and a minimal decode loop."""
from tokenmill.testing.tiny_models import ARCHS, make_tiny_model, make_tokenizer

__all__ = ["ARCHS", "make_tiny_model", "make_tokenizer"]
