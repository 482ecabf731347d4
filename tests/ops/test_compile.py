"""Every Triton kernel compiles ahead of time for sm_90 and sm_80 with the launch configurations
the code uses, without register spills. The compile runs in a subprocess because this test
session may have TRITON_INTERPRET=1 set, which swaps the kernels for interpreted ones.
The table is printed (see it with pytest -s) for the record."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@pytest.fixture(scope="module")
def compile_reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-m", "t3s_kernels.ops.aot", "--json"], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\ntriton {data['triton']}")
    for r in data["reports"]:
        print(f"{r['kernel']:<16}{r['dtype']:<6}sm_{r['arch']}  smem {r['shared_bytes'] / 1024:6.1f} KiB  "
              f"regs {r['registers']:3d}  spills {r['spill_stores']}/{r['spill_loads']} B")
    return data["reports"]


def test_every_kernel_variant_was_compiled(compile_reports):
    kernels = {r["kernel"] for r in compile_reports}
    assert kernels == {"tile_forward", "tile_backward", "chunk_epilogue", "merge_splits", "distill_epilogue",
                       "tile_distill_forward", "tile_jsd", "tile_distill_backward", "merge_distill_splits"}
    assert {(r["arch"], r["dtype"]) for r in compile_reports} == {
        (a, d) for a in (90, 80) for d in ("bf16", "fp16", "fp32")}


def test_no_spills_and_resources_within_limits(compile_reports):
    for r in compile_reports:
        where = f"{r['kernel']} {r['dtype']} sm_{r['arch']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{where} spills {r}"
        assert r["shared_bytes"] <= SMEM_LIMIT[r["arch"]], f"{where} shared memory {r['shared_bytes']}"
        assert r["registers"] <= 255, where
