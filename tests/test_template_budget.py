"""The operator's chat template, rendered in a thread, stops itself at its deadline and output cap
(tokenmill.template_budget); outside a budget the render is HF's, unchanged."""
from __future__ import annotations

import threading
import time

import pytest

from tokenmill.template_budget import TemplateBudgetExceeded, budget
from tokenmill.testing.tiny_models import make_tiny_model
from tokenmill.tokenizer import load_tokenizer, render_chat

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
#: Quadratic in each message's length, with only a lookup per outer iteration to check at.
QUADRATIC = ("{% for m in messages %}{% for c in m['content'] %}{% for d in m['content'] %}{% endfor %}"
             "{% endfor %}{{ m['content'] }}{% endfor %}")
BIG = "{% for a in range(100000) %}{{ messages[0]['content'] * 50 }}{% endfor %}"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(make_tiny_model("llama")))


def test_within_budget_the_render_is_hf_unchanged(tok):
    plain = tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert render_chat(tok, MSGS, timeout=5, max_chars=10_000) == plain
    assert render_chat(tok, MSGS) == plain
    assert render_chat(tok, MSGS, chat_template=BIG, timeout=30, max_chars=10**8) == "be brief" * 50 * 100000


def test_a_slow_render_stops_at_the_deadline(tok):
    long = [{"role": "user", "content": "x" * 200_000}]  # 4e10 inner iterations unbounded
    t0 = time.monotonic()
    with pytest.raises(TemplateBudgetExceeded, match="within 0.5 s"):
        render_chat(tok, long, chat_template=QUADRATIC, timeout=0.5, max_chars=10**9)
    assert time.monotonic() - t0 < 5


def test_output_past_the_cap_stops_before_it_is_built(tok):
    with pytest.raises(TemplateBudgetExceeded, match="more than 100000 characters"):
        render_chat(tok, MSGS, chat_template=BIG, timeout=60, max_chars=100_000)


def test_budget_is_per_thread_and_restored(tok):
    """A budget on one thread does not limit another thread's render of the same template."""
    out = {}

    def other():
        out["text"] = render_chat(tok, MSGS, chat_template=BIG)

    with budget(BIG, 60, 10):
        worker = threading.Thread(target=other)
        worker.start()
        worker.join(60)
    assert len(out["text"]) == len("be brief") * 50 * 100000
    assert len(render_chat(tok, MSGS, chat_template=BIG)) == len(out["text"])  # no budget left behind


def test_budget_arguments_are_validated():
    with pytest.raises(ValueError, match="positive timeout"):
        with budget(BIG, 0, 10):
            pass
