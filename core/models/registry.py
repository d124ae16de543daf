"""The model architectures the core ships, by the name found in ``config.json`` ``architectures``."""
from __future__ import annotations

from tokenmill.models.llama import LlamaForCausalLM, MistralForCausalLM
from tokenmill.models.mixtral import MixtralForCausalLM
from tokenmill.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM

ARCHITECTURES = [
    ("LlamaForCausalLM", LlamaForCausalLM),
    ("MistralForCausalLM", MistralForCausalLM),
    ("Qwen2ForCausalLM", Qwen2ForCausalLM),
    ("Qwen3ForCausalLM", Qwen3ForCausalLM),
    ("MixtralForCausalLM", MixtralForCausalLM),
]
