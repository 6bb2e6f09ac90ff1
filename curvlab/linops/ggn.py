r"""Generalized Gauss-Newton operator :math:`G = \sum_n J_nᵀ Q_n J_n`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..data import Batch
from ..params import ModuleState
from ._autodiff import (
    CompiledProducts,
    CurvatureBase,
    _grad,
    _independent,
    call_model,
    compile_options,
    loss_value,
    split_supervised_batch,
    warn_train_mode_dropout,
)
from ._base import LinearOperator

__all__ = ["GGNOperator", "ggn"]


class OutputCurvature(CurvatureBase, LinearOperator):
    r"""Operators of the form :math:`\sum_b J_bᵀ Q_b J_b` for an output map :math:`o_b(x)`.

    Subclasses give, per batch, the output ``o`` (a function of the leaf ``x``) and a
    symmetric output-space product ``q(u)``. Products are three reverse passes over
    graphs cached per batch: :math:`J v` (double-vjp), :math:`Q (Jv)`, :math:`Jᵀ(QJv)`.
    """

    def _init_common(
        self,
        model: Any,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        params: Any,
        data: Any,
        reduction: str,
        cache: bool | str,
        batch_size_fn: Any,
        psd: bool,
        *,
        check_deterministic: bool = True,
        state: ModuleState | None = None,
        key: int | None = None,
        what: str = "ggn",
    ) -> None:
        if not callable(model):
            raise TypeError(f"model_fn must be callable or an nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if params is None:
            if not isinstance(model, nn.Module):
                raise ValueError("params is None: pass the parameters, or an nn.Module as model_fn")
            params = model
        if data is None:
            raise ValueError("data must hold (inputs, targets) batches: one batch or an iterable of batches")
        if state is None:  # a problem's operators follow the mode the user chose for training
            warn_train_mode_dropout(model, what, stacklevel=4)
        self._setup(
            params,
            data,
            reduction,
            batch_size_fn,
            cache,
            state=state,
            key=key,
            module=model if isinstance(model, nn.Module) else None,
            check_deterministic=check_deterministic,
        )
        n = self.spec.size
        LinearOperator.__init__(self, (n, n), self.spec.dtype, self.spec.device, symmetric=True, psd=psd)
        self.model, self.loss_fn = model, loss_fn
        self._value: Tensor | None = None
        self._gradient: Tensor | None = None
        self._compiled: CompiledProducts | None = None

    def _sample_weight(self) -> float:
        return 1.0 / self.data.n_total() if self.data.reduction == "mean" else 1.0

    def _loss(self, o: Tensor, y: Any, weight: float) -> Tensor:
        r"""The batch's weighted loss: :math:`w\sum_n \ell_n` (per-sample losses) or :math:`w_b L_b` (a scalar)."""
        losses, per_sample = loss_value(self.loss_fn, o, y)
        return losses.sum() * self._sample_weight() if per_sample else losses * weight

    def _uses_pieces(self) -> bool:
        return self._compiled is None

    def _jacobian_pieces(self, x: Tensor, o: Tensor) -> dict[str, Any]:
        if not o.requires_grad:
            raise _independent("the model output")
        u0 = torch.zeros_like(o, requires_grad=True)
        (jt,) = torch.autograd.grad(o, x, u0, create_graph=True, allow_unused=True)
        if jt is None:
            raise _independent("the model output")
        return {"x": x, "o": o, "u0": u0, "jt": jt}

    def _q(self, piece: dict[str, Any], U: Tensor, batched: bool) -> Tensor:
        raise NotImplementedError

    @property
    def _records_value(self) -> bool:
        return self._compiled is None

    def _products(self, V: Tensor, batched: bool) -> Tensor:
        if self._compiled is not None:
            compiled = self._compiled
            out = self._zeros(V.shape[0] if batched else None)
            for i, batch, w in self._batches():
                with self._scope(i):
                    r = compiled(self.x, V.T if batched else V, batch, w)
                out = out + (r.T if batched else r)
                self._record(i, batch, None)
            self._end_pass()
            return self._sum_ranks(out)
        out = self._zeros(V.shape[0] if batched else None)
        for p in self._pieces():
            jv = _grad(p["jt"], p["u0"], V, batched, retain=True)
            qjv = self._q(p, jv, batched)
            out = out + _grad(p["o"], p["x"], qjv, batched, retain=self.cache)
        return self._sum_ranks(out)

    def _matvec(self, v: Tensor) -> Tensor:
        return self._products(v, batched=False)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._products(V.T.contiguous(), batched=True).T

    def _value_grad(self) -> None:
        val = torch.zeros((), dtype=self.spec.dtype, device=self.spec.device)
        grad = self._zeros(None)
        if self._compiled is None:
            for p in self._pieces():
                val, grad = val + p["value"], grad + p["grad"]
        else:
            for i, batch, w in self._batches():
                with torch.enable_grad(), self._scope(i):
                    z = self._leaf()
                    inputs, y = split_supervised_batch(batch)
                    v = self._value_of(call_model(self.model, self.spec, z, inputs), y, w)
                    (g,) = torch.autograd.grad(v, z, allow_unused=True) if v.requires_grad else (None,)
                if g is None:
                    raise _independent("the model output")
                val, grad = val + v.detach(), grad + g
        both = self._sum_ranks(torch.cat([grad, val.reshape(1).to(grad.dtype)]))
        self._value, self._gradient = both[-1].to(val.dtype), both[:-1]

    def _value_of(self, o: Tensor, y: Any, weight: float) -> Tensor:
        return self._loss(o, y, weight)

    @property
    def value(self) -> Tensor:
        """The loss (mean or sum over the data) at the operator's point."""
        if self._value is None:
            self._value_grad()
        assert self._value is not None
        return self._value

    @property
    def gradient(self) -> Tensor:
        """The loss gradient (flat) at the operator's point."""
        if self._gradient is None:
            self._value_grad()
        assert self._gradient is not None
        return self._gradient


