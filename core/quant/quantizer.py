"""Round-to-nearest quantizer: a float checkpoint to GPTQ, AWQ, FP8, int8 or compressed-tensors, in the real
tools' on-disk layouts.

``tokenmill quantize SRC DST --format gptq|awq|fp8|int8|compressed-tensors`` (see
:mod:`tokenmill.commands.quantize`). compressed-tensors (and ``int8``: its W8A16 scheme,
int8 weights per output channel) is written by the compressed-tensors library itself
(:mod:`tokenmill.quant.ct_writer`).
No calibration: GPTQ's error feedback and AWQ's activation-aware scaling are not run,
so quality is RTN's; the files are what AutoGPTQ (``gptq`` checkpoint format, zeros
stored minus one), AutoAWQ (GEMM, interleaved packing) and AutoFP8 (per-tensor scale)
write, so any reader of those formats loads them. With ``desc_act`` the column order is
a seeded permutation shared by the projections that read the same input (q/k/v,
gate/up, w1/w3), as a Hessian ordering would be; ``g_idx`` records it.
"""
from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import torch

from tokenmill.quant.awq import awq_pack
from tokenmill.quant.checkpoint import is_quantizable, rewrite_checkpoint
from tokenmill.quant.gptq import SUPPORTED_BITS, pack_cols, pack_rows

FORMATS = ("gptq", "awq", "fp8", "int8", "compressed-tensors")
_SAME_INPUT = [(re.compile(r"\.(q|k|v)_proj\.weight$"), ".qkv_proj"), (re.compile(r"\.(gate|up)_proj\.weight$"),
                                                                        ".gate_up_proj"),
               (re.compile(r"\.(w1|w3)\.weight$"), ".w13")]


def _input_key(name: str) -> str:
    for pattern, repl in _SAME_INPUT:
        if pattern.search(name):
            return pattern.sub(repl, name)
    return name


def act_order(name: str, k: int) -> torch.Tensor:
    """The desc_act column order for weight ``name`` (the same for projections sharing an input)."""
    gen = torch.Generator().manual_seed(zlib.crc32(_input_key(name).encode()))
    return torch.randperm(k, generator=gen)


