r"""The IFT hypergradient of a bilevel problem whose inner optimality condition is :math:`\nabla_y g = 0`.

For :math:`\min_x f(x, y^*(x))` with :math:`y^*(x) = \arg\min_y g(x, y)`,
differentiating :math:`\nabla_y g(x, y^*(x)) = 0` (Blondel et al. 2021, eq. (2)
with :math:`F = \nabla_y g`; Lorraine et al. 2020, eq. (3)) gives

.. math::
    \frac{d f}{d x} = \nabla_x f - \partial^2_{xy} g\,\big[\partial^2_{yy} g\big]^{-1} \nabla_y f ,

evaluated at :math:`(x, y^*)`. The inverse-Hessian-vector product is one
linear solve with the (symmetric) inner Hessian: ``solve="auto"`` (a small
Hessian formed with one batched product and factored, CG otherwise),
``solve="neumann"`` for Lorraine et al.'s truncated series.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from curvlab.linalg import METHODS, KrylovResult

from ._graph import Recorded, check_forward_levels, foreign_leaves
from ._linear_solve import LinearSolver
from ._root import _CustomRoot, _ift_vjp, _plain, _recorded_vjp, _setup, _warn_residual, custom_root
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
    solve: str | Callable[..., Any] = "auto",
    *,
    args: tuple = (),
    full_output: bool = False,
    nonconvergence: str = "warn",
    jit: bool = False,
    **solve_options: Any,
) -> Any:
    r"""The implicit hypergradient :math:`\nabla_x f - \partial^2_{xy} g\,[\partial^2_{yy} g]^{-1}\nabla_y f`.

    Blondel et al. 2021 (eq. (4) with :math:`F = \nabla_y g`) and Lorraine,
    Vicol & Duvenaud 2020 (eq. (3) and Algorithm 2; their Neumann
    approximation is ``solve="neumann", alpha=..., K=...``). One solve of
    :math:`\partial^2_{yy} g(x, y^*)\, w = \nabla_y f(x, y^*)` with
    Hessian-vector products, then one mixed second-derivative product
    :math:`\partial^2_{xy} g\, w`. ``inner`` and ``outer`` are evaluated once
    each: on plain tensors :math:`\nabla_y g` is recorded by autograd and every
    Hessian product is one backward pass through it (a small Hessian, ``n <= 256``
    with ``solve="auto"``, is formed by one batched pass and factored).

    Under ``torch.func`` transforms (or when ``x``/``y_star`` require grad) the
    products are differentiable ``torch.func`` transforms, so the result can be
    ``vmap``-ed over a batch of hyperparameters/tasks (each task's solve runs on
    its own) and differentiated again.

    Args:
        outer: ``f(x, y, *args) -> scalar`` (e.g. the validation loss).
        inner: ``g(x, y, *args) -> scalar`` (e.g. the regularised training loss),
            minimised over ``y`` at ``y_star``.
        x: the hyperparameters: a tensor or a tuple/list/dict of tensors.
        y_star: the inner solution :math:`y^*(x)`, same kinds of structure.
        solve: linear solver for the inner Hessian (see :func:`custom_root`); the
            default ``"auto"`` treats the Hessian as symmetric (dense factorisation
            when small, CG otherwise, MINRES if CG meets negative curvature).
        args: extra arguments of ``outer`` and ``inner`` (data, batches). Not
            differentiated. Under ``vmap``, tensors that vary across the batch
            (per-task data) must come in here rather than by closure.
        full_output: also return the :class:`~curvlab.linalg.KrylovResult` of the solve.
        nonconvergence: ``"warn"``, ``"raise"`` or ``"ignore"``.
        jit: trace the IFT of a small inner problem once per signature and replay
            it (as :func:`custom_root`'s ``jit``, with its ``jax.jit`` semantics:
            values ``inner`` reads by closure are frozen at the first call). The
            traces are kept per ``inner`` function object (the 16 most recently
            used), so pass the same function on every call (a fresh ``lambda``
            each time retraces).
            ``outer`` runs eagerly.
        **solve_options: options of the solver (``tol``, ``maxiter``, ``alpha``, ``K``, ...).

    Returns:
        The hypergradient, structured like ``x``; with ``full_output=True`` the
        pair ``(hypergradient, info)``.

    Raises:
        TypeError: ``x`` or ``y_star`` an ``nn.Module`` or not made of tensors.
        ValueError: ``outer`` or ``inner`` not returning a scalar, or closing over a
            tensor that requires grad.
        NotImplementedError: under forward-over-forward transforms.
        LinearSolveError: with ``nonconvergence="raise"``.

    Warns:
        OptimalityWarning: :math:`\nabla_y g(x, y^*)` is far from zero (``y_star`` is
            not the inner minimiser, or ``x`` and ``y_star`` were swapped).

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
    check_forward_levels("hypergradient")
    y_leaves, y_def = tree_flatten(y_star)
    if not y_leaves or not all(isinstance(t, Tensor) and t.is_floating_point() for t in y_leaves):
        raise TypeError(
            f"y_star must be a floating-point tensor or a tuple/list/dict of them, got {type(y_star).__name__}"
        )
    if not isinstance(jit, bool):
        raise TypeError(f"jit must be True or False, got {jit!r}")
    plain = _plain(x_leaves, y_leaves, args)
    if jit and plain:
        y_detached = tree_unflatten([t.detach() for t in y_leaves], y_def)
        return _jitted(
            outer, inner, x_leaves, x_def, y_detached, args, solve, nonconvergence, solve_options, full_output
        )
    linear = LinearSolver(solve, solve_options, nonconvergence, symmetric=True)
    if plain:
        out, info = _recorded(outer, inner, x_leaves, x_def, y_leaves, y_def, args, linear)
    else:
        out, info = _transformed(outer, inner, x, x_def, y_star, args, solve, nonconvergence, solve_options)
    return (out, info) if full_output else out