class GGNOperator(OutputCurvature):
    r"""Generalized Gauss-Newton matrix :math:`G = \sum_n J_nᵀ\, \nabla^2_{o}\ell_n\, J_n` (scaled).

    :math:`J_n = \partial o_n / \partial x` is the Jacobian of the model output for
    sample ``n`` and :math:`Q_n = \nabla^2_o \ell(o_n, y_n)` the Hessian of the loss with
    respect to the output, taken by autodiff (exact for any loss: MSE gives the
    identity, softmax cross-entropy :math:`\operatorname{diag}(p) - ppᵀ`).
    With ``reduction="mean"`` the whole is divided by the number of samples ``N``.
    A reduced (scalar) loss :math:`L_b(o_b)` of the whole batch output enters through its
    full output-space Hessian, :math:`J_bᵀ \nabla^2_{o_b} L_b J_b`, weighted as the batch mean
    (or sum) it is. Build it with :func:`ggn`.
    """

    _what = "the loss"

    def _build(self, x: Tensor, batch: Batch, weight: float) -> dict[str, Any]:
        inputs, y = split_supervised_batch(batch)
        o = call_model(self.model, self.spec, x, inputs)
        piece = self._jacobian_pieces(x, o)
        od = o.detach().requires_grad_(True)
        loss = self._loss(od, y, weight)
        (gl,) = torch.autograd.grad(loss, od, create_graph=True)
        piece.update(od=od, gl=gl, value=loss.detach())
        piece["grad"] = _grad(o, x, gl.detach(), False, retain=True)
        return piece

    def _q(self, piece: dict[str, Any], U: Tensor, batched: bool) -> Tensor:
        return _grad(piece["gl"], piece["od"], U, batched, retain=True)

    def _ggn_one(self, x: Tensor, v: Tensor, batch: Batch, w: float) -> Tensor:
        r"""Functional :math:`w\,J^\top Q J v` on one batch (``jvp``, loss-Hessian ``jvp``, ``vjp``).

        This is the function ``compile=True`` compiles.
        """
        inputs, y = split_supervised_batch(batch)

        def out_fn(z: Tensor) -> Tensor:
            return call_model(self.model, self.spec, z, inputs)

        o, jv = torch.func.jvp(out_fn, (x,), (v,))

        def loss_grad(o_: Tensor) -> Tensor:
            return torch.func.grad(lambda q: self._loss(q, y, w))(o_)

        _, qjv = torch.func.jvp(loss_grad, (o.detach(),), (jv,))
        _, pullback = torch.func.vjp(out_fn, x)
        return pullback(qjv)[0]


