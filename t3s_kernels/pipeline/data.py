"""Reading a dataset of traces, pre-tokenized or text.

Where: a JSONL file (``.jsonl``; ``.json`` holds JSON lines or one array of objects; either
compressed as ``.gz``), a Parquet file, a ``datasets.save_to_disk`` folder (a ``DatasetDict`` needs
``split`` unless it has one split), or a hub-style folder of Parquet / JSONL files (read by
``datasets.load_dataset``; the same ``split`` rule).

Each example has an ``id`` (without an ``id`` column, the row index, said on stderr) and either
  * ``input_ids`` with ``prompt_length`` (the tokens after it are the answer) or ``labels``
    (aligned with ``input_ids``, -100 where not a target), or
  * ``prompt`` and ``response`` text, tokenized with a local tokenizer folder, or
  * ``messages`` (``[{"role": ..., "content": ...}, ...]``, the last one the assistant's): the
    tokenizer's chat template renders the conversation; the prompt is everything before the last
    assistant turn as the template renders it for generation (``add_generation_prompt=True``), the
    answer the rest, so the tokens are those a chat SFT trainer trains on.
"""

from __future__ import annotations

import gzip
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..extras import require

IGNORE = -100


@dataclass
class Example:
    id: str
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE where not a target (the prompt)

    @property
    def prompt_length(self) -> int:
        return next((i for i, y in enumerate(self.labels) if y != IGNORE), len(self.labels))


def _chat_tokens(tokenizer, messages, where: str) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens) of a chat conversation, split at its last assistant turn."""
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's answer; it is {messages[-1]['role']!r}")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{where}: 'messages' need a tokenizer with a chat template; this one has none")

    def render(msgs, **kw) -> list[int]:
        out = tokenizer.apply_chat_template(msgs, tokenize=True, **kw)
        if isinstance(out, dict) or hasattr(out, "keys"):  # newer transformers return a BatchEncoding
            out = out["input_ids"]
        return [int(t) for t in out]

    prompt = render(messages[:-1], add_generation_prompt=True)
    full = render(messages)
    if full[:len(prompt)] != prompt or len(full) == len(prompt):
        raise ValueError(f"{where}: the chat template does not render the conversation as its prompt followed by "
                         "the answer, so the answer tokens cannot be told apart; give 'prompt'/'response' or "
                         "'input_ids' with 'labels' instead")
    return prompt, full[len(prompt):]


def _example(record: dict, where: str, get_tokenizer=lambda: None) -> Example:
    if "id" not in record or record["id"] in (None, ""):
        raise ValueError(f"{where}: every example needs an 'id' (or none has one: then the row index is used)")
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
    elif "messages" in record:
        tokenizer = get_tokenizer()
        if tokenizer is None:
            raise ValueError(f"{where} (id {ex_id}): chat examples need a tokenizer folder (--tokenizer)")
        prompt, answer = _chat_tokens(tokenizer, record["messages"], f"{where} (id {ex_id})")
        ids, labels = prompt + answer, [IGNORE] * len(prompt) + answer
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
        raise ValueError(f"{where} (id {ex_id}): expected 'input_ids' (+ 'prompt_length' or 'labels'), "
                         f"'prompt' and 'response', or 'messages'")
    if not ids:
        raise ValueError(f"{where} (id {ex_id}): empty example")
    return Example(ex_id, ids, labels)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def load_tokenizer(path: str):
    """A tokenizer from a local folder; refused when the folder holds no tokenizer (a model folder
    saved without one would otherwise load an empty tokenizer and turn every text into nothing)."""
    AutoTokenizer = require("transformers", "loading a tokenizer").AutoTokenizer

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


def _one_split(dataset, path: str, split: Optional[str]):
    """The split ``split`` of a DatasetDict (or its only one); a Dataset as it is."""
    if not hasattr(dataset, "keys"):
        if split is not None:
            raise ValueError(f"{path} is a single dataset without splits; drop --split {split}")
        return dataset
    names = list(dataset.keys())
    if split is None:
        if len(names) != 1:
            raise ValueError(f"{path} has splits {names}; choose one with --split")
        split = names[0]
    if split not in names:
        raise ValueError(f"{path} has no split {split!r}; it has {names}")
    return dataset[split]


# How a data file's name ends -> the loader ``datasets.load_dataset`` reads a folder of them with.
DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".jsonl.gz": "json", ".json.gz": "json"}


def data_file_type(path: Path) -> Optional[str]:
    """The ending of ``DATA_FILE_TYPES`` that ``path``'s name has (the longest), or None."""
    return max((end for end in DATA_FILE_TYPES if path.name.endswith(end)), key=len, default=None)


