"""The cpu attention's two prefill paths: decode rows for short contexts, SDPA for long ones."""
import pytest
import torch

from tokenmill.attention.interface import AttentionMetadata
from tokenmill.conformance.attention_checks import grid, run_case
from tokenmill_cpu import attention
from tokenmill_cpu.attention import ROWS_MAX_CONTEXT, SMALL_PREFILL, CpuAttention, _plan


def _meta(chunks, bs=16):
    """One step of ``(new tokens, context length)`` chunks, each sequence on its own pages."""
    tables, slots, first = [], [], 0
    for qlen, slen in chunks:
        nb = -(-slen // bs)
        tables.append(list(range(first, first + nb)))
        slots += [tables[-1][p // bs] * bs + p % bs for p in range(slen - qlen, slen)]
        first += nb
    return AttentionMetadata.from_lists([q for q, _ in chunks], [s for _, s in chunks], tables, slots, bs, "cpu")


def test_prefill_chunks_are_decode_rows_up_to_the_context_limit():
    long = ROWS_MAX_CONTEXT + 1
    plan = _plan(_meta([(40, 40), (SMALL_PREFILL + 1, ROWS_MAX_CONTEXT), (1, 700), (SMALL_PREFILL, 1000),
                        (SMALL_PREFILL + 1, long), (long, long)]))
    # the decode (row 57) first, then the rows of the first, second and fourth chunks; the last two take SDPA
    assert plan.decode_rows.tolist() == [57, *range(57), *range(58, 74)]
    assert [(lo, hi, slen) for _, lo, hi, slen in plan.prefills] == [(74, 91, long), (91, 91 + long, long)]
    # each row's context ends at its own token
    assert plan.decode_seq_lens.tolist() == [700, *range(1, 41), *range(ROWS_MAX_CONTEXT - 16, ROWS_MAX_CONTEXT + 1),
                                             *range(1000 - 15, 1001)]


@pytest.mark.parametrize("rows_max_context, native", [(0, True), (ROWS_MAX_CONTEXT, True), (ROWS_MAX_CONTEXT, False)],
                         ids=["sdpa", "rows", "rows-without-native-kernel"])
def test_both_prefill_paths_match_the_reference(rows_max_context, native, monkeypatch):
    """With the limit at 0 every chunk past SMALL_PREFILL takes SDPA; at its value, the conformance
    scenarios' chunks are all decode rows, unless the native kernel does not serve the layer (then
    decode rows would be a padded gather each, and chunks keep SDPA). All match the reference."""
    monkeypatch.setattr(attention, "ROWS_MAX_CONTEXT", rows_max_context)
    if not native:
        monkeypatch.setattr(CpuAttention, "_native_decode", lambda self, q, k_cache: False)
    sdpa, real = [], CpuAttention._prefill
    monkeypatch.setattr(CpuAttention, "_prefill", lambda self, *a: sdpa.append(1) or real(self, *a))
    for case in grid(["float32", "bfloat16"], "standard", True):
        run_case(CpuAttention, case, torch.device("cpu"))
    assert (len(sdpa) > 0) == (rows_max_context == 0 or not native)
