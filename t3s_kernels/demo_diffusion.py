"""``t3s demo --student masked_diffusion``: the dLLM rule of T3S on the toy of ``demo.py``, over seeds,
against plain masked-diffusion training and a random force set, on CPU.

The task, the tokenizer and the traces are ``demo.py``'s: running sums mod 10 over five digits, a base
style with fillers in 5% of the gaps, teacher traces with fillers in half of them, 200 training and 200
held-out prompts per seed, the final digit judged. Two students share the tokenizer (token ``MASK``, an
id the demo's vocabulary leaves free, is the mask token; the causal student never sees it):

* **The selector** is the causal student of ``demo.py`` (a tiny Qwen3), as the paper's selector for a
  dLLM is an AR model of the same tokenizer family: its base, its pilot (plain SFT on the traces,
  checkpoints, training accuracy, the argmin as bottleneck) and its two scoring passes (theta_0 and the
  bottleneck) are ``demo.py``'s own functions. Selected ``S = {t : dc_t < -tau}`` (``select("dllm")``,
  tau 0.2): the yet-to-learn tokens, whose AR confidence fell by the bottleneck.
* **The student** is a masked-diffusion model: the same tiny Qwen3 with the causal mask off
  (``toy.tiny_bidirectional_lm``), patched with ``apply_t3s(model, mode="masked_diffusion")`` and trained
  by ``masked_diffusion_compute_loss`` on batches noised by ``noise_inputs``, with LLaDA 2.0's convention
  (``LLADA2``: one mask rate per sequence from U(0.3, 0.8), no 1/t weight, each sequence's masked mean;
  the paper's dLLM student is LLaDA-2.0-Mini). Answers are padded with ``<eos>`` to ``CANVAS`` positions,
  the padding labelled, as LLaDA pads its SFT data: the model learns where an answer ends. A force set
  reaches the loss as a user's would: ``attach_mask`` puts it in the ``t3s_force_mask`` column,
  ``T3SDataCollator`` pads it, ``noise_inputs`` unions it with the random corruption.
* **Decoding** is LLaDA's low-confidence remasking: the answer canvas starts fully masked; each step
  predicts every masked position and keeps the ``per_step`` most confident predictions (one by default),
  ``CANVAS`` steps in all. A running sum needs its previous sum. Measured on the dLLM base (96% of its
  answers right at one token a step): decoding every position in one step stays at chance (0.115), two a
  step gets 0.52. At one a step the decoder fills the ``<eos>`` padding at the end of the canvas first,
  then the sums, on average from left to right (the mean step at which sum i is unmasked: 3.8, 5.2, 6.4,
  7.6, 8.8).

Why LLaDA 2.0's convention rather than LLaDA 1's (t ~ U(0, 1), the 1/t weight, ``LLADA``): both learn the
task with this decoder, in a sudden transition whose time varies with the initialisation; in one run each
(same model, lr 3e-3, batch 64) LLaDA 2.0's reached 0.995 of its answers right by step 900, LLaDA 1's 0.925
by step 1,500 (and 0.12 at step 1,000), which would not fit the two minutes. The base is therefore
trained to a stated accuracy (``BASE_TARGET``), not for a fixed number of steps.

Per seed, three arms train the same steps from the one dLLM base, on the same data order and the same
random corruption (one generator seed per seed, so the arms differ only in the forced positions):

* ``plain``: masked-diffusion SFT on the traces, no force set;
* ``dllm``: T3S's rule: ``S`` forced into the mask, unioned with the random corruption;
* ``random_force``: as many forced positions in each sequence as ``S`` has there, drawn at random among
  its answer tokens (a control for "more masked tokens", the same size per sequence).

Every arm records, over its training batches, how many forced positions there were, how many of them
were masked, and what share of ``S``'s positions was masked: 1 for ``dllm`` by construction, the random
rate (about 0.55) for ``plain``.

What the mechanism can and cannot do here. Forcing ``S`` into the mask drops no token from the loss: it
makes the selected tokens targets at every step (and hides them as context). ``S`` is where the AR
pilot's confidence fell after the style shift: nearly all of it sums, a third of them right after a
filler, where the step count, not the position, gives the index of the next digit. The dLLM student
trained on the traces has the same shift to absorb (it starts emitting fillers and loses count after
them: its own imitation dip), so more gradient on exactly those positions could help it; whether it does,
beyond what as many random forced positions give, is what the arms measure. ``S`` comes from the causal
model's trajectory, not the dLLM's, as in the paper: where the two students find different tokens hard,
the forcing aims at the wrong place, and the numbers say so. On this toy the AR dip is deep (its
training accuracy falls to about 0.15), so tau 0.2 selects far more than the paper's 5.24%.
"""

