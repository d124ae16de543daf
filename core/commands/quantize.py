"""``tokenmill quantize SRC DST --format gptq|awq|fp8|int8|compressed-tensors``: round-to-nearest quantization.

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
    p.add_argument("--scheme", default=None, choices=("w8a8", "fp8", "w4a16"),
                   help="compressed-tensors: int8 weights+activations, fp8 weights+activations, or 4-bit weights "
                        "(default w4a16)")
    p.add_argument("--bits", type=int, default=None, help="gptq: 4 (default) or 8; awq: 4")
    p.add_argument("--group-size", type=int, default=128,
                   help="inputs per scale group (gptq, compressed-tensors w4a16: -1 = per channel)")
    p.add_argument("--desc-act", action="store_true", help="gptq: act-order column permutation with g_idx")
    p.add_argument("--asym", action="store_true", help="gptq, compressed-tensors w4a16: asymmetric zero points")


def run(args) -> int:
    from tokenmill.quant.quantizer import quantize_checkpoint

    if args.scheme is not None and args.format != "compressed-tensors":
        raise SystemExit(f"--scheme applies to --format compressed-tensors, not {args.format}")
    if args.bits is not None and args.format not in ("gptq", "awq"):
        raise SystemExit(f"--bits applies to gptq and awq; {args.format} takes its width from --format/--scheme")
    out = quantize_checkpoint(args.src, args.dst, args.format, bits=args.bits or 4, group_size=args.group_size,
                              desc_act=args.desc_act, sym=not args.asym, scheme=args.scheme or "w4a16")
    what = f"compressed-tensors {args.scheme or 'w4a16'}" if args.format == "compressed-tensors" else args.format
    print(f"wrote {what} checkpoint to {out}")
    return 0
