"""Memory per rank of the head's loss (the Triton chunked engine, "mean" reduction, bf16), computed
from what the code allocates, for Qwen3-8B's and Qwen3-32B's heads under tensor parallelism (TP
1/2/4/8: each rank holds V/TP rows and sees every token) and under FSDP2 (the head gathered whole
inside its call, each rank its own tokens):

    python benchmarks/memory_per_rank.py [--tokens 16384]

Counted, on top of the inputs (hidden states and the rank's weight rows):
  * dW accumulator: float32 [V_r x H] while the forward runs (ChunkedEngine._alloc_grads), then
    its bf16 copy, alive together for the cast (``HeadGrads.cast``), after the chunks are freed;
  * chunk buffers: the chunk's float32 logits and, today, two bf16 gradient buffers (the previous
    chunk's still alive when the next is allocated), rows from ``plan_chunks`` at the 1 GiB budget;
  * dX: [N x H] bf16, plus its float32 sum across ranks under TP (vocab_parallel.py);
  * held from forward to backward: dW (bf16) and dX.
The peak is the largest of the three moments (chunk loop, TP's dX sum, the cast). The FSDP2 rows add
the gathered bf16 weight (FSDP2's, for the call) and leave each rank 1/world of the gradient after
the reduce-scatter. TP 1 gives 3,837 MiB for Qwen3-8B, the peak measured on an H200 (3,838 MiB,
benchmarks/RESULTS.md); the other figures are computed only (measuring them needs several GPUs).
"""

import argparse

from t3s_kernels.backends.chunked import plan_chunks

MiB = 1 << 20
HEADS = {"Qwen3-8B": (151936, 4096), "Qwen3-32B": (151936, 5120)}
BUDGET = 1 << 30
TRITON_BYTES_PER_LOGIT = 6  # ops/engines.py: TritonEpilogue.bytes_per_logit


def per_rank(vocab_rows: int, hidden: int, tokens: int, tp: int) -> dict:
    rows, vocab_chunk = plan_chunks(tokens, vocab_rows, TRITON_BYTES_PER_LOGIT, BUDGET)
    chunk = rows * vocab_chunk * (4 + 2 * 2)
    dw32, dw16 = vocab_rows * hidden * 4, vocab_rows * hidden * 2
    dx16, dx32 = tokens * hidden * 2, (tokens * hidden * 4 if tp > 1 else 0)
    # Three moments: the chunk loop, the float32 sum of dX across ranks (TP), the cast of dW to bf16.
    peak = dw32 + dx16 + max(chunk, dx32, dw16)
    return {"dW fp32": dw32, "chunks": chunk, "dX": dx16 + dx32, "peak": peak, "held": dw16 + dx16}


def table(tokens: int) -> str:
    lines = ["| head | setting | rows per rank | dW fp32 | chunk buffers | dX | peak in forward | held to backward |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (vocab, hidden) in HEADS.items():
        for tp in (1, 2, 4, 8):
            rows = -(-vocab // tp)
            m = per_rank(rows, hidden, tokens, tp)
            lines.append(f"| {name} | TP {tp} | {rows} | " + " | ".join(
                f"{m[k] / MiB:,.0f}" for k in ("dW fp32", "chunks", "dX", "peak", "held")) + " |")
        m = per_rank(vocab, hidden, tokens, 1)
        gathered = vocab * hidden * 2
        lines.append(f"| {name} | FSDP2, head alone | {vocab} (gathered) | " + " | ".join(
            f"{m[k] / MiB:,.0f}" for k in ("dW fp32", "chunks", "dX")) +
            f" | {(m['peak'] + gathered) / MiB:,.0f} (incl. the gathered W) | {m['held'] / MiB:,.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per rank and step")
    args = parser.parse_args(argv)
    print(f"MiB per rank, N = {args.tokens} tokens, bf16, chunk budget 1 GiB\n")
    print(table(args.tokens))


if __name__ == "__main__":
    main()