def ggn(
    model_fn: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    params: Any,
    data: Any,
    *,
    reduction: str = "mean",
    cache: bool | str = "auto",
    batch_size_fn: Callable[[Batch], int] | None = None,
    psd: bool = True,
    compile: bool | dict[str, Any] = False,  # noqa: A002
    check_deterministic: bool = True,
    state: ModuleState | None = None,
    key: int | None = None,
) -> GGNOperator:
    r"""Matrix-free generalized Gauss-Newton matrix of a supervised loss.

    .. math::
        G = \frac{1}{N} \sum_{n=1}^{N} J_nᵀ\, Q_n\, J_n,\qquad
        J_n = \frac{\partial f(x_n; \theta)}{\partial \theta},\quad
        Q_n = \nabla^2_{o}\, \ell(o, y_n)\big|_{o = f(x_n;\theta)}

    (without the :math:`1/N` for ``reduction="sum"``), summed exactly over every batch of ``data``.

    A reduced loss (one scalar per batch: ``F.cross_entropy``, ``nn.CrossEntropyLoss()``,
    ``F.mse_loss`` with their default ``reduction="mean"``) is exact too: its curvature in output
    space is taken by an HVP with respect to the whole batch output,
    :math:`G = \sum_b w_b J_bᵀ \nabla^2_{o_b} L_b(o_b) J_b` with :math:`w_b = n_b/N` (the batch
    loss taken as a batch mean; ``reduction="sum"``: :math:`w_b = 1`, the batch loss a sum).

    Module state (:mod:`curvlab.params`): an ``nn.Module`` model is evaluated on a snapshot of
    its buffers (no product writes to them; train-mode BatchNorm uses batch statistics), with
    dropout masks fixed per batch and attention on torch's math kernel.

    Args:
        model_fn: ``model_fn(params, inputs) -> outputs`` of shape ``(batch, ...)``,
            or an ``nn.Module`` (called with :func:`torch.func.functional_call`).
        loss_fn: ``loss_fn(outputs, targets)``: per-sample losses of shape ``(batch,)``
            (e.g. ``lambda o, y: F.cross_entropy(o, y, reduction="none")``) or a reduced scalar
            (``F.cross_entropy``, ``nn.CrossEntropyLoss()``).
        params: the point (tensor / tuple / list / dict / ``nn.Module``); ``None`` takes the
            parameters of ``model_fn`` when it is a module.
        data: one ``(inputs, targets)`` batch or an iterable of them.
        reduction: ``"mean"`` (divide by the number of samples) or ``"sum"``.
        cache: keep each batch's graphs between products (``"auto"``: single batch only).
        batch_size_fn: number of samples in a batch (default: leading dimension).
        psd: tag the operator positive semidefinite (true whenever the loss is convex
            in the outputs, as MSE and cross-entropy are).
        compile: compile the products with :func:`torch.compile` (``True`` or a dict of its
            options); off by default. Compiled products are functional per batch
            (``jvp`` of the model, ``jvp`` of the loss gradient, ``vjp``) and keep no graphs.
        check_deterministic: verify products that re-evaluate the model (several batches without
            cache, ``cache=False``, ``compile=True``) against the first pass (see
            :func:`~curvlab.linops.hessian`).
        state: a :class:`~curvlab.params.ModuleState` to evaluate under (a problem passes its own).
        key: random-number key of a single batch (a problem passes a drawn batch's key).

    Returns:
        A symmetric :class:`GGNOperator` of shape ``(P, P)``; ``.value`` and ``.gradient``
        give the loss and its gradient at the point.

    Raises:
        TypeError: if ``model_fn`` or ``loss_fn`` is not callable.
        ValueError: if ``data`` is missing, ``loss_fn`` returns neither per-sample losses nor a
            scalar, or the model output does not depend on ``params`` (at the first product).
    """
    op = GGNOperator.__new__(GGNOperator)
    op._init_common(
        model_fn,
        loss_fn,
        params,
        data,
        reduction,
        cache,
        batch_size_fn,
        psd,
        check_deterministic=check_deterministic,
        state=state,
        key=key,
    )
    opts = compile_options(compile)
    op._compiled = None if opts is None else CompiledProducts(op._ggn_one, opts)
    return op
