"""Checkpoints, below both the training loop and the distributed strategies that write them.

One file per concept: ``atomic`` (the single-process checkpoint: atomic write, checksum
verification, RNG state, safe encode/decode, :class:`CheckpointManager`), ``sharded``
(``torch.distributed.checkpoint`` folders with a manifest, read through a restricted
unpickler) and ``run`` (how a distributed run's strategy writes and finds its checkpoints:
replicated, consolidated, per rank or sharded). Nothing read from disk may execute code.
It imports only ``gradwise.validation`` and torch, so ``train`` and ``distributed`` can both
use it without importing each other.
"""
