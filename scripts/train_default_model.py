"""Train the small model that ``tokenmill serve`` uses when no model is named.

The model ships inside the package (``core/data/default-model/``, a few MB) so that a
newcomer's first request returns Python-/English-looking text without downloading
anything. It is trained only on text that every Python install carries: the standard
library's ``.py`` sources and the reference-manual topics in ``pydoc_data/topics.py``.

What it does
    1. Corpus: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` except tests,
       ``encodings/`` (codec tables), ``site-packages`` and generated config; the
       ``pydoc_data`` topics as plain English documents. Files whose path hashes to
       0 mod 40 are held out for validation.
    2. Tokenizer: byte-level BPE (``tokenizers``; ByteLevel pre-tokenizer and decoder),
       vocab 4096, special tokens ``<s> </s> <unk> <pad>`` (ids 0-3), a chat template
       in ``tokenizer_config.json``::

           <s>{role}\\n{content}</s>\\n ... [<s>assistant\\n]

       No BOS is added automatically (the chat template writes its own ``<s>``).
    3. Model: ``LlamaForCausalLM``, hidden 128, 4 layers, 2 heads (head_dim 64), 1 KV
       head, MLP 344, 1024 positions, tied embeddings (1.25M parameters), random init
       with a fixed seed, trained on the CPU in float32 with plain ``torch.optim.AdamW``
       (lr 4e-3, betas 0.9/0.95, weight decay 0.1 on matrices, grad clip 1.0) on
       next-token prediction, 256-token rows, 8 rows per step: 5 random windows of
       stdlib code, 1 of pydoc topics text, 2 of packed chat examples built from pydoc
       topics, builtin docstrings and stdlib module/function docstrings ("What is a
       list?" -> the first sentences of ``list.__doc__``). The learning rate warms up
       for 30 steps and then follows a cosine to 10% over the time budget (or over
       ``--max-steps`` when given, which makes a run repeatable on one machine). The model is small
       because the budget is a few CPU-minutes: per FLOP a smaller model learns more
       here; ``--hidden 256 --heads 4 --kv-heads 2 --intermediate 688`` (3.95M
       parameters, ~8 MB) is the better choice given several CPU-hours.
    4. Output: ``save_pretrained`` (safetensors, bfloat16), ``generation_config.json``,
       the tokenizer, and ``training.json`` (settings, losses, tokens seen, wall time).

How to run (from the repository root)::

    python scripts/train_default_model.py                 # 20 min budget, 2 threads
    python scripts/train_default_model.py --minutes 60 --threads 8 --out /tmp/m

How long it takes: tokenizer training and corpus tokenization take under a minute;
training then runs for ``--minutes`` wall-clock minutes, then saving and sample
generations take seconds. Two CPU threads train the default size at 2,000-4,000
tokens/s; the shipped model came from ``--minutes 24``: 1,778 steps, 3.64M tokens,
final training loss 3.19 (uniform: 8.32). See ``core/data/README.md``. The stdlib
differs a little between Python versions, so a rerun elsewhere gives a similar, not
identical, model.
"""
from __future__ import annotations

import argparse
import ast
import builtins
import hashlib
import inspect
import json
import math
import os
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

# Without tools this renders <s>ROLE\nCONTENT</s>\n per message (what the model was trained on);
# with tools= it adds a Hermes-style tools block, <tool_call> JSON for assistant tool calls and
# <tool_response> for tool messages (tokenmill's default tool-call parser reads that format).
CHAT_TEMPLATE = (
    "{% if tools %}<s>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}# Tools\n\nYou may call one or more functions to assist with the user query. The function signatures are within <tools></tools> XML tags:\n<tools>\n"
    "{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}</tools>\n\nFor each function call, return a JSON object with the function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call></s>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if not (tools and loop.first and m['role'] == 'system') %}<s>{{ m['role'] }}\n"
    "{% if m['role'] == 'tool' %}<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "{% else %}{{ m['content'] }}"
    "{% endif %}"
    "{% if m['role'] == 'assistant' and m['tool_calls'] is defined and m['tool_calls'] %}"
    "{% for c in m['tool_calls'] %}"
    "{% if m['content'] or not loop.first %}\n"
    "{% endif %}<tool_call>\n{\"name\": {{ c['function']['name'] | tojson }}, \"arguments\": {{ c['function']['arguments'] | tojson }}}\n</tool_call>"
    "{% endfor %}"
    "{% endif %}</s>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n"
    "{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
BOS, EOS, UNK, PAD = 0, 1, 2, 3
EXCLUDED_DIRS = {"test", "tests", "idle_test", "encodings", "site-packages", "__pycache__", "turtledemo"}
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a helpful assistant who knows Python.",
                  "Answer briefly.", "You are tokenmill's default model."]
