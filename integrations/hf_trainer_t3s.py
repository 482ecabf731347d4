"""T3S with the HuggingFace Trainer: a patched model, a mask column, a collator that pads it.

    python integrations/hf_trainer_t3s.py --steps 20
    torchrun --nproc-per-node 2 integrations/hf_trainer_t3s.py --deepspeed integrations/launch/zero3.json

Your own run: replace the tiny model and the synthetic traces with yours; the mask column
``t3s_weights`` comes from ``t3s select`` (True keeps a token in the loss; T3S's AR rule sets
the imitation anchors to False). Everything else stays as written.
"""

import argparse
import tempfile

from datasets import Dataset
from recipe_report import train_and_report  # integrations/recipe_report.py, beside this file
from transformers import Trainer, TrainingArguments

import t3s_kernels as t3s
from t3s_kernels.toy import PAD_ID, synthetic_traces, tiny_causal_lm
from t3s_kernels.trainer_utils import T3SDataCollator


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--deepspeed", default=None,
                        help="a DeepSpeed config, e.g. integrations/launch/zero3.json (launch with torchrun)")
    args = parser.parse_args(argv)

    model = tiny_causal_lm("qwen3")
    t3s.apply_t3s(model)  # training forwards with labels now use the fused loss; logits=None
    data = Dataset.from_list(synthetic_traces(64))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(output_dir=args.output_dir or tmp, max_steps=args.steps,
                                   per_device_train_batch_size=8,
                                   gradient_accumulation_steps=2, learning_rate=3e-3,
                                   logging_steps=max(1, args.steps // 4), report_to=[], save_strategy="no",
                                   use_cpu=True, disable_tqdm=True, deepspeed=args.deepspeed),
            train_dataset=data.remove_columns(["id", "prompt_length"]),
            data_collator=T3SDataCollator(pad_token_id=PAD_ID, model=model),
        )
        return train_and_report(trainer)


if __name__ == "__main__":
    main()
