r"""One autograd graph of :math:`\nabla_y g(x, y)` reused for every second-order product at ``(x, y)``.

:class:`InnerGraph` builds :math:`\nabla_y g` once with ``create_graph=True`` (``x`` and ``y`` both
tracked) and then answers, each by one backward pass through that graph and without any forward
recomputation:

* :meth:`InnerGraph.hvp` — :math:`\nabla^2_{yy} g\, v`;
* :meth:`InnerGraph.jxy` — :math:`\nabla^2_{xy} g\, w` (the x-gradient of :math:`\langle \nabla_y g, w\rangle`);
* :meth:`InnerGraph.hessian` — the dense :math:`\nabla^2_{yy} g` (``dy`` products in one batched backward;
  for small ``dy`` only).

So a Newton-CG inner solve, the adjoint (IFT) linear solve and the mixed product of the hypergradient all
share one forward pass. Over several batches (``batch=ALL``) the graphs of every batch are kept and the
products summed; data-parallel problems all-reduce each product (as :class:`~bilevel.BilevelProblem` does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvlab.data import Batch
from curvlab.problems import ALL

from ._problem import BilevelProblem

__all__ = ["InnerGraph"]


class InnerGraph:
    r"""The inner objective, its y-gradient and its second-order products at one point ``(x, y)``.

    Args:
        problem: the :class:`~bilevel.BilevelProblem`.
        x, y: flat variables.
        batch: one inner batch or ``ALL`` (the whole inner data).

    Attributes:
        value: :math:`g(x, y)` (0-d, detached).
        gy: :math:`\nabla_y g(x, y)` (detached).
        x, y: the point (detached).
    """

    def __init__(self, problem: BilevelProblem, x: Tensor, y: Tensor, batch: Batch = ALL) -> None:
        self.problem = problem
        self.batch = batch
        self.x = x.detach()
        self.y = y.detach()
        self._graphs: list[tuple[Tensor, Tensor, Tensor]] = []
        value: Tensor | None = None
        gy: Tensor | None = None
        for b, w in problem._inner_src.pairs(batch):
            with torch.enable_grad():
                xl = self.x.detach().requires_grad_(True)
                yl = self.y.detach().requires_grad_(True)
                g = problem._call(problem.inner, "inner", xl, yl, b, w)
                if g.requires_grad:
                    (gyb,) = torch.autograd.grad(g, yl, create_graph=True, allow_unused=True)
                else:
                    gyb = None
            if gyb is None:
                gyb = torch.zeros_like(self.y)
            elif gyb.requires_grad:
                self._graphs.append((xl, yl, gyb))
            value = g.detach() if value is None else value + g.detach()
            gy = gyb.detach() if gy is None else gy + gyb.detach()
        assert value is not None and gy is not None
        if self._distributed:
            both = self._reduce(torch.cat([gy, value.reshape(1).to(gy.dtype)]))
            gy, value = both[:-1], both[-1].to(value.dtype)
        self.value = value
        self.gy = gy
        #: products taken through this graph (for oracle counting)
        self.n_products = 0
        self._factor: tuple[Any, ...] | None = None

    @property
    def _distributed(self) -> bool:
        return bool(self.problem.inner_data.distributed)

    def _reduce(self, t: Tensor) -> Tensor:
        return self.problem._reduce("inner", t, self.batch) if self._distributed else t  # type: ignore[attr-defined]

    def _backward(self, v: Tensor, wrt: int, batched: bool = False) -> Tensor:
        like = self.x if wrt == 0 else self.y
        out: Tensor | None = None
        for g in self._graphs:
            (h,) = torch.autograd.grad(
                g[2], g[wrt], v.detach(), retain_graph=True, allow_unused=True, is_grads_batched=batched
            )
            if h is not None:
                out = h if out is None else out + h
        if out is None:
            out = like.new_zeros((v.shape[0], like.shape[0]) if batched else like.shape)
        return out

    def hvp(self, v: Tensor) -> Tensor:
        r""":math:`\nabla^2_{yy} g(x, y)\, v`."""
        self.n_products += 1
        return self._reduce(self._backward(v, 1))

    def jxy(self, w: Tensor) -> Tensor:
        r""":math:`\nabla^2_{xy} g(x, y)\, w` (a ``dx``-vector)."""
        self.n_products += 1
        return self._reduce(self._backward(w, 0))

    def hessian(self) -> Tensor:
        r"""The dense ``dy × dy`` :math:`\nabla^2_{yy} g(x, y)` from ``dy`` products in one batched backward.

        Falls back to a loop of products when the user's function does not support batched
        gradients (``vmap``). Counts ``dy`` products.
        """
        n = self.y.shape[0]
        eye = torch.eye(n, dtype=self.y.dtype, device=self.y.device)
        self.n_products += n
        try:
            H = self._backward(eye, 1, batched=True)
        except RuntimeError:
            H = torch.stack([self._backward(eye[i], 1) for i in range(n)])
        H = self._reduce(H.reshape(-1)).reshape(n, n)
        return 0.5 * (H + H.T)

    def solve_dense(self, b: Tensor) -> Tensor:
        r""":math:`(\nabla^2_{yy} g)^{-1} b` by a Cholesky factorisation of :meth:`hessian` (computed once, cached).

        An indefinite or singular Hessian (non-convex inner problem) is replaced by its eigen-decomposition
        with eigenvalues clamped to :math:`\ge 10^{-10} \lambda_{\max}` (a positive definite modification,
        Nocedal & Wright 2006, §3.4).
        """
        if self._factor is None:
            H = self.hessian()
            L, info = torch.linalg.cholesky_ex(H)
            if not bool(torch.isfinite(H).all()):  # let the solve loop stop with status "nan" (eigh would raise)
                self._factor = ("nan",)
            elif int(info) == 0:
                self._factor = ("chol", L)
            else:
                lam, V = torch.linalg.eigh(H)
                floor = 1e-10 * float(lam.abs().max().clamp_min(torch.finfo(H.dtype).tiny))
                self._factor = ("eig", V, lam.abs().clamp_min(floor))
        if self._factor[0] == "chol":
            return torch.cholesky_solve(b.reshape(-1, 1), self._factor[1]).reshape(b.shape)
        if self._factor[0] == "nan":
            return torch.full_like(b, float("nan"))
        _, V, lam = self._factor
        return V @ ((V.T @ b) / lam)

    def matvec_operator(self) -> Any:
        """:meth:`hvp` as a symmetric PSD :class:`~curvlab.linops.MatvecOperator` (for Krylov solves)."""
        from curvlab.linops import MatvecOperator

        return MatvecOperator(self.hvp, self.y.shape[0], self.y.dtype, self.y.device, symmetric=True, psd=True)
