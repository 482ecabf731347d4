"""Ahead-of-time compilation of every kernel variant for a GPU target, without a GPU, as a launch
compiles it.

A launch specializes its arguments before compiling: an integer equal to 1 (a unit stride) becomes
a constant, and integers and pointers divisible by 16 are marked so (``tt.divisibility``). Those
marks are what let the compiler vectorize loads and pipeline a K loop; a kernel compiled without
them has other registers, spills and shared memory than the one that runs. So this module does not
type the kernels' parameters by hand: it calls every launcher (the files beside it) on meta-device
tensors of realistic shapes, captures each kernel launch instead of running it, specializes the
captured arguments by Triton's rules (``specialize``) and compiles that, with the launch's own
block sizes, warps and stages, for sm_90 and sm_80. ``ptxas -v`` gives registers and spills.
``python -m t3s_kernels.ops.aot`` (or ``t3s compile-report``) prints the table.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import configs
from .chunk_epilogue import chunk_epilogue, chunk_epilogue_kernel
from .distill_epilogue import distill_epilogue, distill_epilogue_kernel
from .merge_splits import merge_splits_kernel
from .tile_forward import TensorDescriptor, tile_forward, tile_forward_kernel

KERNELS = [tile_forward_kernel, merge_splits_kernel, chunk_epilogue_kernel, distill_epilogue_kernel]

# Shapes the launches are modelled at: Qwen3-8B's head (every size divisible by 16), and one where
# the token count (after compaction: any number) and the vocabulary (GPT-2's) are not (there, the
# variants with every option).
SHAPES = {"aligned": dict(n=16384, h=4096, v=151936), "odd": dict(n=16383, h=4096, v=50257)}
# SMs of the cards a target stands for (the vocabulary-split count depends on it): H100/H200, A100.
SM_COUNT = {90: 132, 80: 108}
_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
                 torch.int32: "i32"}


@dataclass(frozen=True)
class Launch:
    """One captured launch: which kernel, and its arguments as the launcher passed them."""

    kernel: str
    variant: str  # the constexpr flags that select this variant
    shape: str
    signature: tuple  # ((name, type), ...), "constexpr" for constants
    constexprs: tuple  # ((name, value), ...)
    divisible: tuple  # names of arguments marked divisible by 16
    num_warps: int
    num_stages: int


@dataclass
class CompileReport:
    kernel: str
    variant: str
    shape: str
    dtype: str
    arch: int
    shared_bytes: int
    registers: int
    spill_stores: int
    spill_loads: int
    num_warps: int
    num_stages: int
    stage_bytes: int  # shared memory one K-loop stage of a tile kernel's operands needs (0 elsewhere)


def specialize(value):
    """(type, constant or None, divisible by 16) of one non-constexpr argument, by the rules a Triton
    launch applies (Triton 3.2 to 3.9): tensors by dtype, marked when their address is 16-aligned;
    an int equal to 1 becomes a constant; ints marked when divisible by 16; floats and bools as they are;
    tensor descriptors by element type and block shape."""
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_DTYPE[value.dtype], None, value.data_ptr() % 16 == 0
    if TensorDescriptor is not None and isinstance(value, TensorDescriptor):  # by element type and block shape
        return f"tensordesc<{_TRITON_DTYPE[value.base.dtype]}{list(value.block_shape)}>", None, False
    if isinstance(value, bool):
        return "i1", None, False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"aot: cannot specialize an argument of type {type(value).__name__}")


def _variant_name(kernel: str, constexprs: dict, signature: dict) -> tuple[str, str]:
    """The report's kernel name and the flags that make this variant (with the logits' dtype where a
    kernel reads a logits buffer: float32, or the inputs' half dtype)."""
    flags = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(constexprs.items())
             if k.isupper() and not k.startswith("BLOCK") and k not in ("DOT_PRECISION", "UPCAST")]
    if "LOGITS" in signature:
        flags.append(f"LOGITS={signature['LOGITS'].lstrip('*')}")
    return kernel.removesuffix("_kernel"), " ".join(flags)


