"""Multi-process test helpers: spawning ranks (parallel.sim.launch.run_ranks) and the one-process
reference training step the distributed runs are compared against."""
from parallel.sim.launch import free_port, run_ranks  # noqa: F401


def reference_step(model, optimizer, batch, grad_clip: float) -> tuple[float, float]:
    """One single-process step on (B, T+1) tokens as dsv3.train takes it: forward, backward, clip,
    AdamW, aux-loss-free bias update. Returns (loss, grad norm before clipping)."""
    from dsv3.training.optim import clip_grad_norm
    out = model(batch[:, :-1], labels=batch[:, 1:])
    out.loss.backward()
    norm = clip_grad_norm([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.update_bias()
    return out.loss.item(), norm
