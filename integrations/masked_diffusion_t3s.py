"""T3S for a masked-diffusion (LLaDA-style) student: a ``Trainer.compute_loss`` override.

    python integrations/masked_diffusion_t3s.py --steps 20

Each step noises the answer tokens (per-sequence ``p_mask = (1 - eps) t + eps``; prompts never
masked), force-masks the T3S-selected yet-to-learn tokens (the ``t3s_weights`` column, from
``t3s select --rule dllm``), and the patched model scores the masked positions only, with
LLaDA's 1/p_mask weights and SFT normalization. The student here is a tiny bidirectional
Llama (causal mask off) standing in for LLaDA 2.0's ``LLaDA2MoeModelLM``, which has the same
backbone / LM-head split (its remote code cannot be fetched here).
"""

import argparse
import tempfile

import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

import t3s_kernels as t3s
from t3s_kernels.toy import MASK_ID, PAD_ID, synthetic_traces, tiny_bidirectional_lm
from t3s_kernels.trainer_utils import T3SDataCollator, masked_diffusion_compute_loss, train_and_report


class MaskedDiffusionTrainer(Trainer):
    """The dLLM trainers' pattern: the loss is built in ``compute_loss`` from the clean batch."""

    def __init__(self, *args, mask_token_id: int, normalization: str = "llada_sft", seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_token_id = mask_token_id
        self.normalization = normalization
        self.noise_generator = torch.Generator().manual_seed(seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = masked_diffusion_compute_loss(model, inputs, mask_token_id=self.mask_token_id,
                                             normalization=self.normalization, generator=self.noise_generator)
        return (loss, None) if return_outputs else loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    model = tiny_bidirectional_lm("llama")
    t3s.apply_t3s(model, mode="masked_diffusion")
    data = Dataset.from_list(synthetic_traces(64, select_fraction=0.05)).remove_columns(["id", "labels"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = MaskedDiffusionTrainer(
            model=model, mask_token_id=MASK_ID,
            args=TrainingArguments(output_dir=args.output_dir or tmp, max_steps=args.steps,
                                   per_device_train_batch_size=8,
                                   learning_rate=3e-3, logging_steps=max(1, args.steps // 4), report_to=[],
                                   save_strategy="no", use_cpu=True, disable_tqdm=True,
                                   remove_unused_columns=False),
            train_dataset=data, data_collator=T3SDataCollator(pad_token_id=PAD_ID, model=model))
        return train_and_report(trainer)


if __name__ == "__main__":
    main()
