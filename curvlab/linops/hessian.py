r"""Hessian operator: :math:`H = \nabla^2 f(x)`, matrix-free."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..data import Batch
from ._autodiff import CompiledProducts, CurvatureBase, _grad, compile_options
from ._base import LinearOperator

__all__ = ["HessianOperator", "hessian"]

_MODES = ("auto", "reverse", "forward")


class HessianOperator(CurvatureBase, LinearOperator):
    r"""The Hessian :math:`H = \nabla^2 F(x)` of a scalar function, as a symmetric operator.

    Over data, :math:`F(x) = \sum_b w_b f(x, \text{batch}_b)` with :math:`w_b = n_b/N`
    (``reduction="mean"``, each batch's ``f`` being a batch mean) or :math:`w_b = 1`
    (``reduction="sum"``).

    Build it with :func:`hessian`. Besides the products it exposes the value and
    gradient at the point (computed with the first product, at no extra cost):
    :attr:`value`, :attr:`gradient`.
    """

    def __init__(
        self,
        f: Callable[..., Tensor],
        params: Any,
        args: tuple = (),
        data: Any = None,
        reduction: str = "mean",
        mode: str = "auto",
        cache: bool | str = "auto",
        batch_size_fn: Callable[[Batch], int] | None = None,
        compile: bool | dict[str, Any] = False,  # noqa: A002
    ) -> None:
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self._setup(params, data, reduction, batch_size_fn, cache)
        n = self.spec.size
        LinearOperator.__init__(self, (n, n), self.spec.dtype, self.spec.device, symmetric=True)
        self.f, self.args = f, tuple(args)
        self.mode = "reverse" if mode == "auto" else mode
        opts = compile_options(compile)
        self._compiled = None if opts is None else CompiledProducts(self._hvp_one, opts)
        self._value: Tensor | None = None
        self._gradient: Tensor | None = None

    # -------------------------------------------------------------- function
    def _f(self, x: Tensor, batch: Batch) -> Tensor:
        p = self.spec.unflatten(x)
        out = self.f(p, *self.args) if batch is None else self.f(p, batch, *self.args)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValueError(f"f must return a scalar tensor, got {getattr(out, 'shape', type(out).__name__)}")
        return out.reshape(())

    def _build(self, x: Tensor, batch: Batch, weight: float) -> dict[str, Any]:
        val = self._f(x, batch) * weight
        (g,) = torch.autograd.grad(val, x, create_graph=True, allow_unused=True)
        if g is None:
            g = torch.zeros_like(x)
        return {"x": x, "g": g, "value": val.detach()}

    def _value_grad(self) -> None:
        val, grad = None, None
        for piece in self._pieces():
            val = piece["value"] if val is None else val + piece["value"]
            gd = piece["g"].detach()
            grad = gd if grad is None else grad + gd
        if self.distributed:
            assert val is not None and grad is not None
            both = self._sum_ranks(torch.cat([grad, val.reshape(1).to(grad.dtype)]))
            val, grad = both[-1].to(val.dtype), both[:-1]
        self._value, self._gradient = val, grad

    @property
    def value(self) -> Tensor:
        """:math:`F(x)` at the operator's point."""
        if self._value is None:
            self._value_grad()
        assert self._value is not None
        return self._value

    @property
    def gradient(self) -> Tensor:
        r""":math:`\nabla F(x)` at the operator's point (flat)."""
        if self._gradient is None:
            self._value_grad()
        assert self._gradient is not None
        return self._gradient

    # -------------------------------------------------------------- products
    def _reverse(self, V: Tensor, batched: bool) -> Tensor:
        out = None
        for piece in self._pieces():
            hv = _grad(piece["g"], piece["x"], V, batched, retain=self.cache)
            out = hv if out is None else out + hv
        assert out is not None
        return self._sum_ranks(out)

    def _forward_fn(self, v: Tensor) -> Tensor:
        out = None
        for batch, w in self.data.weighted_batches():

            def grad_fn(x: Tensor, batch: Batch = batch, w: float = w) -> Tensor:
                return torch.func.grad(lambda z: self._f(z, batch) * w)(x)

            _, hv = torch.func.jvp(grad_fn, (self.x,), (v,))
            out = hv if out is None else out + hv
        assert out is not None
        return out

    def _hvp_one(self, x: Tensor, v: Tensor, batch: Batch, w: float) -> Tensor:
        """Forward-over-reverse product on one batch: the function ``compile=True`` compiles."""
        return torch.func.jvp(lambda z: torch.func.grad(lambda q: self._f(q, batch) * w)(z), (x,), (v,))[1]

    def _compiled_products(self, V: Tensor) -> Tensor:
        assert self._compiled is not None
        out = None
        for batch, w in self.data.weighted_batches():
            hv = self._compiled(self.x, V, batch, w)
            out = hv if out is None else out + hv
        assert out is not None
        return self._sum_ranks(out)

    def _matvec(self, v: Tensor) -> Tensor:
        if self._compiled is not None:
            return self._compiled_products(v)
        if self.mode == "forward":
            return self._sum_ranks(self._forward_fn(v))
        return self._reverse(v, batched=False)

    def _matmat(self, V: Tensor) -> Tensor:
        if self._compiled is not None:
            return self._compiled_products(V)
        if self.mode == "forward":
            try:
                out = torch.func.vmap(self._forward_fn, in_dims=1, out_dims=1)(V)
            except RuntimeError:
                out = torch.stack([self._forward_fn(V[:, j]) for j in range(V.shape[1])], dim=1)
            return self._sum_ranks(out)
        return self._reverse(V.T.contiguous(), batched=True).T


def hessian(
    f: Callable[..., Tensor],
    params: Any,
    *args: Any,
    data: Any = None,
    reduction: str = "mean",
    mode: str = "auto",
    cache: bool | str = "auto",
    batch_size_fn: Callable[[Batch], int] | None = None,
    compile: bool | dict[str, Any] = False,  # noqa: A002
) -> HessianOperator:
    r"""Matrix-free Hessian :math:`\nabla^2 F(x)` of a scalar function at ``params``.

    .. math::
        F(x) = f(x, *args)  \quad\text{or, over data,}\quad
        F(x) = \sum_b w_b\, f(x, \text{batch}_b, *args),

    with :math:`w_b = n_b / N` (``reduction="mean"``) or 1 (``"sum"``).

    Two product modes give the same matrix:

    * ``"reverse"`` (the default, ``"auto"``): reverse-over-reverse. The gradient's
      graph is built once per batch and every product is one backward pass over
      it — the cheapest when many products are taken at one point (Lanczos, CG);
      see ``benchmarks/RESULTS.md``.
    * ``"forward"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``,
      with ``vmap`` over columns for :meth:`~LinearOperator.matmat`; keeps no graph. It is
      slower on CPU (``benchmarks/spectrum.py --sections modes``: 1.7-2.9x per product,
      1.4-1.5x per 8-column block on two digits MLPs; up to 11x on other models): use it
      only when the cached graph does not fit in memory. ``"auto"`` picks ``"reverse"``.

    Args:
        f: ``f(params, *args) -> scalar``, or ``f(params, batch, *args)`` when ``data`` is given.
            ``params`` arrive in the structure they were handed in (a dict for modules).
        params: the point: a tensor, tuple/list/dict of tensors, or an ``nn.Module``.
        *args: extra arguments passed to ``f``.
        data: ``None``, one batch, or an iterable of batches.
        reduction: ``"mean"`` or ``"sum"`` over batches (see above).
        mode: ``"auto"``, ``"reverse"`` or ``"forward"``.
        cache: keep each batch's graph between products (``"auto"``: only for a single batch).
        batch_size_fn: number of samples in a batch (default: leading dimension).
        compile: compile the products with :func:`torch.compile` (``True``, or a dict of its
            options, e.g. ``{"mode": "max-autotune"}``); off by default. Compiled products
            are forward-over-reverse (``mode`` is then ignored) and compile once per batch
            shape, which pays off for many products at one point on a GPU
            (``benchmarks/scaling.py``).

    Returns:
        A symmetric :class:`HessianOperator` of shape ``(P, P)`` with ``P`` the number of parameters.

    Raises:
        TypeError: if ``f`` is not callable or ``params`` has an unsupported type.
        ValueError: on an unknown ``mode``/``reduction`` or if ``f`` does not return a scalar.

    Example:
        >>> import torch, curvlab as cl
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> H = cl.linops.hessian(lambda x: 0.5 * x @ A @ x, torch.zeros(2))
        >>> H @ torch.tensor([1.0, 0.0])
        tensor([2., 1.])
    """
    return HessianOperator(f, params, args, data, reduction, mode, cache, batch_size_fn, compile)
