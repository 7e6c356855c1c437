"""The training strategies of ``gradwise train``: how N processes share one training run.

``base`` (the :class:`Strategy` contract every strategy fulfils), ``registry`` (the
strategies by name), and one file per strategy: ``ddp``, ``zero`` (ZeRO-1/2 and FSDP2)
built on ``zero_optimizer`` (:class:`ZeroOptimizer`) and ``fsdp`` (:func:`shard_model`),
``dtensor`` (what the DTensor strategies share), ``tensor_parallel``, ``pipeline``, and
``local_sgd`` (local SGD and DiLoCo) built on ``periodic_averaging``.
"""
