"""Tokenizer loading and chat-template rendering (HF tokenizers, sandboxed jinja)."""
from __future__ import annotations


def load_tokenizer(path: str):
    """Load a local HF tokenizer (fast) from ``path``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template: str | None = None, **kwargs) -> str:
    """Render ``messages`` with the tokenizer's chat template (HF renders it in a sandboxed jinja env).

    Raises ValueError when the tokenizer has no template and none is given.
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this model's tokenizer has no chat template; pass chat_template or use completions")
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message,
                                             chat_template=template, **kwargs)
    except ValueError:
        raise
    except Exception as exc:  # jinja errors: the template or the messages are wrong
        raise ValueError(f"chat template failed to render: {exc}") from exc
