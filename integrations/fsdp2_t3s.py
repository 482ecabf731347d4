"""T3S under FSDP2 (``fully_shard``), in a training loop of your own, one process per device:

    torchrun --nproc-per-node 2 integrations/fsdp2_t3s.py --steps 4 [--head-alone] [--bf16]

Patch first, then shard: each decoder layer a group, the LM head with the root or (``--head-alone``)
in a group of its own, where the patched loss runs inside FSDP2's all-gather of the head (its
hooks unshard, cast under ``--bf16``'s mixed-precision policy, and reduce-scatter the head's
gradient, as for the Linear it replaces). Each rank trains on its own share of the data (data
parallelism); the loss is the mean over each rank's kept tokens, as the unpatched model's.
Gloo on CPU, NCCL on GPU.
"""

import argparse
import os

import torch
import torch.distributed as dist
from recipe_report import train_loop  # integrations/recipe_report.py, beside this file

import t3s_kernels as t3s
from t3s_kernels.toy import PAD_ID, synthetic_traces, tiny_causal_lm
from t3s_kernels.trainer_utils import T3SDataCollator


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--head-alone", action="store_true", help="the LM head in an FSDP2 group of its own")
    parser.add_argument("--bf16", action="store_true", help="a bf16 mixed-precision policy (fp32 reduction)")
    args = parser.parse_args(argv)

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        model = tiny_causal_lm("qwen3").to(device).train()
        t3s.apply_t3s(model)  # patch before sharding
        policy = dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)) \
            if args.bf16 else {}
        for layer in model.model.layers:
            fully_shard(layer, **policy)
        if args.head_alone:
            fully_shard(model.lm_head, **policy)
        fully_shard(model, **policy)
        collate = T3SDataCollator(pad_token_id=PAD_ID, model=model)
        examples = [{k: v for k, v in e.items() if k not in ("id", "prompt_length")}
                    for e in synthetic_traces(8 * world * args.steps)]
        shares = [examples[(step * world + rank) * 8:(step * world + rank + 1) * 8] for step in range(args.steps)]
        return train_loop(model, [collate(share) for share in shares], device, rank)  # each rank its own batches
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
