"""Where the torch backend's CPU forward + backward spends its time beyond the three-matmul floor.

    python benchmarks/cpu_breakdown.py --rounds 5

Times, interleaved round by round (a busy minute slows every line, not one): the floor as `t3s bench`
times it (three matmuls over one whole N x V logits tensor); the same three matmuls at the chunk
shapes the engine plans (`ChunkedEngine._plan`: logits of one row chunk, dX of it, dW added into
chunk after chunk), with no epilogue; the native epilogue alone on those chunks
(`accumulate_and_gradient`, its input restored by a copy that is timed apart and subtracted); the
logits of a chunk made vocabulary-major (`w @ x.t()`, the layout a CPU GEMM writes at the whole
matmul's speed); and the fused loss itself. CPU defaults: N=2048, H=256, V=65536, fp32.

What each line says: chunk matmuls minus the floor is what the memory budget costs; the epilogue
line is what one exp per logit, read and written once, costs; their sum against the fused loss's
time is the Python and allocation overhead left.
"""

import argparse
import time

import torch

from t3s_kernels import fused_linear_t3s_loss
from t3s_kernels.backends.base import OnlineState, grad_scalars, head_scalars
from t3s_kernels.backends.chunked import ChunkedEngine
from t3s_kernels.backends.cpu_epilogue import cpu_epilogue, native_module
from t3s_kernels.bench import CPU_DEFAULT, Inputs
from t3s_kernels.bench.measure import device_name, matmul_floor
from t3s_kernels.options import HeadOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=CPU_DEFAULT["tokens"])
    parser.add_argument("--hidden", type=int, default=CPU_DEFAULT["hidden"])
    parser.add_argument("--vocab", type=int, default=CPU_DEFAULT["vocab"])
    args = parser.parse_args()
    module = native_module()
    if module is None:
        raise SystemExit("cpu_breakdown.py: the native CPU epilogue did not build (see the warning above)")
    n, vocab = args.tokens, args.vocab
    inputs = Inputs.make(n, args.hidden, vocab, torch.float32, torch.device("cpu"), 1.0)
    x, w, y = inputs.hidden.detach(), inputs.weight.detach(), inputs.labels
    rows, vocab_chunk = ChunkedEngine(cpu_epilogue())._plan(x, vocab, torch.float32)
    if vocab_chunk < vocab:
        raise SystemExit(f"cpu_breakdown.py: the plan splits the vocabulary ({vocab_chunk} of {vocab}); "
                         "this script times the whole-row (three-matmul) plan only")
    if n % rows:
        raise SystemExit(f"cpu_breakdown.py: --tokens {n} is not a multiple of the planned chunk ({rows} rows)")
    starts = range(0, n, rows)
    buf, buf_t = torch.empty(rows, vocab), torch.empty(vocab, rows)
    d_x, d_w = torch.empty_like(x), torch.empty_like(w)
    opts = HeadOptions(vocab_size=vocab)
    row_scale = torch.full((n,), 1.0 / n)
    source = torch.randn(rows, vocab) * 2

    def chunk_matmuls():
        for r0 in starts:
            xc = x[r0:r0 + rows]
            logits = torch.mm(xc, w.t(), out=buf)
            torch.mm(logits, w, out=d_x[r0:r0 + rows])
            if r0:
                d_w.addmm_(logits.t(), xc)
            else:
                torch.mm(logits.t(), xc, out=d_w)

    def vocab_major_logits():
        for r0 in starts:
            torch.mm(w, x[r0:r0 + rows].t(), out=buf_t)

    def row_major_logits():
        for r0 in starts:
            torch.mm(x[r0:r0 + rows], w.t(), out=buf)

    def restore():
        for _ in starts:
            buf.copy_(source)

    def epilogue():
        for r0 in starts:
            buf.copy_(source)
            state = OnlineState(rows, buf.device)
            module.accumulate_and_gradient(logits=buf, labels=y[r0:r0 + rows], state=state.planes,
                                           row_scale=row_scale[r0:r0 + rows], has_softcap=False,
                                           **head_scalars(opts), has_smoothing=False, **grad_scalars(opts),
                                           out_dtype=torch.float32)

    xg, wg = inputs.hidden.detach().clone().requires_grad_(), inputs.weight.detach().clone().requires_grad_()

    def fused():
        fused_linear_t3s_loss(xg, wg, y, backend="torch").loss.backward()
        xg.grad = wg.grad = None

    lines = {"chunk matmuls (3 per chunk, no epilogue)": chunk_matmuls,
             "  of which the logits, row-major (x @ w.t())": row_major_logits,
             "  the logits made vocabulary-major (w @ x.t())": vocab_major_logits,
             "epilogue alone (copy-in subtracted)": epilogue, "copy-in": restore, "fused loss, fwd+bwd": fused}
    for fn in lines.values():
        fn()
    times = {name: [] for name in ["floor (three matmuls)", *lines]}
    for _ in range(args.rounds):
        times["floor (three matmuls)"].append(matmul_floor(inputs, x.device, 1)[1])
        for name, fn in lines.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    median["epilogue alone (copy-in subtracted)"] -= median.pop("copy-in")
    floor = median["floor (three matmuls)"]
    print(f"{device_name(x.device)}, torch {torch.__version__}; N={n} H={args.hidden} V={vocab} fp32, "
          f"chunks of {rows} rows x the whole vocabulary; {args.rounds} rounds, median ms (x the floor)")
    for name, ms in median.items():
        print(f"{name:<50}{ms:>9.1f}  {ms / floor:5.2f}x")


if __name__ == "__main__":
    main()
