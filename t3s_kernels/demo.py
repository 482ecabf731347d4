"""``t3s demo``: the whole T3S pipeline on a toy where imitation shock can appear, over seeds,
against the baselines, on CPU.

The task: a running sum mod 10. A prompt ``Q d1 .. d5 ANS`` (five digits) is answered by the five
running sums ``s1 .. s5`` (``s_i = d1 + .. + d_i mod 10``) and ``<eos>``; the final answer is ``s5``.

* The **base** student (theta_0, a tiny Qwen3) is trained in its own style, where a filler token
  ``F`` (think "wait") follows a step now and then (5% of the gaps between sums). It solves the
  task almost perfectly and, decoding greedily, never emits the filler.
* The **teacher's traces** (200 training prompts, never seen by the base) are correct and put the
  filler in half of the gaps: a style shift made of a token the base already knows.
* **Held-out** prompts (200 per seed) are disjoint from everything the base and the pilot saw.

Why the mechanism can appear here. The filler is an *imitation anchor* by construction: its
confidence starts low (about log 0.05) and rises fast, since it only needs "a filler is likely
here", and at theta_0 its gradient is large (1 - p is about 0.95 against about 0.01 for a sum the base
already predicts). It points against the sums' gradient: raising p(F) after a sum lowers p(next
sum) at the same kind of position. The sums that follow a filler are the *yet-to-learn* tokens:
computing ``s_i`` after a filler needs the step count, not the position, which the base rarely
needed. Once greedy decoding starts emitting fillers, its answers break until that is learned:
a dip in the model's own accuracy, although every training token is correct. T3S drops the
tokens whose confidence rose by the dip (mostly the fillers) from the loss, keeping them as
context, so the student learns from the sums inside the teacher's traces without taking on the
filler habit. Whether this happens, and whether it helps on held-out prompts, is measured below.

Per seed (the training prompts, the filler placement and the data order change; the base is one
model, as in the paper): the pilot is plain SFT on the traces with a checkpoint every ``every``
steps and the training accuracy (greedy answers, final-answer verifier) at each; the bottleneck
is the argmin; every checkpoint's traces are scored with the fused forward; then five arms train
the same steps from theta_0, on the same data order, with the loss divided by the kept count
(anchors as if labelled -100):

* ``plain_sft``: every answer token (the pilot run itself);
* ``t3s``: the AR rule (drop tokens with dc > 0);
* ``random``: a random keep-mask of T3S's kept fraction;
* ``inverse``: the anchors only (the paper's collapsing control);
* ``static_confidence``: keep the T3S kept fraction of tokens with the highest *base* confidence
  (a selection from theta_0 alone, no trajectory).

And at theta_0: the gradients of the mean loss over the anchors and over the other tokens (all
training traces in one batch): the ratio of their norms and their cosine.
"""

from __future__ import annotations

import copy
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .extras import pyplot
from .patching import apply_t3s
from .pipeline.accuracy import generation_accuracy
from .pipeline.bottleneck import TroughDetector, find_bottleneck, plot_accuracy
from .pipeline.data import IGNORE, Example
from .pipeline.scoring import score_dataset
from .pipeline.selection import plot_selection, select
from .pipeline.store import ScoreStore, atomic_write_bytes, writable_folder
from .trainer_utils import T3SDataCollator

PAD, EOS, Q, ANS, FILLER, DIGIT0 = 0, 1, 2, 3, 4, 10  # digit d is token DIGIT0 + d
VOCAB, DIGITS = 24, 5
# The tasks: "style", the traces add only the filler style to problems the base solves; "new_skill", half
# of the training and held-out problems have HARD_DIGITS digits, which the base (trained on DIGITS) never
# saw, so the traces also teach something it cannot yet do.
TASKS = {"style": 0.0, "new_skill": 0.5}
HARD_DIGITS = 7
BASE_FILLER_RATE, TEACHER_FILLER_RATE = 0.05, 0.5
FINAL_ANSWER = r"regex:\b(1\d)\b"  # the last digit token of the answer (token ids as text)
BASE_TARGET = 0.95
ARMS = ("plain_sft", "t3s", "random", "inverse", "static_confidence")


