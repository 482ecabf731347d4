"""The ``t3s`` command line."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import CPU_DEFAULT, GPU_DEFAULT, format_report, report_json, run_bench

    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    defaults = GPU_DEFAULT if on_gpu else CPU_DEFAULT
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    if not 0.0 < args.select <= 1.0:
        raise SystemExit(f"--select must be in (0, 1]; got {args.select}")
    report = run_bench(**shape, select=args.select, providers=args.providers, device=args.device,
                       repeat=args.repeat, check_error=not args.no_error, progress=not args.quiet)
    print(format_report(report))
    if args.json:
        text = report_json(report)
        if args.json == "-":
            print(text)
        else:
            # write then rename: an interrupted run never leaves a truncated results file
            folder = os.path.dirname(os.path.abspath(args.json))
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
                f.write(text)
            os.replace(f.name, args.json)
    return 0


def _compile_report(args: argparse.Namespace) -> int:
    from .ops.aot import main as aot_main

    aot_main(["--arch", *map(str, args.arch)] + (["--json"] if args.json else []))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t3s", description="t3s-kernels: fused LM head + loss for T3S.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="time, memory and error of the fused loss against eager and peers",
                           description="Defaults: on a GPU, Qwen3-8B's head (N=16384, H=4096, V=151936, bf16); "
                                       "on a CPU, N=2048, H=256, V=65536, fp32.")
    bench.add_argument("--tokens", type=int, help="N, the number of tokens")
    bench.add_argument("--hidden", type=int, help="H, the hidden size")
    bench.add_argument("--vocab", type=int, help="V, the vocabulary size")
    bench.add_argument("--dtype", choices=["fp32", "bf16", "fp16"])
    bench.add_argument("--select", type=float, default=1.0,
                       help="fraction of tokens in the loss (the rest get weight 0 / an ignored label)")
    bench.add_argument("--providers", nargs="+", metavar="NAME",
                       help="subset of: eager compile liger cce t3s-torch t3s-triton-chunked "
                            "t3s-triton-tile t3s-token-stats")
    bench.add_argument("--device", help="cpu or cuda[:i] (default: cuda when available)")
    bench.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median)")
    bench.add_argument("--no-error", action="store_true", help="skip the float64 reference")
    bench.add_argument("--json", metavar="PATH", help="also write the report as JSON (- for stdout)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=_bench)

    report = sub.add_parser("compile-report", help="compile every kernel for sm_90/sm_80; smem, registers, spills")
    report.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    report.add_argument("--json", action="store_true")
    report.set_defaults(func=_compile_report)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
