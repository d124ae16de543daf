"""The checkpoint loader: dtypes, sharded and tied checkpoints, refusals and error messages."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenmill.models.loader import checkpoint_files, load_model, resolve_dtype
from tokenmill.models.registry import ARCHITECTURES
from tokenmill.testing import make_tiny_model
from tokenmill.testing.simple_runner import SimpleRunner, reference_context

ARCHS = dict(ARCHITECTURES)



def _hf(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def _prefill_logits(model, ctx, ids):
    runner = SimpleRunner(model, ctx.attention_backend, ctx.device, ctx.dtype, max_seqs=1)
    return runner.prompt_logits(ids)


IDS = [1, 50, 300, 7, 99, 12, 480, 33, 5, 250, 17]


def test_resolve_dtype():
    from tokenmill.models.loader import load_config

    assert resolve_dtype("auto", load_config(make_tiny_model("llama"))) == torch.float32
    assert resolve_dtype("auto", load_config(make_tiny_model("llama", dtype="bfloat16"))) == torch.bfloat16
    assert resolve_dtype("auto", None) == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16
    assert resolve_dtype("fp32") == torch.float32
    assert resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float64'"):
        resolve_dtype("float64")


def test_bfloat16_loading_casts_and_runs():
    path = make_tiny_model("llama")
    ctx = reference_context(torch.bfloat16)
    model = load_model(path, ctx, ARCHS)
    state = load_file(str(path / "model.safetensors"))
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in params.values())
    assert torch.equal(params["model.layers.1.self_attn.qkv_proj.weight"][:128],
                       state["model.layers.1.self_attn.q_proj.weight"].to(torch.bfloat16))
    assert torch.equal(params["model.layers.0.mlp.gate_up_proj.weight"][256:],
                       state["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16))
    assert model.model.cos_sin_cache.dtype == torch.float32  # rotary tables stay float32
    logits = _prefill_logits(model, ctx, IDS)
    assert logits.dtype == torch.float32
    with torch.inference_mode():
        expect = _hf(path, torch.bfloat16)(torch.tensor([IDS])).logits[0].float()
    torch.testing.assert_close(logits, expect, atol=0.05, rtol=0)


def test_sharded_checkpoint_loads_same_weights():
    single, sharded = make_tiny_model("qwen2"), make_tiny_model("qwen2", max_shard_size="400KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert len(checkpoint_files(sharded)) == len(set(index["weight_map"].values()))
    ctx = reference_context()
    a, b = load_model(single, ctx, ARCHS), load_model(sharded, ctx, ARCHS)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_tied_embeddings():
    path = make_tiny_model("qwen3", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))
    ctx = reference_context()
    model = load_model(path, ctx, ARCHS)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())
    with torch.inference_mode():
        expect = _hf(path)(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(_prefill_logits(model, ctx, IDS), expect, atol=1e-4, rtol=0)


def test_tied_checkpoint_that_still_stores_lm_head(tmp_path):
    src = make_tiny_model("qwen3", tie_word_embeddings=True)
    shutil.copytree(src, tmp_path / "m")
    state = load_file(str(src / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    load_model(tmp_path / "m", reference_context(), ARCHS)


def test_mixtral_loads_both_expert_layouts():
    """Per-expert w1/w2/w3 tensors (on disk) and transformers-5 stacked tensors (in memory) load the same."""
    path = make_tiny_model("mixtral")
    ctx = reference_context()
    from_disk = load_model(path, ctx, ARCHS)
    hf_state = _hf(path).state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in hf_state
    stacked = ARCHS["MixtralForCausalLM"](from_disk.hf_config, ctx)
    stacked.load_weights(hf_state.items())
    pa, pb = dict(from_disk.named_parameters()), dict(stacked.named_parameters())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_unknown_architecture_lists_supported(tmp_path):
    src = make_tiny_model("llama")
    shutil.copytree(src, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["FancyForCausalLM"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        load_model(tmp_path / "m", reference_context(), ARCHS)
    msg = str(err.value)
    assert "FancyForCausalLM" in msg
    assert all(name in msg for name in ARCHS)


def test_pickled_checkpoints_are_refused(tmp_path):
    src = make_tiny_model("llama")
    (tmp_path / "m").mkdir()
    shutil.copy(src / "config.json", tmp_path / "m" / "config.json")
    torch.save({"x": torch.zeros(1)}, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only safetensors checkpoints are supported"):
        load_model(tmp_path / "m", reference_context(), ARCHS)
    (tmp_path / "empty").mkdir()
    shutil.copy(src / "config.json", tmp_path / "empty" / "config.json")
    with pytest.raises(ValueError, match="no safetensors weights"):
        load_model(tmp_path / "empty", reference_context(), ARCHS)


@pytest.mark.parametrize("change", ["drop", "extra", "shape"])
def test_incomplete_or_foreign_checkpoints_fail_clearly(tmp_path, change):
    src = make_tiny_model("llama")
    shutil.copytree(src, tmp_path / "m")
    state = load_file(str(src / "model.safetensors"))
    if change == "drop":
        del state["model.layers.1.self_attn.k_proj.weight"]
        match = r"missing weights: model\.layers\.1\.self_attn\.qkv_proj\.weight\[k\]"
    elif change == "extra":
        state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
        match = "does not know: model.layers.0.self_attn.extra.weight"
    else:
        state["model.norm.weight"] = torch.zeros(3)
        match = r"model\.norm\.weight has shape \(3,\), expected \(128,\)"
    save_file(state, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=match):
        load_model(tmp_path / "m", reference_context(), ARCHS)


def test_progress_bar_on_request(monkeypatch, capfd):
    path = make_tiny_model("llama")
    monkeypatch.setenv("TOKENMILL_PROGRESS", "1")
    load_model(path, reference_context(), ARCHS)
    assert "Loading weights" in capfd.readouterr().err
    monkeypatch.setenv("TOKENMILL_PROGRESS", "0")
    load_model(path, reference_context(), ARCHS)
    assert "Loading weights" not in capfd.readouterr().err
