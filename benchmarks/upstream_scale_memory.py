"""What the backward of the fused op allocates beyond what the forward left, at an upstream gradient
of 1 (``loss.backward()``) and at others (a loss divided by accumulation steps, a loss scale).

    PYTHONPATH=. python benchmarks/upstream_scale_memory.py [--tokens 2048 --hidden 256 --vocab 65536]

The chunked engine makes the gradient in the forward, so a backward only rescales it: nothing at
1, in place otherwise. Each row: peak bytes allocated during ``backward`` above what was allocated
before it (``bench.measure.peak_memory_bytes``: the CUDA allocator, or the profiler's memory events
on a CPU), beside the sizes of dW and dX in the inputs' dtype.
"""

import argparse

import torch

import t3s_kernels as t3s
from t3s_kernels.bench.measure import device_name, peak_memory_bytes

MIB = 1 << 20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, generator=g) * args.hidden ** -0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(device)
    size = dtype.itemsize
    print(f"{device_name(device)}, torch {torch.__version__}, N={args.tokens} H={args.hidden} V={args.vocab} "
          f"{args.dtype}: dW {w.numel() * size / MIB:.1f} MiB, dX {x.numel() * size / MIB:.1f} MiB")
    print("| upstream gradient | allocated by backward, MiB |\n|---|---|")
    for upstream in (1.0, 1.0 / 3, 65536.0):
        x.grad = w.grad = None
        loss = t3s.fused_linear_t3s_loss(x, w, y).loss
        scaled = loss if upstream == 1.0 else loss * upstream
        _, peak = peak_memory_bytes(scaled.backward, device)
        print(f"| {upstream:g} | {peak / MIB:.1f} |")


if __name__ == "__main__":
    main()
