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


@pytest.mark.parametrize("prediction,reference,right", [
    (r"so the answer is \boxed{\frac{1}{2}}", r"\boxed{0.5}", True),  # a fraction and a decimal
    (r"$\frac{3}{4}$", r"The answer is $0.75$.", True),
    (r"\boxed{[1, 2)}", r"\boxed{[1,2)}", True),  # intervals
    (r"\boxed{(1, 2)}", r"\boxed{[1,2)}", False),  # open is not half-open
    (r"The final answer is \boxed{x^2 + 2x + 1}", r"\boxed{(x+1)^2}", True),  # symbolic equivalence
    (r"\boxed{42}", r"\boxed{41}", False),
    ("I cannot solve this.", r"\boxed{7}", False),  # nothing to extract: wrong
    (r"\boxed{\sqrt{2}}", r"\boxed{1.41421356}", True),
])
def test_math_verifier(prediction, reference, right):
    pytest.importorskip("math_verify")
    from t3s_kernels.pipeline.accuracy import make_text_verifier

    assert make_text_verifier("math")(prediction, reference, "p") is right


def test_math_verifier_refuses_a_reference_without_an_answer():
    pytest.importorskip("math_verify")
    from t3s_kernels.pipeline.accuracy import make_text_verifier

    with pytest.raises(ValueError, match="example 'p7': math-verify finds no final answer in its reference"):
        make_text_verifier("math")(r"\boxed{1}", "no number at all here", "p7")


def _answers_data(tmp_path):
    """Three problems whose reference answers are boxed numbers, as text through the toy tokenizer's ids."""
    refs = {"a": "\\boxed{1/2}", "b": "\\boxed{3}", "c": "\\boxed{[0,1)}"}
    examples = [Example(k, [5, 6, 7], [IGNORE, IGNORE, 7]) for k in refs]
    return examples, refs


def test_answers_file_is_judged_with_standard_errors(tmp_path):
    pytest.importorskip("math_verify")
    from t3s_kernels.pipeline.accuracy import make_text_verifier
    from t3s_kernels.pipeline.answers import judge, read_answers

    examples, refs = _answers_data(tmp_path)
    texts = {("base", "a"): ["\\boxed{0.5}", "\\boxed{2}"], ("base", "b"): ["\\boxed{3}", "\\boxed{3.0}"],
             ("base", "c"): ["\\boxed{[0, 1)}", "wrong"], ("ck-10", "a"): ["no", "no"],
             ("ck-10", "b"): ["\\boxed{3}", "x"], ("ck-10", "c"): ["y", "z"]}
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(dict(checkpoint=ck, id=i, sample=k, text=t)) + "\n"
                            for (ck, i), ts in texts.items() for k, t in enumerate(ts)))
    answers = read_answers(str(path), examples)
    assert list(answers) == ["base", "ck-10"]
    check = make_text_verifier("math")
    base = judge(answers["base"], examples, check, refs, "base")
    assert base.per_example == {"a": 0.5, "b": 1.0, "c": 0.5} and base.samples == 2
    assert base.accuracy == pytest.approx(2 / 3)
    assert base.stderr == pytest.approx((((0.5 - 2 / 3) ** 2 * 2 + (1 / 3) ** 2) / 2) ** 0.5 / 3 ** 0.5)


