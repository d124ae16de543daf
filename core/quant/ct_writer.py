"""Writing compressed-tensors checkpoints the way llm-compressor does, with the library's own code.

Round-to-nearest, no calibration: a linear weight's scale and zero point come from its
min/max through the library's ``calculate_qparams`` (what llm-compressor's default
``minmax`` weight observer feeds it), the library's compressor for the format the
library infers for the scheme (``infer_module_format``) turns ``weight`` +
``weight_scale`` (+ ``weight_zero_point``) into the stored tensors, and ``config.json``
gets the ``quantization_config`` that ``ModelCompressor.update_config`` writes. Schemes
are the library's presets: ``w8a8`` (W8A8), ``fp8`` (FP8_DYNAMIC), ``w4a16``
(W4A16, or W4A16_ASYM with ``sym=False``) and ``w8a16`` (int8 weights per channel, float
activations: what ``tokenmill quantize --format int8`` writes).
"""
from __future__ import annotations

import torch

SCHEMES = ("w8a8", "fp8", "w4a16", "w8a16")
#: Layers llm-compressor's recipes leave float: the output head and Mixtral's router.
IGNORE = ["lm_head", "re:.*block_sparse_moe\\.gate$"]


def scheme(name: str, group_size: int = 128, sym: bool = True):
    """The library's ``QuantizationScheme`` for ``name`` (see :data:`SCHEMES`), targeting every Linear."""
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    if name not in SCHEMES:
        raise ValueError(f"unknown compressed-tensors scheme {name!r}; supported: {', '.join(SCHEMES)}")
    preset = {"w8a8": "W8A8", "fp8": "FP8_DYNAMIC", "w4a16": "W4A16" if sym else "W4A16_ASYM",
              "w8a16": "W8A16"}[name]
    if not sym and name != "w4a16":
        raise ValueError(f"compressed-tensors {name}: asymmetric weights are not written (w4a16 only)")
    s = preset_name_to_scheme(preset, ["Linear"])
    if name == "w8a16":
        s.weights.strategy, s.weights.group_size = "channel", None
    elif name == "w4a16":
        if group_size == -1:
            s.weights.strategy, s.weights.group_size = "channel", None
        else:
            s.weights.group_size = group_size
    return s


def _min_max(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    if args.strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if args.strategy == "channel":
        return w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    n, k = w.shape
    if k % args.group_size:
        raise ValueError(f"compressed-tensors: a [{n}, {k}] weight does not divide into groups of {args.group_size}")
    g = w.reshape(n, k // args.group_size, args.group_size)
    return g.amin(dim=-1), g.amax(dim=-1)


def compress(w: torch.Tensor, s) -> dict:
    """The stored tensors of weight ``w [N, K]`` under scheme ``s`` (local names: weight_packed, ...)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    lo, hi = _min_max(w, s.weights)
    scale, zero_point = calculate_qparams(lo, hi, s.weights)
    compressor = BaseCompressor.get_value_from_registry(infer_module_format(torch.nn.Linear, s))
    state = {"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zero_point}
    return dict(compressor.compress(state, s))


def quantization_config(s, ignore: list[str] | None = None) -> dict:
    """``config.json``'s ``quantization_config`` for one scheme, as ``ModelCompressor.update_config`` writes it."""
    import compressed_tensors
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig

    fmt = infer_module_format(torch.nn.Linear, s)
    qc = QuantizationConfig(config_groups={"group_0": s}, format=fmt.value, quantization_status="compressed",
                            ignore=list(IGNORE if ignore is None else ignore))
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {}, **qc.model_dump(exclude=["quant_method"])}
