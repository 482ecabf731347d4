"""pytest-benchmark on CPU: PyTorch eager vs the t3s PyTorch backend, forward + backward, at the
shape of the CPU memory/speed targets (N=4096, H=256, V=65536, fp32). Each benchmark records the
peak memory above its inputs in ``extra_info``. Run (about 2 minutes on 2 cores):

    pytest benchmarks/test_bench_cpu.py --benchmark-enable --benchmark-json=bench-out/cpu.json
"""

import pytest
import torch

from t3s_kernels.bench import PROVIDERS, Inputs, peak_memory_bytes

SHAPE = dict(tokens=4096, hidden=256, vocab=65536)


@pytest.fixture(scope="module")
def inputs():
    return Inputs.make(**SHAPE, dtype=torch.float32, device=torch.device("cpu"), select=1.0)


@pytest.mark.parametrize("provider", ["eager", "t3s-torch"])
def test_fwd_bwd(benchmark, inputs, provider):
    run = PROVIDERS[provider](inputs, True)
    _, peak = peak_memory_bytes(run, torch.device("cpu"))
    benchmark.extra_info.update(peak_mib=peak / 2**20, **SHAPE)
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=0)