from __future__ import annotations

import json
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .demo import (
    BASE_FILLER_RATE,
    BASE_TARGET,
    CONFIGS,
    DIGIT0,
    DIGITS,
    EOS,
    FILLER,
    FINAL_ANSWER,
    NO_BOTTLENECK,
    PAD,
    TEACHER_FILLER_RATE,
    VOCAB,
    _fresh,
    _mean_sd,
    base_style_data,
    batch_indices,
    compare,
    heldout_table,
    plot_heldout,
    problem_pools,
    resolve_config,
    run_pilot,
    save_figure,
    score_checkpoints,
    seed_traces,
    train_base,
    train_to_target,
)
from .extras import pyplot
from .masked_diffusion_trainer import LLADA2, masked_diffusion_compute_loss, noise_inputs
from .patching import apply_t3s
from .pipeline.accuracy import cut_at_eos, make_verifier, reference_answer
from .pipeline.data import IGNORE, Example
from .pipeline.selection import attach_mask, select
from .pipeline.store import atomic_write_bytes, writable_folder
from .trainer_utils import T3SDataCollator

MASK = 5  # free in demo.py's vocabulary (0-4 specials, 10-19 digits)
CANVAS = 2 * DIGITS  # answer positions: DIGITS sums, at most DIGITS - 1 fillers, <eos>
CONVENTION = LLADA2
ARMS = ("plain", "dllm", "random_force")


@dataclass(frozen=True)
class DiffusionConfig:
    seeds: int
    selector: str  # the demo.CONFIGS size of the AR selector (its base, pilot and prompts)
    base_steps: int  # at most; the dLLM base trains until BASE_TARGET of its answers are right
    steps: int  # every dLLM arm's steps
    every: int  # the arms' training accuracy is evaluated every this many steps
    batch_size: int = 64
    base_lr: float = 3e-3
    lr: float = 3e-4
    hidden_size: int = 64
    layers: int = 2
    tau: float = 0.2
    per_step: int = 1  # tokens unmasked per decoding step


DIFFUSION_CONFIGS = {
    "quick": DiffusionConfig(seeds=2, selector="quick", base_steps=150, steps=12, every=6),  # a smoke run
    "default": DiffusionConfig(seeds=5, selector="default", base_steps=2000, steps=48, every=8),
    "full": DiffusionConfig(seeds=10, selector="full", base_steps=2000, steps=150, every=10),
}


def canvas(example: dict) -> dict:
    """An example (``input_ids``, ``labels``, optionally a ``t3s_force_mask``) with its answer padded by
    ``<eos>`` to ``CANVAS`` positions, the padding labelled and never forced; its ``prompt_length``."""
    k = next(i for i, y in enumerate(example["labels"]) if y != IGNORE)
    pad = k + CANVAS - len(example["input_ids"])
    if pad < 0:
        raise ValueError(f"example {example.get('id')!r} has an answer longer than the canvas ({CANVAS})")
    out = {**example, "input_ids": example["input_ids"] + [EOS] * pad, "labels": example["labels"] + [EOS] * pad,
           "prompt_length": k}
    if "t3s_force_mask" in example:
        out["t3s_force_mask"] = list(example["t3s_force_mask"]) + [False] * pad
    return out


