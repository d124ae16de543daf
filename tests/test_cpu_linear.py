"""The cpu plugin's float linears: few rows through its C kernel, many through oneDNN on packed weights.

Each path is checked against ``F.linear``, and a model's greedy tokens and logprobs against the
reference ops'."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill import LLM, SamplingParams
from tokenmill.models.layers import Linear
from tokenmill.testing.tiny_models import make_tiny_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _linears(llm):
    return [m for m in llm.engine.runner.model.modules() if isinstance(m, Linear)]


def _lib():
    from tokenmill_cpu import native

    lib = native.load()
    if lib is None:
        pytest.skip(f"no native kernels here: {native.status()}")
    return lib


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 32, 300])
@pytest.mark.parametrize("n, k, bias", [(64, 128, False), (37, 72, True), (520, 1040, False)])
def test_row_kernel_matches_f_linear(dtype, rows, n, k, bias):
    """Tiles of 8 outputs with a remainder (37), a K that is not a multiple of the vector width (72),
    a bias, rows read through a stride wider than K, rows in bfloat16 pairs with an odd one left
    (3), and more rows than one widened panel of 256 (300, without a row limit)."""
    from tokenmill_cpu import native_linear

    if rows > native_linear.MAX_ROWS and (dtype == torch.float32 or n == 520):
        pytest.skip("many rows are a bfloat16 path; one large shape is enough")
    lib = _lib()
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    wide = torch.randn(rows, k + 5, generator=gen).to(dtype)
    x = wide[:, :k]  # row stride k + 5
    w = (torch.randn(n, k, generator=gen) * 0.1).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    limit = 0 if rows > native_linear.MAX_ROWS else None
    got = native_linear.linear(lib, x, w, b, torch.get_num_threads(), limit)
    assert got is not None and got.dtype == dtype and got.shape == (rows, n)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: one rounding of the output
    assert float((got.float() - want).abs().max() / want.abs().max()) < tol
    three_d = native_linear.linear(lib, x.contiguous().view(1, rows, k), w, b, 1, limit)  # [..., K], one thread
    assert torch.equal(three_d.view(rows, n), got)


def test_row_kernel_declines_what_it_does_not_serve():
    from tokenmill_cpu import native_linear

    lib = _lib()
    w = torch.randn(16, 32)
    assert native_linear.linear(lib, torch.randn(native_linear.MAX_ROWS + 1, 32), w, None, 1) is None
    assert native_linear.linear(lib, torch.randn(5, 32), w, None, 1, max_rows=4) is None
    assert native_linear.linear(lib, torch.randn(2, 32).to(torch.bfloat16), w, None, 1) is None  # dtypes differ
    assert native_linear.linear(lib, torch.randn(32, 2).t(), w, None, 1) is None  # columns not contiguous
    assert native_linear.linear(lib, torch.randn(2, 32), torch.randn(32, 16).t(), None, 1) is None  # weight strided
    assert native_linear.linear(lib, torch.randn(2, 32), w, torch.randn(16).to(torch.bfloat16), 1) is None
    assert not native_linear.supports(torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 17, 64, 100])
@pytest.mark.parametrize("n, k, bias", [(64, 128, False), (37, 73, True), (520, 1040, False), (8, 3, True)])
def test_tiled_kernel_matches_f_linear(dtype, rows, n, k, bias):
    """Output tiles with a zero-padded remainder (37, 8, 520), K blocks with a remainder (1040 = 4 x 256 + 16
    in float32, 2 x 256 + 8 pairs in bfloat16), an odd K (73, 3: bfloat16's last pair is half), a K below one
    vector (3), row blocks with a remainder (7, 9, 17), a bias, rows read through an odd stride, and an
    accumulator panel on the heap (100 rows, without a row limit)."""
    from tokenmill_cpu import native_tiles

    lib = _lib()
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, k + 5, generator=gen).to(dtype)[:, :k]  # row stride k + 5
    w = (torch.randn(n, k, generator=gen) * 0.1).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    tiles = native_tiles.pack(lib, w)
    nr = lib.tiles_nr()
    assert tiles.shape == (-(-n // nr), k if dtype == torch.float32 else -(-k // 2), nr)
    got = native_tiles.linear(lib, x, tiles, n, b, torch.get_num_threads(), 0)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got is not None and got.shape == (rows, n) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: one rounding of the output
    assert float((got.double() - want).abs().max() / want.abs().max()) < tol
    three_d = native_tiles.linear(lib, x.contiguous().view(1, rows, k), tiles, n, b, 1, 0)  # [..., K], one thread
    assert torch.equal(three_d.view(rows, n), got)


def test_tiled_kernel_declines_what_it_does_not_serve():
    from tokenmill_cpu import native_tiles

    lib = _lib()
    tiles = native_tiles.pack(lib, torch.randn(16, 32))
    assert native_tiles.linear(lib, torch.randn(native_tiles.MAX_ROWS + 1, 32), tiles, 16, None, 1) is None
    assert native_tiles.linear(lib, torch.randn(5, 32), tiles, 16, None, 1, max_rows=4) is None
    assert native_tiles.linear(lib, torch.randn(2, 32).bfloat16(), tiles, 16, None, 1) is None
    assert native_tiles.linear(lib, torch.randn(32, 2).t(), tiles, 16, None, 1) is None  # columns strided
    assert native_tiles.linear(lib, torch.randn(2, 31), tiles, 16, None, 1) is None  # K differs
    assert native_tiles.linear(lib, torch.randn(2, 32), tiles, 16, torch.randn(16).bfloat16(), 1) is None
    bf16 = native_tiles.pack(lib, torch.randn(16, 32).bfloat16())
    assert native_tiles.linear(lib, torch.randn(2, 32), bf16, 16, None, 1) is None  # float32 rows, bfloat16 tiles
    assert native_tiles.linear(lib, torch.randn(2, 32).bfloat16(), bf16, 16, None, 1) is not None
    with pytest.raises(ValueError, match="bfloat16"):
        native_tiles.pack(lib, torch.randn(16, 32).half())


def test_float32_model_uses_every_path_and_matches_f_linear():
    from tokenmill_cpu import native_tiles
    from tokenmill_cpu.linear import CpuPackedLinearMethod

    _lib()
    # the 80-token prompt runs through oneDNN, the decode steps through the tiled kernel
    prompts = [[5, 9, 13, 2, 7, 11, 3, 5, 9, 13, 2, 7, 11, 3, 6, 8] * 5, [4, 4, 8, 1]]
    assert len(prompts[0]) > native_tiles.MAX_ROWS
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=1)
    ours = LLM(model=str(make_tiny_model("llama")), device="cpu", dtype="float32")
    linears = _linears(ours)
    assert linears and all(type(m.method) is CpuPackedLinearMethod for m in linears)
    assert any(m.prefix == "lm_head" for m in linears)
    # two copies: the tiled one for few rows, oneDNN's (in the plain weight's place) for many
    assert all(m.weight.is_mkldnn and m.weight_packed is None for m in linears)
    assert all(m.weight_tiles is not None and m.method.row_limit(m) == native_tiles.MAX_ROWS for m in linears)
    got = ours.generate([{"prompt_token_ids": p} for p in prompts], params)
    plain = LLM(model=str(make_tiny_model("llama")), device="cpu", dtype="float32", reference_ops=True)
    assert not any(m.weight.is_mkldnn for m in _linears(plain))
    want = plain.generate([{"prompt_token_ids": p} for p in prompts], params)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            tok = next(iter(b))
            assert abs(a[tok].logprob - b[tok].logprob) < 1e-4


class _Layer(torch.nn.Module):
    def __init__(self, out_features, in_features):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features), requires_grad=False)


def test_copy_budget_for_one_copy_keeps_the_tiled_one(monkeypatch):
    """The tiled copy is taken first; oneDNN's copy then replaces the plain weight at no cost, and
    takes the rows the tiled kernel does not."""
    from tokenmill_cpu import linear as cpu_linear
    from tokenmill_cpu import native_tiles

    _lib()
    method = cpu_linear.CpuPackedLinearMethod("none", None, torch.float32)
    layer = _Layer(48, 64)
    w = layer.weight.detach().clone()
    method._copy_budget = 48 * 64 * 4
    method.process_weights_after_loading(layer)
    assert layer.weight_tiles is not None and layer.weight.is_mkldnn and layer.weight_packed is None
    assert method._copy_budget == 0 and method.row_limit(layer) == native_tiles.MAX_ROWS
    calls, real = [], F.linear
    monkeypatch.setattr(cpu_linear.F, "linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for rows in (3, 100):
        x = torch.randn(rows, 64)
        assert torch.allclose(method.apply(layer, x), x @ w.T, atol=1e-5)
    assert calls == []


def test_without_the_tiled_copy_onednn_sits_beside_the_plain_weight(monkeypatch):
    """A layer without tiles keeps its plain weight for the row kernel, and oneDNN's copy (within the
    budget) beside it for many rows; with the tiled copy alone, that kernel serves every M."""
    from tokenmill_cpu import linear as cpu_linear
    from tokenmill_cpu import native_tiles

    _lib()
    monkeypatch.setattr(native_tiles, "supports", lambda dtype: False)
    method = cpu_linear.CpuPackedLinearMethod("none", None, torch.float32)
    layer = _Layer(48, 64)
    method.process_weights_after_loading(layer)
    assert layer.weight_tiles is None and not layer.weight.is_mkldnn and layer.weight_packed.is_mkldnn
    for rows in (2, 100):
        x = torch.randn(rows, 64)
        assert torch.allclose(method.apply(layer, x), F.linear(x, layer.weight), atol=1e-5)
    monkeypatch.undo()
    monkeypatch.setattr(cpu_linear.CpuPackedLinearMethod, "packs", staticmethod(lambda dtype: False))
    method = cpu_linear.CpuPackedLinearMethod("none", None, torch.float32)
    layer = _Layer(48, 64)
    method.process_weights_after_loading(layer)
    assert layer.weight_tiles is not None and not layer.weight.is_mkldnn and layer.weight_packed is None
    assert method.row_limit(layer) == 0
    x = torch.randn(100, 64)
    assert torch.allclose(method.apply(layer, x), F.linear(x, layer.weight), atol=1e-5)


@pytest.mark.parametrize("case", ["no-native", "over-budget"])
def test_one_copy_when_the_row_kernel_is_absent_or_memory_is_short(case, monkeypatch):
    """Without the C kernel the packed copy is the only one; past the memory share there is no packed copy,
    and many rows go to F.linear. Either way every row count gives F.linear's result."""
    from tokenmill_cpu import linear as cpu_linear

    method = cpu_linear.CpuPackedLinearMethod("none", None, torch.float32)
    if case == "no-native":
        method.lib = None
    else:
        _lib()
        monkeypatch.setattr(cpu_linear, "PACKED_COPY_SHARE", 0.0)
    layer = _Layer(48, 64)
    w = layer.weight.detach().clone()
    method.process_weights_after_loading(layer)
    if case == "no-native":
        assert layer.weight.is_mkldnn and layer.weight_packed is None
    else:
        assert not layer.weight.is_mkldnn and layer.weight_packed is None and layer.weight_tiles is None
    for rows in (1, 40):
        x = torch.randn(rows, 64)
        assert torch.allclose(method.apply(layer, x), F.linear(x, w), atol=1e-5)


