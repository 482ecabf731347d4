"""Distillation, fwd+bwd: eager (both heads' full logits, log_softmax, KL + CE) against the fused
loss with a teacher head of the same shape (the chunked engine);
Liger's fused linear JSD and chunked JSD loss and TRL's chunked divergence where installed
(GPU). The peers' losses weigh CE and KD as their APIs do: compare time and memory, not values.

    python benchmarks/bench_distill.py [--tokens 4096 --hidden 256 --vocab 65536] [--kd-loss forward_kl]
"""

import argparse
import json

import torch

import t3s_kernels as t3s
from t3s_kernels.bench import DTYPES, device_name, peak_memory_bytes, time_ms
from t3s_kernels.reference import reference_t3s_loss


def eager(x, w, y, th, tw, kd_loss):
    """Eager PyTorch as a user writes it: both heads' logits materialized, CE + KD (JSD with beta 0.5)."""
    with torch.no_grad():
        t = (th @ tw.t()).float()
    return reference_t3s_loss(x, w, y, teacher_logits=t, kd_weight=1.0, kd_loss=kd_loss, jsd_beta=0.5, dtype=None,
                              with_stats=False)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--kd-loss", choices=["forward_kl", "reverse_kl", "jsd"], default="forward_kl")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    n, h, v, dt = args.tokens, args.hidden, args.vocab, DTYPES[args.dtype]
    mk = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dev, dt)
    x, w, th, tw = mk(n, h), mk(v, h, scale=h ** -0.5), mk(n, h), mk(v, h, scale=h ** -0.5)
    y = torch.randint(0, v, (n,), generator=g).to(dev)
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}[args.kd_loss]

    def runner(fn):
        xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()

        def run():
            xl.grad = wl.grad = None
            fn(xl, wl).backward()
        return run

    def ours(logits_dtype):
        return lambda xl, wl: t3s.fused_linear_t3s_loss(xl, wl, y, teacher_hidden=th, teacher_weight=tw,
                                                        kd_weight=1.0, kd_loss="jsd", jsd_beta=beta,
                                                        logits_dtype=logits_dtype).loss

    providers = {"eager": lambda xl, wl: eager(xl, wl, y, th, tw, args.kd_loss),
                 "t3s" if dev.type == "cuda" else "t3s-torch": ours("auto")}
    if dev.type == "cuda":
        providers["t3s-float32-logits"] = ours("float32")
    if dev.type == "cuda":  # the peers are GPU-only; their signatures are those of Liger-Kernel 0.6
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_jsd

            providers["liger-fused-jsd"] = lambda xl, wl: liger_fused_linear_jsd(xl, wl, th, tw, y, 1 - beta, -100,
                                                                                1.0)
        except ImportError:
            pass
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

            chunked = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, beta=1 - beta,
                                              compiled=False)  # no torch.compile time in a short lease
            providers["liger-chunked-jsd"] = lambda xl, wl: chunked(xl, wl, th, tw, y)
        except ImportError:
            pass
        try:  # TRL's tiled generalized JSD (a private helper of its DistillationTrainer, TRL >= 1.0)
            from trl.trainer.distillation_trainer import _chunked_divergence_loss

            every = torch.ones(1, n, device=dev)
            providers["trl-chunked-divergence"] = lambda xl, wl: _chunked_divergence_loss(
                xl[None], th[None], wl, tw, every, beta)[0]
        except ImportError:
            pass
    rows = []
    for name, fn in providers.items():
        try:
            run = runner(fn)
            _, peak = peak_memory_bytes(run, dev)
            rows.append(dict(provider=name, fwd_bwd_ms=time_ms(run, dev, args.repeat), peak_mib=peak / 2**20))
        except Exception as e:  # a peer whose API differs is reported, not fatal
            rows.append(dict(provider=name, fwd_bwd_ms=float("nan"), peak_mib=float("nan"),
                             note=f"{type(e).__name__}: {str(e)[:80]}"))
    print(f"{device_name(dev)} | distillation fwd+bwd, N={n} H={h} V={v} {args.dtype}, teacher of the same shape, "
          f"{args.kd_loss} + CE")
    for r in rows:
        print(f"{r['provider']:<18}{r['fwd_bwd_ms']:10.0f} ms{r['peak_mib']:10.0f} MiB  {r.get('note', '')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
