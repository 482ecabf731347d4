"""Training accuracy as the method defines it: the model's own answers to the training prompts,
judged by a verifier, at each checkpoint. This is the curve whose trough is the imitation
bottleneck (``t3s bottleneck`` reads the table written here). Teacher-forced token accuracy is
not a substitute: it rises monotonically from the first step.

Generation is greedy by default (``do_sample=False``), batched with left padding, up to the
reference answer's length plus ``slack`` new tokens, stopping at an end-of-sequence token.
``eos_token_id`` is one id or several (Llama 3.x and Gemma 3 configs list several: the answer
ends at the first of any of them); ``eos_token_ids(model)`` gathers the model's config and
generation config's. Verifiers compare the generated answer with the reference answer (the
example's labelled tokens, up to the first end-of-sequence token):

* ``"exact"``: the same tokens (with a tokenizer: the same text, stripped);
* ``"math"``: the final answers, extracted and compared symbolically by math-verify (the ``math``
  extra; ``_math_verifier`` states the extraction rule);
* ``"regex:PATTERN"``: the last match of PATTERN (its first group, if it has one) in both texts
  is the same, and exists (without a tokenizer the text is the token ids, space-separated);
* ``"python:FILE.py:FUNCTION"``: ``FUNCTION(prediction: str, reference: str, example_id: str) -> bool``.

Causal (autoregressive) students only: a masked-diffusion student generates by iterative
unmasking, which this module does not implement.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..extras import require
from .data import IGNORE, Example


@dataclass
class AccuracyResult:
    accuracy: float
    correct: dict[str, bool]  # per example id
    predictions: dict[str, list[int]]  # generated answer tokens per example id


def tokens_text(tokens: Sequence[int], tokenizer) -> str:
    """Tokens as the verifiers read them: decoded, or without a tokenizer the ids, space-separated."""
    if tokenizer is None:
        return " ".join(map(str, tokens))
    return tokenizer.decode(list(tokens), skip_special_tokens=True)


def _load_python_verifier(spec: str) -> Callable[[str, str, str], bool]:
    path, _, name = spec.rpartition(":")
    if not path or not name or not Path(path).is_file():
        raise ValueError(f"verifier 'python:{spec}': expected python:FILE.py:FUNCTION with an existing FILE")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"verifier 'python:{spec}': {path} has no function {name!r}")
    return fn


def make_text_verifier(spec: str) -> Callable[[str, str, str], bool]:
    """A function (predicted text, reference text, example id) -> bool; see the module docstring."""
    if spec == "exact":
        return lambda pred, ref, _id: pred.strip() == ref.strip()
    if spec == "math":
        return _math_verifier()
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec[len("regex:"):])
        except re.error as e:
            raise ValueError(f"verifier {spec!r}: not a valid regular expression ({e})") from e

        def extract(text: str) -> Optional[str]:
            found = list(pattern.finditer(text))
            if not found:
                return None
            last = found[-1]
            return last.group(1) if pattern.groups else last.group(0)

        def by_regex(pred, ref, _id):
            want = extract(ref)
            return want is not None and extract(pred) == want

        return by_regex
    if spec.startswith("python:"):
        fn = _load_python_verifier(spec[len("python:"):])
        return lambda pred, ref, ex_id: bool(fn(pred, ref, ex_id))
    raise ValueError(f"verifier must be 'exact', 'math', 'regex:PATTERN' or 'python:FILE.py:FUNCTION'; got {spec!r}")


def _math_verifier() -> Callable[[str, str, str], bool]:
    """Final answers extracted and compared symbolically by math-verify (the ``math`` extra): each text is
    parsed with its default extraction (LaTeX, a \\boxed{} answer first, then plain expressions, with or
    without an anchor such as "the answer is"), and the two are compared by ``verify(reference,
    prediction)`` (sympy equivalence, numbers to 6 decimals, intervals and sets as such). A prediction
    with nothing to extract is wrong; a reference with nothing to extract is refused, naming the example."""
    math_verify = require("math_verify", "--verifier math")
    cache: dict[str, object] = {}

    def by_math(pred: str, ref: str, ex_id: str) -> bool:
        if ref not in cache:
            cache[ref] = math_verify.parse(ref)
            if not cache[ref]:
                raise ValueError(f"example '{ex_id}': math-verify finds no final answer in its reference answer "
                                 f"({ref[-80:]!r}); give it one (e.g. \\boxed{{...}}) or use another verifier")
        got = math_verify.parse(pred)
        return bool(got) and bool(math_verify.verify(cache[ref], got))

    return by_math


def make_verifier(spec: str, tokenizer=None) -> Callable[[list[int], list[int], str], bool]:
    """A function (predicted tokens, reference tokens, example id) -> bool: ``make_text_verifier`` on the
    decoded texts ("exact" without a tokenizer compares the tokens themselves)."""
    if spec == "exact" and tokenizer is None:
        return lambda pred, ref, _id: list(pred) == list(ref)
    check = make_text_verifier(spec)
    return lambda pred, ref, ex_id: check(tokens_text(pred, tokenizer), tokens_text(ref, tokenizer), ex_id)


EosIds = Union[None, int, Sequence[int]]


def as_eos_ids(eos_token_id: EosIds, what: str = "eos_token_id") -> tuple[int, ...]:
    """``eos_token_id`` (None, one id, or a list of ids, as HF configs hold it) as a tuple of ints."""
    if eos_token_id is None:
        return ()
    ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if not isinstance(ids, (list, tuple)) or not ids or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ValueError(f"{what} must be a token id or a list of token ids; got {eos_token_id!r}")
    return tuple(ids)


def eos_token_ids(model) -> tuple[int, ...]:
    """Every end-of-sequence id the model's config and generation config name (each may be a list)."""
    ids: list[int] = []
    for owner in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        for t in as_eos_ids(getattr(owner, "eos_token_id", None), f"{type(model).__name__}'s eos_token_id"):
            if t not in ids:
                ids.append(t)
    return tuple(ids)


