"""tokenmill: serve large language models behind an OpenAI-compatible API, on any accelerator."""
from tokenmill.hookspecs import hookimpl
from tokenmill.version import CONTRACT_VERSION, __version__

__all__ = ["LLM", "SamplingParams", "hookimpl", "CONTRACT_VERSION", "__version__"]


def __getattr__(name):
    # Lazy so that `import tokenmill` (plugins, the CLI's `plugins` command) does not import torch.
    if name == "LLM":
        from tokenmill.llm import LLM

        return LLM
    if name == "SamplingParams":
        from tokenmill.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
