"""Tokenizer loading and chat-template rendering (HF tokenizers, sandboxed jinja)."""
from __future__ import annotations

import contextlib


def load_tokenizer(path: str):
    """Load a local HF tokenizer (fast) from ``path``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                continue_final_message: bool = False, chat_template: str | None = None,
                timeout: float | None = None, max_chars: int | None = None, **kwargs) -> str:
    """Render ``messages`` with the tokenizer's chat template (HF renders it in a sandboxed jinja env).

    With ``timeout`` (seconds) and ``max_chars``, the render stops at the deadline or past the
    cap with :class:`tokenmill.template_budget.TemplateBudgetExceeded` (a ValueError). Raises
    ValueError when the tokenizer has no template and none is given.
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError("this model's tokenizer has no chat template; pass chat_template or use completions")
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
    bounded = contextlib.nullcontext()
    if timeout is not None or max_chars is not None:
        from tokenmill.template_budget import budget

        bounded = budget(tokenizer.get_chat_template(template, kwargs.get("tools")),
                         timeout if timeout is not None else float("inf"),
                         max_chars if max_chars is not None else 1 << 62)
    try:
        with bounded:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                 continue_final_message=continue_final_message,
                                                 chat_template=template, **kwargs)
    except ValueError:
        raise
    except Exception as exc:  # jinja errors: the template or the messages are wrong
        raise ValueError(f"chat template failed to render: {exc}") from exc


#: Fill-in-the-middle special tokens by model family, and the order the parts go in:
#: ``psm`` = prefix, suffix, middle (StarCoder, Qwen2.5-Coder, DeepSeek-Coder); ``spm`` = Codestral's.
FIM_TOKENS = (
    (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), "psm"),
    (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"), "psm"),
    (("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"), "psm"),
    (("[PREFIX]", "[SUFFIX]", "[MIDDLE]"), "spm"),
)


def _token_id(tokenizer, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != token:
        return None
    return tid


def fim_tokens(tokenizer) -> tuple[tuple[int, int, int | None], str] | None:
    """``((prefix, suffix, middle) ids, order)`` of the tokenizer's fill-in-the-middle tokens, or None.
    Codestral has no middle token (``[MIDDLE]`` absent: the prefix's end is where it writes)."""
    for names, order in FIM_TOKENS:
        ids = [_token_id(tokenizer, n) for n in names]
        if ids[0] is not None and ids[1] is not None and (ids[2] is not None or order == "spm"):
            return (ids[0], ids[1], ids[2]), order
    return None


def fim_prompt(tokenizer, fim, prefix_ids: list[int], suffix_ids: list[int], lead: list[int]) -> list[int]:
    """The prompt that asks the model for the text between ``prefix_ids`` and ``suffix_ids``;
    ``lead`` is what the tokenizer puts first (BOS, if it adds one)."""
    (p, s, m), order = fim
    if order == "psm":
        return [*lead, p, *prefix_ids, s, *suffix_ids, m]
    return [*lead, s, *suffix_ids, p, *prefix_ids]


def encode_bounded(tokenizer, text: str, add_special_tokens: bool, limit: int) -> list[int] | int:
    """``tokenizer.encode(text)``, or just the token count when it exceeds ``limit``.

    Safe to call from a worker thread: a fast tokenizer's Rust backend encodes without the
    GIL, and an over-long prompt (a 10 MB one) is counted without building its list of ids,
    the part that would hold the GIL for long. Same ids as ``tokenizer.encode``: that calls
    the backend's ``encode_batch`` too, with no truncation and the same special-token
    splitting, which is what the checks below make sure of.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None \
            or backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False)):
        ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return ids if len(ids) <= limit else len(ids)
    (enc,) = backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)
    n = len(enc)
    return enc.ids if n <= limit else n
