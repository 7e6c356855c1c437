"""Distributed algorithms that are not a training strategy of the loop: each runs its own
protocol between ranks (``parameter_server``: asynchronous SGD; ``federated``: federated
averaging, with ``federated_logistic`` its label-skewed test problem; ``admm``: consensus
ADMM; ``split_learning``: a model cut between a client and a server).
"""
