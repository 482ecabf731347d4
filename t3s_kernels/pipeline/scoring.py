"""Scoring: each token's confidence (log-probability of the label), entropy and argmax-correct
under one checkpoint, written to the store. The logits are never materialized: the backbone
gives hidden states and ``token_stats`` (the fused forward) gives the statistics.

Causal students are teacher-forced: position t stores the statistics of token t predicted
from positions < t. For masked-diffusion students the paper scores with a causal model of the
same tokenizer family (the default: point scoring at that model). Self-scoring by the
masked-diffusion model (``protocol="masked_diffusion"``) follows this seeded protocol: the
answer positions of an example are split at random (seed + example index) into ``rounds``
disjoint groups; for each group, that group is replaced by the mask token and its positions
are scored, no shift, with the rest visible. Every answer token is scored exactly once,
with about 1/rounds of the answer masked alongside it.
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import torch

from ..adapters.block_diffusion import bidirectional_padding_mask
from ..adapters.packing import VARLEN_ATTENTION
from ..extras import require
from ..patching import capture_head_inputs
from ..validation import DTYPES
from .data import IGNORE, Example
from .store import ScoreStore, iter_batches, token_hash

PROTOCOLS = ("causal", "masked_diffusion")


def _pad(examples: list[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), longest), dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e.input_ids)
        ids[r, :n] = torch.tensor(e.input_ids)
        labels[r, :n] = torch.tensor(e.labels)
        attn[r, :n] = 1
    return ids.to(device), labels.to(device), attn.to(device)


def _stats_dict(n: int, device) -> dict[str, torch.Tensor]:
    return {"logprob": torch.zeros(n, device=device), "entropy": torch.zeros(n, device=device),
            "correct": torch.zeros(n, dtype=torch.bool, device=device),
            "scored": torch.zeros(n, dtype=torch.bool, device=device)}


def _causal_example_stats(st, index, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """One example's stored statistics: its teacher-forced predictions ``st[index]`` (position t-1
    predicting token t) and their ``targets``; the first token has none."""
    d = _stats_dict(targets.numel() + 1, targets.device)
    d["logprob"][1:], d["entropy"][1:], d["correct"][1:] = st.logprob[index], st.entropy[index], st.correct[index]
    d["scored"][1:] = targets != IGNORE
    return d


@torch.no_grad()
def score_batch_causal_packed(model, examples: list[Example]) -> list[dict[str, torch.Tensor]]:
    """The examples concatenated in one row (position ids restarting at 0 for each, no padding;
    adapters/packing.py): the same statistics as padded scoring, without the padding's compute."""
    device = next(model.parameters()).device
    lengths = [len(e.input_ids) for e in examples]
    ids = torch.tensor([t for e in examples for t in e.input_ids], device=device)[None]
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    head = capture_head_inputs(model, input_ids=ids, position_ids=positions)
    offsets = torch.tensor([0] + lengths).cumsum(0).tolist()
    targets = torch.tensor([y for e in examples for y in e.labels], device=device)[1:].clone()
    targets[[o - 1 for o in offsets[1:-1]]] = IGNORE  # a sequence's last token does not predict the next one's first
    st = head.token_stats(head.hidden[0, :-1], targets)
    return [_causal_example_stats(st, slice(o, o + n - 1), targets[o:o + n - 1]) for n, o in zip(lengths, offsets)]


