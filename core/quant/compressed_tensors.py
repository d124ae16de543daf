"""compressed-tensors checkpoints (``quant_method: compressed-tensors``), what llm-compressor writes.

The ``quantization_config`` is parsed and validated by the ``compressed-tensors`` library
(``QuantizationConfig``), and its own name matching (``match_name``) decides which
scheme of ``config_groups`` serves a layer and which layers ``ignore`` leaves float.
Per layer, the stored tensors (local names, as the library's compressors write them):

``int-quantized`` / ``naive-quantized`` (W8A8, W8A16)
    ``weight`` int8 ``[N, K]``, ``weight_scale`` ``[N, 1]`` (channel) or ``[1]`` (tensor).
``float-quantized`` (FP8, FP8_DYNAMIC)
    ``weight`` float8_e4m3fn ``[N, K]``, ``weight_scale`` as above, ``input_scale`` ``[1]``
    for static activations.
``pack-quantized`` (W4A16, W8A16 packed, asymmetric variants)
    ``weight_packed`` int32 ``[N, K * b / 32]``: 32 / b values of one row per word, low
    bits first, each stored plus ``2 ** (b - 1)``; ``weight_scale`` ``[N, G]``;
    ``weight_shape`` ``[2]`` = ``(N, K)``; with asymmetric weights ``weight_zero_point``
    packed the same way along the output dimension: int32 ``[N * b / 32, G]``.

``W[n, k] = (q[n, k] - zero[n, g(k)]) * scale[n, g(k)]``. Supported: the three formats
above; int weights of 8 bits (4 or 8 when packed), channel/tensor/group strategies,
symmetric or asymmetric packed zeros, ``actorder: weight``; input activations none,
int8 per-token dynamic (W8A8: the int8 GEMM path of :mod:`tokenmill.quant.int8`) or FP8
dynamic per token / static per tensor (dequantized here, activations stay float). Refused
with the reason: other formats (sparse, nvfp4, mxfp, marlin), block strategies, output
activations, KV-cache schemes, transforms, static int8 activations, status other than
``compressed``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.quant.fp8 import FP8, dequantize_fp8
from tokenmill.quant.int8 import dequantize_int8, w8a8_reference
from tokenmill.quant.interface import LinearSpec, QuantizationMethod
from tokenmill.quant.params import add_param, expert_view, replace_param

FORMATS = ("int-quantized", "naive-quantized", "float-quantized", "pack-quantized")


@dataclass(frozen=True)
class LayerScheme:
    """What a layer's scheme means for loading and the matmul (from one of ``config_groups``)."""

    format: str  # one of FORMATS
    bits: int
    strategy: str  # tensor | channel | group
    group_size: int | None
    symmetric: bool
    activations: str  # float | int8-token | fp8-token | fp8-static


def _act(args, fmt: str, group: str) -> str:
    if args is None:
        return "float"
    where = f"compressed-tensors {group}: input_activations"
    if args.type == "int":
        if args.num_bits == 8 and args.symmetric and args.strategy == "token" and args.dynamic is True:
            return "int8-token"
        raise ValueError(f"{where} {args.num_bits}-bit int {args.strategy} dynamic={args.dynamic} "
                         f"symmetric={args.symmetric} is not supported (int8 activations: symmetric, dynamic per token)")
    if args.type == "float" and args.num_bits == 8:
        if args.strategy == "token" and args.dynamic is True:
            return "fp8-token"
        if args.strategy == "tensor" and args.dynamic is False:
            return "fp8-static"
    raise ValueError(f"{where} {args.num_bits}-bit {args.type} {args.strategy} dynamic={args.dynamic} is not "
                     f"supported (fp8 activations: dynamic per token or static per tensor)")


