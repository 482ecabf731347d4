"""Token selection from confidence trajectories (docs/method.md), and the baselines.

``dc_t = c_t(bottleneck) - c_t(base)`` over the scored (labelled) tokens. A mask marks the
*selected* tokens; how a trainer uses it depends on the student:
  * ``ar``: selected = not an imitation anchor (``dc <= 0``): the tokens kept in the loss
    (anchors ``dc > 0`` are dropped; they stay in the input as context).
  * ``dllm``: selected = yet-to-learn (``dc < -tau``, default tau 0.2): forced into the
    masked-diffusion corruption mask.
  * ``inverse``: the anchors only (the paper's collapsing control).
  * ``confidence_high`` / ``confidence_low``: the ``budget`` fraction of tokens with the
    highest / lowest base confidence; ``entropy``: the highest base entropy;
    ``random``: a seeded random ``budget`` fraction.
Budgets are fractions of all scored tokens of the dataset.

Every selection records its *use*, which trainers check: ``"keep"`` (an AR keep-mask: the
``t3s_weights`` column, True keeps a token in the loss) or ``"force_mask"`` (a masked-diffusion
force set: the ``t3s_force_mask`` column). ``ar`` and ``inverse`` are keep-masks, ``dllm`` a force
set; a budget baseline is either, as asked (keep by default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..extras import pyplot
from .store import ScoreSet, StoreError, atomic_write_bytes, token_hash

RULES = ("ar", "dllm", "inverse", "confidence_high", "confidence_low", "entropy", "random")
TRAJECTORY_RULES = ("ar", "dllm", "inverse")
USES = ("keep", "force_mask")
# The dataset column each use travels in (one name per meaning; trainers refuse the other).
COLUMNS = {"keep": "t3s_weights", "force_mask": "t3s_force_mask"}
_USE_OF_RULE = {"ar": "keep", "inverse": "keep", "dllm": "force_mask"}


@dataclass
class Selection:
    rule: str
    mask: torch.Tensor  # flat bool, aligned with the score sets' offsets
    offsets: torch.Tensor
    ids: list[str]
    params: dict
    use: str = "keep"  # "keep" (AR keep-mask) or "force_mask" (masked-diffusion force set)
    token_hashes: Optional[list[str]] = None  # the scored examples' token hashes: attach_mask checks them

    def example(self, i: int) -> torch.Tensor:
        return self.mask[self.offsets[i]:self.offsets[i + 1]]

    def summary(self, scored: torch.Tensor) -> dict:
        per_example = []
        for i, ex_id in enumerate(self.ids):
            s = scored[self.offsets[i]:self.offsets[i + 1]]
            m = self.example(i)
            per_example.append({"id": ex_id, "scored": int(s.sum()), "selected": int(m.sum()),
                                "fraction": float(m.sum()) / max(int(s.sum()), 1)})
        total_scored = int(scored.sum())
        selected = int(self.mask.sum())
        return {"rule": self.rule, "use": self.use, **self.params, "scored_tokens": total_scored,
                "selected_tokens": selected,
                "fraction_selected": selected / max(total_scored, 1), "per_example": per_example}


# What two score sets compared token by token must share of their producers (producer.json): dc between
# two checkpoints means nothing across scoring protocols, their parameters, model families or dtypes.
SAME_PRODUCER = ("model_type", "dtype", "protocol", "rounds", "seed", "mask_token_id")


def check_aligned(a: ScoreSet, b: ScoreSet) -> None:
    """Refuse two score sets that are not of the same dataset: ids, token counts and, where recorded,
    the tokens themselves (the dataset hash)."""
    if a.ids != b.ids or not torch.equal(a.offsets, b.offsets):
        raise StoreError(f"score sets '{a.name}' and '{b.name}' are not of the same dataset "
                         "(their ids or token counts differ)")
    if a.dataset_hash is not None and b.dataset_hash is not None and a.dataset_hash != b.dataset_hash:
        raise StoreError(f"score sets '{a.name}' and '{b.name}' were scored on other tokens (dataset hashes "
                         f"{a.dataset_hash} and {b.dataset_hash}, same ids and lengths); score both on one dataset")


def check_comparable(a: ScoreSet, b: ScoreSet) -> None:
    """``check_aligned``, and producers that agree on ``SAME_PRODUCER`` where both are recorded."""
    check_aligned(a, b)
    if a.producer is not None and b.producer is not None:
        differ = [k for k in SAME_PRODUCER if a.producer.get(k) != b.producer.get(k)]
        if differ:
            raise StoreError(f"score sets '{a.name}' and '{b.name}' were scored otherwise (they differ in {differ}: "
                             + ", ".join(f"{k} {a.producer.get(k)!r} vs {b.producer.get(k)!r}" for k in differ)
                             + "); score both checkpoints with the same settings")


def _top_fraction(values: torch.Tensor, scored: torch.Tensor, budget: float, largest: bool) -> torch.Tensor:
    idx = scored.nonzero().squeeze(1)
    k = int(round(budget * idx.numel()))
    mask = torch.zeros_like(scored)
    if k:
        chosen = torch.topk(values[idx], k, largest=largest).indices
        mask[idx[chosen]] = True
    return mask


def _use_for(rule: str, use: Optional[str]) -> str:
    if use is not None and use not in USES:
        raise ValueError(f"use must be one of {USES}; got {use!r}")
    fixed = _USE_OF_RULE.get(rule)
    if fixed is not None and use not in (None, fixed):
        raise ValueError(f"rule '{rule}' makes a {fixed!r} mask; use={use!r} contradicts it")
    return fixed or use or "keep"


def select(rule: str, base: ScoreSet, bottleneck: Optional[ScoreSet] = None, *, tau: float = 0.2,
           budget: Optional[float] = None, seed: int = 0, use: Optional[str] = None) -> Selection:
    """The mask of rule ``rule``. Trajectory rules need the bottleneck score set; budget rules a budget.
    ``use`` (see the module docstring) is fixed by the trajectory rules; a baseline's defaults to "keep"."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}")
    use = _use_for(rule, use)
    scored = base.values["scored"]
    params: dict = {}
    if rule in TRAJECTORY_RULES:
        if bottleneck is None:
            raise ValueError(f"rule '{rule}' needs the bottleneck checkpoint's score set")
        check_comparable(base, bottleneck)
        if bottleneck.name == base.name or torch.equal(base.values["logprob"], bottleneck.values["logprob"]):
            raise ValueError(f"the bottleneck '{bottleneck.name}' is the base checkpoint '{base.name}' itself (dc = 0 "
                             "for every token: the AR rule would keep everything and the dLLM rule select nothing); "
                             "T3S needs the checkpoint at the dip of training accuracy, after the base")
        if not torch.equal(scored, bottleneck.values["scored"]):
            raise StoreError(f"score sets '{base.name}' and '{bottleneck.name}' scored different tokens")
        dc = bottleneck.values["logprob"] - base.values["logprob"]
        if rule == "ar":
            mask = scored & (dc <= 0)
        elif rule == "inverse":
            mask = scored & (dc > 0)
        else:
            if not tau >= 0:
                raise ValueError(f"tau must be >= 0; got {tau}")
            mask = scored & (dc < -tau)
            params["tau"] = tau
        params.update(base=base.name, bottleneck=bottleneck.name)
    else:
        if budget is None or not 0.0 < budget <= 1.0:
            raise ValueError(f"rule '{rule}' needs budget in (0, 1]; got {budget}")
        params.update(budget=budget, base=base.name)
        if rule == "random":
            g = torch.Generator().manual_seed(seed)
            mask = _top_fraction(torch.rand(scored.shape, generator=g), scored, budget, largest=True)
            params["seed"] = seed
        elif rule == "entropy":
            mask = _top_fraction(base.values["entropy"], scored, budget, largest=True)
        else:
            mask = _top_fraction(base.values["logprob"], scored, budget, largest=rule == "confidence_high")
    return Selection(rule=rule, mask=mask, offsets=base.offsets, ids=base.ids, params=params, use=use,
                     token_hashes=base.token_hashes)


