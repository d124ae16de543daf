"""Helpers for tests and the conformance suite: tiny local checkpoints, HF reference tokens, a minimal
decode loop and a trace of the scheduler's plans (overlap)."""
from tokenmill.testing.hf_reference import hf_greedy
from tokenmill.testing.plan_events import record_plan_events
from tokenmill.testing.tiny_models import ARCHS, make_tiny_model, make_tokenizer

__all__ = ["ARCHS", "hf_greedy", "make_tiny_model", "make_tokenizer", "record_plan_events"]
