"""Shared autodiff machinery for the curvature operators.

All operators here live at a fixed point ``x`` (a flat parameter vector) and
take many products there. The products are reverse-mode passes over graphs
that are built once per batch and then reused ("cached"):

* Hessian:  ``g = ∇f(x)`` with ``create_graph=True``; ``H v = ∂(gᵀv)/∂x`` is one
  backward pass over the gradient's graph.
* Jacobians of an output ``o(x)``: ``Jᵀu`` is one backward pass over the
  forward graph; ``J v`` uses the double-vjp identity ``J v = ∂/∂u (Jᵀu)ᵀv``
  with a dummy ``u``, one backward pass over the (linear-in-``u``) vjp graph.

A :class:`_Point` holds, for every batch, the leaf ``x`` and what its graphs
produced. With ``cache=False`` nothing is kept and each product rebuilds the
graphs batch by batch (memory of one batch, about twice the work).

Data-parallel (:mod:`curvlab.distributed`): an operator created under a process group
sums its products over this rank's batches (with globally normalised weights) and
all-reduces them — one collective per product — so every rank holds the product of the
operator over the whole dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as _dist
from ..data import Batch, Data
from ..params import ParamSpec


def _grad(outputs: Tensor, inputs: Tensor, grad_outputs: Tensor, batched: bool, retain: bool = True) -> Tensor:
    """``vjp`` of ``outputs`` w.r.t. ``inputs``; zeros if ``outputs`` does not depend on ``inputs``.

    ``batched=True`` takes a stack of cotangents (leading dim) in one vmapped pass,
    falling back to a loop for ops without batching rules.
    """
    if not outputs.requires_grad:
        shape = (grad_outputs.shape[0], *inputs.shape) if batched else inputs.shape
        return torch.zeros(shape, dtype=inputs.dtype, device=inputs.device)
    if batched and inputs.device.type == "cpu":
        # On CPU a loop of products over the recorded graph beats ``is_grads_batched``
        # (vmap over the backward: 1.45x slower per vector for a 64-256-256-10 MLP).
        k = grad_outputs.shape[0]
        return torch.stack(
            [_grad(outputs, inputs, go, False, retain=retain or j < k - 1) for j, go in enumerate(grad_outputs)]
        )
    if batched:
        try:
            (g,) = torch.autograd.grad(
                outputs, inputs, grad_outputs, retain_graph=retain, allow_unused=True, is_grads_batched=True
            )
        except RuntimeError:
            return torch.stack([_grad(outputs, inputs, go, False, retain=True) for go in grad_outputs])
        if g is None:
            return torch.zeros((grad_outputs.shape[0], *inputs.shape), dtype=inputs.dtype, device=inputs.device)
        return g
    (g,) = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain, allow_unused=True)
    return torch.zeros_like(inputs) if g is None else g


def compile_options(compile: bool | dict[str, Any]) -> dict[str, Any] | None:  # noqa: A002
    """``None`` (eager) or the keyword arguments for :func:`torch.compile` from an operator's ``compile`` option.

    Raises:
        TypeError: ``compile`` is neither a bool nor a dict.
        RuntimeError: ``torch.compile`` is not available in this torch build.
    """
    if compile is False or compile is None:
        return None
    if compile is True:
        opts: dict[str, Any] = {}
    elif isinstance(compile, dict):
        opts = dict(compile)
    else:
        raise TypeError(f"compile must be a bool or a dict of torch.compile options, got {type(compile).__name__}")
    if not hasattr(torch, "compile"):
        raise RuntimeError("compile=True needs torch.compile (torch >= 2.0)")
    opts.setdefault("dynamic", False)
    return opts


class CompiledProducts:
    """Lazily compiled functional product ``fn(x, V, batch, weight)`` with a vmapped block version.

    ``fn`` maps one vector ``v`` to its product on one batch; :meth:`__call__` applies it to a
    vector or (vmapped over columns) to a ``(n, k)`` block. Compilation happens on first use
    (and again for a new batch shape); a block whose ops have no batching rule falls back to a
    loop over the columns.
    """

    def __init__(self, fn: Callable[..., Tensor], options: dict[str, Any]) -> None:
        self.fn = fn
        self.options = options
        self._vec: Any = None
        self._mat: Any = None

    def __call__(self, x: Tensor, V: Tensor, batch: Batch, weight: float) -> Tensor:
        if V.ndim == 1:
            if self._vec is None:
                self._vec = torch.compile(self.fn, **self.options)
            return self._vec(x, V, batch, weight)
        if self._mat is None:
            self._mat = torch.compile(
                torch.func.vmap(self.fn, in_dims=(None, 1, None, None), out_dims=1), **self.options
            )
        try:
            return self._mat(x, V, batch, weight)
        except (RuntimeError, NotImplementedError):
            return torch.stack([self(x, V[:, j], batch, weight) for j in range(V.shape[1])], dim=1)


def call_model(model: Any, spec: ParamSpec, x: Tensor, inputs: Any) -> Tensor:
    """Evaluate ``model`` at the flat parameters ``x`` on ``inputs``.

    ``model`` is a callable ``model(params, inputs)`` or an ``nn.Module`` (called
    through :func:`torch.func.functional_call` with the parameters of ``x``).
    """
    params = spec.unflatten(x)
    if isinstance(model, nn.Module):
        if isinstance(inputs, tuple):
            return torch.func.functional_call(model, params, inputs)
        return torch.func.functional_call(model, params, (inputs,))
    return model(params, inputs)


def split_supervised_batch(batch: Batch, name: str = "data") -> tuple[Any, Tensor]:
    """``(inputs, targets)`` of a supervised batch (a 2-tuple/list or a dict with 'x'/'y')."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and {"x", "y"} <= set(batch):
        return batch["x"], batch["y"]
    raise ValueError(
        f"each batch of {name} must be an (inputs, targets) pair or a dict with keys 'x' and 'y', "
        f"got {type(batch).__name__}"
    )