@dataclass(frozen=True)
class DemoConfig:
    seeds: int
    base_steps: int  # at most; the base trains until BASE_TARGET of its answers are right
    pilot_steps: int  # also every arm's steps (at batch 64 over 200 traces, 3 steps are about an epoch)
    every: int  # checkpoint interval of the pilot
    prompts: int = 200
    heldout: int = 200
    batch_size: int = 64
    base_lr: float = 3e-3
    lr: float = 3e-4
    hidden_size: int = 64
    layers: int = 2


CONFIGS = {
    "quick": DemoConfig(seeds=2, base_steps=100, pilot_steps=12, every=3, prompts=64, heldout=64),  # a smoke run
    "default": DemoConfig(seeds=5, base_steps=800, pilot_steps=48, every=3),  # about 16 epochs, as in the paper
    "full": DemoConfig(seeds=10, base_steps=800, pilot_steps=150, every=5),
}


class _Done(Exception):
    """Stops a training loop from its step callback."""


def running_sums(digits) -> list[int]:
    out, s = [], 0
    for d in digits:
        s = (s + d) % 10
        out.append(s)
    return out


def trace(ex_id: str, digits, filler_rate: float, rng: random.Random) -> Example:
    """``Q d1..d5 ANS s1 [F] s2 [F] .. s5 <eos>``, a filler in each gap with probability ``filler_rate``."""
    prompt = [Q] + [DIGIT0 + d for d in digits] + [ANS]
    answer = []
    for i, s in enumerate(running_sums(digits)):
        if i and rng.random() < filler_rate:
            answer.append(FILLER)
        answer.append(DIGIT0 + s)
    answer.append(EOS)
    return Example(ex_id, prompt + answer, [IGNORE] * len(prompt) + answer)


def _batches(model, examples: list[Example], keep: Optional[list[list[bool]]], batch_size: int,
             rng: random.Random):
    """Shuffled epochs of full batches (the last one wraps into the next epoch), padded by the
    library's collator: a dropped token (keep False) gets label -100, as the method's loss means."""
    collate = T3SDataCollator(PAD, model=model)
    for idx in batch_indices(len(examples), batch_size, rng):
        yield collate([{"input_ids": examples[i].input_ids, "labels": examples[i].labels,
                        **({} if keep is None else {"t3s_weights": keep[i]})} for i in idx])


def batch_indices(n: int, batch_size: int, rng: random.Random):
    """Shuffled epochs of ``n`` examples' indices in full batches (the last one wraps into the next epoch)."""
    order = list(range(n))
    while True:
        rng.shuffle(order)
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            if len(idx) < batch_size:
                idx += order[:batch_size - len(idx)]
            yield idx


