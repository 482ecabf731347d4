"""Distilling a tiny teacher into a tiny student with T3S weights: CE on the selected tokens
plus a KD term to the teacher's distribution, in one fused pass per head.

    python integrations/distill_t3s.py --steps 20

The student is patched with the teacher's LM head and the KD options; each step runs the
teacher's backbone without gradients and hands its hidden states to the student's forward.
With an offline top-k cache instead, pass ``teacher_topk_ids`` / ``teacher_topk_logprobs``.
"""

import argparse
import tempfile

import torch
from datasets import Dataset
from recipe_report import train_and_report  # integrations/recipe_report.py, beside this file
from transformers import Trainer, TrainingArguments

import t3s_kernels as t3s
from t3s_kernels.toy import PAD_ID, synthetic_traces, tiny_causal_lm
from t3s_kernels.trainer_utils import T3SDataCollator


class DistillTrainer(Trainer):
    def __init__(self, *args, teacher, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with torch.no_grad():
            teacher_hidden = self.teacher.model(input_ids=inputs["input_ids"],
                                                attention_mask=inputs["attention_mask"]).last_hidden_state
        outputs = model(**inputs, teacher_hidden=teacher_hidden, num_items_in_batch=num_items_in_batch)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--kd-loss", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    args = parser.parse_args(argv)

    teacher = tiny_causal_lm("qwen3", seed=1, hidden_size=96, head_dim=24)  # a different hidden size
    student = tiny_causal_lm("qwen3", seed=0)
    t3s.apply_t3s(student, teacher_weight=teacher.lm_head.weight, kd_weight=0.5, kd_loss=args.kd_loss,
                  kd_temperature=2.0)
    data = Dataset.from_list(synthetic_traces(64)).remove_columns(["id", "prompt_length"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DistillTrainer(
            model=student, teacher=teacher,
            args=TrainingArguments(output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=8,
                                   learning_rate=3e-3, logging_steps=max(1, args.steps // 4), report_to=[],
                                   save_strategy="no", use_cpu=True, disable_tqdm=True, remove_unused_columns=False),
            train_dataset=data, data_collator=T3SDataCollator(pad_token_id=PAD_ID, model=student))
        return train_and_report(trainer)


if __name__ == "__main__":
    main()
