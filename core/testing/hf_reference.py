"""HF transformers as the reference: greedy tokens on the same weights, one prompt at a time."""
from __future__ import annotations


def hf_greedy(model_dir, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The ``new_tokens`` greedy tokens HF generates after each prompt (float32, CPU, EOS not stopping)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    # A plain argmax loop rather than generate(): generate's min_new_tokens masks EOS out of the
    # argmax, while the engine's ignore_eos lets EOS be the greedy token and only keeps going after it.
    out = []
    for p in prompts:
        ids, past, toks = torch.tensor([p]), None, []
        with torch.inference_mode():
            for _ in range(new_tokens):
                res = hf(input_ids=ids, past_key_values=past, use_cache=True)
                past = res.past_key_values
                ids = res.logits[:, -1].argmax(dim=-1, keepdim=True)
                toks.append(int(ids))
        out.append(toks)
    return out