def gptq_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, order: torch.Tensor | None = None) -> dict:
    """RTN GPTQ tensors of ``w [N, K]``: ``qweight``, ``qzeros`` (zero - 1), ``scales`` fp16, ``g_idx``."""
    n, k = w.shape
    maxq = 2 ** bits - 1
    gs = k if group_size == -1 else group_size
    if k % gs or k % (32 // bits) or n % (32 // bits):
        raise ValueError(f"gptq: a [{n}, {k}] weight does not divide into groups of {gs} / {bits}-bit packing")
    order = torch.arange(k) if order is None else order
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // gs).to(torch.int32)
    groups = k // gs
    w32 = w.to(torch.float32)
    scales = torch.empty(groups, n)
    zeros = torch.empty(groups, n, dtype=torch.int64)
    for g in range(groups):
        sub = w32[:, order[g * gs:(g + 1) * gs]]
        if sym:
            scales[g] = (2 * sub.abs().amax(dim=1) / maxq).clamp_min(1e-8)
            zeros[g] = (maxq + 1) // 2
        else:
            lo, hi = sub.amin(dim=1).clamp(max=0), sub.amax(dim=1).clamp(min=0)
            scales[g] = ((hi - lo) / maxq).clamp_min(1e-8)
            # zero 0 would be stored as -1, which the v1 format cannot hold
            zeros[g] = torch.round(-lo / scales[g]).clamp(1, maxq).to(torch.int64)
    scales16 = scales.to(torch.float16)
    gi = g_idx.long()
    q = torch.round(w32.t() / scales16.to(torch.float32)[gi]) + zeros[gi]
    q = q.clamp_(0, maxq).to(torch.int64)
    return {"qweight": pack_rows(q, bits), "qzeros": pack_cols(zeros - 1, bits), "scales": scales16, "g_idx": g_idx}


def awq_quantize(w: torch.Tensor, group_size: int) -> dict:
    """RTN AWQ (GEMM) tensors of ``w [N, K]``: ``qweight`` ``[K, N/8]``, ``qzeros`` ``[G, N/8]``, ``scales`` fp16."""
    n, k = w.shape
    if k % group_size or n % 8:
        raise ValueError(f"awq: a [{n}, {k}] weight does not divide into groups of {group_size} / 8 outputs")
    g = w.to(torch.float32).t().reshape(k // group_size, group_size, n)
    lo, hi = g.amin(dim=1).clamp(max=0), g.amax(dim=1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp_min(1e-8).to(torch.float16)
    s = scales.to(torch.float32)
    zeros = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(g / s.unsqueeze(1)) + zeros.unsqueeze(1)).clamp(0, 15).reshape(k, n)
    return {"qweight": awq_pack(q), "qzeros": awq_pack(zeros), "scales": scales}


def fp8_quantize(w: torch.Tensor) -> dict:
    """AutoFP8-style per-tensor FP8: ``weight`` float8_e4m3fn and a scalar float32 ``weight_scale``."""
    from tokenmill.quant.fp8 import FP8, FP8_MAX

    w32 = w.to(torch.float32)
    scale = (w32.abs().max() / FP8_MAX).clamp_min(1e-12)
    return {"weight": (w32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), "weight_scale": scale.reshape(())}


def checkpoint_config(fmt: str, bits: int = 4, group_size: int = 128, desc_act: bool = False,
                      sym: bool = True) -> dict:
    """The ``quantization_config`` the owning tool writes into ``config.json`` for these parameters."""
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
                "damp_percent": 0.01, "static_groups": False, "true_sequential": True, "lm_head": False,
                "checkpoint_format": "gptq", "quantizer": ["tokenmill (round-to-nearest)"]}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    if fmt == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"]}
    raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")


def compressed_tensors_cases() -> list:
    """``(label, quantization_config, tensors(w, order))`` per compressed-tensors scheme (conformance)."""
    from tokenmill.quant import ct_writer

    out = []
    for name, group, sym in (("w8a8", 128, True), ("fp8", 128, True), ("w4a16", 32, True), ("w4a16", 64, False),
                             ("w4a16", -1, True), ("w8a16", 128, True)):
        s = ct_writer.scheme(name, group, sym)
        label = f"{name}{'' if name != 'w4a16' else f'-g{group}'}{'' if sym else '-asym'}"
        out.append((label, ct_writer.quantization_config(s), lambda w, o, s=s: ct_writer.compress(w, s)))
    return out


def quantize_checkpoint(src, dst, fmt: str, bits: int = 4, group_size: int = 128, desc_act: bool = False,
                        sym: bool = True, scheme: str = "w4a16") -> Path:
    """Write ``dst``: the checkpoint ``src`` with its linear weights quantized to ``fmt``.

    ``scheme``: the compressed-tensors scheme (``w8a8``, ``fp8``, ``w4a16``; ``int8`` is ``w8a16``).
    """
    if fmt in ("int8", "compressed-tensors"):
        return _quantize_compressed_tensors(src, dst, "w8a16" if fmt == "int8" else scheme, group_size, sym)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; supported: {', '.join(FORMATS)}")
    if fmt == "gptq" and bits not in SUPPORTED_BITS:
        raise ValueError(f"gptq: bits={bits} is not supported (supported: {SUPPORTED_BITS})")
    if fmt == "awq" and bits != 4:
        raise ValueError("awq: only 4 bits")

    def quantize(name, tensor):
        if fmt == "gptq":
            return gptq_quantize(tensor, bits, group_size, sym, act_order(name, tensor.shape[1]) if desc_act else None)
        return awq_quantize(tensor, group_size) if fmt == "awq" else fp8_quantize(tensor)

    qcfg = checkpoint_config(fmt, bits=bits, group_size=group_size, desc_act=desc_act, sym=sym)
    out = _rewrite_quantized(src, dst, quantize, qcfg)
    if fmt == "gptq":  # AutoGPTQ also writes its own config file next to the weights
        (out / "quantize_config.json").write_text(
            json.dumps({k: v for k, v in qcfg.items() if k != "quant_method"}, indent=2) + "\n")
    return out


def _quantize_compressed_tensors(src, dst, scheme: str, group_size: int, sym: bool) -> Path:
    from tokenmill.quant import ct_writer

    s = ct_writer.scheme(scheme, group_size, sym)
    return _rewrite_quantized(src, dst, lambda name, tensor: ct_writer.compress(tensor, s),
                              ct_writer.quantization_config(s))


def _rewrite_quantized(src, dst, quantize, qcfg: dict) -> Path:
    """``dst``: ``src`` with each quantizable ``<base>.weight`` replaced by ``<base>.<k>`` for ``quantize(name, w)``'s
    ``{k: tensor}``, and ``qcfg`` as its ``quantization_config``; an already quantized ``src`` is refused."""
    config = json.loads((Path(src) / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")

    def convert(name, tensor):
        if not is_quantizable(name):
            return {name: tensor}
        base = name[: -len(".weight")]
        return {f"{base}.{k}": v for k, v in quantize(name, tensor).items()}

    return rewrite_checkpoint(src, dst, convert, config_update={"quantization_config": qcfg})
