"""Guided decoding (structured output): the contract, the xgrammar and outlines backends, the compiler.

- :mod:`tokenmill.guided.interface`: specs, backends, compiled grammars, matchers (the contract);
- :mod:`tokenmill.guided.params`: :class:`StructuredOutputsParams` (vLLM's per-request fields);
- :mod:`tokenmill.guided.manager`: backend choice (``auto``), compile cache, off-loop compilation;
- :mod:`tokenmill.guided.xgrammar_backend`, :mod:`tokenmill.guided.outlines_backend`: the built-ins,
  registered through ``tokenmill_guided_decoding_backends`` like any plugin's.
"""
from tokenmill.guided.interface import (KINDS, CompiledGrammar, GuidedBackend, GuidedMatcher, GuidedSpec,
                                        GuidedSpecError, VocabInfo)
from tokenmill.guided.manager import GrammarHandle, GuidedCompiler, backend_classes, choose_backend
from tokenmill.guided.params import BACKEND_CHOICES, StructuredOutputsParams

__all__ = ["KINDS", "BACKEND_CHOICES", "CompiledGrammar", "GuidedBackend", "GuidedMatcher", "GuidedSpec",
           "GuidedSpecError", "VocabInfo", "GrammarHandle", "GuidedCompiler", "backend_classes", "choose_backend",
           "StructuredOutputsParams"]
