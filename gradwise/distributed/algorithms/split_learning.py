r"""Split learning: a client process holds the first layers, a server process the rest.

Gupta & Raskar 2018, "Distributed learning of deep neural network over multiple agents"
(J. Netw. Comput. Appl. 116, arXiv:1810.06060); Vepakomma, Gupta, Swedish & Raskar 2018,
"Split learning for health" (arXiv:1812.00564), the "vanilla" configuration: the client keeps
its raw inputs, the server keeps the labels. With the model
:math:`\ell(h(g(x)), y)`, :math:`g` the client's layers (the *cut* after them) and :math:`h`
the server's, one training step on a batch is

1. client: :math:`a = g(x)`, send :math:`a` (the "smashed data") to the server;
2. server: receive :math:`a`, compute :math:`L = \ell(h(a), y)`, backpropagate to get
   :math:`\nabla_\theta L` for its own layers and :math:`\partial L / \partial a`, send
   :math:`\partial L / \partial a` back, step its optimizer;
3. client: receive :math:`\partial L / \partial a`, backpropagate it through :math:`g`
   (:math:`\nabla_\phi L = (\partial a / \partial\phi)^\top \partial L / \partial a`, the chain rule
   cut in two), step its optimizer.

The gradients are those of the unsplit model, so with the same optimizer on both sides the
run equals training :math:`h \circ g` in one process. Only :math:`a` and
:math:`\partial L / \partial a` cross, by ``torch.distributed`` point-to-point send/recv: per
step 2 x batch x (activation size) x element size bytes, nothing else (the server knows
the activation shape in advance, so no header is sent). Both sides count their bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gradwise.validation import check_int


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class SplitClient:
    """The client's half: ``bottom`` (the layers before the cut) and its optimizer.

    Example::

        client = SplitClient(model[:2], Adam(model[:2].parameters()), server=1)
        for inputs in my_batches:
            client.step(inputs)
    """

    def __init__(self, bottom: nn.Module, optimizer: torch.optim.Optimizer, server: int = 1) -> None:
        self.bottom, self.optimizer = bottom, optimizer
        self.server = check_int("server", server, 0, dist.get_world_size() - 1)
        if self.server == dist.get_rank():
            raise ValueError(f"server must be another rank than this client's, got {server}")
        self.bytes_sent = 0
        self.bytes_received = 0

    def step(self, inputs: Tensor) -> None:
        """Forward ``inputs`` to the cut, send the activations, receive their gradient, backpropagate, step."""
        self.optimizer.zero_grad(set_to_none=True)
        activations = self.bottom(inputs)
        dist.send(activations.detach().contiguous(), self.server)
        self.bytes_sent += _nbytes(activations)
        gradient = torch.empty_like(activations)
        dist.recv(gradient, self.server)
        self.bytes_received += _nbytes(gradient)
        activations.backward(gradient)
        self.optimizer.step()


class SplitServer:
    """The server's half: ``top`` (the layers after the cut), the loss and its optimizer.

    Args:
        top: maps the activations to the model's output.
        loss_fn: ``(output, targets) -> scalar loss``.
        optimizer: over ``top``'s parameters.
        activation_shape: the shape of one example's activations at the cut.
        activation_dtype: their dtype (default: that of ``top``'s first parameter); they are
            received on the device of ``top``'s first parameter.
        client: the client's rank.

    Example::

        server = SplitServer(model[2:], nn.functional.cross_entropy, Adam(model[2:].parameters()),
                             activation_shape=(16,), client=0)
        losses = [server.step(targets) for targets in my_labels]
    """

    def __init__(self, top: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], optimizer: torch.optim.Optimizer,
                 activation_shape: Sequence[int], activation_dtype: torch.dtype | None = None, client: int = 0) -> None:
        self.top, self.loss_fn, self.optimizer = top, loss_fn, optimizer
        self.activation_shape = tuple(check_int("activation_shape", size, 1) for size in activation_shape)
        self.activation_dtype = activation_dtype or next(top.parameters()).dtype
        self.device = next(top.parameters()).device
        self.client = check_int("client", client, 0, dist.get_world_size() - 1)
        if self.client == dist.get_rank():
            raise ValueError(f"client must be another rank than this server's, got {client}")
        self.bytes_sent = 0
        self.bytes_received = 0

    def step(self, targets: Tensor) -> float:
        """Receive the activations of the batch whose labels are ``targets``, finish the forward
        pass and the loss, send back the activations' gradient, step; returns the loss."""
        activations = torch.empty((targets.shape[0], *self.activation_shape), dtype=self.activation_dtype,
                                  device=self.device)
        dist.recv(activations, self.client)
        self.bytes_received += _nbytes(activations)
        activations.requires_grad_(True)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.top(activations), targets)
        loss.backward()
        grad = activations.grad
        if grad is None:
            raise RuntimeError("the server's model does not use the activations: there is no gradient to send back")
        dist.send(grad, self.client)
        self.bytes_sent += _nbytes(grad)
        self.optimizer.step()
        return float(loss.detach())