def train(model, examples: list[Example], steps: int, *, lr: float, batch_size: int, seed: int,
          keep: Optional[list[list[bool]]] = None, on_step=None):
    """AdamW on the patched model's loss: the sum over kept labelled tokens / their count."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    data = _batches(model, examples, keep, batch_size, random.Random(seed))
    model.train()
    for step in range(1, steps + 1):
        loss = model(**next(data)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step:
            on_step(step, model)
    return model


def answer_accuracy(model, examples: list[Example]) -> tuple[float, float]:
    """(share of greedy answers whose final digit is right, fillers emitted per answer)."""
    result = generation_accuracy(model, examples, verifier=FINAL_ANSWER, eos_token_id=EOS, pad_token_id=PAD,
                                 batch_size=len(examples), slack=HARD_DIGITS, progress=False)
    fillers = sum(p.count(FILLER) for p in result.predictions.values()) / len(examples)
    return result.accuracy, fillers


def gradient_conflict(model, examples: list[Example], anchors: list[list[bool]]) -> dict:
    """At the model's parameters: g_A, g_O = gradients of the mean loss over the anchors / the other
    labelled tokens (every example in one batch). Returns |g_A| / |g_O| and cos(g_A, g_O)."""
    others = [[y != IGNORE and not a for y, a in zip(ex.labels, m)] for ex, m in zip(examples, anchors)]
    grads = []
    for keep in (anchors, others):
        batch = next(_batches(model, examples, keep, len(examples), random.Random(0)))
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        model.zero_grad(set_to_none=True)
    g_a, g_o = grads
    return {"norm_ratio": float(g_a.norm() / g_o.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(g_a, g_o, dim=0))}


def _fresh(base, state):
    model = copy.deepcopy(base)
    model.load_state_dict(state)
    return model


def seed_traces(pool: list[tuple[int, ...]], seed: int, cfg: DemoConfig,
                hard_pool: Optional[list[tuple[int, ...]]] = None,
                hard_share: float = 0.0) -> tuple[list[Example], list[Example]]:
    """A seed's teacher traces (``cfg.prompts``, fillers in TEACHER_FILLER_RATE of gaps) and held-out
    problems (``cfg.heldout``, no fillers), disjoint, drawn from ``pool`` (and ``hard_pool``, for
    ``hard_share`` of each)."""
    rng = random.Random(seed)
    n_hard = [round(hard_share * n) for n in (cfg.prompts, cfg.heldout)]
    easy = rng.sample(pool, cfg.prompts + cfg.heldout - sum(n_hard))
    hard = rng.sample(hard_pool, sum(n_hard)) if sum(n_hard) else []
    train_part = easy[:cfg.prompts - n_hard[0]] + hard[:n_hard[0]]
    held_part = easy[cfg.prompts - n_hard[0]:] + hard[n_hard[0]:]
    rng.shuffle(train_part)
    problems = train_part + held_part
    traces = [trace(f"s{seed}-train-{i}", p, TEACHER_FILLER_RATE, rng)
              for i, p in enumerate(problems[:cfg.prompts])]
    heldout = [trace(f"s{seed}-heldout-{i}", p, 0.0, rng) for i, p in enumerate(problems[cfg.prompts:])]
    return traces, heldout


@dataclass
class Pilot:
    """Plain SFT on the traces from theta_0, with its checkpoints and training accuracy at each."""

    model: torch.nn.Module
    checkpoints: dict  # name -> state dict, "base" first
    table: list  # (name, training accuracy)
    fillers: list  # fillers per answer at each checkpoint
    trough: str  # the trough detector's verdict
    bottleneck: str
    bottleneck_accuracy: float


def run_pilot(base, base_state, traces: list[Example], seed: int, cfg: DemoConfig) -> Pilot:
    """The pilot: plain SFT on the traces, a checkpoint (and the model's own training accuracy) every
    ``cfg.every`` steps; the bottleneck is the argmin."""
    base_acc, base_fillers = answer_accuracy(_fresh(base, base_state), traces)
    checkpoints = {"base": base_state}
    table = [("base", base_acc)]
    fillers = [base_fillers]
    detector = TroughDetector(patience=2, min_rise=0.05, min_dip=0.05, base_accuracy=base_acc)

    def checkpoint(step, model):
        if step % cfg.every == 0:
            name = f"step-{step}"
            checkpoints[name] = copy.deepcopy(model.state_dict())
            acc, n_fill = answer_accuracy(model, traces)
            table.append((name, acc))
            fillers.append(n_fill)
            detector.update(step, acc)

    model = train(_fresh(base, base_state), traces, cfg.pilot_steps, lr=cfg.lr, batch_size=cfg.batch_size,
                  seed=seed, on_step=checkpoint)
    bottleneck, bottleneck_acc = find_bottleneck(table)
    return Pilot(model, checkpoints, table, fillers, detector.verdict(), bottleneck, bottleneck_acc)


NO_BOTTLENECK = ("training accuracy never fell below the base's: there is no bottleneck, so T3S and its controls "
                 "do not apply to this seed")


def score_checkpoints(base, base_state, traces: list[Example], checkpoints: dict, folder: Path) -> ScoreStore:
    """Every checkpoint's traces scored into ``folder`` (the fused forward: one log-probability per token,
    no logits), each under its name."""
    store = ScoreStore(folder)
    scorer = _fresh(base, base_state)
    for name, state in checkpoints.items():
        scorer.load_state_dict(state)
        score_dataset(scorer, traces, store, name, progress=False)
    return store


def run_seed(base, base_state, pool: list[tuple[int, ...]], seed: int, cfg: DemoConfig, out: Path,
             hard_pool: Optional[list[tuple[int, ...]]] = None, hard_share: float = 0.0) -> dict:
    traces, heldout = seed_traces(pool, seed, cfg, hard_pool, hard_share)
    base_model = _fresh(base, base_state)
    pilot = run_pilot(base, base_state, traces, seed, cfg)
    table, bottleneck, checkpoints = pilot.table, pilot.bottleneck, pilot.checkpoints
    base_acc = table[0][1]
    result = {"seed": seed, "training_accuracy": table, "fillers_per_answer": pilot.fillers, "bottleneck": bottleneck,
              "trough": pilot.trough}
    heldout_acc = {"base": answer_accuracy(base_model, heldout)[0],
                   "plain_sft": answer_accuracy(pilot.model, heldout)[0]}
    result["heldout_accuracy"] = heldout_acc
    if bottleneck == "base":
        result["no_selection"] = NO_BOTTLENECK
        return result

    store = score_checkpoints(base, base_state, traces, checkpoints, out / f"store-seed{seed}")
    base_set, bottleneck_set = store.load("base"), store.load(bottleneck)
    t3s_sel = select("ar", base_set, bottleneck_set)
    keep_fraction = t3s_sel.summary(base_set.values["scored"])["fraction_selected"]
    selections = {
        "t3s": t3s_sel,
        "random": select("random", base_set, budget=keep_fraction, seed=seed),
        "inverse": select("inverse", base_set, bottleneck_set),
        "static_confidence": select("confidence_high", base_set, budget=keep_fraction),
    }
    scored = base_set.values["scored"]
    anchors = scored & ~t3s_sel.mask
    anchor_masks = [anchors[t3s_sel.offsets[i]:t3s_sel.offsets[i + 1]].tolist() for i in range(len(traces))]
    tokens = torch.cat([torch.tensor(ex.input_ids) for ex in traces])
    anchor_tokens = tokens[anchors]
    static_dropped = tokens[scored & ~selections["static_confidence"].mask]
    result.update(
        kept_fraction=keep_fraction,
        anchors={"share_of_labelled": float(anchors.sum() / scored.sum()),
                 "fillers": int((anchor_tokens == FILLER).sum()), "digits": int((anchor_tokens >= DIGIT0).sum()),
                 "eos": int((anchor_tokens == EOS).sum()),
                 "fillers_among_anchors": float((anchor_tokens == FILLER).float().mean()) if anchor_tokens.numel()
                 else 0.0},
        fillers_among_static_drops=float((static_dropped == FILLER).float().mean()) if static_dropped.numel()
        else 0.0,
        gradients_at_base=gradient_conflict(_fresh(base, base_state), traces, anchor_masks))

    t3s_curve = [("base", base_acc)]
    for arm, sel in selections.items():
        keep = [sel.example(i).tolist() for i in range(len(traces))]
        on_step = None
        if arm == "t3s":
            def on_step(step, model):
                if step % cfg.every == 0:
                    t3s_curve.append((f"step-{step}", answer_accuracy(model, traces)[0]))
        model = train(_fresh(base, base_state), traces, cfg.pilot_steps, lr=cfg.lr, batch_size=cfg.batch_size,
                      seed=seed, keep=keep, on_step=on_step)
        heldout_acc[arm] = answer_accuracy(model, heldout)[0]
    result["t3s_training_accuracy"] = t3s_curve
    if seed == 0 or not (out / "dc_hist.png").exists():
        result["plots"] = _plot_seed(base_set, bottleneck_set, [store.load(n) for n in checkpoints], anchors,
                                     table, bottleneck, out)
    return result


def _plot_seed(base_set, bottleneck_set, sets, anchors, table, bottleneck, out: Path) -> list[str]:
    try:
        paths = plot_selection(base_set, bottleneck_set, sets, anchors, str(out))
        paths.append(plot_accuracy(table, str(out / "training_accuracy.png"), bottleneck))
    except ImportError:
        return []
    return paths


def plot_heldout(ax, seeds: list[dict], arms: tuple, ylabel: str, title: str, rotation: int = 0) -> None:
    """Each seed's held-out accuracy of each arm as a dot, the mean over seeds as a bar, on ``ax``."""
    for k, arm in enumerate(arms):
        values = [s["heldout_accuracy"][arm] for s in seeds if arm in s["heldout_accuracy"]]
        ax.scatter([k] * len(values), values, alpha=0.6)
        if values:
            ax.plot([k - 0.3, k + 0.3], [statistics.mean(values)] * 2, "k-")
    ax.set_xticks(range(len(arms)), arms, rotation=rotation, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)