def parse_scheme(scheme, top_format: str, group: str) -> LayerScheme:
    """Validate one scheme of ``config_groups``; ``ValueError`` names what is unsupported."""
    fmt = scheme.format or top_format
    where = f"compressed-tensors {group}"
    if fmt not in FORMATS:
        raise ValueError(f"{where}: format {fmt!r} is not supported (supported: {', '.join(FORMATS)})")
    if scheme.output_activations is not None:
        raise ValueError(f"{where}: output_activations quantization is not supported")
    w = scheme.weights
    if w is None:
        raise ValueError(f"{where}: a scheme without weights quantization is not supported")
    if w.dynamic not in (False, None):
        raise ValueError(f"{where}: weights dynamic={w.dynamic} is not supported")
    if w.strategy not in ("tensor", "channel", "group"):
        raise ValueError(f"{where}: weights strategy {w.strategy!r} is not supported (tensor, channel, group)")
    if w.actorder not in (None, "weight", False):
        raise ValueError(f"{where}: weights actorder={w.actorder!r} is not supported")
    if fmt == "float-quantized":
        if w.type != "float" or w.num_bits != 8:
            raise ValueError(f"{where}: float-quantized weights of {w.num_bits}-bit {w.type} are not supported "
                             f"(float8 e4m3 only)")
        if w.strategy == "group":
            raise ValueError(f"{where}: float-quantized weights with group strategy are not supported")
    elif w.type != "int":
        raise ValueError(f"{where}: {fmt} weights of type {w.type!r} are not supported (int)")
    elif fmt == "pack-quantized":
        if w.num_bits not in (4, 8):
            raise ValueError(f"{where}: pack-quantized weights of {w.num_bits} bits are not supported (4, 8)")
        if w.strategy == "tensor":
            raise ValueError(f"{where}: pack-quantized weights with tensor strategy are not supported")
    else:
        if w.num_bits != 8:
            raise ValueError(f"{where}: {fmt} weights of {w.num_bits} bits are not supported (8)")
        if not w.symmetric:
            raise ValueError(f"{where}: asymmetric {fmt} weights are not supported")
        if w.strategy == "group":
            raise ValueError(f"{where}: {fmt} weights with group strategy are not supported")
    act = _act(scheme.input_activations, fmt, group)
    if act.startswith("int8") and fmt not in ("int-quantized", "naive-quantized"):
        raise ValueError(f"{where}: int8 activations with {fmt} weights are not supported")
    if act.startswith("fp8") and fmt != "float-quantized":
        raise ValueError(f"{where}: fp8 activations with {fmt} weights are not supported")
    return LayerScheme(fmt, w.num_bits, w.strategy, w.group_size if w.strategy == "group" else None,
                       bool(w.symmetric), act)


def parse_config(cfg: dict):
    """``(QuantizationConfig, {group: LayerScheme})`` through the library; refusals name the field."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError as exc:  # a dependency of tokenmill; only a broken install lands here
        raise ValueError(f"compressed-tensors checkpoints need the compressed-tensors library: {exc}") from None
    import pydantic

    if cfg.get("sparsity_config"):
        raise ValueError(f"compressed-tensors: sparsity_config {cfg['sparsity_config'].get('format', '')!r} "
                         f"(sparse weights) is not supported")
    if cfg.get("transform_config"):
        raise ValueError("compressed-tensors: transform_config (rotations) is not supported")
    try:
        qc = QuantizationConfig.model_validate({k: v for k, v in cfg.items() if k not in (
            "version", "sparsity_config", "transform_config")})
    except pydantic.ValidationError as exc:
        raise ValueError(f"compressed-tensors: the quantization_config does not validate: {exc}") from None
    if qc.kv_cache_scheme is not None:
        raise ValueError("compressed-tensors: kv_cache_scheme (a quantized KV cache) is not supported")
    status = getattr(qc.quantization_status, "value", qc.quantization_status)
    if status != "compressed":
        raise ValueError(f"compressed-tensors: quantization_status {status!r} is not supported "
                         f"(only compressed checkpoints)")
    if getattr(qc, "moe_sparsity_config", None) is not None:
        raise ValueError("compressed-tensors: moe_sparsity_config is not supported")
    schemes = {name: parse_scheme(s, qc.format, name) for name, s in qc.config_groups.items()}
    return qc, schemes


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int) -> torch.Tensor:
    """compressed-tensors' dense int32 packing along ``dim`` (-1 or -2) -> signed values, ``size`` of them."""
    from tokenmill.quant.gptq import unpack_cols, unpack_rows

    u = unpack_cols(packed, bits) if dim == -1 else unpack_rows(packed, bits)
    u = u.narrow(dim, 0, size)
    return u - (1 << (bits - 1))


def packed_dequantize(packed, scale, zero_point, bits: int, k: int, dtype) -> torch.Tensor:
    """The float weight ``[N, K]`` of one pack-quantized layer (``scale`` float32 ``[N, G]``)."""
    q = unpack_int32(packed, bits, k, -1).to(torch.float32)  # [N, K]
    groups = scale.shape[-1]
    idx = torch.arange(k, device=q.device) // (k // groups)
    if zero_point is not None:
        z = unpack_int32(zero_point, bits, q.shape[-2], -2).to(torch.float32)  # [N, G]
        q = q - z[..., idx]
    return (q * scale[..., idx]).to(dtype)