@pytest.mark.parametrize("records,pattern", [
    ([dict(checkpoint="b", id="a", sample=0, text="1")], r"checkpoint 'b' has no answers for 2 training example"),
    ([dict(checkpoint="b", id=i, sample=0, text="1") for i in "abc"] + [dict(checkpoint="b", id="a", sample=0,
                                                                              text="2")],
     r"answers.jsonl:4: a second answer for checkpoint 'b', id 'a', sample 0"),
    ([dict(checkpoint="b", id="zz", sample=0, text="1")], r"answers.jsonl:1: id 'zz' is not a training example"),
    ([dict(checkpoint="b", id="a", sample="0", text="1")], r"answers.jsonl:1: 'sample' must be a int; got '0'"),
    ([dict(checkpoint="b", id="a", text="1")], r"'sample' must be a int; got None"),
    ([dict(checkpoint="b", id=i, sample=0, text="1") for i in "abc"] + [dict(checkpoint="b", id="c", sample=1,
                                                                              text="2")],
     r"id 'c' has 2 samples where others have 1"),
    ([dict(checkpoint="b", id=i, sample=1, text="1") for i in "abc"], r"id 'a' has samples \[1\]; expected 0 \.\. 0"),
    ([["a", "list"]], r"answers.jsonl:1: expected an object with checkpoint, id, sample, text; got list"),
])
def test_answers_file_refusals(tmp_path, records, pattern):
    from t3s_kernels.pipeline.answers import read_answers

    examples, _ = _answers_data(tmp_path)
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=pattern):
        read_answers(str(path), examples)


def test_answers_file_must_cover_every_listed_checkpoint(tmp_path):
    from t3s_kernels.pipeline.answers import read_answers

    examples, _ = _answers_data(tmp_path)
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(dict(checkpoint="b", id=i, sample=0, text="1")) + "\n" for i in "abc"))
    with pytest.raises(ValueError, match=r"no answers for checkpoint 'checkpoint-5' \(it has \['b'\]\)"):
        read_answers(str(path), examples, ["b", "checkpoint-5"])


def test_cli_judges_an_answers_file_and_bottleneck_reads_the_errors(tmp_path, capsys):
    """Pre-tokenized traces (no tokenizer: a reference is its token ids, space-separated, as an engine run
    on those ids would print them); the table holds the standard errors; the dip is beyond them."""
    from t3s_kernels.cli import main
    from t3s_kernels.pipeline.bottleneck import read_accuracy_errors

    data = tmp_path / "traces.jsonl"
    refs = {f"p{i}": [10 + i, 20 + i] for i in range(8)}
    data.write_text("".join(json.dumps(dict(id=i, input_ids=[5, 6] + r, prompt_length=2)) + "\n"
                            for i, r in refs.items()))
    records = []
    for ck, right in (("base", 8), ("checkpoint-10", 1), ("checkpoint-20", 6)):
        for k, (i, r) in enumerate(refs.items()):
            for sample in range(2):
                text = " ".join(map(str, r)) if k < right else "9"
                records.append(dict(checkpoint=ck, id=i, sample=sample, text=text))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "acc.csv"
    assert main(["accuracy", "--answers", str(answers), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    errors = read_accuracy_errors(str(out))
    assert set(errors) == {"base", "checkpoint-10", "checkpoint-20"} and errors["base"] == 0.0
    assert errors["checkpoint-10"] == pytest.approx((1 / 8 * 7 / 8 * 8 / 7) ** 0.5 / 8 ** 0.5)
    capsys.readouterr()
    assert main(["bottleneck", str(out), "--plot", str(tmp_path / "acc.png")]) == 0
    said = capsys.readouterr().out
    assert "bottleneck: checkpoint-10" in said and "beyond 2 standard errors" in said
    assert (tmp_path / "acc.png").exists()


def test_bottleneck_declares_no_trough_within_the_noise(tmp_path, capsys):
    from t3s_kernels.cli import main

    table = tmp_path / "acc.csv"
    table.write_text("checkpoint,accuracy,stderr,samples\nbase,0.60,0.04,4\nck-10,0.55,0.04,4\nck-20,0.62,0.04,4\n")
    assert main(["bottleneck", str(table)]) == 1
    assert "no trough beyond the noise: the lowest checkpoint ck-10 (0.5500) is 0.0500 below base" in \
        capsys.readouterr().out
    table.write_text("checkpoint,accuracy\nbase,0.60\nck-10,0.55\nck-20,0.62\n")  # no errors: the argmin
    assert main(["bottleneck", str(table)]) == 0


def test_sampled_answers_are_seeded_batched_and_resumed(tmp_path, capsys):
    """--samples 3 at temperature 1: the same seed gives the same answers; a second run reads the cached
    answers of each checkpoint; a changed seed generates anew."""
    from t3s_kernels.cli import main

    model = tiny_causal_lm("qwen3", seed=3).eval()
    folder = tmp_path / "checkpoint-5"
    model.save_pretrained(folder)
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps(dict(id=e.id, input_ids=e.input_ids, labels=e.labels)) + "\n"
                            for e in examples_for(model)))
    args = ["accuracy", "--checkpoints", str(folder), "--data", str(data), "--samples", "3", "--temperature", "1.0",
            "--slack", "0", "--batch-size", "2", "--eos-token-id", str(EOS_ID), "--quiet"]
    out = tmp_path / "acc.csv"
    assert main(args + ["--out", str(out)]) == 0
    first = out.read_text()
    cached = sorted((tmp_path / "acc.csv.answers").iterdir())
    assert len(cached) == 1 and len(cached[0].read_text().splitlines()) == 6 * 3
    capsys.readouterr()
    assert main(args + ["--out", str(out)]) == 0
    assert "answers from" in capsys.readouterr().out and out.read_text() == first
    other = tmp_path / "other.csv"
    assert main(args + ["--out", str(other)]) == 0  # another cache folder: generated again, the same draws
    assert other.read_text() == first
    assert main(args + ["--out", str(out), "--seed", "1"]) == 0
    assert len(list((tmp_path / "acc.csv.answers").iterdir())) == 2
    capsys.readouterr()
    assert main(["accuracy", "--checkpoints", str(folder), "--data", str(data), "--samples", "2", "--out",
                 str(out)]) != 0
    assert "samples > 1 needs temperature > 0" in capsys.readouterr().err


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