def resolve_config(configs: dict, size: str, seeds: Optional[int]):
    """The configuration of ``size`` from ``configs`` (a frozen dataclass each), with ``seeds`` in place of
    its own where given."""
    if size not in configs:
        raise ValueError(f"size must be one of {sorted(configs)}; got {size!r}")
    cfg = configs[size]
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1; got {seeds}")
        cfg = type(cfg)(**{**asdict(cfg), "seeds": seeds})
    return cfg


def save_figure(plt, fig, path: Path) -> list[str]:
    """``fig`` laid out and written to ``path`` (120 dpi), then closed; [the path]."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [str(path)]


def _plot_arms(seeds: list[dict], out: Path) -> list[str]:
    try:
        plt = pyplot("the demo's plots")
    except ImportError:
        return []
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    plot_heldout(left, seeds, ("base",) + ARMS, "held-out accuracy", "each dot a seed, bar the mean", rotation=30)
    for s in seeds:
        steps = [0] + [int(n.split("-")[1]) for n, _ in s["training_accuracy"][1:]]
        right.plot(steps, [a for _, a in s["training_accuracy"]], "-", color="tab:red", alpha=0.5)
        if s.get("t3s_training_accuracy"):
            right.plot(steps, [a for _, a in s["t3s_training_accuracy"]], "-", color="tab:blue", alpha=0.5)
    right.plot([], [], color="tab:red", label="plain SFT (the pilot)")
    right.plot([], [], color="tab:blue", label="T3S retrain")
    right.set_xlabel("step")
    right.set_ylabel("training accuracy (own answers)")
    right.legend(fontsize=8)
    return save_figure(plt, fig, out / "arms.png")


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _verdict(seeds: list[dict]) -> list[str]:
    n = len(seeds)
    dips = [s["training_accuracy"][0][1] - dict(s["training_accuracy"])[s["bottleneck"]] for s in seeds]
    lines = [f"- Imitation dip: the pilot's training accuracy fell by ≥ 0.05 below the base's in "
             f"{sum(d >= 0.05 for d in dips)} of {n} seeds (mean fall {statistics.mean(dips):.3f}); "
             f"a trough confirmed (dip, then a rise by 0.05 for two evaluations) in "
             f"{sum(s['trough'].startswith('trough confirmed') for s in seeds)} of {n}."]
    with_sel = [s for s in seeds if "t3s" in s["heldout_accuracy"]]
    if not with_sel:
        return lines + ["- No seed had a bottleneck after the base, so T3S could not be applied: no verdict on it."]
    lines.append(f"- What T3S drops: fillers are {_mean_sd([s['anchors']['fillers_among_anchors'] for s in with_sel])} "
                 f"of the anchors (dc > 0); of the tokens the static-confidence rule drops (lowest base confidence, "
                 f"same count) {_mean_sd([s['fillers_among_static_drops'] for s in with_sel])} are fillers.")
    grads = [s["gradients_at_base"] for s in with_sel]
    ratio = statistics.mean(g["norm_ratio"] for g in grads)
    cosine = statistics.mean(g["cosine"] for g in grads)
    lines.append(f"- Gradients at theta_0: anchors/others norm ratio {ratio:.1f} on average, cosine {cosine:+.2f} "
                 + ("(larger and opposed, as the paper reports)." if ratio > 1 and cosine < 0 else
                    "(not the paper's picture of larger, opposed anchor gradients)."))
    for other in ("plain_sft", "base", "random", "inverse", "static_confidence"):
        lines.append(compare("T3S", other, [s["heldout_accuracy"]["t3s"] - s["heldout_accuracy"][other]
                                            for s in with_sel]))
    return lines


def compare(arm: str, other: str, diffs: list[float], sd: bool = False) -> str:
    """One verdict line from the per-seed held-out differences ``arm - other``: "beats" / "loses to" only
    when every seed agrees, the wins and losses, the mean difference (± its sd over seeds, with ``sd``)."""
    wins = sum(d > 0 for d in diffs)
    losses = sum(d < 0 for d in diffs)
    mean = statistics.mean(diffs)
    word = ("beats" if wins == len(diffs) and mean > 0 else
            "loses to" if losses == len(diffs) and mean < 0 else "does not reliably beat")
    spread = f" ± {statistics.stdev(diffs):.3f}" if sd and len(diffs) > 1 else ""
    return (f"- {arm} {word} {other} on held-out prompts: better in {wins}, worse in {losses} of "
            f"{len(diffs)} seeds, mean difference {mean:+.3f}{spread}.")


def problem_pools() -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The problems no base ever sees, that every seed draws its training and held-out prompts from:
    DIGITS-digit ones and HARD_DIGITS-digit ones."""
    pool_rng = random.Random(12345)
    pool = sorted({tuple(pool_rng.randrange(10) for _ in range(DIGITS)) for _ in range(4000)})
    hard_pool = sorted({tuple(pool_rng.randrange(10) for _ in range(HARD_DIGITS)) for _ in range(4000)})
    return pool, hard_pool