_ORDER_HINT = (
    " Check the argument order: hypergradient(outer, inner, x, y_star) calls inner(x, y) and outer(x, y), "
    "hyperparameters first (custom_root's optimality_fn takes (y, *theta), the solution first)."
)


def _scalar(value: Any, name: str) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError(
            f"{name}(x, y, *args) must return a scalar tensor, got {getattr(value, 'shape', type(value).__name__)}"
        )
    return value.reshape(())


def _recorded(
    outer: Callable[..., Tensor],
    inner: Callable[..., Tensor],
    x_leaves: list[Tensor],
    x_def: Any,
    y_leaves: list[Tensor],
    y_def: Any,
    args: tuple,
    linear: LinearSolver,
) -> tuple[Any, KrylovResult | None]:
    """Plain autograd: ``∇_y g`` recorded once (with ``create_graph``), Hessian products as backward passes."""
    with torch.enable_grad():
        xl = [t.detach().requires_grad_() for t in x_leaves]
        yl = [t.detach().requires_grad_() for t in y_leaves]
        xt, yt = tree_unflatten(xl, x_def), tree_unflatten(yl, y_def)
        g = _scalar(inner(xt, yt, *args), "inner")
        f = _scalar(outer(xt, yt, *args), "outer")
        gy = torch.autograd.grad(g, yl, create_graph=True, allow_unused=True, materialize_grads=True)
        fg = torch.autograd.grad(f, [*xl, *yl], allow_unused=True, materialize_grads=True)
    F = flat_cat(list(gy))
    for leaf, name in ((f, "outer"), (g, "inner")):
        stray = foreign_leaves(leaf, [*xl, *yl])
        if stray:
            raise ValueError(
                f"{name} depends on a tensor that requires grad but is neither x nor y_star nor in args (it closes "
                f"over it: shape {tuple(stray[0].shape)}); pass it through args= or detach it"
            )
    gx_f, gy_f = fg[: len(xl)], fg[len(xl) :]
    rec = Recorded(F, yl, xl)
    v = flat_cat([t.to(F.dtype) for t in gy_f])
    implicit = _recorded_vjp(rec, linear, v, list(range(len(xl))))
    _warn_residual(
        linear.last, float(F.detach().norm()), float(flat_cat(y_leaves).norm()), "hypergradient", _ORDER_HINT
    )
    return tree_unflatten([d + i.to(d.dtype) for d, i in zip(gx_f, implicit)], x_def), linear.last


#: jit=True: the custom_root(jit=True) and held y* per (inner function, solver configuration), most recent last.
_JIT_ROOTS: OrderedDict[tuple[Any, Any], tuple[_CustomRoot, list[Any]]] = OrderedDict()
#: How many (inner, configuration) pairs keep their traces (least recently used dropped first).
_JIT_ROOTS_MAX = 16


