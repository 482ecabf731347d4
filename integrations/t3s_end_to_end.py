"""The whole T3S recipe with HF Trainer: pilot SFT -> bottleneck -> score -> select -> retrain from theta_0.

    python integrations/t3s_end_to_end.py --out t3s-run

1. Pilot SFT on the teacher's traces, saving checkpoints; ``BottleneckCallback`` evaluates
   training accuracy every k steps, as the method defines it: the model's own greedy answers
   to the training prompts, judged by exact match (``pipeline.accuracy``; ``t3s accuracy`` does
   the same from saved checkpoints).
2. The bottleneck: the checkpoint of lowest training accuracy; the callback says whether its
   rule confirmed a trough (a dip below the base and a recovery). This toy starts from a random
   initialization, which answers nothing right, so it finds none and says so: the recipe shows
   the plumbing, not the effect (``t3s demo`` is the task built to show it).
3. Scoring: every trace under theta_0 and under the bottleneck (the fused forward).
4. Selection: the AR rule (drop tokens whose confidence rose).
5. Retrain from theta_0 with the mask as a ``t3s_weights`` column.
The same steps exist as commands: ``t3s score``, ``t3s bottleneck``, ``t3s select``.
"""

import argparse
import copy
from pathlib import Path

from datasets import Dataset
from recipe_report import train_and_report  # integrations/recipe_report.py, beside this file
from transformers import Trainer, TrainingArguments

import t3s_kernels as t3s
from t3s_kernels.pipeline import BottleneckCallback, ScoreStore, attach_mask, find_bottleneck, score_dataset, select
from t3s_kernels.pipeline.accuracy import generation_accuracy
from t3s_kernels.pipeline.data import Example
from t3s_kernels.toy import EOS_ID, PAD_ID, synthetic_traces, tiny_causal_lm
from t3s_kernels.trainer_utils import T3SDataCollator


def answer_accuracy(examples):
    """eval_fn for the callback: the fraction of training prompts the model answers exactly right."""
    def evaluate(model, step):
        return generation_accuracy(model, examples, eos_token_id=EOS_ID, pad_token_id=PAD_ID, progress=False).accuracy
    return evaluate


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="t3s-run")
    parser.add_argument("--pilot-steps", type=int, default=30)
    parser.add_argument("--retrain-steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    args = parser.parse_args(argv)
    out = Path(args.out)

    traces = synthetic_traces(64, min_len=16, max_len=16)  # equal lengths keep the proxy eval simple
    train_rows = [{k: t[k] for k in ("input_ids", "labels")} for t in traces]
    theta0 = tiny_causal_lm("qwen3")
    theta0_state = copy.deepcopy(theta0.state_dict())
    collate = dict(pad_token_id=PAD_ID)

    def trainer_args(name, steps):
        return TrainingArguments(output_dir=str(out / name), max_steps=steps, per_device_train_batch_size=16,
                                 learning_rate=3e-3, logging_steps=max(1, steps // 4), report_to=[], use_cpu=True,
                                 disable_tqdm=True, save_strategy="no", remove_unused_columns=False)

    # 1-2. pilot SFT with the bottleneck callback (it saves a checkpoint at each evaluation)
    pilot = t3s.apply_t3s(copy.deepcopy(theta0))
    examples = [Example(t["id"], t["input_ids"], t["labels"]) for t in traces]
    callback = BottleneckCallback(answer_accuracy(examples), every_steps=args.every, patience=2,
                                  history_path=str(out / "pilot_accuracy.json"))
    trainer = Trainer(model=pilot, args=trainer_args("pilot", args.pilot_steps),
                      train_dataset=Dataset.from_list(train_rows),
                      data_collator=T3SDataCollator(model=pilot, **collate), callbacks=[callback])
    train_and_report(trainer)
    table = [(f"step-{s}", a) for s, a in callback.detector.history]
    bottleneck, acc = find_bottleneck(table)
    print(f"lowest training accuracy: {bottleneck} ({acc:.3f}); online rule: {callback.detector.verdict()}")

    # 3. score theta_0 and the bottleneck checkpoint
    store = ScoreStore(out / "store")
    score_dataset(theta0, examples, store, "base", progress=False)
    bott_model = type(theta0).from_pretrained(out / "pilot" / f"checkpoint-{bottleneck.split('-')[1]}")
    score_dataset(bott_model, examples, store, bottleneck, progress=False)

    # 4. select with the AR rule; 5. retrain from theta_0 with the mask column
    selection = select("ar", store.load("base"), store.load(bottleneck))
    masked_rows = [{k: r[k] for k in ("input_ids", "labels", "t3s_weights")}
                   for r in attach_mask([{**t} for t in traces], selection)]
    student = tiny_causal_lm("qwen3")
    student.load_state_dict(theta0_state)
    t3s.apply_t3s(student)
    trainer = Trainer(model=student, args=trainer_args("t3s", args.retrain_steps),
                      train_dataset=Dataset.from_list(masked_rows),
                      data_collator=T3SDataCollator(model=student, **collate))
    losses = train_and_report(trainer)
    print(f"kept {float(selection.mask.sum()) / float(store.load('base').values['scored'].sum()):.1%} of the "
          f"labelled tokens in the T3S loss")
    return dict(bottleneck=bottleneck, losses=losses)


if __name__ == "__main__":
    main()