@torch.no_grad()
def score_batch_causal(model, examples: list[Example], pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    device = next(model.parameters()).device
    ids, labels, attn = _pad(examples, pad_id, device)
    head = capture_head_inputs(model, input_ids=ids, attention_mask=attn)
    targets = labels[:, 1:]  # position t-1 predicts token t
    st = head.token_stats(head.hidden[:, :-1], targets)
    return [_causal_example_stats(st, (r, slice(0, len(e.input_ids) - 1)), targets[r, :len(e.input_ids) - 1])
            for r, e in enumerate(examples)]


def _full_attention_padding(model, attn: torch.Tensor):
    """A padded batch's 2-D mask as a full-attention student must take it (as the patch sends it in
    training): a 4-D (or flex) mask, since a model's own builder may make a padded 2-D mask causal
    (transformers 4.x's does, and LLaDA 2.0's code); flash attention's varlen path takes the 2-D one."""
    attention = getattr(model.config, "_attn_implementation", None)
    if bool(attn.bool().all()) or attention in VARLEN_ATTENTION:
        return attn
    return bidirectional_padding_mask(attn.bool(), attention=attention, dtype=next(model.parameters()).dtype,
                                      model_name=type(model).__name__)


@torch.no_grad()
def score_batch_masked_diffusion(model, examples: list[Example], indices: list[int], *, mask_token_id: int,
                                 rounds: int = 2, seed: int = 0, pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
    device = next(model.parameters()).device
    ids, labels, attn = _pad(examples, pad_id, device)
    groups = torch.full(ids.shape, -1, dtype=torch.long)
    for r, (e, idx) in enumerate(zip(examples, indices)):
        answer = (torch.tensor(e.labels) != IGNORE).nonzero().squeeze(1)
        g = torch.Generator().manual_seed(seed * 1_000_003 + idx)
        groups[r, answer] = torch.randperm(answer.numel(), generator=g) % rounds
    groups = groups.to(device)
    out = [_stats_dict(len(e.input_ids), device) for e in examples]
    attn = _full_attention_padding(model, attn)
    for k in range(rounds):
        masked = groups == k
        noisy = torch.where(masked, torch.full_like(ids, mask_token_id), ids)
        head = capture_head_inputs(model, input_ids=noisy, attention_mask=attn)
        st = head.token_stats(head.hidden, torch.where(masked, ids, torch.full_like(ids, IGNORE)))
        for r, e in enumerate(examples):
            n = len(e.input_ids)
            m = masked[r, :n]
            out[r]["logprob"][m] = st.logprob[r, :n][m]
            out[r]["entropy"][m] = st.entropy[r, :n][m]
            out[r]["correct"][m] = st.correct[r, :n][m]
            out[r]["scored"][m] = True
    return out


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of a torchrun launch, (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@torch.no_grad()
def weights_fingerprint(model, samples: int = 4096) -> str:
    """A hash of every parameter's name, shape, dtype and a strided sample of its values (cheap at
    any size; two checkpoints of one run differ in it)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        h.update(flat[::step].double().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def scoring_producer(model, protocol: str, **params) -> dict:
    """What produced a score set: recorded with it, and compared when it is resumed."""
    from ..version import __version__

    dtype = next(model.parameters()).dtype
    return {"model": str(getattr(model.config, "_name_or_path", "")), "model_type": model.config.model_type,
            "weights": weights_fingerprint(model), "dtype": str(dtype), "protocol": protocol,
            **params, "library": __version__}


def _check_fits(model, examples: list[Example], mask_token_id: Optional[int] = None) -> None:
    """Token ids inside the model's vocabulary and lengths within its positions, or a refusal naming the example
    (or the mask token id)."""
    head = model.get_output_embeddings()
    vocab = head.out_features if head is not None else model.config.get_text_config().vocab_size
    if mask_token_id is not None and not 0 <= mask_token_id < vocab:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the model's vocabulary [0, {vocab})")
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    for e in examples:
        bad = next((t for t in e.input_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"example '{e.id}' has token id {bad}, outside the model's vocabulary [0, {vocab})")
        if positions is not None and len(e.input_ids) > positions:
            raise ValueError(f"example '{e.id}' has {len(e.input_ids)} tokens, more than the model's "
                             f"max_position_embeddings = {positions}; shorten it or leave it out")


def score_dataset(model, examples: list[Example], store: ScoreStore, name: str, *, protocol: str = "causal",
                  max_tokens: int = 16384, max_batch: int = 64, mask_token_id: Optional[int] = None,
                  rounds: int = 2, seed: int = 0, pad_id: int = 0, rank: Optional[int] = None,
                  world_size: Optional[int] = None, progress: bool = True, packed: bool = False) -> int:
    """Score every example not yet in score set ``name`` (this process's share under torchrun);
    returns the number scored now. Batches by length; one shard per batch. ``packed`` (causal
    protocol) runs each batch as one padding-free row (``score_batch_causal_packed``)."""
    from tqdm.auto import tqdm

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}; got {protocol!r}")
    if protocol == "masked_diffusion" and mask_token_id is None:
        raise ValueError("protocol='masked_diffusion' needs mask_token_id")
    if rank is None or world_size is None:
        rank, world_size = dist_rank_world()
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1; got {rounds}")
    if packed and protocol != "causal":
        raise ValueError("packed scoring is for the causal protocol; score a masked-diffusion student padded")
    _check_fits(model, examples, mask_token_id if protocol == "masked_diffusion" else None)
    store.bind([e.id for e in examples], [len(e.input_ids) for e in examples],
               [token_hash(e.input_ids) for e in examples])
    params = dict(rounds=rounds, seed=seed, mask_token_id=mask_token_id) if protocol == "masked_diffusion" else {}
    producer = scoring_producer(model, protocol, **params)
    with store.writing(name, rank, producer):
        done = store.done(name)
        todo = [i for i in range(len(examples)) if i % world_size == rank and i not in done]
        todo.sort(key=lambda i: len(examples[i].input_ids))
        lengths = [len(e.input_ids) for e in examples]
        model.eval()
        bar = tqdm(total=len(todo), desc=f"scoring '{name}'", unit="ex", disable=not progress)
        for batch in iter_batches(todo, lengths, max_tokens, max_batch):
            chunk = [examples[i] for i in batch]
            if protocol == "causal":
                stats = score_batch_causal_packed(model, chunk) if packed else \
                    score_batch_causal(model, chunk, pad_id=pad_id)
            else:
                stats = score_batch_masked_diffusion(model, chunk, batch, mask_token_id=mask_token_id, rounds=rounds,
                                                     seed=seed, pad_id=pad_id)
            store.write_shard(name, rank, batch, stats)
            bar.update(len(batch))
        bar.close()
    return len(todo)


def load_local_model(path: str, dtype: str = "fp32", device: str = "cpu", trust_remote_code: bool = False):
    """A model from a local folder only (never a hub download)."""
    AutoModelForCausalLM = require("transformers", "loading a model").AutoModelForCausalLM
    if not os.path.isdir(path):
        raise ValueError(f"model must be a local folder; {path!r} is not one")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype,
                                                 trust_remote_code=trust_remote_code)
    return model.to(device).eval()
