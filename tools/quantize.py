#!/usr/bin/env python
"""Post-training quantization of a megatron_bar checkpoint with nvidia-modelopt.

    python tools/quantize.py --load runs/demo/stages/bar_router/checkpoints/iter_0000040 \\
        --save ckpt/bar-fp8 --format fp8                       # calibrates on the router stage's sample
    python tools/quantize.py --load ckpt/bar-merged --save ckpt/bar-int8 --format int8 \\
        --calib examples/configs/tiny/router.yaml              # a router-stage config
    python tools/quantize.py --load ckpt/bar-merged --save ckpt/bar-fp8 --format fp8 \\
        --calib math=data/math.jsonl code=data/code.jsonl ... --export-hf hf/bar-fp8

Formats: fp8 (vLLM, TensorRT-LLM), int8 (SmoothQuant W8A8, TensorRT-LLM), int4_awq
(W4A16, TensorRT-LLM). The router stays in fp32. The output is a megatron checkpoint
that ``load_model`` reads (with its quantizers); ``--export-hf`` also writes modelopt's
unified HF checkpoint (fp8 / int8) for vLLM / TensorRT-LLM.
"""

import argparse
from pathlib import Path

from megatron_bar.cli import run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="megatron_bar checkpoint (a merged BAR model or any)")
    p.add_argument("--save", required=True, help="output quantized checkpoint (must not exist)")
    p.add_argument("--format", required=True, help="fp8 | int8 | int4_awq")
    p.add_argument("--calib", nargs="+", default=None,
                   help="a training config (YAML / run config.json) whose data section is the "
                        "calibration set, or domain=path.jsonl[:text] ... (default: the config.json "
                        "of the run the checkpoint belongs to, i.e. the router stage's sample)")
    p.add_argument("--calib-fraction", type=float, default=None,
                   help="stratified fraction per domain for domain=path inputs (default 0.05)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed for domain=path inputs (default 1234)")
    p.add_argument("--seq-length", type=int, default=None, help="cut documents at this many tokens (default 512)")
    p.add_argument("--max-documents", type=int, default=None,
                   help="cap on calibration documents, keeping every domain (default: all sampled)")
    p.add_argument("--export-hf", default=None,
                   help="also write modelopt's unified HF checkpoint here (vLLM / TensorRT-LLM)")
    args = p.parse_args()

    from megatron_bar.serve import quantize as q

    q.get_format(args.format)  # an unknown format fails before any loading
    load = Path(args.load)
    kw = {"max_documents": args.max_documents}
    calib_args = args.calib
    if calib_args is None:
        default = q.default_calibration_config(load)
        if default is None:
            raise q.QuantizationError(
                f"{load}: not inside a training run (no ../../config.json); name the calibration "
                "data with --calib CONFIG.yaml or --calib domain=path.jsonl ..."
            )
        calib_args = [str(default)]
    if len(calib_args) == 1 and "=" not in calib_args[0]:
        if args.calib_fraction is not None or args.seed is not None:
            raise q.QuantizationError("--calib-fraction / --seed apply to domain=path inputs; "
                                      "a config file brings its own sample_fraction and seed")
        calib = q.calibration_from_config(load, calib_args[0], **kw)
    else:
        calib = q.calibration_set(
            load, q.parse_calib_args(calib_args),
            fraction=args.calib_fraction if args.calib_fraction is not None else q.DEFAULT_FRACTION,
            seed=args.seed if args.seed is not None else q.DEFAULT_SEED,
            seq_length=args.seq_length or q.DEFAULT_SEQ_LENGTH,
            source="--calib " + " ".join(calib_args), **kw,
        )
    q.quantize_checkpoint(load, args.save, args.format, calib,
                          hf_export=Path(args.export_hf) if args.export_hf else None)


if __name__ == "__main__":
    run(main)
