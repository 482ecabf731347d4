"""`t3s bench`'s providers timed in turn, round by round, in one process: on a machine whose load
changes from minute to minute (shared cores), each round times every provider within the same few
seconds, so a busy minute slows all of them instead of the one `t3s bench` was timing then.

    python benchmarks/bench_interleaved.py --rounds 5 --providers compile torch-lce-chunked-256 t3s-torch

Prints, per provider, the median and the range over the rounds of forward and of forward + backward,
and the matmul floor (1 and 3 matmuls) timed in the same rounds. CPU defaults: N=2048, H=256,
V=65536, fp32."""

import argparse
import time

import torch

from t3s_kernels.bench import CPU_DEFAULT, DTYPES, PROVIDERS, Inputs
from t3s_kernels.bench.measure import matmul_floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", nargs="+", default=["eager", "compile", "torch-lce-chunked-256", "t3s-torch"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=CPU_DEFAULT["tokens"])
    parser.add_argument("--hidden", type=int, default=CPU_DEFAULT["hidden"])
    parser.add_argument("--vocab", type=int, default=CPU_DEFAULT["vocab"])
    args = parser.parse_args()
    inputs = Inputs.make(args.tokens, args.hidden, args.vocab, DTYPES["fp32"], torch.device("cpu"), 1.0)
    runs = {(name, grad): PROVIDERS[name](inputs, grad) for name in args.providers for grad in (False, True)}
    for run in runs.values():  # warm-up (torch.compile compiles here)
        run()
    times = {key: [] for key in [*runs, ("floor", False), ("floor", True)]}
    for _ in range(args.rounds):
        one, three = matmul_floor(inputs, torch.device("cpu"), 1)
        times["floor", False].append(one)
        times["floor", True].append(three)
        for key, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[key].append((time.perf_counter() - t0) * 1e3)
    print(f"N={args.tokens} H={args.hidden} V={args.vocab} fp32, {args.rounds} rounds, torch {torch.__version__}; "
          f"ms: median [min, max]")
    print(f"{'provider':<26}{'fwd':>24}{'fwd+bwd':>26}")
    for name in ["floor", *args.providers]:
        cells = []
        for grad in (False, True):
            t = sorted(times[name, grad])
            cells.append(f"{t[len(t) // 2]:.0f} [{t[0]:.0f}, {t[-1]:.0f}]")
        print(f"{name:<26}{cells[0]:>24}{cells[1]:>26}")


if __name__ == "__main__":
    main()