def base_style_data(n: int, reserved: set, *, check: int = 200) -> tuple[list[Example], list[Example]]:
    """(``check`` traces to judge a base by, ``n`` to train it on): the base's own style (fillers in
    BASE_FILLER_RATE of gaps), on DIGITS-digit problems outside ``reserved``."""
    rng = random.Random(0)
    data = []
    while len(data) < n + check:
        digits = tuple(rng.randrange(10) for _ in range(DIGITS))
        if digits not in reserved:
            data.append(trace(f"base-{len(data)}", digits, BASE_FILLER_RATE, rng))
    return data[:check], data[check:]


def train_base(cfg: DemoConfig, reserved: set):
    """theta_0, the causal base student (a tiny Qwen3, patched): trained in its own style until BASE_TARGET
    of its answers are right (checked every 50 steps), at most ``cfg.base_steps`` steps, on problems outside
    ``reserved``. Returns (model, its state dict, [(step, accuracy)])."""
    from .toy import tiny_causal_lm

    print(f"[t3s demo] base student theta_0: its own style (fillers in {BASE_FILLER_RATE:.0%} of gaps), trained "
          f"until {BASE_TARGET:.0%} of its answers are right (at most {cfg.base_steps} steps)")
    torch.manual_seed(0)
    # Running sums are learned in a sudden transition whose time varies with the initialisation;
    # the base is trained to a stated accuracy, not for a fixed number of steps.
    base = apply_t3s(tiny_causal_lm("qwen3", seed=1, vocab_size=VOCAB, hidden_size=cfg.hidden_size,
                                    num_hidden_layers=cfg.layers, intermediate_size=2 * cfg.hidden_size))
    base_check, base_data = base_style_data(cfg.base_steps * cfg.batch_size, reserved)
    return train_to_target(base, train, base_data, lambda model: answer_accuracy(model, base_check)[0], cfg, "base")