def _latex_tokenizer(tmp_path, texts):
    """A small byte-level BPE tokenizer trained on ``texts`` (LaTeX answers round-trip through it), saved
    as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(folder)
    return folder


def test_cli_verifier_math_end_to_end_on_answers_and_on_a_tiny_model(tmp_path):
    """`t3s accuracy --verifier math`: text traces whose responses end in boxed answers, judged from a
    hand-written answers file (0.5 and 1/2 agree; [0,1) and (0,1) do not), and generated by a tiny model
    from the same data (its answers are not math: every one wrong, none refused)."""
    pytest.importorskip("math_verify")
    from t3s_kernels.cli import main
    from t3s_kernels.pipeline.bottleneck import read_accuracy_table

    responses = {"p0": r"so \boxed{\frac{1}{2}}", "p1": r"thus \boxed{[0,1)}", "p2": r"hence \boxed{x^2+2x+1}"}
    data = tmp_path / "traces.jsonl"
    data.write_text("".join(json.dumps(dict(id=i, prompt="Solve it.", response=r)) + "\n"
                            for i, r in responses.items()))
    tok = _latex_tokenizer(tmp_path, ["Solve it."] + list(responses.values()) + [r"\boxed{0.5} (0,1) (x+1)^2"])
    right = {"p0": r"\boxed{0.5}", "p1": r"\boxed{(0,1)}", "p2": r"the answer is \boxed{(x+1)^2}"}
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(dict(checkpoint="base", id=i, sample=0, text=t)) + "\n"
                               for i, t in right.items()))
    out = tmp_path / "acc.csv"
    assert main(["accuracy", "--answers", str(answers), "--data", str(data), "--tokenizer", str(tok),
                 "--verifier", "math", "--out", str(out), "--quiet"]) == 0
    assert read_accuracy_table(str(out)) == [("base", pytest.approx(2 / 3))]  # the interval's openness differs
    model = tiny_causal_lm("qwen3", seed=3, vocab_size=300)
    model.save_pretrained(tmp_path / "checkpoint-1")
    assert main(["accuracy", "--checkpoints", str(tmp_path / "checkpoint-1"), "--data", str(data), "--tokenizer",
                 str(tok), "--verifier", "math", "--max-new-tokens", "8", "--out", str(out), "--quiet"]) == 0
    assert read_accuracy_table(str(out)) == [("checkpoint-1", 0.0)]