def to_launch(kernel, args: tuple, kwargs: dict, shape: str) -> Launch:
    """The launch ``kernel[grid](*args, **kwargs)``, specialized as Triton specializes it."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    params = [p.name for p in kernel.params]
    bound = dict(zip(params, args), **kwargs)
    missing = [p for p in params if p not in bound]
    if missing:
        raise TypeError(f"aot: the launch of {kernel.fn.__name__} misses {missing}")
    signature, constants, divisible = [], {}, []
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            signature.append((name, "constexpr"))
            constants[name] = bound[name]
            continue
        kind, constant, aligned = specialize(bound[name])
        signature.append((name, kind))
        if constant is not None:
            constants[name] = constant
        if aligned:
            divisible.append(name)
    name, variant = _variant_name(kernel.fn.__name__, constants, dict(signature))
    return Launch(name, variant, shape, tuple(signature), tuple(sorted(constants.items())), tuple(divisible),
                  options.get("num_warps", 4), options.get("num_stages", 3))


def _capture(kernel, into: list):
    """Replace ``kernel.run`` (what ``kernel[grid](...)`` calls) by one that records (kernel, args, kwargs)."""
    def run(*args, grid, warmup, **kwargs):
        into.append((kernel, args, kwargs))

    return mock.patch.object(kernel, "run", run, create=True)


def _launcher_calls(dtype: torch.dtype, n: int, h: int, v: int, plain: bool = True):
    """Every variant the engines launch: each launcher called with each option family (without the
    plain one, no options at all, unless ``plain``)."""
    meta = dict(device="meta")
    x, w, b = (torch.empty(n, h, dtype=dtype, **meta), torch.empty(v, h, dtype=dtype, **meta),
               torch.empty(v, dtype=dtype, **meta))
    y, f32 = torch.empty(n, dtype=torch.int64, **meta), dict(dtype=torch.float32, **meta)
    row_scale, lse = torch.empty(n, **f32), torch.empty(n, **f32)
    head = dict(softcap=30.0, logit_scale=1.0)
    grad = dict(ce_weight=1.0, smoothing=0.1, inv_vocab=1.0 / v, z_loss=1e-4)
    kd_grad = dict(kd_coef=1.0, beta=0.5, inv_temp=0.5, log_beta=-0.7, log_1m_beta=-0.7)
    for rich in (False, True)[0 if plain else 1:]:
        yield lambda: tile_forward(x, w, b if rich else None, y, head, rich, rich)
    # The chunked epilogues: a chunk of whole vocabulary rows in 1 GiB, of float32 logits (6 bytes a logit with
    # the half gradient) and, for half inputs, of logits in their dtype with the gradient over them (2 bytes).
    chunks = [(torch.float32, 6)] + ([(dtype, 2)] if dtype != torch.float32 else [])
    for (logits_dtype, per_logit), rich in itertools.product(chunks, (False, True)[0 if plain else 1:]):
        rows = min(n, max(1, (1 << 30) // (per_logit * v)))
        logits = torch.empty(rows, v, dtype=logits_dtype, **meta)
        state = torch.empty(5, rows, **f32)
        yield lambda: chunk_epilogue(logits, y[:rows], 0, {**head, **grad}, rich, rich, state=state)
        yield lambda: chunk_epilogue(logits, y[:rows], 0, {**head, **grad}, rich, rich, lse=lse[:rows],
                                     row_scale=row_scale[:rows], out_dtype=dtype)
        yield lambda: chunk_epilogue(logits, y[:rows], 0, {**head, **grad}, rich, rich, state=state,
                                     row_scale=row_scale[:rows], out_dtype=dtype)
        for (mode, with_grad), inv_temp in itertools.product(((1, True), (2, True), (3, True), (3, False)),
                                                             (1.0, 0.5)):  # T = 1: SAME_TEMP
            yield lambda: distill_epilogue(logits, logits, y[:rows], row_scale[:rows] if with_grad else None,
                                           {**head, **grad, **kd_grad, "inv_temp": inv_temp}, mode, rich, rich,
                                           dtype)


def launcher_arguments(dtype: torch.dtype, arch: int, shape: str) -> list[tuple]:
    """(kernel, args, kwargs) of every launch the launchers make at ``shape``, as on a card of compute
    capability ``arch`` (its SM count sets the vocabulary splits); nothing runs (meta tensors)."""
    calls: list[tuple] = []
    sms = mock.Mock(multi_processor_count=SM_COUNT[arch], major=arch // 10, minor=arch % 10)
    patches = [_capture(k, calls) for k in KERNELS]
    with mock.patch.object(torch.cuda, "get_device_properties", return_value=sms), \
            mock.patch.object(configs, "interpreting", return_value=False):
        for p in patches:
            p.start()
        try:
            for call in _launcher_calls(dtype, **SHAPES[shape], plain=shape == "aligned"):
                call()
        finally:
            for p in patches:
                p.stop()
    return calls


def capture_launches(dtype: torch.dtype, arch: int, shapes=tuple(SHAPES)) -> list[Launch]:
    """The distinct specialized launches of every variant at ``shapes``."""
    seen, unique = set(), []
    for shape in shapes:
        for kernel, args, kwargs in launcher_arguments(dtype, arch, shape):
            launch = to_launch(kernel, args, kwargs, shape)
            key = (launch.kernel, launch.signature, launch.constexprs, launch.divisible, launch.num_warps,
                   launch.num_stages)
            if key not in seen:
                seen.add(key)
                unique.append(launch)
    return unique


def triton_specialization(kernel, args: tuple, kwargs: dict, arch: int):
    """(signature, constants, divisible) as this Triton's own launch path computes them for the
    call, through its private binder; None where this Triton has no such binder. For checking
    ``specialize`` against the real thing."""
    try:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError:
        return None
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = kernel._pack_args(backend, dict(kwargs), bound, specialization, options)
    names = [p.name for p in kernel.params]
    constants = {names[path[0]]: value for path, value in constexprs.items()}
    divisible = sorted(names[path[0]] for path, marks in attrs.items() if ["tt.divisibility", 16] in marks)
    return dict(signature), constants, divisible


def check_specialization(archs=(90, 80), dtypes=(torch.bfloat16, torch.float32)) -> list[str]:
    """Where ``specialize`` and this Triton's launch path disagree, for every captured launch
    (empty when they agree everywhere); raises LookupError where the Triton has no binder to ask."""
    mismatches = []
    for arch, dtype, shape in itertools.product(archs, dtypes, SHAPES):
        for kernel, args, kwargs in launcher_arguments(dtype, arch, shape):
            ours = to_launch(kernel, args, kwargs, shape)
            theirs = triton_specialization(kernel, args, kwargs, arch)
            if theirs is None:
                raise LookupError(f"triton {triton.__version__} has no launch binder to compare with")
            signature, constants, divisible = theirs
            mine = (dict(ours.signature), dict(ours.constexprs), sorted(ours.divisible))
            if mine != (signature, constants, divisible):
                mismatches.append(f"{ours.kernel} {ours.variant} {shape}: ours {mine}, triton's "
                                  f"{(signature, constants, divisible)}")
    return mismatches


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


_BY_NAME = {k.fn.__name__.removesuffix("_kernel"): k for k in KERNELS}


def _stage_bytes(launch: Launch, dtype: torch.dtype) -> int:
    """Shared memory of one K-loop stage (an X and a W tile) for the tile kernels, else 0."""
    c = dict(launch.constexprs)
    if "BLOCK_K" not in c:
        return 0
    return (c["BLOCK_M"] + c["BLOCK_N"]) * c["BLOCK_K"] * torch.finfo(dtype).bits // 8


def compile_launch(launch: Launch, dtype: torch.dtype, arch: int) -> CompileReport:
    kernel = _BY_NAME[launch.kernel]
    signature = dict(launch.signature)
    index = {name: k for k, name in enumerate(kernel.arg_names)}
    attrs = {(index[name],): [["tt.divisibility", 16]] for name in launch.divisible}
    source = ASTSource(fn=kernel, signature=signature, constexprs=dict(launch.constexprs), attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
    regs, spill_st, spill_ld = _ptxas_usage(compiled.asm["ptx"], arch)
    return CompileReport(kernel=launch.kernel, variant=launch.variant, shape=launch.shape,
                         dtype=_TRITON_DTYPE[dtype], arch=arch, shared_bytes=compiled.metadata.shared,
                         registers=regs, spill_stores=spill_st, spill_loads=spill_ld, num_warps=launch.num_warps,
                         num_stages=launch.num_stages, stage_bytes=_stage_bytes(launch, dtype))


def _compile_job(job) -> CompileReport:
    return compile_launch(*job)


def compile_all(archs=(90, 80), dtypes=(torch.bfloat16, torch.float32), workers=None) -> list[CompileReport]:
    jobs = [(launch, dtype, arch) for arch in archs for dtype in dtypes for launch in capture_launches(dtype, arch)]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(_compile_job, jobs))


def format_reports(reports: list[CompileReport]) -> str:
    lines = [f"{'kernel':<22}{'variant':<72}{'shape':<8}{'dtype':<6}{'arch':<7}{'smem KiB':>9}{'stage':>6}"
             f"{'regs':>6}{'spill st/ld B':>15}{'warps':>6}"]
    for r in reports:
        lines.append(f"{r.kernel:<22}{r.variant:<72}{r.shape:<8}{r.dtype:<6}sm_{r.arch:<4}{r.shared_bytes / 1024:>9.1f}"
                     f"{r.num_stages:>6}{r.registers:>6}{f'{r.spill_stores}/{r.spill_loads}':>15}{r.num_warps:>6}")
    return "\n".join(lines)


def main(argv=None) -> None:
    import argparse
    import json
    from dataclasses import asdict

    parser = argparse.ArgumentParser(description="Compile every kernel variant as a launch would, for GPU targets; "
                                                 "report shared memory, registers and spills.")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SM_COUNT))
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--check-specialization", action="store_true",
                        help="only compare the modelled launch specialization with this Triton's own")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")
    dtypes = [{v: k for k, v in _TRITON_DTYPE.items()}[d] for d in args.dtype]
    if args.check_specialization:
        mismatches = check_specialization(args.arch, dtypes)
        print("\n".join(mismatches) or f"the modelled specialization equals triton {triton.__version__}'s")
        raise SystemExit(1 if mismatches else 0)
    reports = compile_all(args.arch, dtypes)
    if args.json:
        print(json.dumps({"triton": triton.__version__, "reports": [asdict(r) for r in reports]}))
    else:
        print(f"triton {triton.__version__}")
        print(format_reports(reports))


if __name__ == "__main__":
    main()