def train_to_target(model, train_fn, data: list, accuracy, cfg, desc: str) -> tuple:
    """``train_fn(model, data, ...)`` at ``cfg``'s base steps, learning rate and batch, stopped once
    ``accuracy(model)``, read every 50 steps, reaches ``BASE_TARGET``. Returns (model, its state dict,
    [(step, accuracy)])."""
    from tqdm.auto import tqdm

    log = []
    bar = tqdm(total=cfg.base_steps, desc=desc, leave=False)

    def until_target(step, m):
        bar.update(1)
        if step % 50 == 0:
            log.append((step, accuracy(m)))
            if log[-1][1] >= BASE_TARGET:
                raise _Done

    try:
        train_fn(model, data, cfg.base_steps, lr=cfg.base_lr, batch_size=cfg.batch_size, seed=0,
                 on_step=until_target)
    except _Done:
        pass
    bar.close()
    return model, copy.deepcopy(model.state_dict()), log


def run_demo(out_dir: str = "t3s-demo", *, size: str = "default", seeds: Optional[int] = None,
             task: str = "style") -> dict:
    """Run the demo at ``size`` ("quick", "default", "full") on ``task`` (``TASKS``); write report.md /
    report.json / plots."""
    from tqdm.auto import tqdm

    cfg = resolve_config(CONFIGS, size, seeds)
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}; got {task!r}")
    t_start = time.time()
    out = writable_folder(out_dir, "--out")
    pool, hard_pool = problem_pools()
    base, base_state, base_log = train_base(cfg, set(pool))

    seed_results = []
    for seed in tqdm(range(cfg.seeds), desc="seeds (pilot, scoring, 5 arms)"):
        seed_results.append(run_seed(base, base_state, pool, seed, cfg, out, hard_pool, TASKS[task]))
    plots = [p for s in seed_results for p in s.pop("plots", [])] + _plot_arms(seed_results, out)
    verdict = _verdict(seed_results)
    result = {"config": {"size": size, "task": task, **asdict(cfg)}, "base_training": base_log, "seeds": seed_results,
              "verdict": verdict, "plots": [Path(p).name for p in plots], "seconds": round(time.time() - t_start, 1)}
    atomic_write_bytes(out / "report.json", json.dumps(result, indent=2).encode())
    report = _report(result)
    atomic_write_bytes(out / "report.md", report.encode())
    print(report)
    print(f"\nwrote {out / 'report.md'}")
    return result


