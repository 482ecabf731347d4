"""T3S with TRL's SFTTrainer: the same patched model and mask column, TRL's training loop.

    python integrations/trl_sft_t3s.py --steps 20

The dataset is pre-tokenized (input_ids, labels, t3s_weights), so TRL's own preparation is
skipped and our collator pads the mask column. TRL >= 1.0 computes its loss through a fused
head of its own (``fused_lm_head=True``), which knows no token weights, so ``compute_loss``
is overridden to call the patched model: that is the whole integration.
"""

import argparse
import tempfile

from datasets import Dataset
from recipe_report import train_and_report  # integrations/recipe_report.py, beside this file
from trl import SFTConfig, SFTTrainer

import t3s_kernels as t3s
from t3s_kernels.toy import synthetic_traces, tiny_causal_lm, tiny_tokenizer
from t3s_kernels.trainer_utils import T3SDataCollator


class T3SSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is the patched model's: the fused T3S loss with the mask column."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm("llama")
    t3s.apply_t3s(model)
    data = Dataset.from_list(synthetic_traces(64)).remove_columns(["id", "prompt_length"])
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(output_dir=args.output_dir or tmp, max_steps=args.steps, per_device_train_batch_size=8,
                           learning_rate=3e-3, logging_steps=max(1, args.steps // 4), report_to=[],
                           save_strategy="no", use_cpu=True,
                           disable_tqdm=True, dataset_kwargs={"skip_prepare_dataset": True},
                           remove_unused_columns=False)
        trainer = T3SSFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                data_collator=T3SDataCollator(pad_token_id=tokenizer.pad_token_id, model=model))
        return train_and_report(trainer)


if __name__ == "__main__":
    main()
