"""T3S for a masked-diffusion (LLaDA-style) student with HF Trainer.

    python integrations/masked_diffusion_t3s.py --steps 20                      # LLaDA conventions
    python integrations/masked_diffusion_t3s.py --steps 20 --convention llada2  # LLaDA 2.0's

Each step noises the answer tokens (prompts never masked), force-masks the T3S-selected
yet-to-learn tokens (the ``t3s_force_mask`` column, from ``t3s select --rule dllm``), and the
patched model scores the masked positions only. ``llada``: t ~ U(eps, 1), 1/t importance weights
(a forced token weighs 1), SFT normalization. ``llada2``: one rate per example from U(0.3, 0.8), no
1/t, the mean over masked tokens. ``MaskedDiffusionTrainer`` noises a step's micro-batches when it
draws them, so gradient accumulation equals one batch as large under every normalization. The
student is a tiny bidirectional Llama (causal mask off) standing in for LLaDA 2.0's
``LLaDA2MoeModelLM``, which has the same backbone / LM-head split (its remote code cannot be
fetched here). Block diffusion is not supported.
"""

import argparse
import tempfile

from datasets import Dataset
from recipe_report import train_and_report  # integrations/recipe_report.py, beside this file
from transformers import TrainingArguments

import t3s_kernels as t3s
from t3s_kernels.masked_diffusion_trainer import LLADA, LLADA2, MaskedDiffusionTrainer
from t3s_kernels.toy import MASK_ID, PAD_ID, synthetic_traces, tiny_bidirectional_lm
from t3s_kernels.trainer_utils import T3SDataCollator

CONVENTIONS = {"llada": LLADA, "llada2": LLADA2}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--convention", choices=sorted(CONVENTIONS), default="llada")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    model = tiny_bidirectional_lm("llama")
    t3s.apply_t3s(model, mode="masked_diffusion")
    traces = synthetic_traces(64, select_fraction=0.05, use="force_mask")
    data = Dataset.from_list(traces).remove_columns(["id", "labels"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = MaskedDiffusionTrainer(
            model=model, mask_token_id=MASK_ID, **CONVENTIONS[args.convention],
            args=TrainingArguments(output_dir=args.output_dir or tmp, max_steps=args.steps,
                                   per_device_train_batch_size=8,
                                   learning_rate=3e-3, logging_steps=max(1, args.steps // 4), report_to=[],
                                   save_strategy="no", use_cpu=True, disable_tqdm=True,
                                   remove_unused_columns=False),
            train_dataset=data, data_collator=T3SDataCollator(pad_token_id=PAD_ID, model=model))
        return train_and_report(trainer)


if __name__ == "__main__":
    main()