def test_bfloat16_is_served_and_float16_keeps_f_linear():
    from tokenmill.quant import UnquantizedMethod
    from tokenmill_cpu.linear import CpuPackedLinearMethod

    path = str(make_tiny_model("llama"))
    if torch.bfloat16 in CpuPackedLinearMethod.dtypes():
        bf16 = LLM(model=path, device="cpu", dtype="bfloat16")
        linears = _linears(bf16)
        assert all(type(m.method) is CpuPackedLinearMethod for m in linears)
        packs = CpuPackedLinearMethod.packs(torch.bfloat16)
        assert all(m.weight.is_mkldnn == packs and m.weight_packed is None for m in linears)
        ref = LLM(model=path, device="cpu", dtype="bfloat16", reference_ops=True)
        params = SamplingParams(max_tokens=8, temperature=0)
        a = bf16.generate([{"prompt_token_ids": [5, 9, 13, 2]}], params)[0].outputs[0].token_ids
        b = ref.generate([{"prompt_token_ids": [5, 9, 13, 2]}], params)[0].outputs[0].token_ids
        assert len(a) == len(b) == 8 and a[0] == b[0]  # bf16 rounding may part them later, never at once
    llm = LLM(model=path, device="cpu", dtype="float16")
    assert all(type(m.method) is UnquantizedMethod and not m.weight.is_mkldnn for m in _linears(llm))