def heldout_table(seeds: list[dict], arms: tuple) -> list[str]:
    """The report's table of held-out accuracy: a row per seed, a column per arm, and the mean ± sd."""
    lines = ["| seed | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for s in seeds:
        row = [f"{s['heldout_accuracy'][a]:.3f}" if a in s["heldout_accuracy"] else "—" for a in arms]
        lines.append(f"| {s['seed']} | " + " | ".join(row) + " |")
    lines.append("| mean ± sd | " + " | ".join(
        _mean_sd([s["heldout_accuracy"][a] for s in seeds if a in s["heldout_accuracy"]]) for a in arms) + " |")
    return lines


def _report(result: dict) -> str:
    cfg, seeds = result["config"], result["seeds"]
    hard_share = TASKS[cfg.get("task", "style")]
    base_steps, base_acc = result["base_training"][-1] if result["base_training"] else (cfg["base_steps"], "n/a")
    arms = ("base",) + ARMS
    lines = [
        "# t3s demo report", "",
        f"Task: running sum mod 10 over {DIGITS} digits"
        + (f" (and, in {hard_share:.0%} of the training and held-out problems, {HARD_DIGITS} digits, which the base "
           "never saw)" if hard_share else "")
        + ", final answer judged. Base style: fillers in "
        f"{BASE_FILLER_RATE:.0%} of gaps (one base, {base_steps} steps, {base_acc} of its answers right on "
        f"problems of its own distribution); teacher traces: fillers in "
        f"{TEACHER_FILLER_RATE:.0%} of gaps, {cfg['prompts']} training prompts per seed, {cfg['heldout']} held-out "
        f"prompts disjoint from the base's and the pilot's. Tiny Qwen3 ({cfg['layers']} layers, hidden "
        f"{cfg['hidden_size']}); every arm {cfg['pilot_steps']} steps at batch {cfg['batch_size']}, lr {cfg['lr']}, "
        f"from theta_0; pilot checkpoints every {cfg['every']} steps. {len(seeds)} seeds. The design and why the "
        "mechanism can appear: `t3s_kernels/demo.py`.", "",
        "## Held-out accuracy (greedy answers, final digit)", "",
    ] + heldout_table(seeds, arms)
    lines += ["", "## Pilot (plain SFT) and selection, per seed", "",
              "| seed | base train acc | bottleneck | acc there | trough | fillers/answer there | T3S kept | "
              "anchors: fillers / digits / eos | grad norm ratio | cosine |", "|---" * 10 + "|"]
    for s in seeds:
        names = [n for n, _ in s["training_accuracy"]]
        at = names.index(s["bottleneck"])
        if "anchors" in s:
            a, g = s["anchors"], s["gradients_at_base"]
            sel = (f"{s['kept_fraction']:.1%} | {a['fillers']} / {a['digits']} / {a['eos']} | "
                   f"{g['norm_ratio']:.1f} | {g['cosine']:+.2f}")
        else:
            sel = "— | — | — | —"
        lines.append(f"| {s['seed']} | {s['training_accuracy'][0][1]:.3f} | {s['bottleneck']} | "
                     f"{s['training_accuracy'][at][1]:.3f} | {s['trough']} | {s['fillers_per_answer'][at]:.2f} | "
                     + sel + " |")
    lines += ["", "Training accuracy of the pilot (seed by seed): "] + [
        f"- seed {s['seed']}: " + ", ".join(f"{n} {a:.2f}" for n, a in s["training_accuracy"]) for s in seeds]
    lines += ["", "## Verdict (what the numbers say)", ""] + result["verdict"] + [
        "", "Plots: " + (", ".join(f"`{p}`" for p in result["plots"]) or "none (matplotlib is not installed)") + ".",
        "", f"Ran in {result['seconds']} s."]
    return "\n".join(lines)
