"""Training settings shared by the benchmarks that study what an optimizer's update alone does to a network
(edge_of_stability.py, implicit_regularisation.py)."""

UPDATE_ONLY = dict(
    schedule="constant",
    warmup_steps=0,
    weight_decay=0.0,
    clip=None,
    spike_factor=1e6,
    eval_every=10**6,
    checkpoint_every=10**6,
)
"""``TrainConfig`` settings that leave nothing in a run but the optimizer's update: a constant lr without warm-up,
no weight decay, no clipping, no rollback of a loss spike, and no evaluation or checkpoint inside the run."""