def trajectory(sets: Sequence[ScoreSet], anchors: torch.Tensor) -> dict:
    """Mean confidence of the anchors and of the other scored tokens under each checkpoint."""
    out = {"checkpoints": [], "anchors": [], "others": []}
    for s in sets:
        check_comparable(sets[0], s)
        scored = s.values["scored"]
        lp = s.values["logprob"]
        out["checkpoints"].append(s.name)
        out["anchors"].append(float(lp[anchors & scored].mean()) if bool((anchors & scored).any()) else float("nan"))
        out["others"].append(float(lp[~anchors & scored].mean()) if bool((~anchors & scored).any()) else float("nan"))
    return out


def save_selection(sel: Selection, out_dir: str, scored: torch.Tensor) -> dict:
    """``mask.safetensors`` (flat mask + offsets, ids in the metadata) and ``summary.json``, atomically."""
    from safetensors.torch import save

    out = Path(out_dir)
    meta = {"rule": sel.rule, "use": sel.use, "params": json.dumps(sel.params), "ids": json.dumps(sel.ids),
            "token_hashes": json.dumps(sel.token_hashes)}
    atomic_write_bytes(out / "mask.safetensors", save({"mask": sel.mask, "offsets": sel.offsets}, metadata=meta))
    summary = sel.summary(scored)
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def load_selection(path: str) -> Selection:
    from safetensors import SafetensorError, safe_open

    file = Path(path) / "mask.safetensors" if Path(path).is_dir() else Path(path)
    redo = "select it again (t3s select)"
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            mask, offsets = f.get_tensor("mask"), f.get_tensor("offsets")
        rule, ids, params = meta["rule"], json.loads(meta["ids"]), json.loads(meta["params"])
        hashes = json.loads(meta.get("token_hashes", "null"))
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as e:
        raise StoreError(f"{file}: not a selection this library wrote, or damaged ({type(e).__name__}: {e}); "
                         f"{redo}") from None
    use = meta.get("use") or _USE_OF_RULE.get(rule)  # files from before "use" was recorded
    if use not in USES:
        raise StoreError(f"{file}: a {rule!r} mask that does not record its use (keep or force_mask); {redo}")
    return Selection(rule=rule, mask=mask, offsets=offsets, ids=ids, params=params, use=use, token_hashes=hashes)


