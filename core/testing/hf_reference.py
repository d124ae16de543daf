"""HF transformers as the reference: greedy tokens on the same weights, one prompt at a time."""
from __future__ import annotations


def hf_greedy(model_dir, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The ``new_tokens`` greedy tokens HF generates after each prompt (float32, CPU, EOS not stopping)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else 0
    out = []
    for p in prompts:
        with torch.inference_mode():
            seq = hf.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=pad)
        out.append(seq[0, len(p):].tolist())
    return out
