"""Planning models for large-scale training, each checked against a measurement or a simulation.

One module per model: :mod:`memory` (bytes per device by optimizer, precision and ZeRO stage),
:mod:`communication` (the alpha-beta model of collectives) with :mod:`collective_timing` (its
measurement with ``torch.distributed``), :mod:`step_time` (data-parallel step time and time to
solution by number format), :mod:`parallelism` (bytes per device of a transformer on a
``(pp, dp, tp)`` mesh: pipeline stages, Megatron's tensor layout, FSDP shards, activations in
flight) with :mod:`parallel_step_time` (its step: compute, the pipeline bubble, each mesh
dimension's traffic), :mod:`batch_size` (Chebyshev's bound, linear scaling, the noise
scale), :mod:`stability` (stale gradients, gradient descent and heavy-ball rates),
:mod:`network` (spanning tree, max flow and min cut) and :mod:`failures` (chi-squared test of
failure type against hardware).
"""