def random_force(examples: list[dict], like: list[list[bool]], seed: int) -> list[list[bool]]:
    """For each example as many forced positions as ``like`` has in it, at random among its labelled ones."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for ex, sel in zip(examples, like):
        labelled = [i for i, y in enumerate(ex["labels"]) if y != IGNORE]
        chosen = torch.randperm(len(labelled), generator=g)[:sum(sel)].tolist()
        mask = [False] * len(ex["input_ids"])
        for c in chosen:
            mask[labelled[c]] = True
        out.append(mask)
    return out


def train_dllm(model, examples: list[dict], steps: int, *, lr: float, batch_size: int, seed: int,
               watch: Optional[list[list[bool]]] = None, on_step=None) -> dict:
    """AdamW on the masked-diffusion loss (``CONVENTION``) of the patched model: each batch collated by
    ``T3SDataCollator`` (its ``t3s_force_mask`` column, if the examples have one), noised by
    ``noise_inputs`` (the force set unioned in), scored by ``masked_diffusion_compute_loss``. Returns the
    mask statistics over all steps: forced positions, forced positions masked, and of ``watch`` (one bool
    list per example, e.g. T3S's selection) the positions and how many were masked."""
    collate = T3SDataCollator(PAD, model=model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    stats = dict.fromkeys(("forced", "forced_masked", "watched", "watched_masked", "masked", "answer"), 0)
    model.train()
    for step, idx in zip(range(1, steps + 1), batch_indices(len(examples), batch_size, random.Random(seed))):
        batch = collate([examples[i] for i in idx])
        noised = noise_inputs(batch, mask_token_id=MASK, rate_range=CONVENTION["rate_range"], generator=generator)
        if noised.forced is not None:
            stats["forced"] += int(noised.forced.sum())
            stats["forced_masked"] += int((noised.forced & noised.masked).sum())
        if watch is not None:
            watched = torch.tensor([watch[i] for i in idx], dtype=torch.bool)
            stats["watched"] += int(watched.sum())
            stats["watched_masked"] += int((watched & noised.masked).sum())
        stats["masked"] += int(noised.masked.sum())
        stats["answer"] += int(noised.answer_mask.sum())
        loss = masked_diffusion_compute_loss(model, batch, mask_token_id=MASK, noised=noised, **CONVENTION)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step:
            on_step(step, model)
    return stats


@torch.no_grad()
def decode(model, prompts: list[list[int]], per_step: int = 1) -> list[list[int]]:
    """LLaDA's low-confidence remasking over a ``CANVAS``-long answer: start fully masked; at each step
    predict every masked position (greedy, the mask token's own column excluded) and keep the
    ``per_step`` most confident predictions. Prompts of one length are decoded in one batch."""
    was_training = model.training
    model.eval()
    out: list[Optional[list[int]]] = [None] * len(prompts)
    try:
        for length in sorted({len(p) for p in prompts}):
            rows = [r for r, p in enumerate(prompts) if len(p) == length]
            x = torch.full((len(rows), length + CANVAS), MASK, dtype=torch.long)
            x[:, :length] = torch.tensor([prompts[r] for r in rows])
            while True:
                masked = x == MASK
                left = int(masked.sum(1).max())
                if not left:
                    break
                logits = model(input_ids=x).logits.float()
                logits[..., MASK] = float("-inf")
                conf, token = logits.softmax(-1).max(-1)
                conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
                keep = torch.zeros_like(masked).scatter_(1, conf.topk(min(per_step, left), dim=1).indices, True)
                x = torch.where(keep & masked, token, x)
            for r, row in zip(rows, x[:, length:].tolist()):
                out[r] = row
    finally:
        model.train(was_training)
    return out


def dllm_accuracy(model, examples: list[Example], per_step: int = 1) -> tuple[float, float]:
    """(share of decoded answers whose final digit is right, fillers per answer), answers cut at ``<eos>``,
    judged by demo.py's verifier."""
    check = make_verifier(FINAL_ANSWER)
    decoded = decode(model, [ex.input_ids[:ex.prompt_length] for ex in examples], per_step)
    answers = [cut_at_eos(d, (EOS,)) for d in decoded]
    right = [check(a, reference_answer(ex, (EOS,)), ex.id) for a, ex in zip(answers, examples)]
    return sum(right) / len(examples), sum(a.count(FILLER) for a in answers) / len(examples)


def train_dllm_base(cfg: DiffusionConfig, reserved: set):
    """The dLLM base student: a tiny bidirectional Qwen3, patched for masked diffusion, trained in the base
    style until BASE_TARGET of its decoded answers are right (checked every 50 steps), at most
    ``cfg.base_steps`` steps. Returns (model, its state dict, [(step, accuracy)])."""
    from .toy import tiny_bidirectional_lm

    print(f"[t3s demo] masked-diffusion student: its own style (fillers in {BASE_FILLER_RATE:.0%} of gaps), "
          f"trained until {BASE_TARGET:.0%} of its decoded answers are right (at most {cfg.base_steps} steps)")
    model = apply_t3s(tiny_bidirectional_lm("qwen3", seed=1, vocab_size=VOCAB, hidden_size=cfg.hidden_size,
                                            num_hidden_layers=cfg.layers, intermediate_size=2 * cfg.hidden_size),
                      mode="masked_diffusion")
    check, data = base_style_data(cfg.base_steps * cfg.batch_size, reserved)
    data = [canvas({"input_ids": ex.input_ids, "labels": ex.labels}) for ex in data]
    return train_to_target(model, train_dllm, data, lambda m: dllm_accuracy(m, check, cfg.per_step)[0], cfg,
                           "dLLM base")


def run_diffusion_seed(ar_base, ar_state, dllm, dllm_state, pool, seed: int, cfg: DiffusionConfig,
                       out: Path) -> dict:
    ar_cfg = CONFIGS[cfg.selector]
    traces, heldout = seed_traces(pool, seed, ar_cfg)
    pilot = run_pilot(ar_base, ar_state, traces, seed, ar_cfg)
    result = {"seed": seed, "selector_training_accuracy": pilot.table, "bottleneck": pilot.bottleneck,
              "trough": pilot.trough}
    base_model = _fresh(dllm, dllm_state)
    result["heldout_accuracy"] = {"base": dllm_accuracy(base_model, heldout, cfg.per_step)[0]}
    result["training_accuracy"] = {"base": dllm_accuracy(base_model, traces, cfg.per_step)}
    if pilot.bottleneck == "base":
        result["no_selection"] = NO_BOTTLENECK
        return result

    # The AR selector's two scoring passes, and the dLLM rule.
    folder = out / f"dllm-store-seed{seed}"  # this run's scores only: a store resumes what it holds
    shutil.rmtree(folder, ignore_errors=True)
    store = score_checkpoints(ar_base, ar_state, traces, {n: pilot.checkpoints[n] for n in ("base", pilot.bottleneck)},
                              folder)
    base_set, bottleneck_set = store.load("base"), store.load(pilot.bottleneck)
    sel = select("dllm", base_set, bottleneck_set, tau=cfg.tau)
    scored = base_set.values["scored"]
    tokens = torch.cat([torch.tensor(ex.input_ids) for ex in traces])
    chosen = tokens[sel.mask]
    after = torch.zeros_like(sel.mask)  # positions right after a filler
    after[1:] = tokens[:-1] == FILLER
    result["selection"] = {
        "fraction_selected": float(sel.mask.sum() / scored.sum()), "tokens": int(sel.mask.sum()),
        "digits": int((chosen >= DIGIT0).sum()), "fillers": int((chosen == FILLER).sum()),
        "eos": int((chosen == EOS).sum()),
        "digits_after_a_filler": int((sel.mask & after & (tokens >= DIGIT0)).sum()),
        "examples_with_any": sum(bool(sel.example(i).any()) for i in range(len(traces)))}

    rows = [{"id": ex.id, "input_ids": ex.input_ids, "labels": ex.labels} for ex in traces]
    forced = [canvas(r) for r in attach_mask(rows, sel)]  # the t3s_force_mask column, as a user attaches it
    plain = [canvas(r) for r in rows]
    selected = [r["t3s_force_mask"] for r in forced]
    shuffled = [{**r, "t3s_force_mask": m} for r, m in zip(plain, random_force(plain, selected, seed))]
    data = {"plain": plain, "dllm": forced, "random_force": shuffled}
    result["masking"], result["training_curves"] = {}, {}
    for arm in ARMS:
        model = _fresh(dllm, dllm_state)
        curve = result["training_curves"][arm] = [(0, result["training_accuracy"]["base"][0])]

        def evaluate(step, m):
            if step % cfg.every == 0:
                curve.append((step, dllm_accuracy(m, traces, cfg.per_step)[0]))

        stats = train_dllm(model, data[arm], cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed,
                           watch=selected, on_step=evaluate)
        result["masking"][arm] = {**stats, "selected_masked_share": stats["watched_masked"] / max(stats["watched"], 1),
                                  "masked_share": stats["masked"] / max(stats["answer"], 1)}
        result["heldout_accuracy"][arm] = dllm_accuracy(model, heldout, cfg.per_step)[0]
        result["training_accuracy"][arm] = dllm_accuracy(model, traces, cfg.per_step)
    return result


def _verdict(seeds: list[dict]) -> list[str]:
    n = len(seeds)
    dips = [s["selector_training_accuracy"][0][1] - dict(s["selector_training_accuracy"])[s["bottleneck"]]
            for s in seeds]
    lines = [f"- The AR selector's pilot dipped by ≥ 0.05 below its base in {sum(d >= 0.05 for d in dips)} of {n} "
             f"seeds (mean fall {statistics.mean(dips):.3f})."]
    with_sel = [s for s in seeds if "dllm" in s["heldout_accuracy"]]
    if not with_sel:
        return lines + ["- No seed had a bottleneck after the selector's base: the dLLM rule selects nothing; "
                        "no verdict on it."]
    sel = [s["selection"] for s in with_sel]
    lines.append(f"- What the dLLM rule forces (dc < -tau): {_mean_sd([x['fraction_selected'] for x in sel])} of the "
                 f"answer tokens (the paper: 5.24% at tau 0.2); of them digits "
                 f"{_mean_sd([x['digits'] / max(x['tokens'], 1) for x in sel])}, digits right after a filler "
                 f"{_mean_sd([x['digits_after_a_filler'] / max(x['tokens'], 1) for x in sel])}.")
    masking = [s["masking"] for s in with_sel]
    lines.append(f"- Forced positions masked: {sum(m['dllm']['forced_masked'] for m in masking)} of "
                 f"{sum(m['dllm']['forced'] for m in masking)} in the dllm arm; the selected positions were masked "
                 f"{_mean_sd([m['plain']['selected_masked_share'] for m in masking])} of the time in plain training "
                 f"(the random rate), {_mean_sd([m['dllm']['selected_masked_share'] for m in masking])} in the dllm "
                 "arm.")
    base = [s["heldout_accuracy"]["base"] for s in with_sel]
    plain = [s["heldout_accuracy"]["plain"] for s in with_sel]
    lines.append(f"- Plain masked-diffusion SFT on the traces: held-out {_mean_sd(plain)} against the dLLM base's "
                 f"{_mean_sd(base)}.")
    lows = {arm: [min(a for _, a in s["training_curves"][arm]) for s in with_sel] for arm in ARMS}
    lines.append("- The dLLM student's own training accuracy (its decoded answers on the training prompts): from "
                 f"{_mean_sd([s['training_accuracy']['base'][0] for s in with_sel])} at the base to a low of "
                 + ", ".join(f"{_mean_sd(lows[a])} ({a})" for a in ARMS) + "; at the end "
                 + ", ".join(f"{_mean_sd([s['training_accuracy'][a][0] for s in with_sel])} ({a})" for a in ARMS)
                 + ", with " + ", ".join(f"{_mean_sd([s['training_accuracy'][a][1] for s in with_sel])} ({a})"
                                         for a in ARMS) + " fillers per answer.")
    for arm, other in (("dllm", "plain"), ("dllm", "random_force"), ("dllm", "base"), ("random_force", "plain")):
        lines.append(compare(arm, other, [s["heldout_accuracy"][arm] - s["heldout_accuracy"][other]
                                          for s in with_sel], sd=True))
    for other in ("plain", "random_force"):
        diffs = [s["heldout_accuracy"]["dllm"] - s["heldout_accuracy"][other] for s in with_sel]
        if len(diffs) < 2:
            continue
        mean, se = statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5
        lines.append(f"- dllm against {other}: mean difference {mean:+.3f}, paired standard error {se:.3f}: "
                     + (f"{'better' if mean > 0 else 'worse'} beyond seed noise (more than two standard errors)."
                        if abs(mean) > 2 * se else "no difference beyond seed noise (within two standard errors)."))
    return lines


def _plot(seeds: list[dict], out: Path) -> list[str]:
    try:
        plt = pyplot("the demo's plots")
    except ImportError:
        return []
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    plot_heldout(left, seeds, ("base",) + ARMS, "held-out accuracy (decoded)",
                 "masked-diffusion student: each dot a seed, bar the mean")
    colors = {"plain": "tab:red", "dllm": "tab:blue", "random_force": "tab:gray"}
    for s in seeds:
        for arm, curve in s.get("training_curves", {}).items():
            right.plot([st for st, _ in curve], [a for _, a in curve], "-", color=colors[arm], alpha=0.5)
    for arm, color in colors.items():
        right.plot([], [], color=color, label=arm)
    right.set_xlabel("step")
    right.set_ylabel("training accuracy (own decoded answers)")
    right.legend(fontsize=8)
    return save_figure(plt, fig, out / "dllm_arms.png")


def run_diffusion_demo(out_dir: str = "t3s-demo", *, size: str = "default", seeds: Optional[int] = None,
                       tau: Optional[float] = None) -> dict:
    """The masked-diffusion demo at ``size`` ("quick", "default", "full"), the dLLM rule's ``tau`` (default
    0.2); writes report.md / report.json / a plot into ``out_dir``."""
    from tqdm.auto import tqdm

    cfg = resolve_config(DIFFUSION_CONFIGS, size, seeds)
    if tau is not None:
        if not tau >= 0:
            raise ValueError(f"tau must be >= 0; got {tau}")
        cfg = DiffusionConfig(**{**asdict(cfg), "tau": tau})
    t_start = time.time()
    out = writable_folder(out_dir, "--out")
    pool, _ = problem_pools()
    ar_base, ar_state, ar_log = train_base(CONFIGS[cfg.selector], set(pool))
    dllm, dllm_state, dllm_log = train_dllm_base(cfg, set(pool))
    seed_results = [run_diffusion_seed(ar_base, ar_state, dllm, dllm_state, pool, seed, cfg, out)
                    for seed in tqdm(range(cfg.seeds), desc="seeds (AR pilot, scoring, 3 dLLM arms)")]
    result = {"config": {"size": size, "student": "masked_diffusion", "convention": CONVENTION, **asdict(cfg),
                         "selector_config": asdict(CONFIGS[cfg.selector])},
              "selector_base_training": ar_log, "base_training": dllm_log, "seeds": seed_results,
              "verdict": _verdict(seed_results), "plots": [Path(p).name for p in _plot(seed_results, out)],
              "seconds": round(time.time() - t_start, 1)}
    atomic_write_bytes(out / "report.json", json.dumps(result, indent=2).encode())
    report = _report(result)
    atomic_write_bytes(out / "report.md", report.encode())
    print(report)
    print(f"\nwrote {out / 'report.md'}")
    return result


def _report(result: dict) -> str:
    cfg, seeds = result["config"], result["seeds"]
    sel_cfg = cfg["selector_config"]

    def reached(log, limit):
        return f"{log[-1][0]} steps, {log[-1][1]} of its answers right" if log else f"{limit} steps"

    arms = ("base",) + ARMS
    lines = [
        "# t3s demo report: a masked-diffusion student", "",
        f"Task: running sum mod 10 over {DIGITS} digits, final answer judged (`t3s_kernels/demo.py`). Base style: "
        f"fillers in {BASE_FILLER_RATE:.0%} of gaps; teacher traces: {TEACHER_FILLER_RATE:.0%}, "
        f"{sel_cfg['prompts']} training prompts per seed, {sel_cfg['heldout']} held-out prompts. "
        f"AR selector: tiny Qwen3 ({reached(result['selector_base_training'], sel_cfg['base_steps'])}), pilot "
        f"{sel_cfg['pilot_steps']} steps, a checkpoint every {sel_cfg['every']}; dLLM rule dc < -{cfg['tau']}. "
        f"dLLM student: tiny bidirectional Qwen3 ({cfg['layers']} layers, hidden {cfg['hidden_size']}), LLaDA 2.0's "
        f"objective (rates U{tuple(cfg['convention']['rate_range'])}, masked mean), base "
        f"{reached(result['base_training'], cfg['base_steps'])}; every arm {cfg['steps']} steps at batch "
        f"{cfg['batch_size']}, lr {cfg['lr']}, from the dLLM base, same data order and corruption draws. Decoding: "
        f"low-confidence remasking, {cfg['per_step']} token(s) a step. {len(seeds)} seeds. The design: "
        "`t3s_kernels/demo_diffusion.py`.", "",
        "## Held-out accuracy (decoded answers, final digit)", "",
    ] + heldout_table(seeds, arms)
    lines += ["", "## Selection and masking, per seed", "",
              "| seed | selector bottleneck (train acc) | selected | digits / after a filler / fillers / eos | "
              "selected masked: plain / dllm / random_force | dllm forced masked | train acc: base / plain / dllm / "
              "random_force | fillers per answer: base / plain / dllm |", "|---" * 8 + "|"]
    for s in seeds:
        acc = dict(s["selector_training_accuracy"])[s["bottleneck"]]
        if "selection" not in s:
            lines.append(f"| {s['seed']} | {s['bottleneck']} ({acc:.3f}) | — | — | — | — | — | — |")
            continue
        x, m, t = s["selection"], s["masking"], s["training_accuracy"]
        lines.append(
            f"| {s['seed']} | {s['bottleneck']} ({acc:.3f}) | {x['fraction_selected']:.1%} | {x['digits']} / "
            f"{x['digits_after_a_filler']} / {x['fillers']} / {x['eos']} | "
            + " / ".join(f"{m[a]['selected_masked_share']:.2f}" for a in ARMS)
            + f" | {m['dllm']['forced_masked']} / {m['dllm']['forced']} | "
            + " / ".join(f"{t[a][0]:.3f}" for a in arms) + " | "
            + " / ".join(f"{t[a][1]:.2f}" for a in ("base", "plain", "dllm")) + " |")
    lines += ["", "Training accuracy of the dLLM arms (seed by seed, step: accuracy):"] + [
        f"- seed {s['seed']} {arm}: " + ", ".join(f"{st} {a:.2f}" for st, a in s["training_curves"][arm])
        for s in seeds if "training_curves" in s for arm in ARMS]
    lines += ["", "## Verdict (what the numbers say)", ""] + result["verdict"] + [
        "", "Plots: " + (", ".join(f"`{p}`" for p in result["plots"]) or "none (matplotlib is not installed)") + ".",
        "", f"Ran in {result['seconds']} s."]
    return "\n".join(lines)