def attach_mask(examples: list[dict], selection: Selection) -> list[dict]:
    """Examples (dicts with ``id`` and ``input_ids``) with the selection as a per-token column, matched
    by id: ``t3s_weights`` for a keep-mask, ``t3s_force_mask`` for a force set (``COLUMNS``); refuses
    examples the selection does not know, whose length differs or (where the selection records token
    hashes) whose tokens differ."""
    column = COLUMNS[selection.use]
    index = {ex_id: i for i, ex_id in enumerate(selection.ids)}
    out = []
    for ex in examples:
        if str(ex["id"]) not in index:
            raise StoreError(f"example '{ex['id']}' is not in the selection (made for another dataset?)")
        i = index[str(ex["id"])]
        m = selection.example(i)
        if m.numel() != len(ex["input_ids"]):
            raise StoreError(f"example '{ex['id']}' has {len(ex['input_ids'])} tokens but its mask {m.numel()}")
        if selection.token_hashes is not None and token_hash(ex["input_ids"]) != selection.token_hashes[i]:
            raise StoreError(f"example '{ex['id']}' has other tokens than the selection was scored on (same id and "
                             "length): another dataset or tokenization; attach the mask to the dataset it was made on")
        out.append({**ex, column: m.tolist()})
    return out


def plot_selection(base: ScoreSet, bottleneck: ScoreSet, sets: Sequence[ScoreSet], anchors: torch.Tensor,
                   out_dir: str, selection: Optional[Selection] = None) -> list[str]:
    """dc histogram and the bifurcation picture (anchors vs others per checkpoint); needs matplotlib.
    With a ``dllm`` selection, both pictures also show tau and the selected (force-masked) set."""
    plt = pyplot("plotting a selection")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scored = base.values["scored"]
    dc = (bottleneck.values["logprob"] - base.values["logprob"])[scored]
    tau = selection.params.get("tau") if selection is not None and selection.rule == "dllm" else None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(dc.numpy(), bins=60, color="tab:blue")
    ax.axvline(0, color="k", lw=0.8)
    title = f"anchors (Δc > 0): {float((dc > 0).float().mean()):.1%} of tokens"
    if tau is not None:
        ax.axvline(-tau, color="tab:red", lw=1.2, ls="--", label=f"−τ = {-tau:g}")
        ax.legend(fontsize=8)
        title += f"; selected (Δc < −τ): {float(selection.mask[scored].float().mean()):.1%}"
    ax.set_xlabel(f"Δc = c({bottleneck.name}) − c({base.name})")
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    paths = [str(out / "dc_hist.png")]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    traj = trajectory(sets, anchors)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(traj["checkpoints"], traj["anchors"], "o-", label="imitation anchors (Δc > 0)")
    ax.plot(traj["checkpoints"], traj["others"], "s-", label="yet-to-learn (Δc ≤ 0)")
    if tau is not None:
        chosen = trajectory(sets, selection.mask)
        ax.plot(chosen["checkpoints"], chosen["anchors"], "^--", color="tab:red", label=f"selected (Δc < −{tau:g})")
    ax.set_ylabel("mean log-prob of the label")
    ax.set_xlabel("checkpoint")
    ax.legend(fontsize=8)
    fig.autofmt_xdate()
    fig.tight_layout()
    paths.append(str(out / "bifurcation.png"))
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