class CompressedTensorsMethod(QuantizationMethod):
    """Reference compressed-tensors: int8 / FP8 / packed int weights, dequantized then ``F.linear``
    (W8A8 through the int8 activation path). A plugin overrides ``apply`` per ``layer.ct_scheme``."""

    name = "compressed-tensors"
    checkpoint_formats = ("compressed-tensors",)

    def __init__(self, fmt: str, quant_config: dict | None, dtype):
        super().__init__(fmt, quant_config, dtype)
        self.config, self.schemes = parse_config(quant_config or {})
        self.ignore = list(self.config.ignore or [])
        self._layers: dict[str, LayerScheme] = {}

    def describe(self) -> str:
        parts = []
        for name, s in self.schemes.items():
            w = f"{s.format} int{s.bits}" if s.format != "float-quantized" else f"{s.format} fp8"
            w += f" {s.strategy}{'' if s.group_size is None else ' ' + str(s.group_size)}"
            parts.append(f"{name}: {w}{'' if s.symmetric else ' asym'}, activations {s.activations}")
        return "compressed-tensors " + "; ".join(parts)

    def scheme_of(self, name: str) -> LayerScheme | None:
        """The scheme serving checkpoint module ``name`` (None: ignored or not targeted)."""
        from compressed_tensors.utils.match import match_name

        if any(match_name(name, ig) for ig in self.ignore):
            return None
        for group, scheme in self.config.config_groups.items():
            if "Linear" in scheme.targets or any(match_name(name, t) for t in scheme.targets):
                return self.schemes[group]
        return None

    def quantizes(self, prefix: str, shard_prefixes: tuple[str, ...] = ()) -> bool:
        names = shard_prefixes or (prefix,)
        found = {self.scheme_of(n) for n in names}
        if len(found) > 1:
            raise ValueError(f"compressed-tensors: the fused projections {', '.join(names)} have different "
                             f"schemes (or some are ignored); a fused layer needs one")
        scheme = found.pop()
        if scheme is not None:
            self._layers[prefix] = scheme
        return scheme is not None

    def _scale(self, layer, spec, s: LayerScheme, k: int, n: int) -> None:
        if s.strategy == "tensor":
            add_param(layer, "weight_scale", (), torch.float32, spec, mode="per_shard")
        elif s.strategy == "channel":
            add_param(layer, "weight_scale", (n, 1), torch.float32, spec, shard_dim=0)
        else:
            if k % s.group_size:
                raise ValueError(f"compressed-tensors: {spec.prefix} has {k} inputs, not a multiple of "
                                 f"group_size {s.group_size}")
            add_param(layer, "weight_scale", (n, k // s.group_size), torch.float32, spec, shard_dim=0)

    def create_weights(self, layer, spec: LinearSpec) -> None:
        s = self._layers[spec.prefix]
        k, n = spec.in_features, spec.out_features
        layer.ct_scheme = s
        layer.ct_shard_rows = list((spec.shard_sizes or {None: n}).values())
        layer.ct_in_features = k
        if s.format == "pack-quantized":
            per = 32 // s.bits
            add_param(layer, "weight_packed", (n, -(-k // per)), torch.int32, spec, shard_dim=0)
            add_param(layer, "weight_shape", (2,), torch.int64, spec, mode="per_shard", cast=True)
            if not s.symmetric:
                add_param(layer, "weight_zero_point", (-(-n // per), 1 if s.strategy == "channel" else
                                                       k // s.group_size), torch.int32, spec, shard_dim=0, pack=per)
        else:
            add_param(layer, "weight", (n, k), FP8 if s.format == "float-quantized" else torch.int8, spec, shard_dim=0)
            if s.activations == "fp8-static":
                add_param(layer, "input_scale", (), torch.float32, spec, mode="per_shard")
        self._scale(layer, spec, s, k, n)

    def process_weights_after_loading(self, layer) -> None:
        s: LayerScheme = layer.ct_scheme
        scale = layer.weight_scale.data
        if s.strategy == "tensor":
            rows = torch.tensor(layer.ct_shard_rows, device=scale.device)
            scale = torch.repeat_interleave(scale, rows, dim=-1)
        elif s.format != "pack-quantized":
            scale = scale.squeeze(-1)
        replace_param(layer, "weight_scale", scale.to(torch.float32).contiguous())
        if s.format == "pack-quantized":
            shapes = layer.weight_shape.data.reshape(-1, len(layer.ct_shard_rows), 2)
            want = torch.tensor([[r, layer.ct_in_features] for r in layer.ct_shard_rows], dtype=shapes.dtype)
            if not torch.equal(shapes.cpu(), want.expand_as(shapes.cpu())):
                raise ValueError(f"compressed-tensors: {layer.prefix}.weight_shape is {shapes[0].tolist()}, "
                                 f"expected {want.tolist()}")
            replace_param(layer, "weight_shape", None)
        elif s.format == "float-quantized":
            replace_param(layer, "input_scale", None)  # activations stay float on the dequantizing path
        else:
            q = layer.weight.data
            replace_param(layer, "weight", None)
            replace_param(layer, "qweight", q)

    def dequantized(self, layer, expert, dtype):
        s: LayerScheme = layer.ct_scheme
        scale = expert_view(layer.weight_scale, expert)
        if s.format == "pack-quantized":
            zp = expert_view(layer.weight_zero_point, expert) if not s.symmetric else None
            return packed_dequantize(expert_view(layer.weight_packed, expert), scale, zp, s.bits,
                                     layer.ct_in_features, dtype)
        if s.format == "float-quantized":
            return dequantize_fp8(expert_view(layer.weight, expert), scale, dtype)
        return dequantize_int8(expert_view(layer.qweight, expert), scale, dtype)

    def apply(self, layer, x, bias=None, expert=None):
        if layer.ct_scheme.activations == "int8-token":
            return w8a8_reference(x, expert_view(layer.qweight, expert), expert_view(layer.weight_scale, expert), bias)
        return F.linear(x, self.dequantized(layer, expert, x.dtype), bias)
