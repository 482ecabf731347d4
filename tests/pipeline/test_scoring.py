"""Scoring: stored log-probabilities equal log_softmax(model(...).logits) at the labels; the
masked-diffusion protocol scores each answer token once; a killed run resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from t3s_kernels.pipeline.data import Example, load_examples
from t3s_kernels.pipeline.scoring import score_dataset
from t3s_kernels.pipeline.store import ScoreStore
from t3s_kernels.toy import MASK_ID, synthetic_traces, tiny_bidirectional_lm, tiny_causal_lm
from tests.helpers import assert_close

pytest.importorskip("transformers")


def examples(n=12, **kw):
    return [Example(e["id"], e["input_ids"], e["labels"]) for e in synthetic_traces(n, **kw)]


def test_causal_scores_equal_eager_log_softmax(tmp_path):
    model = tiny_causal_lm("qwen3").eval()
    exs = examples()
    store = ScoreStore(tmp_path)
    assert score_dataset(model, exs, store, "base", max_tokens=100, progress=False) == len(exs)
    scores = store.load("base")
    for i, ex in enumerate(exs):
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        want = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
        scored = scores.example(i, "scored")
        labelled = torch.tensor(ex.labels) != -100
        assert torch.equal(scored[1:], labelled[1:]) and not scored[0]
        assert_close(scores.example(i)[1:][scored[1:]], want[scored[1:]], 1e-5, "logprob")
        assert (scores.example(i)[~scored] == 0).all()
    assert score_dataset(model, exs, store, "base", progress=False) == 0  # complete: nothing to redo


def protocol_groups(ex, index: int, rounds: int, seed: int = 0) -> torch.Tensor:
    """The self-scoring protocol's groups of example ``index`` (pipeline/scoring.py), written out: its answer
    positions in a random order (seed + index), dealt into ``rounds`` groups; -1 elsewhere."""
    answer = torch.tensor(ex.labels) != -100
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    groups = torch.full((len(ex.input_ids),), -1)
    groups[answer.nonzero().squeeze(1)] = torch.randperm(int(answer.sum()), generator=g) % rounds
    return groups


def test_masked_diffusion_protocol_scores_each_answer_token_once(tmp_path):
    model = tiny_bidirectional_lm("llama").eval()
    exs = examples(6)
    store = ScoreStore(tmp_path)
    score_dataset(model, exs, store, "self", protocol="masked_diffusion", mask_token_id=MASK_ID, rounds=3,
                  progress=False)
    scores = store.load("self")
    ex = exs[2]
    assert torch.equal(scores.example(2, "scored"), torch.tensor(ex.labels) != -100)
    masked = protocol_groups(ex, 2, rounds=3) == 1  # the documented protocol, by hand, for one group
    ids = torch.tensor(ex.input_ids)
    with torch.no_grad():
        logits = model(input_ids=torch.where(masked, MASK_ID, ids)[None]).logits[0].float()
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1)[masked]
    assert_close(scores.example(2)[masked], want, 1e-5, "logprob")
    with pytest.raises(ValueError, match="needs mask_token_id"):
        score_dataset(model, exs, store, "x", protocol="masked_diffusion")


def test_block_diffusion_protocol_scores_in_the_training_layout(tmp_path):
    """The same groups as the masked-diffusion protocol, each round's noisy sequence beside the clean one
    under the block mask (the rule written out in tests/test_patching_diffusion.py); the producer record
    names the block size."""
    from tests.test_patching_diffusion import rule_mask

    model = tiny_bidirectional_lm("llama", attn_implementation="sdpa").eval()
    exs = examples(5)
    store = ScoreStore(tmp_path)
    score_dataset(model, exs, store, "self", protocol="block_diffusion", block_size=4, mask_token_id=MASK_ID,
                  rounds=2, progress=False)
    scores = store.load("self")
    producer = store.producer("self")
    assert producer["block_size"] == 4 and producer["protocol"] == "block_diffusion"
    ex = exs[3]
    assert torch.equal(scores.example(3, "scored"), torch.tensor(ex.labels) != -100)
    masked = protocol_groups(ex, 3, rounds=2) == 0
    ids = torch.tensor(ex.input_ids)
    n = ids.numel()
    allowed = rule_mask(n, 4)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([torch.where(masked, MASK_ID, ids), ids])[None],
                       position_ids=torch.arange(n).repeat(2)[None], attention_mask=mask).logits[0, :n].float()
    want = torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1)[masked]
    assert_close(scores.example(3)[masked], want, 1e-5, "logprob")
    with pytest.raises(ValueError, match="block_size goes with protocol='block_diffusion'"):
        score_dataset(model, exs, store, "x", protocol="block_diffusion", mask_token_id=MASK_ID)


def test_masked_diffusion_protocol_gives_a_padded_batch_the_full_attention_mask():
    """A student whose own mask builder makes a padded 2-D mask causal (LLaDA 2.0's code under
    transformers 4.x; tests/standins.py) scores each example in a padded batch as it scores it alone:
    the protocol sends the padding as a 4-D mask, which such a model takes as given."""
    from t3s_kernels.pipeline.scoring import score_batch_masked_diffusion
    from tests.standins import StandInLM

    model = StandInLM("causal_under_2d", vocab_size=512).eval()
    exs = examples(3)
    assert len({len(e.input_ids) for e in exs}) > 1  # a padded batch
    batch = score_batch_masked_diffusion(model, exs, [0, 1, 2], mask_token_id=MASK_ID, rounds=2)
    for i, e in enumerate(exs):
        alone = score_batch_masked_diffusion(model, [e], [i], mask_token_id=MASK_ID, rounds=2)[0]
        assert torch.equal(batch[i]["scored"], alone["scored"]) and alone["scored"].any()
        assert_close(batch[i]["logprob"], alone["logprob"], 1e-5, "logprob")
        assert_close(batch[i]["entropy"], alone["entropy"], 1e-5, "entropy")


def test_data_loading_refusals(tmp_path):
    bad = tmp_path / "bad.jsonl"
    for lines, pattern in [
        ([{"id": "a", "input_ids": [1, 2], "prompt_length": 1}, {"input_ids": [1, 2], "prompt_length": 1}],
         "needs an 'id'"),  # some ids present, one absent: refused (all absent: the row index)
        ([{"id": "a", "input_ids": [1, 2], "labels": [1]}], "labels has 1 entries but input_ids has 2"),
        ([{"id": "a", "input_ids": [1, 2]}], "needs 'prompt_length' or 'labels'"),
        ([{"id": "a", "input_ids": [1], "prompt_length": 0}, {"id": "a", "input_ids": [2], "prompt_length": 0}],
         "appears more than once"),
        ([{"id": "a", "prompt": "t5", "response": "t6"}], "need a tokenizer folder"),
    ]:
        bad.write_text("".join(json.dumps(x) + "\n" for x in lines))
        with pytest.raises(ValueError, match=pattern):
            load_examples(str(bad))
    bad.write_text('{"id": "a", "input_ids": [1, 2], "prompt_length": 1}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_examples(str(bad))


def test_text_examples_with_a_local_tokenizer(tmp_path):
    from t3s_kernels.toy import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "q1", "prompt": "t5 t6", "response": "t7 t8"}) + "\n")
    (ex,) = load_examples(str(data), str(tmp_path / "tok"))
    assert ex.input_ids == [5, 6, 7, 8, 1] and ex.labels == [-100, -100, 7, 8, 1]
    (tmp_path / "model_only").mkdir()
    (tmp_path / "model_only" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_examples(str(data), str(tmp_path / "model_only"))


def test_killed_scoring_run_resumes_with_every_example_exactly_once(tmp_path):
    """200 traces of 512 tokens, scored by the CLI in a subprocess, SIGKILLed halfway, restarted."""
    model_dir, data, store_dir = tmp_path / "model", tmp_path / "traces.jsonl", tmp_path / "store"
    tiny_causal_lm("qwen3", max_position_embeddings=512).save_pretrained(model_dir)
    traces = synthetic_traces(200, min_len=512, max_len=512)
    data.write_text("".join(json.dumps({"id": t["id"], "input_ids": t["input_ids"], "prompt_length": 6}) + "\n"
                            for t in traces))
    cmd = [sys.executable, "-m", "t3s_kernels.cli", "score", "--model", str(model_dir), "--data", str(data),
           "--store", str(store_dir), "--name", "base", "--max-batch", "2", "--device", "cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    shard_dir = store_dir / "scores" / "base"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shard_dir.exists() and len(list(shard_dir.glob("*.safetensors"))) >= 10:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    store = ScoreStore(store_dir)
    partial = store.done("base")
    assert 0 < len(partial) < 200
    with pytest.raises(ValueError, match="incomplete"):
        store.load("base")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"scored {200 - len(partial)} examples" in done.stdout
    assert "scoring 'base'" in done.stderr  # the progress bar
    assert "taking over a stale lock of score set 'base'" in done.stderr  # the killed run's, said aloud
    scores = store.load("base")  # complete, each example once (load refuses duplicates)
    assert scores.ids == [t["id"] for t in traces] and int(scores.offsets[-1]) == 200 * 512


def test_torchrun_ranks_write_their_own_shards_and_reads_merge(tmp_path):
    model = tiny_causal_lm("qwen3").eval()
    exs = examples(9)
    store = ScoreStore(tmp_path)
    for rank in (1, 0):  # as two processes of a torchrun launch
        score_dataset(model, exs, store, "base", rank=rank, world_size=2, progress=False)
    names = sorted(p.name.split("-")[1] for p in store.shards("base"))
    assert set(names) == {"r0", "r1"}
    single = ScoreStore(tmp_path / "single")
    score_dataset(model, exs, single, "base", progress=False)
    assert torch.allclose(store.load("base").values["logprob"], single.load("base").values["logprob"], atol=1e-6)


def test_examples_the_model_cannot_score_are_refused_by_name(tmp_path):
    model = tiny_causal_lm("qwen3", max_position_embeddings=16)
    store = ScoreStore(tmp_path / "store")
    with pytest.raises(ValueError, match=r"example 'big' has token id 9999, outside the model's vocabulary"):
        score_dataset(model, [Example("big", [5, 9999, 7], [-100, 9999, 7])], store, "base", progress=False)
    with pytest.raises(ValueError, match=r"example 'long' has 20 tokens, more than the model's max_position_emb"):
        score_dataset(model, [Example("long", [5] * 20, [-100] + [5] * 19)], store, "base", progress=False)
    with pytest.raises(ValueError, match=r"mask_token_id 600 is outside the model's vocabulary \[0, 512\)"):
        score_dataset(model, [Example("a", [5, 6], [-100, 6])], store, "base", protocol="masked_diffusion",
                      mask_token_id=600, progress=False)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        score_dataset(model, [Example("a", [5, 6], [-100, 6])], store, "base", rounds=0, progress=False)


def test_pre_tokenized_data_needs_no_tokenizer_even_when_a_folder_is_named(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "input_ids": [5, 6, 7], "prompt_length": 1}) + "\n")
    (ex,) = load_examples(str(data), str(tmp_path / "no-tokenizer-here"))  # never loaded: no text example
    assert ex.labels == [-100, 6, 7]


def test_a_label_outside_the_vocabulary_is_refused_before_any_shard(tmp_path):
    model = tiny_causal_lm("qwen3")
    store = ScoreStore(tmp_path / "store")
    exs = [Example("ok", [5, 6, 7], [-100, 6, 7]), Example("bad-label", [5, 6, 7], [-100, 6, 700])]
    with pytest.raises(ValueError, match=r"example 'bad-label' has label id 700, outside the model's vocabulary "
                                         r"\[0, 512\)"):
        score_dataset(model, exs, store, "base", max_batch=1, progress=False)
    assert store.shards("base") == [] and store.manifest() is None  # refused up front, nothing written
