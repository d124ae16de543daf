"""Helpers for tests and the conformance suite: tiny local checkpoints, HF reference tokens and a minimal decode loop."""
from tokenmill.testing.hf_reference import hf_greedy
from tokenmill.testing.tiny_models import ARCHS, make_tiny_model, make_tokenizer

__all__ = ["ARCHS", "hf_greedy", "make_tiny_model", "make_tokenizer"]
