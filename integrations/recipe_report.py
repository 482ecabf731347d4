"""The recipes' common ending: train, print the logged losses, return them."""


def train_and_report(trainer) -> list[float]:
    """Run ``trainer.train()``, print the logged training losses, return them."""
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"trained {result.global_step} steps; logged losses: {', '.join(f'{x:.3f}' for x in losses)}")
    return losses
