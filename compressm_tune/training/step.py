"""One optimizer step: forward, backward, update; on CUDA replayed from a captured graph.

Why graphs: on a GPU, a small SSM's step is a few hundred short kernels, and launching them
from Python costs more than running them. So on CUDA the forward
and backward are captured once into a ``torch.cuda.CUDAGraph`` and replayed on every batch
(copied into static input buffers); the fused AdamW update runs eagerly after the replay (one
launch), so the learning-rate schedule stays a plain float. The capture is keyed on the very
parameter objects of the model: a reduction (new, narrower parameters), a rollback or a resumed
checkpoint builds new ones, and the next step captures again.

A capture warms up twice on a side stream first, as CUDA graphs require; those two passes
would move BatchNorm's running statistics, so the buffers are restored after the capture. If
capture fails (an operation that cannot be captured), the step says so once and runs eagerly.

With a ``teacher`` (distillation), the teacher's forward on the same batch runs inside the step
(and inside the captured graph), without gradients and in eval mode.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from compressm_tune._device import autocast

__all__ = ["TrainStep"]

Loss = Callable[..., torch.Tensor]


class TrainStep:
    """``step(model, optimizer, x, y) -> loss`` (a detached scalar tensor on the device).

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(model_output, y)``, or with a ``teacher`` ``loss_fn(model_output, y,
        teacher_output)``; outputs are upcast to float32 first.
    device : torch.device
    precision : str
        ``fp32``, ``tf32`` or ``bf16`` (autocast around the forward pass).
    graphs : bool
        Capture and replay CUDA graphs (only on CUDA devices).
    teacher : torch.nn.Module, optional
        A frozen model run on the same inputs (put in eval mode here; no gradients).
    """

    def __init__(self, loss_fn: Loss, device: torch.device, precision: str,
                 graphs: bool = True, teacher: torch.nn.Module | None = None) -> None:
        self.loss_fn, self.device, self.precision = loss_fn, device, precision
        self.teacher = teacher.eval() if teacher is not None else None
        self.graphs = graphs and device.type == "cuda"
        self._graph: torch.cuda.CUDAGraph | None = None
        self._params: list[torch.nn.Parameter] = []  # strong refs: ids are never reused
        self._grads: list[torch.Tensor | None] = []
        self._static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.captures = 0

    def _forward_backward(self, model: torch.nn.Module, x: torch.Tensor,
                          y: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            if self.teacher is None:
                loss = self.loss_fn(model(x).float(), y)
            else:
                with torch.no_grad():
                    target = self.teacher(x).float()
                loss = self.loss_fn(model(x).float(), y, target)
        loss.backward()
        return loss

    def __call__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.graphs and not self._current(model, x, y):
            self._capture(model, optimizer, x, y)
        if self._graph is None:
            optimizer.zero_grad(set_to_none=True)
            loss = self._forward_backward(model, x, y)
        else:
            static_x, static_y, loss = self._static
            static_x.copy_(x)
            static_y.copy_(y)
            self._graph.replay()
            for p, g in zip(self._params, self._grads, strict=True):
                p.grad = g  # the graph writes these buffers, whatever happened to .grad since
        optimizer.step()
        return loss.detach()

    def _current(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
        params = list(model.parameters())
        return (self._graph is not None and len(params) == len(self._params)
                and all(a is b for a, b in zip(params, self._params, strict=True))
                and self._static[0].shape == x.shape and self._static[1].shape == y.shape)

    def _capture(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 x: torch.Tensor, y: torch.Tensor) -> None:
        self._graph, self._static, self._params, self._grads = None, None, [], []
        buffers = [b.clone() for b in model.buffers()]
        static_x, static_y = x.clone(), y.clone()
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up: kernel compilation, cuBLAS workspaces
                    optimizer.zero_grad(set_to_none=True)
                    self._forward_backward(model, static_x, static_y)
            torch.cuda.current_stream(self.device).wait_stream(side)
            optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loss = self._forward_backward(model, static_x, static_y)
        except Exception as exc:  # any op that cannot be captured: run eagerly from now on
            self.graphs = False
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"compressm-tune: CUDA graph capture failed ({first}); training eagerly",
                  file=sys.stderr)
            optimizer.zero_grad(set_to_none=True)
            return
        finally:
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers, strict=True):
                    b.copy_(saved)
        self._graph, self._static = graph, (static_x, static_y, loss)
        self._params = list(model.parameters())
        self._grads = [p.grad for p in self._params]
        self.captures += 1