def per_sample_losses(loss_fn: Callable[[Tensor, Tensor], Tensor], out: Tensor, y: Tensor) -> Tensor:
    """``loss_fn(out, y)`` checked to be a vector of per-sample losses."""
    losses = loss_fn(out, y)
    if not isinstance(losses, Tensor) or losses.ndim != 1 or losses.shape[0] != out.shape[0]:
        raise ValueError(
            "loss_fn(outputs, targets) must return per-sample losses of shape (batch,) = "
            f"({out.shape[0]},), got {getattr(losses, 'shape', type(losses).__name__)}; "
            "use reduction='none' for torch.nn.functional losses"
        )
    return losses


class CurvatureBase:
    """Per-batch graph builder and cache shared by the curvature operators.

    Subclasses implement ``_build(x, batch, weight) -> dict`` (the graph pieces of
    one batch) and use :meth:`_pieces` to iterate over them.
    """

    def _setup(self, params: Any, data: Any, reduction: str, batch_size_fn: Any, cache: bool | str) -> None:
        self.spec = params if isinstance(params, ParamSpec) else ParamSpec(params)
        self.x = self.spec.flatten()
        self.data = data if isinstance(data, Data) else Data(data, reduction, batch_size_fn)
        if cache == "auto":
            cache = not self.data.multi
        if not isinstance(cache, bool):
            raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
        self.cache = cache
        self._cached: list[dict[str, Any]] | None = None

    @property
    def distributed(self) -> bool:
        """Whether the operator's products are all-reduced over the ranks (fixed at creation)."""
        return self.data.distributed

    def _sum_ranks(self, t: Tensor) -> Tensor:
        """All-reduce a sum over this rank's batches into the sum over the whole dataset (no-op locally)."""
        return _dist.all_reduce_sum(t) if self.data.distributed else t  # type: ignore[return-value]

    def _leaf(self) -> Tensor:
        return self.x.detach().clone().requires_grad_(True)

    def _build(self, x: Tensor, batch: Batch, weight: float) -> dict[str, Any]:
        raise NotImplementedError

    def _pieces(self) -> Any:
        if self.cache:
            if self._cached is None:
                with torch.enable_grad():
                    self._cached = [self._build(self._leaf(), b, w) for b, w in self.data.weighted_batches()]
            yield from self._cached
        else:
            for b, w in self.data.weighted_batches():
                with torch.enable_grad():
                    yield self._build(self._leaf(), b, w)

    def release(self) -> None:
        """Drop the cached graphs (they are rebuilt on the next product)."""
        self._cached = None
