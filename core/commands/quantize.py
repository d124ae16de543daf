"""``tokenmill quantize SRC DST --format gptq|awq|fp8``: round-to-nearest quantization of a float checkpoint.

Writes the on-disk layout of the tool that owns each format (see :mod:`tokenmill.quant.quantizer`);
``tokenmill serve DST`` then reads the format from ``config.json``.
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tokenmill.quant.quantizer import FORMATS

    p.add_argument("src", help="float checkpoint directory")
    p.add_argument("dst", help="output directory")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--bits", type=int, default=4, help="gptq: 4 or 8; awq: 4")
    p.add_argument("--group-size", type=int, default=128, help="inputs per scale group (gptq: -1 = per channel)")
    p.add_argument("--desc-act", action="store_true", help="gptq: act-order column permutation with g_idx")
    p.add_argument("--asym", action="store_true", help="gptq: asymmetric zero points")


def run(args) -> int:
    from tokenmill.quant.quantizer import quantize_checkpoint

    out = quantize_checkpoint(args.src, args.dst, args.format, bits=args.bits, group_size=args.group_size,
                              desc_act=args.desc_act, sym=not args.asym)
    print(f"wrote {args.format} checkpoint to {out}")
    return 0
