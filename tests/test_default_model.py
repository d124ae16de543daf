"""The bundled default model (core/data/default-model) loads with HF transformers and is trained.

It is what ``tokenmill serve`` runs with no model argument, so these checks stand in for a
newcomer's first request: the files are where the package ships them, small, with a chat
template, and the weights are trained (loss far below uniform, readable greedy text).
"""
from __future__ import annotations

import importlib.resources
import json
import math
from pathlib import Path

import pytest
import torch

import tokenmill

MODEL_DIR = Path(str(importlib.resources.files("tokenmill") / "data" / "default-model"))

# Not from the standard library: held out by construction.
HELD_OUT = '''import os
import sys


def read_lines(path, encoding="utf-8"):
    """Return the lines of the file at *path* without trailing newlines."""
    with open(path, encoding=encoding) as f:
        return [line.rstrip("\\n") for line in f]


class Counter:
    """Count how many times each key was seen."""

    def __init__(self):
        self.counts = {}

    def add(self, key):
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    for name in argv:
        if not os.path.exists(name):
            print("no such file: %s" % name, file=sys.stderr)
            return 1
        print(len(read_lines(name)))
    return 0
'''


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def test_ships_inside_the_package_and_is_small():
    assert MODEL_DIR == Path(tokenmill.__file__).parent / "data" / "default-model"
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir())
    assert 1e6 < total < 12e6, f"{total / 1e6:.1f} MB"
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(str(MODEL_DIR / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes <= {"BF16", "F16"}, dtypes


def test_tokenizer_has_chat_template_and_special_tokens(tokenizer):
    assert tokenizer.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert tokenizer.pad_token_id is not None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is a list?"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<s>user\nWhat is a list?</s>\n<s>assistant\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.bos_token_id) == 2 and ids.count(tokenizer.eos_token_id) == 1
    code = "def f(x):\n    return x + 1\n"
    assert tokenizer.decode(tokenizer(code, add_special_tokens=False).input_ids) == code


def test_loss_on_held_out_code_is_far_below_uniform(model, tokenizer):
    ids = torch.tensor([tokenizer(HELD_OUT, add_special_tokens=False).input_ids])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    uniform = math.log(model.config.vocab_size)
    # Random or noise weights sit at (or above) the uniform loss.
    assert loss < 0.45 * uniform, (loss, uniform)  # the shipped model: ~0.35


def test_greedy_completion_is_readable_text(model, tokenizer):
    ids = torch.tensor([tokenizer("def ", add_special_tokens=False).input_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(text) >= 40, repr(text)
    assert sum(c.isprintable() or c in "\n\t" for c in text) / len(text) > 0.95, repr(text)
    visible = [c for c in text if not c.isspace()]
    assert len(set(visible)) >= 8, repr(text)  # not one token repeated
    assert sum(c.isalnum() or c == "_" for c in visible) / len(visible) > 0.5, repr(text)