@pytest.mark.parametrize("onednn_bf16", [False, True])
def test_bfloat16_rows_limit_follows_onednn(onednn_bf16, monkeypatch):
    """Without oneDNN bfloat16 kernels the tiled C kernel takes every M (F.linear is the slower choice);
    with them, many rows go to oneDNN's packed copy as in float32."""
    from tokenmill_cpu import linear as cpu_linear
    from tokenmill_cpu import native_tiles

    _lib()
    if onednn_bf16 and not cpu_linear._onednn_bf16():
        pytest.skip("this CPU has no oneDNN bfloat16 kernels")
    monkeypatch.setattr(cpu_linear, "_onednn_bf16", lambda: onednn_bf16)
    method = cpu_linear.CpuPackedLinearMethod(dtype=torch.bfloat16)
    layer = torch.nn.Module()
    w = (torch.randn(24, 40) * 0.1).bfloat16()
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    method.process_weights_after_loading(layer)
    assert layer.weight.is_mkldnn == onednn_bf16 and layer.weight_packed is None and layer.weight_tiles is not None
    assert method.row_limit(layer) == (native_tiles.MAX_ROWS if onednn_bf16 else 0)
    served = []
    real = native_tiles.linear

    def spy(*args):
        y = real(*args)
        served.append(y is not None)
        return y

    monkeypatch.setattr(cpu_linear.native_tiles, "linear", spy)
    for rows in (3, native_tiles.MAX_ROWS + 9):
        x = torch.randn(rows, 40).bfloat16()
        got = method.apply(layer, x)
        want = F.linear(x.float(), w.float())
        assert float((got.float() - want).abs().max() / want.abs().max()) < 1e-2
    assert served == [True, not onednn_bf16]
    assert (method.describe().endswith("(no oneDNN bfloat16 kernels on this CPU)")) == (not onednn_bf16)