GREETINGS = [
    ("Hello", "Hello! I am a small model trained on the Python standard library. Ask me about Python."),
    ("Hi", "Hi! Ask me about Python: lists, dictionaries, functions, classes or modules."),
    ("Who are you?", "I am tokenmill's default model, a tiny Llama trained on the Python standard library."),
    ("What can you do?", "I can answer short questions about Python and complete Python code."),
    ("Thanks!", "You are welcome."),
]
TOPIC_FOR_BUILTIN = {"dict": "typesmapping", "type": "bltin-type-objects"}
SAMPLE_PROMPTS = ["import os\n", "def main(", "class ", "The "]
SAMPLE_CHATS = ["What is a list?", "What does len do?", "What is the with statement?"]


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Python twin of CHAT_TEMPLATE, for tokenizer training (before a tokenizer exists)."""
    text = "".join(f"<s>{m['role']}\n{m['content']}</s>\n" for m in messages)
    return text + ("<s>assistant\n" if add_generation_prompt else "")


# ----------------------------------------------------------------------------- corpus
def stdlib_files() -> tuple[list[Path], list[Path]]:
    """Sorted (train, held-out) stdlib ``.py`` paths."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        if rel.name.startswith("_sysconfigdata") or rel.as_posix() == "pydoc_data/topics.py":
            continue
        bucket = held if int(hashlib.sha1(rel.as_posix().encode()).hexdigest(), 16) % 40 == 0 else train
        bucket.append(path)
    return train, held


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics
    return dict(sorted(topics.items()))


