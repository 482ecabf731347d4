"""``t3s demo``: the whole T3S pipeline, end to end, on CPU in a few minutes.

The toy: a tiny Qwen3 learns two-number addition. Its *base* (theta_0) is trained on a
direct answer style, ``Q a b ans c <eos>``. The *teacher's traces* spell out a longer
style, ``Q a b so a then b thus ans c <eos>``, for 200 training prompts. Then, as the paper
does: a pilot SFT on the traces with checkpoints and training accuracy (greedy decoding,
exact answer) at each; the bottleneck (argmin); scoring of every training trace under
theta_0 and the bottleneck (the fused forward); the AR rule (drop tokens whose confidence
rose, dc > 0); a retrain from theta_0 with that mask; held-out accuracy of base, plain SFT
and T3S. Everything is written to the output folder: report.md, report.json, plots, the
score store and the mask. Whether the toy reproduces the paper's effect is reported as
measured, not assumed.
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import torch

from .patching import apply_t3s
from .pipeline.bottleneck import find_bottleneck, plot_accuracy
from .pipeline.data import IGNORE, Example
from .pipeline.scoring import score_dataset
from .pipeline.selection import plot_selection, save_selection, select
from .pipeline.store import ScoreStore, atomic_write_bytes

PAD, EOS, Q, ANS, SO, THEN, THUS = 0, 1, 3, 4, 5, 6, 7
NUM0, MAX_OPERAND = 10, 19  # number n is token NUM0 + n; operands 0..19, sums 0..38
VOCAB = 64


def direct(a: int, b: int) -> list[int]:
    return [Q, NUM0 + a, NUM0 + b, ANS, NUM0 + a + b, EOS]


def verbose(a: int, b: int) -> list[int]:
    return [Q, NUM0 + a, NUM0 + b, SO, NUM0 + a, THEN, NUM0 + b, THUS, ANS, NUM0 + a + b, EOS]


def _batches(seqs: list[list[int]], weights, batch_size: int, rng: random.Random):
    order = list(range(len(seqs)))
    while True:
        rng.shuffle(order)
        for k in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[k:k + batch_size]
            longest = max(len(seqs[i]) for i in idx)
            ids = torch.full((batch_size, longest), PAD)
            labels = torch.full((batch_size, longest), IGNORE)
            w = torch.zeros(batch_size, longest, dtype=torch.bool)
            for r, i in enumerate(idx):
                s = torch.tensor(seqs[i])
                ids[r, :len(s)] = s
                labels[r, 3:len(s)] = s[3:]  # the prompt (Q a b) is never a target
                w[r, :len(s)] = True if weights is None else torch.tensor(weights[i])
            yield ids, labels, w


def train(model, seqs, steps: int, *, weights=None, lr: float = 3e-3, batch_size: int = 32, seed: int = 0,
          on_step=None):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    data = _batches(seqs, weights, batch_size, random.Random(seed))
    model.train()
    for step in range(1, steps + 1):
        ids, labels, w = next(data)
        loss = model(input_ids=ids, labels=labels, t3s_weights=w if weights is not None else None).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step:
            on_step(step, model)
    return model


@torch.no_grad()
def accuracy(model, pairs: list[tuple[int, int]], max_new: int = 10) -> float:
    """Greedy-decode each prompt; correct when the token after the first ``ans`` is the sum."""
    model.eval()
    ids = torch.tensor([[Q, NUM0 + a, NUM0 + b] for a, b in pairs])
    for _ in range(max_new):
        nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    correct = 0
    for row, (a, b) in zip(ids[:, 3:].tolist(), pairs):
        if ANS in row and row.index(ANS) + 1 < len(row) and row[row.index(ANS) + 1] == NUM0 + a + b:
            correct += 1
    model.train()
    return correct / len(pairs)


def run_demo(out_dir: str = "t3s-demo", *, quick: bool = False, seed: int = 0) -> dict:
    from .toy import tiny_causal_lm

    t_start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = dict(base=400, pilot=150, every=10, retrain=300) if not quick else \
        dict(base=150, pilot=40, every=10, retrain=40)
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    rng.shuffle(pairs)
    train_pairs, heldout = pairs[:200], pairs[200:300]

    print("[1/6] base student theta_0: the direct answer style, all operand pairs")
    base = apply_t3s(tiny_causal_lm("qwen3", seed=seed, vocab_size=VOCAB, num_hidden_layers=2, hidden_size=64))
    train(base, [direct(a, b) for a, b in pairs], steps["base"], seed=seed)
    base_state = copy.deepcopy(base.state_dict())

    print(f"[2/6] pilot SFT on the teacher's traces, a checkpoint every {steps['every']} steps")
    traces = [verbose(a, b) for a, b in train_pairs]
    checkpoints = {"base": copy.deepcopy(base_state)}
    table = [("base", accuracy(base, train_pairs))]

    def keep(step, model):
        if step % steps["every"] == 0:
            checkpoints[f"step-{step}"] = copy.deepcopy(model.state_dict())
            table.append((f"step-{step}", accuracy(model, train_pairs)))

    pilot = copy.deepcopy(base)
    train(pilot, traces, steps["pilot"], seed=seed + 1, on_step=keep)
    bottleneck, bottleneck_acc = find_bottleneck(table)
    print("      training accuracy: " + ", ".join(f"{n} {a:.2f}" for n, a in table))
    print(f"      bottleneck: {bottleneck} ({bottleneck_acc:.2f})")

    print("[3/6] scoring every trace under each checkpoint (fused forward, no logits)")
    store = ScoreStore(out / "store")
    examples = [Example(f"train-{i}", s, [IGNORE] * 3 + s[3:]) for i, s in enumerate(traces)]
    scorer = copy.deepcopy(base)
    for name, state in checkpoints.items():
        scorer.load_state_dict(state)
        score_dataset(scorer, examples, store, name, progress=False)

    print("[4/6] selection: the AR rule (drop imitation anchors, dc > 0)")
    base_set, bott_set = store.load("base"), store.load(bottleneck)
    sel = select("ar", base_set, bott_set)
    summary = save_selection(sel, str(out / "selection"), base_set.values["scored"])
    anchors = base_set.values["scored"] & ~sel.mask
    plots = plot_selection(base_set, bott_set, [store.load(n) for n in checkpoints], anchors, str(out))
    plots.append(plot_accuracy(table, str(out / "training_accuracy.png"), bottleneck))
    kinds = {SO: "so", THEN: "then", THUS: "thus", ANS: "ans", EOS: "<eos>"}
    anchor_tokens: dict[str, int] = {}
    for i, ex in enumerate(examples):
        a = anchors[sel.offsets[i]:sel.offsets[i + 1]]
        for t, is_anchor in zip(ex.input_ids, a.tolist()):
            if is_anchor:
                key = kinds.get(t, "number")
                anchor_tokens[key] = anchor_tokens.get(key, 0) + 1

    print("[5/6] retraining from theta_0 with the mask (T3S); plain SFT for comparison")
    weights = [sel.example(i).tolist() for i in range(len(examples))]
    t3s_model = copy.deepcopy(base)
    t3s_model.load_state_dict(base_state)
    train(t3s_model, traces, steps["retrain"], weights=weights, seed=seed + 2)
    sft_model = copy.deepcopy(base)
    sft_model.load_state_dict(base_state)
    train(sft_model, traces, steps["retrain"], seed=seed + 2)

    print("[6/6] held-out accuracy")
    result = {
        "heldout_accuracy": {"base": accuracy(base, heldout), "plain_sft": accuracy(sft_model, heldout),
                             "t3s": accuracy(t3s_model, heldout)},
        "training_accuracy_curve": table, "bottleneck": bottleneck,
        "selection": {k: v for k, v in summary.items() if k != "per_example"},
        "anchor_tokens_by_kind": anchor_tokens, "steps": steps, "seed": seed,
        "plots": [str(Path(p).name) for p in plots], "seconds": round(time.time() - t_start, 1),
    }
    acc = result["heldout_accuracy"]
    dip = table[0][1] - bottleneck_acc
    verdict = ("the pilot run shows an imitation dip" if dip > 0.05 else
               "the pilot run shows no clear imitation dip on this toy")
    effect = ("T3S beats plain SFT on held-out prompts" if acc["t3s"] > acc["plain_sft"] + 0.02 else
              "T3S does not beat plain SFT here" if acc["t3s"] < acc["plain_sft"] - 0.02 else
              "T3S and plain SFT are level here")
    result["verdict"] = f"{verdict} (base {table[0][1]:.2f} -> {bottleneck_acc:.2f} at {bottleneck}); {effect}."
    report = [
        "# t3s demo report", "",
        f"Toy: two-number addition; base style `Q a b ans c`, teacher style `Q a b so a then b thus ans c`; "
        f"200 training prompts, 100 held out; tiny Qwen3 (2 layers, hidden 64). Steps: {steps}. Seed {seed}.", "",
        "| model | held-out accuracy |", "|---|---|",
        f"| base (theta_0) | {acc['base']:.2f} |", f"| plain SFT on the traces | {acc['plain_sft']:.2f} |",
        f"| T3S (AR rule, retrained from theta_0) | {acc['t3s']:.2f} |", "",
        "Training accuracy during the pilot SFT: " + ", ".join(f"{n} {a:.2f}" for n, a in table), "",
        f"Bottleneck: **{bottleneck}**. Tokens kept in the T3S loss: "
        f"{summary['fraction_selected']:.1%} of {summary['scored_tokens']} labelled tokens; "
        f"anchors dropped, by kind: {anchor_tokens}.", "",
        f"**What happened:** {result['verdict']}", "",
        "Plots: " + ", ".join(f"`{p}`" for p in result["plots"]) + ".", "",
        f"Ran in {result['seconds']} s.",
    ]
    atomic_write_bytes(out / "report.md", "\n".join(report).encode())
    atomic_write_bytes(out / "report.json", json.dumps(result, indent=2).encode())
    print("\n".join(report))
    print(f"\nwrote {out / 'report.md'}")
    return result
