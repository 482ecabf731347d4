"""Datasets as users keep them: chat messages, DatasetDict folders with splits, hub-style Parquet
folders, Parquet files, absent ids; and the score CLI over several checkpoints in one process."""

import json
import os

import pytest
import torch

from t3s_kernels.cli import main
from t3s_kernels.pipeline.data import load_examples
from t3s_kernels.pipeline.store import ScoreStore
from t3s_kernels.toy import tiny_causal_lm, tiny_tokenizer

pytest.importorskip("datasets")

# user: "t3 <content> "; assistant: "t4 <content> <eos> "; generation prompt "t4 "
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}t3 {{ m['content'] }} "
                 "{% else %}t4 {{ m['content'] }} <eos> {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}t4 {% endif %}")
ROWS = [{"id": "a", "input_ids": [5, 6, 7, 8], "prompt_length": 2},
        {"id": "b", "input_ids": [5, 9, 9], "prompt_length": 1}]


def _chat_tokenizer(folder):
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


def test_chat_messages_split_at_the_last_assistant_turn(tmp_path):
    tok = _chat_tokenizer(tmp_path / "tok")
    data = tmp_path / "chat.jsonl"
    conversation = [{"role": "user", "content": "t5 t6"}, {"role": "assistant", "content": "t7 t8"}]
    data.write_text(json.dumps({"id": "c1", "messages": conversation}) + "\n")
    (ex,) = load_examples(str(data), str(tok))
    assert ex.input_ids == [3, 5, 6, 4, 7, 8, 1] and ex.labels == [-100] * 4 + [7, 8, 1]
    data.write_text(json.dumps({"id": "c2", "messages": conversation[:1]}) + "\n")
    with pytest.raises(ValueError, match=r"\(id c2\): the last message must be the assistant's answer; it is 'user'"):
        load_examples(str(data), str(tok))
    plain = tmp_path / "plain"
    tiny_tokenizer().save_pretrained(plain)  # no chat template
    data.write_text(json.dumps({"id": "c3", "messages": conversation}) + "\n")
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        load_examples(str(data), str(plain))


def test_datasetdict_folder_needs_a_split_when_it_has_several(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}).save_to_disk(tmp_path / "dd")
    with pytest.raises(ValueError, match=r"has splits \['train', 'test'\]; choose one with --split"):
        load_examples(str(tmp_path / "dd"))
    assert [e.id for e in load_examples(str(tmp_path / "dd"), split="train")] == ["a", "b"]
    assert [e.id for e in load_examples(str(tmp_path / "dd"), split="test")] == ["a"]
    with pytest.raises(ValueError, match=r"has no split 'dev'; it has \['train', 'test'\]"):
        load_examples(str(tmp_path / "dd"), split="dev")
    Dataset.from_list(ROWS).save_to_disk(tmp_path / "single")
    assert len(load_examples(str(tmp_path / "single"))) == 2


