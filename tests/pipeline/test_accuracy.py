"""Training accuracy from the model's own answers: generation against a manual greedy decode, each
verifier, the CLI table that `t3s bottleneck` reads, natural checkpoint order."""

import json

import pytest
import torch

from t3s_kernels.pipeline.accuracy import generation_accuracy, make_verifier
from t3s_kernels.pipeline.bottleneck import read_accuracy_table
from t3s_kernels.pipeline.data import IGNORE, Example
from t3s_kernels.pipeline.store import natural_key
from t3s_kernels.toy import EOS_ID, tiny_causal_lm

pytest.importorskip("transformers")


def greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == EOS_ID:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def examples_for(model, n=6, prompt_len=5, answer_len=4, right=(0, 2, 3)):
    """Examples whose reference is the model's own greedy answer for the ids in ``right``, else not."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 500, (prompt_len + i % 3,), generator=g).tolist()  # ragged: left padding
        answer = greedy(model, prompt, answer_len)
        if i not in right:
            answer = [(t + 1) % 500 + 3 for t in answer] or [7]
        ids = prompt + answer + [EOS_ID]
        out.append(Example(f"e{i}", ids, [IGNORE] * len(prompt) + answer + [EOS_ID]))
    return out


def test_generation_accuracy_counts_the_models_own_right_answers():
    model = tiny_causal_lm("qwen3", seed=3).eval()
    examples = examples_for(model)
    result = generation_accuracy(model, examples, eos_token_id=EOS_ID, batch_size=4, slack=0, progress=False)
    assert result.correct == {f"e{i}": i in (0, 2, 3) for i in range(6)}
    assert result.accuracy == pytest.approx(0.5)


def test_verifiers(tmp_path):
    exact = make_verifier("exact")
    assert exact([5, 6], [5, 6], "a") and not exact([5, 6, 7], [5, 6], "a")
    last_number = make_verifier(r"regex:(\d+)$")
    assert last_number([9, 9, 42], [1, 42], "a") and not last_number([42, 9], [1, 42], "a")
    assert not make_verifier("regex:nomatch")([1], [1], "a")  # the reference must contain the pattern
    script = tmp_path / "judge.py"
    script.write_text("def judge(pred, ref, ex_id):\n    return pred.split()[-1:] == ref.split()[-1:]\n")
    judge = make_verifier(f"python:{script}:judge")
    assert judge([1, 2, 3], [3], "a") and not judge([1, 2], [3], "a")
    with pytest.raises(ValueError, match="verifier must be"):
        make_verifier("fuzzy")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        make_verifier(f"python:{script}:missing")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        make_verifier("regex:(")


def test_cli_writes_the_table_bottleneck_reads_in_natural_order(tmp_path, capsys):
    from t3s_kernels.cli import main

    folders = []
    for step, seed in ((100, 1), (20, 3)):
        model = tiny_causal_lm("qwen3", seed=seed)
        folder = tmp_path / f"checkpoint-{step}"
        model.save_pretrained(folder)
        folders.append(str(folder))
    reference = tiny_causal_lm("qwen3", seed=3).eval()  # checkpoint-20's weights
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps(dict(id=e.id, input_ids=e.input_ids, labels=e.labels)) + "\n"
                            for e in examples_for(reference)))
    out = tmp_path / "acc.csv"
    assert main(["accuracy", "--checkpoints", *folders, "--data", str(data), "--out", str(out), "--slack", "0",
                 "--quiet"]) == 0
    table = read_accuracy_table(str(out))
    assert [name for name, _ in table] == ["checkpoint-20", "checkpoint-100"]
    assert table[0][1] == pytest.approx(0.5)
    assert natural_key("checkpoint-20") < natural_key("checkpoint-100")


@pytest.mark.parametrize("eos", [[EOS_ID], [EOS_ID, 511], (511, EOS_ID)])
def test_a_list_of_eos_ids_cuts_answers_as_one_id_does(eos):
    # Llama 3.x / Gemma 3 configs list several eos ids: each ends an answer, and padding is no answer
    model = tiny_causal_lm("qwen3", seed=3).eval()
    examples = examples_for(model)
    one = generation_accuracy(model, examples, eos_token_id=EOS_ID, batch_size=4, slack=0, progress=False)
    many = generation_accuracy(model, examples, eos_token_id=eos, batch_size=4, slack=0, progress=False)
    assert many.correct == one.correct and many.predictions == one.predictions
    assert many.accuracy == pytest.approx(0.5)


def test_eos_ids_come_from_the_config_and_the_generation_config():
    from t3s_kernels.pipeline.accuracy import as_eos_ids, eos_token_ids

    model = tiny_causal_lm("qwen3", seed=3, eos_token_id=[EOS_ID, 7])
    model.generation_config.eos_token_id = [7, 9]
    assert eos_token_ids(model) == (EOS_ID, 7, 9)
    with pytest.raises(ValueError, match="eos_token_id must be a token id or a list"):
        as_eos_ids("</s>")


def test_cli_cuts_at_a_config_that_lists_its_eos_ids(tmp_path, capsys):
    from t3s_kernels.cli import main

    model = tiny_causal_lm("qwen3", seed=3, eos_token_id=[EOS_ID, 511])
    model.generation_config.eos_token_id = [EOS_ID, 511]
    folder = tmp_path / "checkpoint-1"
    model.save_pretrained(folder)
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps(dict(id=e.id, input_ids=e.input_ids, labels=e.labels)) + "\n"
                            for e in examples_for(model.eval(), right=range(6))))
    out = tmp_path / "acc.csv"
    assert main(["accuracy", "--checkpoints", str(folder), "--data", str(data), "--out", str(out), "--slack", "0",
                 "--quiet"]) == 0
    assert read_accuracy_table(str(out)) == [("checkpoint-1", 1.0)]
