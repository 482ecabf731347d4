"""T3S on a model loaded with transformers' tensor parallelism (``tp_plan="auto"``), one process per
device:

    torchrun --nproc-per-node 2 integrations/tensor_parallel_t3s.py --steps 4

Every layer is sharded, the LM head over the vocabulary (a ``Shard(0)`` DTensor). Say so with
``apply_t3s(model, tensor_parallel=True)``: the loss then runs vocabulary-parallel, each rank
over its own rows of the head, the softmax states merged across ranks exactly (no rank ever
holds the whole head or whole-vocabulary logits). Every rank sees the same tokens, as tensor
parallelism requires. Gloo on CPU, NCCL on GPU.
"""

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
from recipe_report import train_loop  # integrations/recipe_report.py, beside this file

import t3s_kernels as t3s
from t3s_kernels.toy import PAD_ID, synthetic_traces, tiny_causal_lm
from t3s_kernels.trainer_utils import T3SDataCollator


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", default=None, help="a local model folder (default: a tiny Qwen3 saved here)")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = [args.model or os.path.join(tmp, "model")]
            if args.model is None:  # rank 0 saves a tiny model where every rank loads it (one machine)
                dist.broadcast_object_list(folder, src=0)
                if rank == 0:
                    tiny_causal_lm("qwen3").save_pretrained(folder[0])
                dist.barrier()
            model = AutoModelForCausalLM.from_pretrained(folder[0], tp_plan="auto", dtype=torch.float32).train()
            dist.barrier()  # every rank has loaded before rank 0 removes the folder
        t3s.apply_t3s(model, tensor_parallel=True)
        collate = T3SDataCollator(pad_token_id=PAD_ID, model=model)
        examples = [{k: v for k, v in e.items() if k not in ("id", "prompt_length")}
                    for e in synthetic_traces(8 * args.steps)]
        batches = [collate(examples[step * 8:(step + 1) * 8]) for step in range(args.steps)]
        return train_loop(model, batches, device, rank)  # every rank the same batches
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
