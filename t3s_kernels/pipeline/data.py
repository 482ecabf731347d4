"""Reading a dataset of traces: JSONL or a ``datasets`` folder, pre-tokenized or text.

Each example has an ``id`` and either
  * ``input_ids`` with ``prompt_length`` (the tokens after it are the answer) or ``labels``
    (aligned with ``input_ids``, -100 where not a target), or
  * ``prompt`` and ``response`` text, tokenized with a local tokenizer folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

IGNORE = -100


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE where not a target (the prompt)

    @property
    def prompt_length(self) -> int:
        return next((i for i, y in enumerate(self.labels) if y != IGNORE), len(self.labels))


def _example(record: dict, where: str, get_tokenizer=lambda: None) -> Example:
    if "id" not in record or record["id"] in (None, ""):
        raise ValueError(f"{where}: every example needs an 'id'")
    ex_id = str(record["id"])
    if "input_ids" in record:
        ids = [int(t) for t in record["input_ids"]]
        if "labels" in record:
            labels = [int(t) for t in record["labels"]]
            if len(labels) != len(ids):
                raise ValueError(f"{where} (id {ex_id}): labels has {len(labels)} entries but input_ids has {len(ids)}")
        elif "prompt_length" in record:
            k = int(record["prompt_length"])
            if not 0 <= k <= len(ids):
                raise ValueError(f"{where} (id {ex_id}): prompt_length {k} outside [0, {len(ids)}]")
            labels = [IGNORE] * k + ids[k:]
        else:
            raise ValueError(f"{where} (id {ex_id}): a pre-tokenized example needs 'prompt_length' or 'labels'")
    elif "prompt" in record and "response" in record:
        tokenizer = get_tokenizer()
        if tokenizer is None:
            raise ValueError(f"{where} (id {ex_id}): text examples need a tokenizer folder (--tokenizer)")
        prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response = response + [tokenizer.eos_token_id]
        ids, labels = prompt + response, [IGNORE] * len(prompt) + response
    else:
        raise ValueError(f"{where} (id {ex_id}): expected 'input_ids' (+ 'prompt_length' or 'labels') or "
                         f"'prompt' and 'response'")
    if not ids:
        raise ValueError(f"{where} (id {ex_id}): empty example")
    return Example(ex_id, ids, labels)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def load_tokenizer(path: str):
    """A tokenizer from a local folder; refused when the folder holds no tokenizer (a model folder
    saved without one would otherwise load an empty tokenizer and turn every text into nothing)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"tokenizer must be a local folder; {path!r} is not one")
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise ValueError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); pass --tokenizer "
                         "with the folder that has it")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if len(tokenizer) < 2:
        raise ValueError(f"the tokenizer in {path} has {len(tokenizer)} tokens; it cannot be the model's")
    return tokenizer


def load_examples(path: str, tokenizer_path: Optional[str] = None) -> list[Example]:
    """Examples from a JSONL file or a ``datasets.save_to_disk`` folder, in file order. The tokenizer
    (``tokenizer_path``) is loaded when the first text example needs it."""
    loaded: dict = {}

    def get_tokenizer():
        if tokenizer_path is not None and "tokenizer" not in loaded:
            loaded["tokenizer"] = load_tokenizer(tokenizer_path)
        return loaded.get("tokenizer")

    p = Path(path)
    if p.is_dir():
        from datasets import load_from_disk

        records = [(f"{path}[{i}]", r) for i, r in enumerate(load_from_disk(str(p)))]
    else:
        records = []
        with open(p) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append((f"{path}:{n}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
    examples = [_example(r, where, get_tokenizer) for where, r in records]
    seen = set()
    for ex in examples:
        if ex.id in seen:
            raise ValueError(f"{path}: id '{ex.id}' appears more than once")
        seen.add(ex.id)
    return examples


def write_jsonl(path: str, examples: list[dict]) -> None:
    from .store import atomic_write_bytes

    atomic_write_bytes(Path(path), "".join(json.dumps(e) + "\n" for e in examples).encode())