def cut_at_eos(tokens: list[int], eos_ids: Sequence[int]) -> list[int]:
    """``tokens`` up to (without) the first of any of ``eos_ids``."""
    return next((tokens[:i] for i, t in enumerate(tokens) if t in eos_ids), tokens)


def reference_answer(ex: Example, eos_ids: Sequence[int] = ()) -> list[int]:
    """The example's reference answer: its labelled tokens after the prompt, up to the first end-of-sequence
    token."""
    k = ex.prompt_length
    return cut_at_eos([t for t, y in zip(ex.input_ids[k:], ex.labels[k:]) if y != IGNORE], eos_ids)


def _split(ex: Example, eos_ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """(prompt tokens, reference answer tokens up to the first end-of-sequence token)."""
    k = ex.prompt_length
    answer = reference_answer(ex, eos_ids)
    if k == 0:
        raise ValueError(f"example '{ex.id}' has no prompt (its first token is labelled); nothing to answer")
    return ex.input_ids[:k], answer


@torch.no_grad()
def generation_accuracy(model, examples: Sequence[Example], *, verifier: str = "exact", tokenizer=None,
                        eos_token_id: EosIds = None, pad_token_id: int = 0, batch_size: int = 16,
                        slack: int = 8, do_sample: bool = False, progress: bool = True) -> AccuracyResult:
    """The fraction of ``examples`` whose generated answer the verifier accepts."""
    if not examples:
        raise ValueError("generation_accuracy got no examples")
    if batch_size < 1 or slack < 0:
        raise ValueError(f"batch_size must be >= 1 and slack >= 0; got {batch_size}, {slack}")
    from tqdm import tqdm

    check = make_verifier(verifier, tokenizer)
    eos_ids = as_eos_ids(eos_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct, predictions = {}, {}
    try:
        bar = tqdm(total=len(examples), desc="answers", disable=not progress)
        for start in range(0, len(examples), batch_size):
            chunk = list(examples[start:start + batch_size])
            pairs = [_split(ex, eos_ids) for ex in chunk]
            longest = max(len(p) for p, _ in pairs)
            ids = torch.full((len(chunk), longest), pad_token_id, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for r, (prompt, _) in enumerate(pairs):  # left padding: every prompt ends where generation starts
                ids[r, longest - len(prompt):] = torch.tensor(prompt)
                attn[r, longest - len(prompt):] = 1
            new = max(len(ref) for _, ref in pairs) + slack
            out = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=new,
                                 do_sample=do_sample, eos_token_id=list(eos_ids) or None,
                                 pad_token_id=pad_token_id)
            for r, (ex, (_, ref)) in enumerate(zip(chunk, pairs)):
                pred = cut_at_eos(out[r, longest:].tolist(), eos_ids)
                predictions[ex.id] = pred
                correct[ex.id] = bool(check(pred, ref, ex.id))
            bar.update(len(chunk))
        bar.close()
    finally:
        model.train(was_training)
    return AccuracyResult(accuracy=sum(correct.values()) / len(correct), correct=correct, predictions=predictions)
