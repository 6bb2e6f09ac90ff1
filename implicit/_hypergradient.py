r"""The IFT hypergradient of a bilevel problem whose inner optimality condition is :math:`\nabla_y g = 0`.

For :math:`\min_x f(x, y^*(x))` with :math:`y^*(x) = \arg\min_y g(x, y)`,
differentiating :math:`\nabla_y g(x, y^*(x)) = 0` (Blondel et al. 2021, eq. (2)
with :math:`F = \nabla_y g`; Lorraine et al. 2020, eq. (3)) gives

.. math::
    \frac{d f}{d x} = \nabla_x f - \partial^2_{xy} g\,\big[\partial^2_{yy} g\big]^{-1} \nabla_y f ,

evaluated at :math:`(x, y^*)`. The inverse-Hessian-vector product is one
linear solve with the (symmetric) inner Hessian: CG by default,
``solve="neumann"`` for Lorraine et al.'s truncated series.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from curvlab.linalg import KrylovResult

from ._root import _ift_vjp, _setup
from ._tree import flat_cat

__all__ = ["hypergradient"]


def _check_scalar(fn: Callable[..., Tensor], name: str, x: Any, y: Any, args: tuple) -> None:
    out = fn(x, y, *args)
    if not isinstance(out, Tensor) or out.numel() != 1:
        raise ValueError(
            f"{name}(x, y, *args) must return a scalar tensor, got {getattr(out, 'shape', type(out).__name__)}"
        )


def hypergradient(
    outer: Callable[[Any, Any], Tensor],
    inner: Callable[[Any, Any], Tensor],
    x: Any,
    y_star: Any,
    solve: str | Callable[..., Any] = "cg",
    *,
    args: tuple = (),
    full_output: bool = False,
    nonconvergence: str = "warn",
    **solve_options: Any,
) -> Any:
    r"""The implicit hypergradient :math:`\nabla_x f - \partial^2_{xy} g\,[\partial^2_{yy} g]^{-1}\nabla_y f`.

    Blondel et al. 2021 (eq. (4) with :math:`F = \nabla_y g`) and Lorraine,
    Vicol & Duvenaud 2020 (eq. (3) and Algorithm 2; their Neumann
    approximation is ``solve="neumann", alpha=..., K=...``). One solve of
    :math:`\partial^2_{yy} g(x, y^*)\, w = \nabla_y f(x, y^*)` with
    Hessian-vector products, then one mixed second-derivative product
    :math:`\partial^2_{xy} g\, w`; no Hessian is formed.

    All products are ``torch.func`` transforms, so the result can be
    ``vmap``-ed over a batch of hyperparameters/tasks (each task's solve runs on
    its own) and differentiated again.

    Args:
        outer: ``f(x, y, *args) -> scalar`` (e.g. the validation loss).
        inner: ``g(x, y, *args) -> scalar`` (e.g. the regularised training loss),
            minimised over ``y`` at ``y_star``.
        x: the hyperparameters: a tensor or a tuple/list/dict of tensors.
        y_star: the inner solution :math:`y^*(x)`, same kinds of structure.
        solve: linear solver for the inner Hessian (see :func:`custom_root`);
            ``"cg"`` suits a strongly convex inner problem.
        args: extra arguments of ``outer`` and ``inner`` (data, batches). Not
            differentiated. Under ``vmap``, tensors that vary across the batch
            (per-task data) must come in here rather than by closure.
        full_output: also return the :class:`~curvlab.linalg.KrylovResult` of the solve.
        nonconvergence: ``"warn"``, ``"raise"`` or ``"ignore"``.
        **solve_options: options of the solver (``tol``, ``maxiter``, ``alpha``, ``K``, ...).

    Returns:
        The hypergradient, structured like ``x``; with ``full_output=True`` the
        pair ``(hypergradient, info)``.

    Raises:
        TypeError: ``x`` or ``y_star`` an ``nn.Module`` or not made of tensors.
        ValueError: ``outer`` or ``inner`` not returning a scalar.
        LinearSolveError: with ``nonconvergence="raise"``.

    Example:
        >>> X = torch.randn(30, 4, dtype=torch.float64); t = torch.randn(30, dtype=torch.float64)
        >>> inner = lambda lam, w: 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
        >>> outer = lambda lam, w: 0.5 * ((X @ w - t) ** 2).sum()
        >>> lam = torch.tensor(1.0, dtype=torch.float64)
        >>> H = X.T @ X + lam * torch.eye(4, dtype=X.dtype)
        >>> w = torch.linalg.solve(H, X.T @ t)
        >>> h = hypergradient(outer, inner, lam, w)
        >>> exact = -w @ torch.linalg.solve(H, X.T @ (X @ w - t))
        >>> bool(torch.isclose(h, exact))
        True
    """
    for value, name in ((x, "x"), (y_star, "y_star")):
        if isinstance(value, nn.Module):
            raise TypeError(
                f"{name} must be a tensor or a tuple/list/dict of tensors, got an nn.Module; pass "
                f"dict(module.named_parameters()) and call torch.func.functional_call inside outer/inner"
            )
    x_leaves, x_def = tree_flatten(x)
    if not x_leaves or not all(isinstance(t, Tensor) and t.is_floating_point() for t in x_leaves):
        raise TypeError(f"x must be a floating-point tensor or a tuple/list/dict of them, got {type(x).__name__}")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple, got {type(args).__name__}")
    _check_scalar(outer, "outer", x, y_star, args)
    _check_scalar(inner, "inner", x, y_star, args)

    grad_y_inner = torch.func.grad(inner, argnums=1)

    def grad_y(y: Any, xx: Any, *a: Any) -> Any:  # the inner optimality condition ∇_y g(x, y) = 0
        return grad_y_inner(xx, y, *a)

    grad_y.__name__ = "grad_y(inner)"
    gx_f, gy_f = torch.func.grad(outer, argnums=(0, 1))(x, y_star, *args)
    arguments, y, fun, system = _setup(grad_y, y_star, (x, *args), solve, nonconvergence, solve_options, symmetric=True)
    th = arguments.tensors
    v = flat_cat([t.to(y[0].dtype) for t in tree_flatten(gy_f)[0]])
    implicit = _ift_vjp(system, fun, y, th, v, list(range(len(x_leaves))))
    direct = tree_flatten(gx_f)[0]
    out = tree_unflatten([d + i.to(d.dtype) for d, i in zip(direct, implicit)], x_def)
    if full_output:
        info: KrylovResult | None = system.solver.last
        return out, info
    return out
