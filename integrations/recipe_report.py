"""The recipes' common ending: train, print the logged losses, return them."""


def train_and_report(trainer) -> list[float]:
    """Run ``trainer.train()``, print the logged training losses, return them."""
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"trained {result.global_step} steps; logged losses: {', '.join(f'{x:.3f}' for x in losses)}")
    return losses


def train_loop(model, batches, device, rank: int, lr: float = 3e-3) -> list[float]:
    """The distributed recipes' loop: AdamW over the collated ``batches`` (this rank's), then one line
    'rank R: trained N steps; losses: ...' written at once, so the ranks' lines never interleave."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for batch in batches:
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    print(f"rank {rank}: trained {len(losses)} steps; losses: {', '.join(f'{x:.3f}' for x in losses)}\n", end="",
          flush=True)
    return losses