# ----------------------------------------------------------------------------- chat data
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(`])")


def first_sentences(text: str, limit: int = 300) -> str:
    """First prose paragraph(s) of ``text``, whitespace-joined, cut at a sentence end near ``limit``."""
    paras = []
    for block in re.split(r"\n\s*\n", text.strip("\n")):
        lines = block.splitlines()
        # Skip grammar/code blocks (indented), rst underlines and signature lines.
        if not lines or lines[0].startswith("   ") or re.fullmatch(r"[*=\-~^]+", lines[-1].strip() or "x"):
            continue
        if all(re.match(r"^[\w.]+\(.*\)( -> .*)?$", line.strip()) for line in lines):
            continue
        para = re.sub(r"\s+", " ", " ".join(lines)).strip()
        if para.endswith(":"):  # it introduces a code block that we do not keep
            paras.append(para[:-1] + ".")
            break
        paras.append(para)
        if sum(map(len, paras)) > limit:
            break
    out = ""
    for sent in _SENT_SPLIT.split(" ".join(paras)):
        if out and len(out) + len(sent) > limit:
            break
        out = f"{out} {sent}".strip()
    return out


def _article(name: str) -> str:
    return "an" if name[:1].lower() in "aeiou" else "a"


def topic_pairs(topics: dict[str, str]) -> list[tuple[str, str]]:
    """Questions about each pydoc topic and each of its titled sections."""
    pairs = []
    for text in topics.values():
        lines = text.splitlines()
        for i in range(len(lines) - 1):
            title, under = lines[i].strip(), lines[i + 1].strip()
            if not title or not re.fullmatch(r"[*=\-]{3,}", under) or len(under) < len(title) // 2:
                continue
            answer = first_sentences("\n".join(lines[i + 2:]))
            if len(answer) < 30:
                continue
            name = title.replace('"', "")
            name = name[0].lower() + name[1:] if not name[:2].isupper() else name
            for q in (f"What is {name}?", f"Explain {name}.", f"Tell me about {name}."):
                pairs.append((q, answer))
    return list(dict.fromkeys(pairs))


def builtin_pairs(topics: dict[str, str]) -> list[tuple[str, str]]:
    """Questions about builtins ("What is a list?") and methods of the common builtin types."""
    pairs = []
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if name.startswith("_") or not (doc := inspect.getdoc(obj)):
            continue
        answer = first_sentences(doc)
        if (" -> " in answer or not answer) and name in TOPIC_FOR_BUILTIN:  # a signature list, not prose
            answer = first_sentences(topics[TOPIC_FOR_BUILTIN[name]].split("\n", 2)[2])
        if len(answer) < 15 or " -> " in answer:
            continue
        if isinstance(obj, type):
            qs = [f"What is {_article(name)} {name}?", f"What is {name}?", f"Explain {name}."]
        else:
            qs = [f"What does {name} do?", f"What is {name}?", f"How do I use {name}()?"]
        pairs += [(q, answer) for q in qs]
    for cls in (list, dict, str, set, tuple, bytes, int, float, frozenset):
        for meth in sorted(vars(cls)):
            doc = inspect.getdoc(getattr(cls, meth))
            if meth.startswith("_") or not doc or len(answer := first_sentences(doc)) < 15:
                continue
            pairs += [(f"What does {cls.__name__}.{meth} do?", answer),
                      (f"How do I use {cls.__name__}.{meth}()?", answer)]
    return pairs


def module_pairs(files: list[Path], root: Path) -> tuple[list, list]:
    """(module questions, function/class questions) from the docstrings of stdlib sources."""
    mods, funcs = [], []
    for path in files:
        src = read_text(path)
        try:
            tree = ast.parse(src or "")
        except (SyntaxError, ValueError):
            continue
        rel = path.relative_to(root).with_suffix("")
        mod = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if any(p.startswith("_") for p in mod.split(".")):
            continue
        if (doc := ast.get_docstring(tree)) and len(answer := first_sentences(doc)) > 20:
            mods += [(f"What is the {mod} module?", answer), (f"What does the {mod} module do?", answer)]
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            if (doc := ast.get_docstring(node)) and len(answer := first_sentences(doc)) > 20:
                verb = "is" if isinstance(node, ast.ClassDef) else "does"
                q = f"What {verb} {mod}.{node.name}{'' if verb == 'is' else ' do'}?"
                funcs.append((q, answer))
    return mods, funcs


def sample_conversation(rng: random.Random, sources: list[list[tuple[str, str]]], weights: list[float]) -> list[dict]:
    msgs = []
    if rng.random() < 0.2:
        msgs.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(2 if rng.random() < 0.15 else 1):
        q, a = rng.choice(rng.choices(sources, weights)[0])
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [BOS, EOS, UNK, PAD]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE, model_max_length=1024)


def save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save_pretrained(out, save_jinja_files=False)
    # A plain config that transformers 4.45+ and 5.x both load, with the template inline.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<pad>", "model_max_length": 1024,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        (out / extra).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- training
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="training wall-time budget")
    ap.add_argument("--max-steps", type=int, default=0, help="stop (and schedule) by steps instead of time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="rows of --context tokens per step")
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--intermediate", type=int, default=344)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "core/data/default-model")
    args = ap.parse_args()

    # On a shared machine OpenMP's default spin-waiting burns most of the CPU time at
    # barriers (measured: 6x slower steps); sleeping waiters cost nothing when idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    import torch.nn.functional as F
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    root = Path(sysconfig.get_paths()["stdlib"])
    train_files, held_files = stdlib_files()
    code = [t for p in train_files if (t := read_text(p))]
    held = [t for p in held_files if (t := read_text(p))]
    topics = pydoc_topics()
    prose = list(topics.values())
    tpairs, bpairs = topic_pairs(topics), builtin_pairs(topics)
    mpairs, fpairs = module_pairs(train_files, root)
    chat_sources = [tpairs, bpairs, mpairs, fpairs, GREETINGS]
    chat_weights = [0.3, 0.3, 0.15, 0.2, 0.05]
    log(f"corpus: {len(code)} files / {sum(map(len, code)) / 1e6:.1f}M chars train, {len(held)} held out, "
        f"{len(prose)} topics; chat pairs: topics {len(tpairs)} builtins {len(bpairs)} "
        f"modules {len(mpairs)} functions {len(fpairs)}")

    chats_for_tok = [render_chat(sample_conversation(rng, chat_sources, chat_weights)) for _ in range(3000)]
    tokenizer = train_tokenizer(code + prose + chats_for_tok, args.vocab)
    vocab = len(tokenizer)
    log(f"tokenizer: vocab {vocab}")

    def tokenize_docs(texts: list[str]) -> torch.Tensor:
        ids = []
        for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
            ids += [BOS, *enc.ids, EOS]
        return torch.tensor(ids, dtype=torch.int32)

    code_ids, prose_ids, held_ids = tokenize_docs(code), tokenize_docs(prose), tokenize_docs(held)
    log(f"tokens: code {len(code_ids) / 1e6:.2f}M ({sum(map(len, code)) / len(code_ids):.2f} chars/token), "
        f"prose {len(prose_ids) / 1e6:.2f}M, held-out {len(held_ids) / 1e6:.2f}M")

    def chat_ids() -> list[int]:
        msgs = sample_conversation(rng, chat_sources, chat_weights)
        return tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]

    T, gen = args.context, torch.Generator().manual_seed(args.seed)
    n_chat = max(1, round(args.batch * 3 / 16))
    n_prose = max(1, round(args.batch * 2 / 16))
    n_code = args.batch - n_chat - n_prose

    def windows(ids: torch.Tensor, n: int, g: torch.Generator = gen) -> torch.Tensor:
        starts = torch.randint(0, len(ids) - T - 1, (n,), generator=g)
        return torch.stack([ids[s:s + T + 1] for s in starts.tolist()]).long()

    def chat_rows(n: int) -> torch.Tensor:
        rows = []
        for _ in range(n):
            row: list[int] = []
            while len(row) < T + 1:
                row += chat_ids()
            rows.append(row[:T + 1])
        return torch.tensor(rows, dtype=torch.long)

    def batch() -> torch.Tensor:
        return torch.cat([windows(code_ids, n_code), windows(prose_ids, n_prose), chat_rows(n_chat)])

    config = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=1024,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.02,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = LlamaForCausalLM(config).float().train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    val_batch = windows(held_ids, 32, torch.Generator().manual_seed(1234))

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=rows[:, :-1]).logits
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), rows[:, 1:].reshape(-1))

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        loss = sum(loss_of(val_batch[i:i + 8]).item() for i in range(0, len(val_batch), 8)) / 4
        model.train()
        return loss

    budget = args.minutes * 60
    t_train, step, tokens, warmup = time.time(), 0, 0, 30
    history, running, t_log, tok_log = [], None, time.time(), 0
    log(f"training: {args.batch}x{T} tokens/step, lr {args.lr}, budget "
        f"{f'{args.max_steps} steps' if args.max_steps else f'{args.minutes} min'}; uniform loss {math.log(vocab):.2f}")
    while True:
        progress = step / args.max_steps if args.max_steps else (time.time() - t_train) / budget
        if progress >= 1:
            break
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        rows = batch()
        loss = loss_of(rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, tokens, tok_log = step + 1, tokens + rows[:, 1:].numel(), tok_log + rows[:, 1:].numel()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % args.log_every == 0:
            now = time.time()
            msg = f"step {step} loss {running:.3f} lr {lr:.2e} tokens {tokens / 1e6:.2f}M {tok_log / (now - t_log):.0f} tok/s"
            if step % (args.log_every * 10) == 0:
                vl = val_loss()
                history.append({"step": step, "tokens": tokens, "train_loss": round(running, 4), "val_loss": round(vl, 4)})
                msg += f" val {vl:.3f}"
            log(msg)
            t_log, tok_log = time.time(), 0
    train_seconds = time.time() - t_train
    final_val = val_loss()
    log(f"done: {step} steps, {tokens / 1e6:.2f}M tokens, train loss {running:.3f}, held-out loss {final_val:.3f}")

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*"):
        old.unlink()
    model.eval().to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=True, temperature=0.7,
                     top_p=0.9, top_k=50, max_new_tokens=128).save_pretrained(args.out)
    save_tokenizer(tokenizer, args.out)
    info = {
        "python": sys.version.split()[0], "torch": torch.__version__, "seed": args.seed, "threads": args.threads,
        "vocab_size": vocab, "parameters": n_params, "context": T, "batch_rows": args.batch,
        "rows_per_step": {"code": n_code, "prose": n_prose, "chat": n_chat}, "lr": args.lr, "steps": step,
        "tokens_seen": tokens, "train_seconds": round(train_seconds, 1), "final_train_loss": round(running, 4),
        "final_heldout_loss": round(final_val, 4), "uniform_loss": round(math.log(vocab), 4),
        "corpus_tokens": {"code": len(code_ids), "prose": len(prose_ids), "heldout": len(held_ids)},
        "history": history,
    }
    (args.out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    sizes = {p.name: p.stat().st_size for p in sorted(args.out.iterdir())}
    log(f"saved to {args.out}: " + ", ".join(f"{k} {v / 1e6:.2f}MB" for k, v in sizes.items())
        + f"; total {sum(sizes.values()) / 1e6:.2f}MB")

    # Samples from the saved (bfloat16) files, as a user would get them.
    model = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=60, do_sample=False)
        log(f"greedy {prompt!r} -> {tokenizer.decode(out[0, ids.shape[1]:])!r}")
    for question in SAMPLE_CHATS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(ids, max_new_tokens=80, do_sample=False)
        log(f"chat {question!r} -> {tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