def test_parquet_file_and_hub_style_folder(tmp_path):
    from datasets import Dataset

    (tmp_path / "hub" / "data").mkdir(parents=True)
    Dataset.from_list(ROWS).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet"))
    Dataset.from_list(ROWS[1:]).to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match="choose one with --split"):
        load_examples(str(tmp_path / "hub"))
    train = load_examples(str(tmp_path / "hub"), split="train")
    assert [e.id for e in train] == ["a", "b"] and train[0].labels == [-100, -100, 7, 8]
    assert [e.id for e in load_examples(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))] == ["b"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a saved dataset"):
        load_examples(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="single file without splits"):
        load_examples(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"), split="train")


def test_absent_ids_become_row_indices_and_say_so(tmp_path, capsys):
    data = tmp_path / "noid.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "id"}) + "\n" for r in ROWS))
    assert [e.id for e in load_examples(str(data))] == ["0", "1"]
    assert "no example has an 'id'; each is named by its row index" in capsys.readouterr().err


def _model_folders(tmp_path):
    folders = []
    for step in (100, 20):  # natural order: checkpoint-20 first
        folder = tmp_path / f"checkpoint-{step}"
        tiny_causal_lm("qwen3", seed=step).save_pretrained(folder)
        folders.append(folder)
    return folders


def test_score_several_checkpoints_in_one_process(tmp_path, capsys):
    folders = _model_folders(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    argv = ["score", "--model", *map(str, folders), "--data", str(data), "--store", str(tmp_path / "store"),
            "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.index("'checkpoint-20'") < out.index("'checkpoint-100'")
    store = ScoreStore(tmp_path / "store")
    assert store.names() == ["checkpoint-20", "checkpoint-100"]
    single = tmp_path / "single"
    assert main(["score", "--model", str(folders[1]), "--data", str(data), "--store", str(single), "--name", "x",
                 "--device", "cpu", "--quiet"]) == 0
    assert torch.equal(store.load("checkpoint-20").values["logprob"], ScoreStore(single).load("x").values["logprob"])
    assert main(argv + ["--name", "base"]) == 2
    assert "--name names one score set" in capsys.readouterr().err


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for argv, message in [
        (["score", "--model", str(tmp_path / "nope"), "--data", str(data), "--store", str(a_file), "--name", "n"],
         f"--store '{a_file}' is a file; it must be a folder"),
        (["score", "--model", str(tmp_path / "nope"), "--data", str(data), "--store", str(a_file / "sub"),
          "--name", "n"], f"--store '{a_file / 'sub'}' cannot be created"),
        (["select", "--store", str(tmp_path), "--rule", "random", "--budget", "0.5", "--out", str(a_file)],
         f"--out '{a_file}' is a file; it must be a folder"),
        (["accuracy", "--checkpoints", str(tmp_path), "--data", str(data), "--out", str(tmp_path)],
         f"--out '{tmp_path}' is a folder; it must be the CSV file to write"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_read_only_store_is_refused_up_front(tmp_path, capsys, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    if os.geteuid() == 0:  # root writes to read-only folders: simulate the permission check's answer
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    else:
        store.chmod(0o555)
    try:
        assert main(["score", "--model", str(tmp_path), "--data", str(tmp_path / "d.jsonl"), "--store", str(store),
                     "--name", "n"]) == 2
        assert f"--store '{store}' is not writable by this user" in capsys.readouterr().err
    finally:
        store.chmod(0o755)


def test_json_arrays_and_gzipped_json_lines_are_read(tmp_path):
    import gzip

    lines = "".join(json.dumps(r) + "\n" for r in ROWS)
    expected = [(e.id, e.input_ids, e.labels) for e in load_examples(_write(tmp_path / "d.jsonl", lines))]
    for name, text in [("array.json", json.dumps(ROWS)), ("pretty.json", json.dumps(ROWS, indent=2)),
                       ("lines.json", lines)]:
        got = load_examples(_write(tmp_path / name, text))
        assert [(e.id, e.input_ids, e.labels) for e in got] == expected, name
    for name, text in [("d.jsonl.gz", lines), ("a.json.gz", json.dumps(ROWS))]:
        with gzip.open(tmp_path / name, "wt") as f:
            f.write(text)
        assert [(e.id, e.input_ids, e.labels) for e in load_examples(str(tmp_path / name))] == expected, name
    (tmp_path / "hub").mkdir()
    os.replace(tmp_path / "d.jsonl.gz", tmp_path / "hub" / "train.jsonl.gz")  # a folder of gzipped JSON lines
    assert [e.id for e in load_examples(str(tmp_path / "hub"))] == ["a", "b"]


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, where, got", [
    ('{"id": "a", "input_ids": [1, 2], "prompt_length": 1}\nnull\n', "bad.jsonl:2", "null"),
    ('[1, 2]\n', "bad.jsonl:1", r"\[1, 2\]"),
    ('"text"\n', "bad.jsonl:1", '"text"'),
])
def test_a_json_line_that_is_no_object_is_named(tmp_path, text, where, got):
    with pytest.raises(ValueError, match=f"{where}: expected a JSON object .*; got {got}"):
        load_examples(_write(tmp_path / "bad.jsonl", text))


def test_a_json_array_of_non_objects_and_other_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"bad.json\[1\]: expected a JSON object .*; got \[3\]"):
        load_examples(_write(tmp_path / "bad.json", json.dumps([ROWS[0], [3]])))
    with pytest.raises(ValueError, match=r"data.csv: not a data file this reads; give a .jsonl, .json, .parquet"):
        load_examples(_write(tmp_path / "data.csv", "id,input_ids\n"))
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"broken.jsonl.gz: cannot be read as gzipped text"):
        load_examples(str(tmp_path / "broken.jsonl.gz"))
