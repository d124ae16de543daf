"""Tiny random-weight checkpoints and a small BPE tokenizer, made locally for tests.

Everything is built once and cached on disk under ``$TOKENMILL_TEST_CACHE`` (default
``~/.cache/tokenmill-test``), in a directory named by a hash of the settings. Builds go
to a temporary directory that is renamed into place, so parallel test processes are
safe: the first rename wins and the others discard their copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

#: Bump to invalidate every cached artefact when the recipes below change.
RECIPE_VERSION = 1
TOKENIZER_VOCAB = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
               initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=3)

#: Per-architecture HF config class and settings; chosen so each model's special paths run.
ARCHS = {
    # Llama-3 rope scaling with a short original context so low, medium and high frequencies all occur.
    "llama": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # Sliding window shorter than the test sequences; head_dim 64 differs from hidden / heads.
    "mistral": ("MistralConfig", dict(sliding_window=24, head_dim=64)),
    # Sliding window on layer 1 only (max_window_layers=1), qkv bias.
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=20, max_window_layers=1,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # q/k norm, head_dim from the config (64, not hidden / heads = 32), MQA.
    "qwen3": ("Qwen3Config", dict(head_dim=64, num_key_value_heads=1)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=128)),
}


def cache_root(cache_dir=None) -> Path:
    """The on-disk cache directory (created)."""
    root = Path(cache_dir or os.environ.get("TOKENMILL_TEST_CACHE") or Path.home() / ".cache" / "tokenmill-test")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _transformers_major() -> int:
    from importlib import metadata

    return int(metadata.version("transformers").split(".")[0])


def _key(kind: str, settings: dict) -> str:
    fields = {"kind": kind, "v": RECIPE_VERSION, **settings}
    if _transformers_major() < 5:
        # What transformers 4 saves differs (tokenizer class, rope fields), and venvs share the cache.
        fields["transformers"] = 4
    blob = json.dumps(fields, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _build_atomically(target: Path, build) -> Path:
    if (target / ".complete").exists():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)
        (tmp / ".complete").write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (target exists and is not empty): use theirs.
            if not (target / ".complete").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _training_text() -> list[str]:
    import pydoc_data.topics as topics

    text = "\n".join(topics.topics.values())
    return [text[i:i + 4096] for i in range(0, len(text), 4096)]


def make_tokenizer(cache_dir=None, vocab_size: int = TOKENIZER_VOCAB) -> Path:
    """A byte-level BPE tokenizer (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, ``<pad>`` 3) with a chat template.

    Trained with ``tokenizers`` on the Python docs bundled with the standard library, saved
    with ``PreTrainedTokenizerFast.save_pretrained``. Returns its directory.
    """
    target = cache_root(cache_dir) / _key("tokenizer", {"vocab": vocab_size, "template": CHAT_TEMPLATE})

    def build(out: Path):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(_training_text(), trainer=trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       pad_token="<pad>", unk_token="<unk>")
        fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(str(out))

    return _build_atomically(target, build)


def _legacy_rope(settings: dict) -> dict:
    """``rope_parameters`` (transformers 5) as ``rope_theta`` + ``rope_scaling``, which transformers 4 reads."""
    settings = dict(settings)
    params = dict(settings.pop("rope_parameters"))
    settings["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type", "default") != "default":
        settings["rope_scaling"] = params
    return settings


def make_tiny_model(arch: str, cache_dir=None, *, tie_word_embeddings: bool = False,
                    max_shard_size: str | None = None, dtype: str = "float32", seed: int = 0,
                    extra_special_tokens: tuple[str, ...] = (), **overrides) -> Path:
    """A tiny random-weight checkpoint of ``arch`` (one of :data:`ARCHS`) with the test tokenizer.

    ``tie_word_embeddings`` ties the output head to the embeddings; ``max_shard_size``
    (e.g. ``"100KB"``) saves a sharded checkpoint with an index; ``dtype`` is the saved
    weights' dtype; ``extra_special_tokens`` are added to the tokenizer (and the vocabulary), such
    as fill-in-the-middle tokens; ``overrides`` replace config fields. Returns the checkpoint directory.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHS)}")
    config_cls_name, arch_settings = ARCHS[arch]
    settings = {**_COMMON, **arch_settings, "tie_word_embeddings": tie_word_embeddings, **overrides}
    extra = {"special": list(extra_special_tokens)} if extra_special_tokens else {}
    if "rope_parameters" in settings and _transformers_major() < 5:
        settings = _legacy_rope(settings)  # transformers 4 ignores rope_parameters
    key = _key(f"{arch}", {"settings": settings, "shard": max_shard_size, "dtype": dtype, "seed": seed, **extra})
    tokenizer_dir = make_tokenizer(cache_dir)
    target = cache_root(cache_dir) / key

    def build(out: Path):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if extra_special_tokens:
            tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
        config = getattr(transformers, config_cls_name)(vocab_size=len(tokenizer), **settings)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            # HF initialises norms to one and biases to zero; randomise them so loading them is tested.
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    if "norm" in name:
                        p.uniform_(0.5, 1.5)
                    else:
                        p.normal_(0.0, settings["initializer_range"])
        model = model.to(getattr(torch, dtype))
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(str(out), **kwargs)
        tokenizer.save_pretrained(str(out))

    return _build_atomically(target, build)
