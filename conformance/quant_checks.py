"""Checks of a plugin's quantized matmuls against the core's reference of the same format.

For every :class:`~tokenmill.quant.interface.QuantizationMethod` subclass a plugin
registers (``tokenmill_quantization_methods``), for every checkpoint format and online
mode it declares, on every platform it serves, in every dtype the platform declares:
the cases of :mod:`tokenmill.conformance.quant_cases` (the checkpoint tensors the core's
quantizer writes for each supported configuration of the format) load into a layer of
the plugin's class on the device and into a layer of the core's reference class on the
CPU in float32. Both go through the engine's own path: ``create_weights``, each
parameter's ``weight_loader`` per fused shard and expert, ``process_weights_after_loading``,
``apply``. The outputs must match within the per-format tolerance of
:data:`tokenmill.conformance.tolerances.QUANT_TOLERANCES`, relative to the largest
reference output; the check reports the measured worst error, not just a pass.

A configuration the plugin's class refuses in its constructor (``ValueError``) is not a
failure: the engine falls back to the next class there, so the check lists it as refused.
"""
from __future__ import annotations

from tokenmill.conformance.quant_cases import GEOMETRIES, TOKENS, cases_for, reference_class
from tokenmill.conformance.results import Check, Skip
from tokenmill.conformance.tolerances import quant_tolerance


def _build(cls, key: str, case, geometry, dtype, device, weights, bias):
    """A Linear of ``cls`` serving ``key`` loaded from ``case``'s checkpoint tensors of ``weights``."""
    import torch

    from tokenmill.models.interface import ModelContext
    from tokenmill.models.layers import Linear, check_all_loaded

    method = cls(key, case.quant_config, dtype)
    float_mode = key == "none"  # a float linear: the method serves the layers quantization leaves out
    ctx = ModelContext(kernels=None, attention_backend=None, dtype=dtype, device=torch.device(device),
                       quantization=None if float_mode else method, float_method=method if float_mode else None)
    layer = Linear(geometry.in_features, geometry.out_features, bias is not None, ctx,
                   shard_sizes=geometry.shard_sizes, prefix="model.layers.0.mlp.proj",
                   num_experts=geometry.num_experts)
    params = dict(layer.named_parameters())
    with torch.no_grad():
        for shard, tensors in weights.items():
            for name, tensor in tensors.items():
                if name not in params:
                    raise AssertionError(f"{cls.__name__} has no parameter {name!r} for the checkpoint tensor "
                                         f"{name} (its parameters: {sorted(params)})")
                params[name].weight_loader(params[name], tensor.to(device), shard)
        if bias is not None:
            layer.bias.weight_loader(layer.bias, bias.to(device))
    check_all_loaded(layer)
    method.process_weights_after_loading(layer)
    return layer


def run_quant(cls, key: str, kind: str, reference, dtype_name: str, device, seed: int = 0) -> str:
    """Compare ``cls`` serving ``key`` with ``reference`` on every case; the measured worst error."""
    import torch

    dtype = getattr(torch, dtype_name)
    tolerance = quant_tolerance(key, dtype_name)
    worst, worst_label, n, refused = 0.0, "", 0, []
    cases = cases_for(key, kind)
    if not cases:
        raise Skip(f"the suite has no test configurations of {kind} format {key!r}")
    for case in cases:
        try:
            cls(key, case.quant_config, dtype)
        except ValueError as exc:
            refused.append(f"{case.label}: {exc}")
            continue
        for geometry in GEOMETRIES:
            if geometry.num_experts and not (cls.covers_experts and reference.covers_experts):
                continue
            gen = torch.Generator().manual_seed(seed)
            weights = case.checkpoint(geometry, gen)
            bias = torch.randn(geometry.out_features, generator=gen) * 0.1 if geometry.bias else None
            if geometry.num_experts:
                bias = None
            ours = _build(cls, key, case, geometry, dtype, device, weights, bias)
            ref = _build(reference, key, case, geometry, torch.float32, "cpu", weights, bias)
            for tokens in TOKENS:
                x = torch.randn(tokens, geometry.in_features, generator=gen).to(dtype)
                expert = geometry.num_experts - 1 if geometry.num_experts else None
                with torch.no_grad():
                    got = ours(x.to(device), expert)
                    want = ref(x.to(torch.float32), expert)
                label = f"{case.label} {geometry.label} {tokens}tok"
                assert got.dtype == dtype, f"{label}: output dtype {got.dtype}, expected {dtype}"
                assert tuple(got.shape) == tuple(want.shape), \
                    f"{label}: output shape {tuple(got.shape)}, the reference gives {tuple(want.shape)}"
                g = got.detach().to("cpu", torch.float32)
                assert torch.isfinite(g).all(), f"{label}: output has inf/nan"
                err = float((g - want).abs().max() / want.abs().max().clamp_min(1e-12))
                assert err <= tolerance, (f"{label}: relative error {err:.3g} exceeds the {key} tolerance "
                                          f"{tolerance:g} in {dtype_name} (max |reference| "
                                          f"{float(want.abs().max()):.3g})")
                if err >= worst:
                    worst, worst_label = err, label
                n += 1
    if not n:
        raise Skip(f"{cls.__name__} refuses every configuration the suite has for {key}: " + "; ".join(refused))
    detail = f"{n} cases, worst relative error {worst:.2g} ({worst_label}), tolerance {tolerance:g}"
    if refused:
        detail += f"; refused {len(refused)} configuration(s) (the engine falls back): " + "; ".join(refused)
    return detail


def quant_checks(target, platform, platform_name: str, device, device_skip: str | None,
                 dtypes: list[str], dtype_skips: dict[str, str]) -> list[Check]:
    """One check per (method class serving ``platform_name``, format or mode, dtype)."""
    from tokenmill.plugins import CORE_NAME

    core = [c for p, c in target.pm.registered("quantization_methods") if p == CORE_NAME]
    checks = []
    for cls in target.quant_methods_for(platform_name):
        keys = [(k, "checkpoint") for k in cls.checkpoint_formats] + [(k, "online") for k in cls.online_modes]
        for key, kind in keys:
            prefix = f"quant/{platform_name}/{cls.__name__}/{key}"
            reference = reference_class(core, key, kind)
            for dt in dtypes:
                def run(cls=cls, key=key, kind=kind, reference=reference, dt=dt):
                    if device_skip:
                        raise Skip(device_skip)
                    if reference is None:
                        raise Skip(f"the core has no reference implementation of {kind} format {key!r} to "
                                   f"compare with")
                    why = cls.available(platform) if platform is not None else "platform not installed"
                    if why:
                        raise Skip(f"{cls.__name__}.available(): {why}")
                    return run_quant(cls, key, kind, reference, dt, device)
                checks.append(Check(f"{prefix}/{dt}", "quantization",
                                    f"{cls.__name__} {key} matches the core's reference in {dt}", run))
            for dt, why in dtype_skips.items():
                checks.append(Check(f"{prefix}/{dt}", "quantization", f"{cls.__name__} {key} in {dt}",
                                    lambda w=why: _skip(w)))
    return checks


def _skip(reason: str):
    raise Skip(reason)
