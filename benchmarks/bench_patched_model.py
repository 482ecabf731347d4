"""A training step of a mini Qwen3 with a large vocabulary, patched and unpatched: peak memory
above the model and its inputs, and time (CPU or GPU).

    python benchmarks/bench_patched_model.py [--vocab 131072] [--tokens 2048] [--json PATH]
"""

import argparse
import json
import time

import torch

import t3s_kernels as t3s
from t3s_kernels.bench import device_name, peak_memory_bytes
from t3s_kernels.toy import tiny_causal_lm


def step(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach()


def measure(patched: bool, vocab: int, tokens: int, device: torch.device):
    model = tiny_causal_lm("qwen3", vocab_size=vocab, max_position_embeddings=tokens).to(device).train()
    if patched:
        t3s.apply_t3s(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, tokens), generator=g).to(device)
    step(model, ids, ids)  # warm-up, and the grads exist before measuring (as in any step after the first)
    loss, peak = peak_memory_bytes(lambda: step(model, ids, ids), device)
    t0 = time.perf_counter()
    step(model, ids, ids)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return dict(patched=patched, loss=loss.item(), peak_mib=peak / 2**20, step_ms=(time.perf_counter() - t0) * 1e3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [measure(p, args.vocab, args.tokens, device) for p in (False, True)]
    print(f"{device_name(device)} | mini Qwen3 (hidden 64, 2 layers), V={args.vocab}, T={args.tokens}, fp32")
    for r in rows:
        print(f"{'patched' if r['patched'] else 'unpatched':<10} loss {r['loss']:.4f}  peak {r['peak_mib']:8.0f} MiB  "
              f"step {r['step_ms']:8.0f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name(device), vocab=args.vocab, tokens=args.tokens, rows=rows), f, indent=2)
    return rows


if __name__ == "__main__":
    main()
