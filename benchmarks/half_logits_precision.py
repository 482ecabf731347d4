"""What logits rounded to the inputs' half dtype (``logits_dtype="input"``) do to the loss and to the
per-token statistics T3S scores with, against logits rounded to float32: the float64 reference
(reference.py) with ``round_logits`` half or float32 against it without, on the same bf16/fp16 inputs.

    PYTHONPATH=. python benchmarks/half_logits_precision.py [--tokens 512 --hidden 1024 --vocab 151936]

Logits are drawn with a trained model's spread: standard deviation ``--spread`` over the vocabulary and
the label's logit ``--margin`` above the rest for most tokens (a confident student), a few tokens unsure.
"""

import argparse

import torch

from t3s_kernels.reference import reference_t3s_loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--spread", type=float, default=3.0)
    p.add_argument("--margin", type=float, default=12.0)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    n, h, v = args.tokens, args.hidden, args.vocab
    y = torch.randint(0, v, (n,), generator=g)
    w = torch.randn(v, h, generator=g) * (args.spread / h ** 0.5)
    x = torch.randn(n, h, generator=g)
    # Move each hidden state towards its label's row: the label's logit sits `margin` (times a random
    # confidence in [0, 1]) above the spread.
    conf = torch.rand(n, 1, generator=g)
    x = x + conf * args.margin * w[y] / w[y].square().sum(1, keepdim=True)
    print(f"N={n}, H={h}, V={v}; logits std {args.spread}, label margin up to {args.margin}")
    print(f"{'dtype':6} {'statistic':9} {'float32 logits: max |err|':>26} {'half logits: max |err|':>24} "
          f"{'half: mean |err|':>17}")
    for dtype in (torch.bfloat16, torch.float16):
        xd, wd = x.to(dtype).double(), w.to(dtype).double()
        exact, ref = reference_t3s_loss(xd, wd, y, reduction="none")
        f32, f32_stats = reference_t3s_loss(xd, wd, y, reduction="none", round_logits=torch.float32)
        half, half_stats = reference_t3s_loss(xd, wd, y, reduction="none", round_logits=dtype)
        rows = [("loss", exact, f32, half)] + [(k, ref[k], f32_stats[k], half_stats[k])
                                                for k in ("logprob", "entropy", "lse")]
        for name, want, a, b in rows:
            ea, eb = (a.double() - want).abs(), (b.double() - want).abs()
            print(f"{str(dtype).split('.')[-1]:6} {name:9} {ea.max().item():26.2e} {eb.max().item():24.2e} "
                  f"{eb.mean().item():17.2e}")
        flips = (ref["correct"] != half_stats["correct"]).sum().item()
        print(f"{str(dtype).split('.')[-1]:6} correct   {flips} of {n} tokens change with half logits")


if __name__ == "__main__":
    main()