def _json_records(p: Path, path: str) -> list[tuple[str, object]]:
    """(where, value) of a JSON-lines file, or of a JSON file holding one array (``.json``), gzipped or not."""
    try:
        with (gzip.open(p, "rt") if p.name.endswith(".gz") else open(p)) as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot be read as {'gzipped ' if p.name.endswith('.gz') else ''}text ({e})") \
            from None
    if data_file_type(p) in (".json", ".json.gz"):
        try:  # one JSON value: an array of examples (or a single one); else JSON lines, as to_json writes them
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, list):
            return [(f"{path}[{i}]", v) for i, v in enumerate(whole)]
        if whole is not None:
            return [(path, whole)]
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    return records


def _records(path: str, split: Optional[str]) -> list[tuple[str, dict]]:
    """(where, record) in file order, from any of the layouts in the module docstring."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"No such file or directory: {path}")
    if p.is_dir():
        if (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            load_from_disk = require("datasets", f"reading the saved dataset {path}").load_from_disk
            rows = _one_split(load_from_disk(str(p)), path, split)
        else:
            files = [f for f in sorted(p.rglob("*")) if data_file_type(f) and f.is_file()]
            if not files:
                raise ValueError(f"{path}: a folder with neither a saved dataset (save_to_disk) nor "
                                 f"{'/'.join(DATA_FILE_TYPES)} files")
            load_dataset = require("datasets", f"reading the dataset folder {path}").load_dataset
            rows = _one_split(load_dataset(str(p)), path, split)
        return [(f"{path}[{i}]", dict(r)) for i, r in enumerate(rows)]
    if split is not None:
        raise ValueError(f"--split {split}: {path} is a single file without splits")
    kind = data_file_type(p)
    if kind is None:
        raise ValueError(f"{path}: not a data file this reads; give a {', '.join(DATA_FILE_TYPES)} file, a "
                         "save_to_disk folder or a folder of such files")
    if kind == ".parquet":
        pq = require("pyarrow.parquet", f"reading the Parquet file {path}")
        return [(f"{path}[{i}]", r) for i, r in enumerate(pq.read_table(str(p)).to_pylist())]
    records = _json_records(p, path)
    for where, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object (one example with its fields); got "
                             f"{json.dumps(record)[:60]}")
    return records


def load_examples(path: str, tokenizer_path: Optional[str] = None, split: Optional[str] = None) -> list[Example]:
    """Examples from any layout of the module docstring, in file order. The tokenizer
    (``tokenizer_path``) is loaded when the first text or chat example needs it."""
    loaded: dict = {}

    def get_tokenizer():
        if tokenizer_path is not None and "tokenizer" not in loaded:
            loaded["tokenizer"] = load_tokenizer(tokenizer_path)
        return loaded.get("tokenizer")

    records = _records(path, split)
    with_id = sum(1 for _, r in records if r.get("id") not in (None, ""))
    if records and with_id == 0:
        print(f"[t3s] {path}: no example has an 'id'; each is named by its row index (0, 1, ...): the same file, "
              "in the same order, gives the same names", file=sys.stderr)
        records = [(where, {**r, "id": str(i)}) for i, (where, r) in enumerate(records)]
    examples = [_example(r, where, get_tokenizer) for where, r in records]
    seen = set()
    for ex in examples:
        if ex.id in seen:
            raise ValueError(f"{path}: id '{ex.id}' appears more than once")
        seen.add(ex.id)
    return examples
