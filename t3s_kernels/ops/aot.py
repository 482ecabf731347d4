"""Ahead-of-time compilation of every kernel for a GPU target, without a GPU.

Triton compiles to PTX and cubin for any CUDA target on a CPU-only machine. This builds
each kernel with exactly the launch configurations of ``configs.KERNEL_CONFIGS`` and reads
back what matters for performance: shared memory (Triton's metadata), registers and
spills (``ptxas -v`` on the generated PTX). ``python -m t3s_kernels.ops.aot`` prints it.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .chunk_epilogue import chunk_epilogue_kernel
from .configs import KERNEL_CONFIGS
from .distill_epilogue import distill_epilogue_kernel
from .merge_splits import merge_splits_kernel
from .tile_backward import tile_backward_kernel
from .tile_distill import tile_distill_backward_kernel, tile_distill_forward_kernel
from .tile_forward import tile_forward_kernel

# What is compiled and reported, by name: a kernel, the KERNEL_CONFIGS entry it launches with,
# and the constexpr flags that make it this variant (the rest take their most demanding value).
VARIANTS = {
    "tile_forward": (tile_forward_kernel, "tile_forward", {}),
    "tile_backward": (tile_backward_kernel, "tile_backward", {}),
    "chunk_epilogue": (chunk_epilogue_kernel, "chunk_epilogue", {}),
    "merge_splits": (merge_splits_kernel, "merge_splits", dict(DISTILL=False)),
    "distill_epilogue": (distill_epilogue_kernel, "distill_epilogue", {}),
    "tile_distill_forward": (tile_distill_forward_kernel, "tile_distill_forward", dict(JSD_PASS=False)),
    "tile_jsd": (tile_distill_forward_kernel, "tile_jsd", dict(JSD_PASS=True)),
    "tile_distill_backward": (tile_distill_backward_kernel, "tile_distill_backward", {}),
    "merge_distill_splits": (merge_splits_kernel, "merge_splits", dict(DISTILL=True)),
}

_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_INPUT_POINTERS = {"X", "W", "B", "DZ", "Xt", "Wt", "Bt"}  # in the inputs' dtype
_FP32_POINTERS = {"PART", "OUT", "LSE", "ROW_SCALE", "DX", "DW", "DB", "LOGITS", "TEACHER_LOGITS", "LSE_S", "LSE_T",
                  "STATS", "STATE"}
_INT_SCALARS = {"N", "V", "H", "Ht", "n_rows", "width", "col0", "n_splits", "blocks_per_split"}  # and every stride_*
_FLOAT_SCALARS = {"softcap", "logit_scale", "ce_weight", "smoothing", "inv_vocab", "z_loss", "kd_coef", "inv_temp",
                  "beta", "log_beta", "log_1m_beta"}
# The most demanding variant of each feature flag.
_FLAGS = dict(HAS_BIAS=True, HAS_SOFTCAP=True, HAS_SMOOTHING=True, COMPUTE_DX=True, COMPUTE_DW=True,
              COMPUTE_DB=True, ACCUMULATE=True, GRAD=True, UPCAST=False, KD_MODE=3, HAS_TEACHER_BIAS=True)


@dataclass
class CompileReport:
    kernel: str
    dtype: str
    arch: int
    shared_bytes: int
    registers: int
    spill_stores: int
    spill_loads: int
    num_warps: int


def _signature(kernel, dtype: torch.dtype, config: dict, flags: dict):
    signature, constexprs = {}, {}
    meta = {**_FLAGS, "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32", **flags, **config}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = meta[name]
        elif name == "Y":
            signature[name] = "*i64"
        elif name in _INPUT_POINTERS:
            signature[name] = "*" + _TRITON_DTYPE[dtype]
        elif name in _FP32_POINTERS:
            signature[name] = "*fp32"
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        elif name in _INT_SCALARS or name.startswith("stride_"):
            signature[name] = "i32"
        else:  # a new parameter must be typed here: guessing would compile a float as an int silently
            raise ValueError(f"aot: {kernel.fn.__name__} has a parameter {name!r} of no known type; add it to "
                             "_INPUT_POINTERS, _FP32_POINTERS, _FLOAT_SCALARS or _INT_SCALARS")
    return signature, constexprs


def _ptxas_candidates() -> list[str]:
    """ptxas binaries to try, newest first: Triton's generated PTX version follows its newest one."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    names = [os.environ.get("TRITON_PTXAS_PATH", "")] + [os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")]
    return [n for n in names if n and os.path.exists(n)]


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) that ptxas reports for the PTX."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for ptxas in _ptxas_candidates():
            out = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")],
                                 capture_output=True, text=True)
            text = out.stdout + out.stderr
            if out.returncode == 0:
                regs = int(re.search(r"Used (\d+) registers", text).group(1))
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
                return regs, int(spills.group(1)), int(spills.group(2))
            errors.append(f"{ptxas}: {text.strip()}")
    raise RuntimeError(f"no ptxas could assemble the kernel for {gpu}:\n" + "\n".join(errors))


def compile_kernel(name: str, dtype: torch.dtype, arch: int) -> CompileReport:
    kernel, config_name, flags = VARIANTS[name]
    config = dict(KERNEL_CONFIGS[config_name]["fp32" if dtype == torch.float32 else "half"])
    options = {k: config.pop(k) for k in ("num_warps", "num_stages")}
    signature, constexprs = _signature(kernel, dtype, config, flags)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    regs, spill_st, spill_ld = _ptxas_usage(compiled.asm["ptx"], arch)
    return CompileReport(kernel=name, dtype=_TRITON_DTYPE[dtype], arch=arch, shared_bytes=compiled.metadata.shared,
                         registers=regs, spill_stores=spill_st, spill_loads=spill_ld,
                         num_warps=options["num_warps"])


def compile_all(archs=(90, 80), dtypes=(torch.bfloat16, torch.float32)) -> list[CompileReport]:
    return [compile_kernel(name, dtype, arch) for arch in archs for dtype in dtypes for name in VARIANTS]


def format_reports(reports: list[CompileReport]) -> str:
    lines = [f"{'kernel':<22}{'dtype':<7}{'arch':<7}{'smem KiB':>9}{'regs':>6}{'spill st/ld B':>15}{'warps':>6}"]
    for r in reports:
        lines.append(f"{r.kernel:<22}{r.dtype:<7}sm_{r.arch:<4}{r.shared_bytes / 1024:>9.1f}{r.registers:>6}"
                     f"{f'{r.spill_stores}/{r.spill_loads}':>15}{r.num_warps:>6}")
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse
    import json
    from dataclasses import asdict

    parser = argparse.ArgumentParser(description="Compile every kernel for GPU targets; report smem/regs/spills.")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")
    dtypes = [{v: k for k, v in _TRITON_DTYPE.items()}[d] for d in args.dtype]
    reports = compile_all(args.arch, dtypes)
    if args.json:
        print(json.dumps({"triton": triton.__version__, "reports": [asdict(r) for r in reports]}))
    else:
        print(f"triton {triton.__version__}")
        print(format_reports(reports))


if __name__ == "__main__":
    main()