def _jit_root(
    inner: Callable[..., Tensor], solve: Any, nonconvergence: str, solve_options: dict[str, Any]
) -> tuple[_CustomRoot, list[Any]] | None:
    """The cached ``custom_root(∇_y g, jit=True)`` of ``inner`` for this solver configuration (``None``: not
    cacheable — an unhashable ``inner`` or option).

    The cache is a small LRU keyed by ``inner`` itself (bound methods compare equal across accesses), so a
    fresh ``lambda`` on every call retraces every call, and memory stays bounded.
    """
    try:
        key = (inner, (solve, nonconvergence, tuple(sorted(solve_options.items()))))
        hash(key)
    except TypeError:
        return None
    entry = _JIT_ROOTS.get(key)
    if entry is not None:
        _JIT_ROOTS.move_to_end(key)
        return entry
    held: list[Any] = [None]  # the solution of the current call: the "solver" returns it
    grad_y_inner = torch.func.grad(inner, argnums=1)

    def grad_y(y: Any, x: Any, *a: Any) -> Any:  # the inner optimality condition ∇_y g(x, y) = 0
        return grad_y_inner(x, y, *a)

    grad_y.__name__ = "grad_y(inner)"

    def solution(y0: Any, x: Any, *a: Any) -> Any:
        return held[0]

    solution.__name__ = "hypergradient"

    options = dict(solve_options)
    if isinstance(solve, str) and "symmetric" in METHODS.get(solve, ()):
        options.setdefault("symmetric", True)
    root = custom_root(grad_y, solve, nonconvergence=nonconvergence, jit=True, **options)(solution)
    entry = _JIT_ROOTS[key] = (root, held)
    while len(_JIT_ROOTS) > _JIT_ROOTS_MAX:
        _JIT_ROOTS.popitem(last=False)
    return entry


def _jitted(
    outer: Callable[..., Tensor],
    inner: Callable[..., Tensor],
    x_leaves: list[Tensor],
    x_def: Any,
    y_detached: Any,
    args: tuple,
    solve: Any,
    nonconvergence: str,
    solve_options: dict[str, Any],
    full_output: bool,
) -> Any:
    """``jit=True``: ``outer`` differentiated through ``custom_root(∇_y g, jit=True)``'s traced IFT."""
    entry = _jit_root(inner, solve, nonconvergence, solve_options)
    if entry is None:
        out = hypergradient(
            outer,
            inner,
            tree_unflatten(x_leaves, x_def),
            y_detached,
            solve,
            args=args,
            full_output=True,
            nonconvergence=nonconvergence,
            **solve_options,
        )
        return out if full_output else out[0]
    root, held = entry
    with torch.enable_grad():
        xl = [t.detach().requires_grad_() for t in x_leaves]
        xt = tree_unflatten(xl, x_def)
        held[0] = y_detached
        try:
            y = root(y_detached, xt, *args)
        finally:
            held[0] = None
        f = _scalar(outer(xt, y, *args), "outer")
        stray = foreign_leaves(f, xl)
        if stray:
            raise ValueError(
                f"outer depends on a tensor that requires grad but is neither x nor y_star nor in args (it closes "
                f"over it: shape {tuple(stray[0].shape)}); pass it through args= or detach it"
            )
        grads = torch.autograd.grad(f, xl, allow_unused=True, materialize_grads=True)
    out = tree_unflatten(list(grads), x_def)
    return (out, root.last_solve) if full_output else out


def _transformed(
    outer: Callable[..., Tensor],
    inner: Callable[..., Tensor],
    x: Any,
    x_def: Any,
    y_star: Any,
    args: tuple,
    solve: Any,
    nonconvergence: str,
    solve_options: dict[str, Any],
) -> tuple[Any, KrylovResult | None]:
    """Under ``torch.func`` transforms (or when the result is differentiated again): differentiable products."""
    _check_scalar(outer, "outer", x, y_star, args)
    _check_scalar(inner, "inner", x, y_star, args)
    grad_y_inner = torch.func.grad(inner, argnums=1)

    def grad_y(y: Any, xx: Any, *a: Any) -> Any:  # the inner optimality condition ∇_y g(x, y) = 0
        return grad_y_inner(xx, y, *a)

    grad_y.__name__ = "grad_y(inner)"
    gx_f, gy_f = torch.func.grad(outer, argnums=(0, 1))(x, y_star, *args)
    arguments, y, fun, system = _setup(grad_y, y_star, (x, *args), solve, nonconvergence, solve_options, symmetric=True)
    th = arguments.tensors
    n_x = len(tree_flatten(x)[0])
    v = flat_cat([t.to(y[0].dtype) for t in tree_flatten(gy_f)[0]])
    implicit = _ift_vjp(system, fun, y, th, v, list(range(n_x)))
    direct = tree_flatten(gx_f)[0]
    out = tree_unflatten([d + i.to(d.dtype) for d, i in zip(direct, implicit)], x_def)
    return out, system.solver.last
