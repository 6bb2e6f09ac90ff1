r"""Implicit differentiation of roots and fixed points.

``custom_root``, ``custom_fixed_point``, ``root_vjp``, ``root_jvp``.

Blondel et al. 2021 ("Efficient and Modular Implicit Differentiation",
NeurIPS 2022). Let :math:`y^*(\theta)` satisfy the optimality condition
:math:`F(y^*(\theta), \theta) = 0` (eq. (1)) and write
:math:`A = \partial_y F(y^*, \theta)`, :math:`B = \partial_\theta F(y^*, \theta)`.
The implicit function theorem gives (eq. (2))

.. math::
    \partial y^*(\theta) = -A^{-1} B ,

so, without differentiating the solver that produced :math:`y^*`,

* reverse mode (eq. (4)): solve :math:`A^\top u = \bar v` for the cotangent
  :math:`\bar v` of :math:`y^*`, then :math:`\bar\theta = -B^\top u`;
* forward mode (eq. (3)): :math:`\dot y = -A^{-1} (B\dot\theta)`.

Products with :math:`A`, :math:`A^\top`, :math:`B`, :math:`B^\top` come from one
recorded evaluation of :math:`F` (:mod:`implicit._graph`) outside ``torch.func``
transforms, and from ``torch.func.jvp``/``vjp`` of :math:`F` inside them; the
linear solve is :func:`curvlab.linalg.solve`. Fixed points :math:`y = T(y, \theta)`
use :math:`F = T - y` (Blondel et al., §2.2).
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function
from torch.utils._pytree import tree_flatten, tree_unflatten

from curvlab.linalg import KrylovResult
from curvlab.linops import MatvecOperator

from ._graph import (
    Recorded,
    _flat,
    check_forward_levels,
    foreign_leaves,
    functorch_active,
    is_legacy_batched,
    legacy_level,
)
from ._jit import FAILED, TraceCache, signature, trace
from ._linear_solve import LinearSolver
from ._linear_system import LinearSystem, closure_hint, jvp, linear_solve
from ._tree import Arguments, flat_cat, split_like

__all__ = ["OptimalityWarning", "custom_fixed_point", "custom_root", "root_jvp", "root_vjp"]

_TENSOR = object()  # placeholder for a tensor leaf of aux
_LEAF = tree_flatten(torch.zeros(()))[1]  # the structure of a single tensor


class OptimalityWarning(UserWarning):
    r"""The solution handed to implicit differentiation is far from a root of the optimality condition.

    The implicit function theorem differentiates the exact root; at a point
    :math:`y` with :math:`F(y, \theta) \ne 0` the derivatives are those of a
    nearby root, off by about the relative distance to it. The warning states
    that distance, estimated as :math:`\|F\| / (\|A\|\,\|y\|)`.
    """


#: Warn when the estimated relative distance of y to the root exceeds max(this, sqrt(eps)).
_RESIDUAL_WARN = 1e-4


#: Messages of errors that torch.autograd.grad raises inside F when F cannot be run with autograd leaves.
_AUTOGRAD_GRAD_ERRORS = ("does not require grad", "element 0 of tensors", "not have been used in the graph")


def _autograd_grad_hint(name: str, e: Exception) -> RuntimeError:
    return RuntimeError(
        f"{name} failed: {e}. It seems to compute a gradient with torch.autograd.grad (or to call "
        "requires_grad_ on its inputs); write it with torch.func.grad instead (e.g. optimality_fn = "
        "torch.func.grad(inner_objective)): implicit differentiates F itself, with autograd and torch.func."
    )


# --------------------------------------------------------------------------- #
# the optimality function on flat vectors
# --------------------------------------------------------------------------- #
class _Optimality:
    """``F(y, *args, **kwargs)`` as ``fun(y_leaves, theta_tensors) -> flat F``.

    Args:
        fn: the user's optimality function.
        arguments: the theta (and init) split into tensors and constants.
        y_def: the pytree structure of ``y``.
        n: total size of ``y`` (``F`` must have as many entries).
        name: how error messages call ``fn``.
    """

    def __init__(self, fn: Callable[..., Any], arguments: Arguments, y_def: Any, n: int, name: str) -> None:
        self.fn, self.arguments, self.y_def, self.n, self.name = fn, arguments, y_def, n, name

    def __call__(self, y_leaves: Sequence[Tensor], theta: Sequence[Tensor]) -> Tensor:
        y = y_leaves[0] if self.y_def is _LEAF else tree_unflatten(list(y_leaves), self.y_def)
        try:
            plain = self.arguments.plain_theta(theta)
            if plain is not None:
                out = self.fn(y, *plain[0])
            else:
                with self.arguments.theta(theta) as (args, kwargs):
                    out = self.fn(y, *args, **kwargs)
        except RuntimeError as e:
            msg = str(e)
            if any(k in msg for k in _AUTOGRAD_GRAD_ERRORS):
                raise _autograd_grad_hint(self.name, e) from e
            raise
        if isinstance(out, Tensor) and out.ndim == 1 and out.shape[0] == self.n:
            return out
        leaves = tree_flatten(out)[0]
        if not leaves or not all(isinstance(t, Tensor) for t in leaves):
            raise TypeError(
                f"{self.name} must return a tensor or a tuple/list/dict of tensors (F(y, *theta), shaped like y), "
                f"got {type(out).__name__}"
            )
        flat = flat_cat(leaves)
        if flat.shape[0] != self.n:
            raise ValueError(
                f"{self.name} returned F with {flat.shape[0]} entries but y has {self.n}: the implicit function "
                "theorem needs a square system (as many equations as unknowns, ∂F/∂y square). F(y, *theta) must "
                "be shaped like y (e.g. the gradient of the inner objective w.r.t. y)."
            )
        return flat


def _validate_y(y: Any, what: str) -> tuple[list[Tensor], Any]:
    leaves, y_def = tree_flatten(y)
    if not leaves or not all(isinstance(t, Tensor) for t in leaves):
        hint = (
            " (if the solver returns (y_star, aux), decorate it with has_aux=True)"
            if isinstance(y, tuple) and len(y) == 2
            else ""
        )
        raise TypeError(f"{what} must be a tensor or a tuple/list/dict of tensors, got {type(y).__name__}{hint}")
    for t in leaves:
        if not t.is_floating_point():
            raise TypeError(f"{what} must hold floating-point tensors, got dtype {t.dtype}")
    if len({t.dtype for t in leaves}) > 1 or len({t.device for t in leaves}) > 1:
        raise ValueError(f"all tensors in {what} must share one dtype and device")
    return leaves, y_def


# --------------------------------------------------------------------------- #
# the two routes: recorded graph (plain autograd) and torch.func (transforms)
# --------------------------------------------------------------------------- #
def _record(
    fun: _Optimality, y: Sequence[Tensor], theta: Sequence[Tensor], diff: Sequence[bool]
) -> tuple[Recorded, list[Tensor]]:
    """Evaluate ``F`` once with ``y`` and the ``diff`` theta as fresh autograd leaves; also return all leaves."""
    with torch.enable_grad():
        yl = [t.detach().requires_grad_() for t in y]
        tl = [t.detach().requires_grad_() if d else t.detach() for t, d in zip(theta, diff)]
        F = fun(yl, tl)
    return Recorded(F, yl, tl), [*yl, *(t for t, d in zip(tl, diff) if d)]


def _check_closure(fun: _Optimality, F: Tensor, ours: Sequence[Tensor]) -> None:
    """Refuse an ``F`` that depends on a tensor requiring grad which is not among its arguments."""
    if not F.requires_grad:
        return
    _refuse_closure(fun, foreign_leaves(F, ours))


def _refuse_closure(fun: _Optimality, foreign: Sequence[Tensor]) -> None:
    """Raise when ``F`` read (by closure) tensors that require grad: their gradient would be dropped."""
    if foreign:
        shapes = ", ".join(str(tuple(t.shape)) for t in foreign[:3])
        raise ValueError(
            f"{fun.name} depends on a tensor that requires grad but is not among the arguments theta (it closes "
            f"over it: shape {shapes}), so its gradient would be silently dropped. Pass every tensor you "
            "differentiate with respect to as an argument: solver(init, *theta) and optimality_fn(y, *theta) "
            "(nn.Module arguments are supported)."
        )


def _jacobian_fn(fun: _Optimality, n_y: int, diff: Sequence[int]) -> Callable[..., tuple[Tensor, ...]]:
    r"""``(*y, *theta) -> (F, A, *rows)``: :math:`F`, :math:`A = \partial_y F` ``(n, n)`` and the rows of
    :math:`B` for ``theta[diff]`` (each ``(n, *shape)``), by one batched vjp."""

    def jacobian(*flat: Tensor) -> tuple[Tensor, ...]:
        y, theta = list(flat[:n_y]), list(flat[n_y:])

        def f(*q: Tensor) -> Tensor:
            full = list(theta)
            for i, t in zip(diff, q[n_y:]):
                full[i] = t
            return fun(list(q[:n_y]), full)

        F, vjp_fn = torch.func.vjp(f, *y, *(theta[i] for i in diff))
        if F.dtype != y[0].dtype:
            raise TypeError(f"{fun.name} returned F of dtype {F.dtype} for y of dtype {y[0].dtype}")
        gs = torch.func.vmap(vjp_fn)(torch.eye(F.shape[0], dtype=F.dtype, device=F.device))
        return (F, _flat(gs[:n_y], True), *gs[n_y:])

    return jacobian


def _ift_fn(fun: _Optimality, n_y: int, diff: Sequence[int], damping: float) -> Callable[..., tuple[Tensor, ...]]:
    r"""``(*y, *theta, V) -> (A, *rows, U, *grads, stats)``: the whole reverse-mode IFT of a small system
    (what ``jit=True`` traces; Blondel et al. eq. (4)).

    :math:`A` and the rows of :math:`B` by :func:`_jacobian_fn`; :math:`U = (A + \lambda I)^{-\top} V` by LU
    with one step of iterative refinement, branch-free (the caller checks ``stats`` and redoes the solve
    with :func:`curvlab.linalg.solve` when the factorisation failed or the residual is too large);
    ``grads[i] = -U^\top B_i`` ``(k, numel)``; ``stats = [LU info, ‖F‖, ‖y‖, ‖A + λI‖_F, ‖R_j‖..., ‖V_j‖...]``.
    """
    jacobian = _jacobian_fn(fun, n_y, diff)

    def ift(*flat: Tensor) -> tuple[Tensor, ...]:
        V = flat[-1]
        F, A, *rows = jacobian(*flat[:-1])
        n = A.shape[0]
        At = A.T
        if damping:
            At = At + damping * torch.eye(n, dtype=A.dtype, device=A.device)
        Vm = V.reshape(n, -1)
        LU, piv, info = torch.linalg.lu_factor_ex(At)
        U = torch.linalg.lu_solve(LU, piv, Vm)
        U = U + torch.linalg.lu_solve(LU, piv, torch.addmm(Vm, At, U, alpha=-1))  # one refinement step
        rnorm = torch.linalg.vector_norm(torch.addmm(Vm, At, U, alpha=-1), dim=0)
        grads = [-(U.T @ r.reshape(n, -1)) for r in rows]
        ys = flat[:n_y]
        ynorm = (
            torch.linalg.vector_norm(ys[0])
            if n_y == 1
            else torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in ys]))
        )
        scalars = torch.stack([info.to(A.dtype), torch.linalg.vector_norm(F), ynorm, torch.linalg.matrix_norm(At)])
        stats = torch.cat([scalars, rnorm, torch.linalg.vector_norm(Vm, dim=0)])
        return (A, *rows, U, *grads, stats)

    return ift


def _ift_vjp(
    system: LinearSystem, fun: _Optimality, y: Sequence[Tensor], theta: Sequence[Tensor], v: Tensor, idx: list[int]
) -> list[Tensor]:
    r"""Reverse mode (Blondel et al. eq. (4)), differentiable: :math:`u = A^{-\top}\bar v`, return :math:`-B^\top u`.

    Only the entries ``theta[idx]`` are differentiated.
    """
    u = linear_solve(system.T, v, [*y, *theta])

    def f(*q: Tensor) -> Tensor:
        full = list(theta)
        for i, t in zip(idx, q):
            full[i] = t
        return fun(y, full)

    _, vjp_fn = torch.func.vjp(f, *[theta[i] for i in idx])
    return [-g for g in vjp_fn(u)]


def _ift_jvp(
    system: LinearSystem,
    fun: _Optimality,
    y: Sequence[Tensor],
    theta: Sequence[Tensor],
    tangents: Sequence[Tensor | None],
) -> Tensor:
    r"""Forward mode (Blondel et al. eq. (3)), differentiable: :math:`\dot y = -A^{-1} B\dot\theta` (flat)."""
    idx = [i for i, (t, d) in enumerate(zip(theta, tangents)) if d is not None and t.is_floating_point()]
    if not idx:
        return torch.zeros(fun.n, dtype=y[0].dtype, device=y[0].device)

    def f(*q: Tensor) -> Tensor:
        full = list(theta)
        for i, t in zip(idx, q):
            full[i] = t
        return fun(y, full)

    b_dot = jvp(f, tuple(theta[i] for i in idx), tuple(tangents[i].to(theta[i].dtype) for i in idx))
    return -linear_solve(system, b_dot, [*y, *theta])


def _operator(rec: Recorded, linear: LinearSolver, transpose: bool) -> MatvecOperator:
    """``Aᵀ`` (``transpose``) or ``A`` of a recorded ``F`` as an operator for :func:`curvlab.linalg.solve`."""
    F = rec.F
    if linear.symmetric:  # A = Aᵀ: no second-order graph needed
        mv, mm, rmv = rec.at, rec.at_block, rec.at
    elif transpose:
        mv, mm, rmv = rec.at, rec.at_block, rec.a
    else:
        mv, mm, rmv = rec.a, rec.a_block, rec.at
    return MatvecOperator(mv, rec.n, F.dtype, F.device, matmat=mm, rmatvec=rmv, symmetric=linear.symmetric)


def _recorded_vjp(rec: Recorded, linear: LinearSolver, v: Tensor, idx: list[int]) -> list[Tensor]:
    r""":math:`-B^\top A^{-\top} v` for ``theta[idx]`` on a recorded ``F`` (``v``: ``(n,)`` or ``(n, k)``).

    When the solve factors a small system, :math:`A` and :math:`B` come from one
    batched backward pass (:meth:`Recorded.jacobian`) and :math:`B^\top u` is a
    matrix product; otherwise :math:`A^\top` is an operator of backward passes and
    :math:`B^\top u` one more.
    """
    if linear.factors(rec.n):
        jac = rec.jacobian(idx)
        if jac is not None:
            return _dense_vjp(linear, *jac, v)
    u = linear(_operator(rec, linear, transpose=True), v)
    return rec.bt(u, idx)


def _dense_vjp(linear: LinearSolver, A: Tensor, rows: Sequence[Tensor], v: Tensor) -> list[Tensor]:
    r""":math:`-B^\top A^{-\top} v` from the matrix :math:`A` ``(n, n)`` and the rows of :math:`B` (``(n, *shape)``)."""
    u = linear.solve_matrix(A.T, v, linear.symmetric)
    n = A.shape[0]
    if u.ndim == 1:
        return [-(u @ r.reshape(n, -1)).reshape(r.shape[1:]) for r in rows]
    return [-(u.T @ r.reshape(n, -1)).reshape(u.shape[1], *r.shape[1:]) for r in rows]


def _warn_residual(res: KrylovResult | None, fnorm: float | None, ynorm: float, what: str, hint: str = "") -> None:
    """Warn (:class:`OptimalityWarning`) when ``y`` is far from a root: ``‖F‖ / (‖A‖ ‖y‖)`` above the threshold."""
    if res is None or fnorm is None or not math.isfinite(fnorm) or fnorm == 0.0:
        return
    anorm = res.info.get("anorm")
    if anorm is None or not anorm > 0:
        return
    dist = fnorm / (anorm * ynorm) if ynorm > 0 else math.inf
    limit = max(_RESIDUAL_WARN, float(torch.finfo(res.x.dtype).eps) ** 0.5)
    if dist > limit:
        warnings.warn(
            f"{what}: the solution is far from a root of the optimality condition (‖F(y*, θ)‖ = {fnorm:.3g}, "
            f"about {dist:.2g} of ‖y*‖ away by a Newton step estimate), so the implicit derivatives are those of "
            f"a nearby point, not exact: solve the inner problem more accurately.{hint}",
            OptimalityWarning,
            stacklevel=4,
        )


# --------------------------------------------------------------------------- #
# custom_root
# --------------------------------------------------------------------------- #
class _RootProblem:
    """Everything one call of a decorated solver needs (passed through ``Function.apply`` as a constant)."""

    def __init__(self, root: _CustomRoot, arguments: Arguments, grad_mode: bool) -> None:
        self.root = root
        self.arguments = arguments
        self.grad_mode = grad_mode
        self.n_y: int | None = None
        self.y_def: Any = None
        self.y_meta: list[tuple[torch.Size, torch.dtype]] | None = None
        self.aux_def: Any = None
        self.aux_leaves: list[Any] = []  # non-tensor aux leaves (_TENSOR where a tensor goes)
        self.optimality: _Optimality | None = None
        self.system: LinearSystem | None = None
        self.residual: float | None = None
        self.y_norm: float = 0.0
        self.rec: Recorded | None = None
        # jit=True: the cache entry of this call's signature ({V signature: traced IFT}, differentiated theta)
        self.traced: tuple[dict[Any, Callable[..., tuple[Tensor, ...]]], list[int]] | None = None
        # (y, theta) of a call that did not evaluate F (jit=True, or nothing to differentiate)
        self.deferred: tuple[list[Tensor], list[Tensor]] | None = None

    # forward: run the solver, record structures, evaluate F once
    def run(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        root, arguments = self.root, self.arguments
        wants = [t.requires_grad and t.is_floating_point() for t in tensors[arguments.n_init :]]
        tensors = [t.detach() for t in tensors]
        init = arguments.init(tensors[: arguments.n_init])
        theta = tensors[arguments.n_init :]
        plain = arguments.plain_theta(theta)
        if plain is not None:  # positional tensors and constants only: no re-parametrisation context
            with closure_hint():
                out = root.solver(init, *plain[0])
        else:
            with closure_hint(), arguments.theta(theta) as (args, kwargs):
                out = root.solver(init, *args, **kwargs)
        if root.has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"has_aux=True: the solver {root.solver_name} must return a pair (y_star, aux), "
                    f"got {type(out).__name__}{'' if not isinstance(out, tuple) else f' of length {len(out)}'}"
                )
            y, aux = out
        else:
            y, aux = out, None
            _check_no_aux(out, init, root.solver_name)
        y_leaves, y_def = _validate_y(y, f"the solution returned by {root.solver_name}")
        if self.y_def is None:
            self.y_def, self.n_y = y_def, len(y_leaves)
            self.y_meta = [(t.shape, t.dtype) for t in y_leaves]
            n = sum(t.numel() for t in y_leaves)
            self.optimality = _Optimality(root.optimality_fn, arguments, y_def, n, root.optimality_name)
            self.system = LinearSystem(self.optimality, len(y_leaves), root.linear, transpose=False)
        elif y_def != self.y_def or [(t.shape, t.dtype) for t in y_leaves] != self.y_meta:
            raise ValueError(f"{root.solver_name} returned solutions of different structures across a vmap batch")
        inputs = {id(t) for t in tensors}
        y_out = [t.detach().clone() if id(t) in inputs else t.detach() for t in y_leaves]
        aux_leaves, self.aux_def = tree_flatten(aux)
        self.aux_leaves = [_TENSOR if isinstance(a, Tensor) else a for a in aux_leaves]
        aux_out = [a.detach() for a in aux_leaves if isinstance(a, Tensor)]
        with closure_hint():
            self._evaluate(y_out, theta, wants)
        return (*y_out, *aux_out)

    def _evaluate(self, y: list[Tensor], theta: list[Tensor], wants: list[bool]) -> None:
        """``F`` at the solution, once: recorded for the derivatives when they will be asked for outside transforms."""
        fun = self.optimality
        assert fun is not None
        forward_ad = torch.autograd.forward_ad._current_level >= 0
        plain = not functorch_active()
        if plain and self.grad_mode and not forward_ad and self._traced(y, theta, wants):
            return  # F is evaluated with A and B in the backward pass (last_residual evaluates it on demand)
        if plain and (self.grad_mode or forward_ad):
            # recorded with y (and the theta that are differentiated) as leaves: the derivatives reuse it
            diff = [t.is_floating_point() for t in theta] if forward_ad else wants
            rec, ours = _record(fun, y, theta, diff)
            F = rec.F
            _check_closure(fun, F, ours)
            if any(diff):
                self.rec = rec
        elif self.grad_mode:
            with torch.enable_grad():
                F = fun(y, theta)
            if any(t.requires_grad for t in (*y, *theta)):  # F made our detached inputs require grad
                raise _autograd_grad_hint(fun.name, RuntimeError("it set requires_grad on y or theta"))
            _check_closure(fun, F, [])
        else:  # nothing will be differentiated: F is needed only for last_residual, evaluated on demand
            self.deferred = (y, theta)
            return
        if F.dtype != y[0].dtype:
            raise TypeError(f"{fun.name} returned F of dtype {F.dtype} for y of dtype {y[0].dtype}; they must match")
        Fd = F.detach()
        self.residual = float(torch.linalg.vector_norm(Fd))
        self.y_norm = float(torch.linalg.vector_norm(flat_cat(y)))

    def _traced(self, y: list[Tensor], theta: list[Tensor], wants: list[bool]) -> bool:
        """``jit=True``: find (or trace, for a cotangent shaped like ``y``) the IFT graph of this signature.

        False (and the eager route) when ``jit`` is off, nothing is differentiated, the system is not
        factored densely, a module or an unhashable constant is among the theta, or ``F`` cannot be traced.
        """
        root, fun = self.root, self.optimality
        traces, linear = root.traces, root.linear
        assert fun is not None
        if traces is None or not any(wants) or not linear.factors(fun.n):
            return False
        damping = linear.traced_damping(y[0].dtype)
        consts = self.arguments.constants_key()
        if damping is None or consts is None:
            return False
        key = (tuple(wants), signature(y), signature(theta), consts)
        entry = traces.get(key)
        if entry is None and traces.full():
            if not traces.warned:
                traces.warned = True
                warnings.warn(
                    f"custom_root(jit=True) for {root.solver_name}: {len(traces)} input signatures traced (shapes, "
                    "dtypes and the values of non-tensor arguments); calls with further signatures run eagerly. "
                    "Pass values that change from call to call as tensors, not Python numbers.",
                    RuntimeWarning,
                    stacklevel=5,
                )
            return False
        if entry is FAILED:
            return False
        if entry is None:
            diff = [i for i, w in enumerate(wants) if w]
            v = torch.zeros(fun.n, dtype=y[0].dtype, device=y[0].device)
            try:
                compiled, captured = trace(_ift_fn(fun, len(y), diff, damping), [*y, *theta, v])
            except Exception:  # noqa: BLE001 - untraceable F (data-dependent control flow, ...): run eagerly
                traces.put(key, FAILED)
                return False
            _refuse_closure(fun, [t for t in captured if t.requires_grad])
            entry = ({signature([v]): compiled}, diff)
            traces.put(key, entry)
        self.traced, self.deferred = entry, (y, theta)
        return True

    def lazy_residual(self) -> float | None:
        """:attr:`residual`, evaluating ``F`` now if the call deferred it (``jit=True``, no gradient)."""
        if self.residual is None and self.deferred is not None and self.optimality is not None:
            with torch.no_grad():
                self.residual = float(torch.linalg.vector_norm(self.optimality(*self.deferred)))
        return self.residual

    def jit_vjp(self, V: Tensor, idx: list[int]) -> list[Tensor] | None:
        """``-Bᵀ A⁻ᵀ V`` for ``theta[idx]`` by the traced graph (``V``: ``(n,)`` or ``(n, k)``).

        ``None`` when a new cotangent shape cannot be traced (the caller takes the eager route).
        """
        assert self.traced is not None and self.deferred is not None and self.optimality is not None
        graphs, diff = self.traced
        y, theta = self.deferred
        linear = self.root.linear
        vsig = signature([V])
        compiled = graphs.get(vsig)
        if compiled is None:
            try:
                damping = linear.traced_damping(V.dtype)
                compiled, _ = trace(_ift_fn(self.optimality, len(y), diff, damping or 0.0), [*y, *theta, V])
            except Exception:  # noqa: BLE001 - the eager route computes the same derivatives
                return None
            graphs[vsig] = compiled
        try:
            outs = compiled(*y, *theta, V)
        except Exception:  # noqa: BLE001 - a replay that fails (it should not) leaves the eager route
            return None
        nd = len(diff)
        A, rows, U, grads, stats = outs[0], outs[1 : 1 + nd], outs[1 + nd], outs[2 + nd : 2 + 2 * nd], outs[-1]
        where = {i: j for j, i in enumerate(diff)}
        values = stats.tolist()  # one host sync for every check
        info, fnorm, ynorm, anorm = values[:4]
        k = U.shape[1]
        self.residual, self.y_norm = fnorm, ynorm
        if linear.traced_accepts(info, values[4 : 4 + k], values[4 + k :], V.dtype):
            linear.record_traced(U if V.ndim == 2 else U[:, 0], stats[4 : 4 + k], stats[4 + k :], V.ndim, anorm)
            out = []
            for i in idx:
                g, shape = grads[where[i]], theta[i].shape
                out.append(g.reshape(shape) if V.ndim == 1 else g.reshape(k, *shape))
        else:  # LU failed or the refined residual is too large: the full dense solve decides (and reports)
            out = _dense_vjp(linear, A, [rows[where[i]] for i in idx], V)
        _warn_residual(linear.last, self.residual, self.y_norm, self.root.solver_name)
        return out

    def element(self) -> _RootProblem:
        """A problem for one element of a ``vmap`` batch, sharing the structures found so far."""
        sub = _RootProblem(self.root, self.arguments, self.grad_mode)
        for name in ("n_y", "y_def", "y_meta", "optimality", "system"):
            setattr(sub, name, getattr(self, name))
        return sub

    def adopt(self, sub: _RootProblem) -> None:
        """Take the structures (and latest residual) found while solving one ``vmap`` element."""
        names = ("n_y", "y_def", "y_meta", "aux_def", "aux_leaves", "optimality", "system", "residual", "deferred")
        for name in names:
            setattr(self, name, getattr(sub, name))

    def outputs(self, outs: Sequence[Tensor]) -> Any:
        assert self.n_y is not None
        y = tree_unflatten(list(outs[: self.n_y]), self.y_def)
        if not self.root.has_aux:
            return y
        it = iter(outs[self.n_y :])
        aux = tree_unflatten([next(it) if a is _TENSOR else a for a in self.aux_leaves], self.aux_def)
        return y, aux

    # derivatives on the recorded graph
    def fast_vjp(self, v: Tensor, idx: list[int]) -> list[Tensor]:
        """``-Bᵀ A⁻ᵀ v`` for ``theta[idx]`` (``v``: ``(n,)`` or ``(n, k)``; results ``(k, *shape)`` for a block)."""
        rec, linear = self.rec, self.root.linear
        assert rec is not None
        grads = _recorded_vjp(rec, linear, v, idx)
        _warn_residual(linear.last, self.residual, self.y_norm, self.root.solver_name)
        return grads

    def fast_jvp(self, tangents: Sequence[Tensor | None]) -> Tensor:
        """``-A⁻¹ B θ̇`` (flat) for tangents aligned with theta."""
        rec, linear = self.rec, self.root.linear
        assert rec is not None
        b_dot = rec.b(tangents)
        y_dot = linear(_operator(rec, linear, transpose=False), b_dot)
        _warn_residual(linear.last, self.residual, self.y_norm, self.root.solver_name)
        return -y_dot


def _check_no_aux(out: Any, init: Any, solver_name: str) -> None:
    """``has_aux=False`` but the solver returned ``(y, aux)``: say so before ``F`` fails on the pair."""
    if not (isinstance(out, tuple) and len(out) == 2) or init is None:
        return
    init_def = tree_flatten(init)[1]
    if tree_flatten(out)[1] == init_def:
        return
    first = out[0]
    if tree_flatten(first)[1] == init_def:
        raise TypeError(
            f"the solver {solver_name} returned a pair whose first entry is structured like init and the second "
            "is extra: if it returns (y_star, aux), decorate it with has_aux=True"
        )


def _legacy_unbatch(grads: Sequence[Tensor | None]) -> tuple[list[Tensor | None], int | None]:
    """Grads batched by ``is_grads_batched=True`` as plain ``(k, ...)`` tensors, and the legacy-vmap level."""
    if not any(is_legacy_batched(g) for g in grads):
        return list(grads), None
    level = legacy_level()
    out = [torch._remove_batch_dim(g, level, 1, 0) if is_legacy_batched(g) else g for g in grads]
    k = next(g.shape[0] for g, o in zip(out, grads) if is_legacy_batched(o))
    out = [g if g is None or is_legacy_batched(o) else g.expand(k, *g.shape) for g, o in zip(out, grads)]
    return out, level


class _Root(Function):
    """``theta -> y*(theta)``: the solver's output with IFT derivatives (Blondel et al. eqs. (3), (4))."""

    @staticmethod
    def forward(problem: _RootProblem, *tensors: Tensor) -> tuple[Tensor, ...]:
        return problem.run(tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, ...]) -> None:
        problem, *tensors = inputs
        ctx.problem = problem
        n_y = problem.n_y
        theta = tensors[problem.arguments.n_init :]
        ctx.save_for_backward(*output[:n_y], *theta)
        ctx.save_for_forward(*output[:n_y], *theta)
        if len(output) > n_y:
            ctx.mark_non_differentiable(*output[n_y:])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple:
        problem: _RootProblem = ctx.problem
        n_y, n_init = problem.n_y, problem.arguments.n_init
        saved = ctx.saved_tensors
        y, theta = saved[:n_y], saved[n_y:]
        needs = ctx.needs_input_grad[1 + n_init :]
        idx = [i for i, t in enumerate(theta) if needs[i] and t.is_floating_point()]
        out: list[Tensor | None] = [None] * (1 + n_init + len(theta))
        g_y = list(grads[:n_y])
        if not idx or all(g is None for g in g_y):
            return tuple(out)
        g_y, level = _legacy_unbatch(g_y)
        batched = level is not None
        if batched:
            k = next(g.shape[0] for g in g_y if g is not None)
            V = torch.cat(
                [(t.new_zeros(k, t.numel()) if g is None else g.reshape(k, -1)) for g, t in zip(g_y, y)],
                dim=1,
            ).T
        else:
            V = flat_cat([torch.zeros_like(t) if g is None else g for g, t in zip(g_y, y)])
        fast = (
            problem.rec is not None
            and not torch.is_grad_enabled()
            and not functorch_active()
            and all(problem.rec.theta[i].requires_grad for i in idx)
        )
        traced = None
        if problem.traced is not None and not torch.is_grad_enabled() and not functorch_active():
            traced = problem.jit_vjp(V, idx)
        if traced is not None:
            values = traced
        elif fast:
            values = problem.fast_vjp(V, idx)
        elif batched:  # general route, one cotangent at a time
            cols = [_ift_vjp(problem.system, problem.optimality, y, theta, V[:, j], idx) for j in range(V.shape[1])]
            values = [torch.stack([c[i] for c in cols]) for i in range(len(idx))]
        else:
            values = _ift_vjp(problem.system, problem.optimality, y, theta, V, idx)
        for i, g in zip(idx, values):
            out[1 + n_init + i] = torch._add_batch_dim(g, 0, level) if batched else g
        return tuple(out)

    @staticmethod
    def jvp(ctx: Any, _problem_t: Any, *tangents: Tensor | None) -> tuple[Tensor, ...]:
        problem: _RootProblem = ctx.problem
        n_y, n_init = problem.n_y, problem.arguments.n_init
        saved = ctx.saved_tensors
        y, theta = saved[:n_y], saved[n_y:]
        t_theta = tangents[n_init:]
        rec = problem.rec
        fast = (
            rec is not None
            and not functorch_active()
            and all(d is None or rec.theta[i].requires_grad for i, d in enumerate(t_theta))
        )
        if fast:
            flat = problem.fast_jvp(
                [None if d is None or not theta[i].is_floating_point() else d for i, d in enumerate(t_theta)]
            )
        else:
            flat = _ift_jvp(problem.system, problem.optimality, y, theta, t_theta)
        y_dot = split_like(flat, y)
        n_aux = sum(a is _TENSOR for a in problem.aux_leaves)
        return (*y_dot, *([None] * n_aux))

    @staticmethod
    def vmap(info: Any, in_dims: tuple, problem: _RootProblem, *tensors: Tensor) -> tuple[tuple, tuple]:
        # An arbitrary solver is not vmap-able (it may stop on data-dependent tests); solve per batch element.
        dims = in_dims[1:]
        outs = []
        with closure_hint(vmap_loop=True):
            for i in range(info.batch_size):
                sub = problem.element()  # each element records its own F (and derivatives) at its own solution
                outs.append(_Root.apply(sub, *[t if d is None else t.select(d, i) for t, d in zip(tensors, dims)]))
                problem.adopt(sub)
        stacked = tuple(torch.stack([o[j] for o in outs]) for j in range(len(outs[0])))
        return stacked, (0,) * len(stacked)


#: ``torch._C._FunctionBase.apply`` bound to ``_Root`` (what ``Function.apply`` calls outside transforms).
_APPLY = super(Function, _Root).apply


def _is_transformed(t: Tensor) -> bool:
    """``t`` is being traced by a ``torch.func`` transform (grad, vmap, jvp)."""
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:  # pragma: no cover - older torch
        return False


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _fn_name(fn: Any, default: str) -> str:
    name = getattr(fn, "__name__", None)
    return f"{default} {name!r}" if name and name != "<lambda>" else default


class _CustomRoot:
    """A solver decorated by :func:`custom_root` (see there). Calls like the solver."""

    def __init__(
        self,
        solver: Callable[..., Any],
        optimality_fn: Callable[..., Any],
        linear: LinearSolver,
        has_aux: bool,
        optimality_label: str = "optimality_fn",
        jit: bool = False,
    ) -> None:
        if not callable(solver):
            raise TypeError(f"custom_root decorates a solver function, got {type(solver).__name__}")
        functools.update_wrapper(self, solver)
        self.solver, self.optimality_fn, self.linear, self.has_aux = solver, optimality_fn, linear, has_aux
        self.solver_name = _fn_name(solver, "solver")
        self.optimality_name = _fn_name(optimality_fn, optimality_label)
        self._solver_sig = _signature(solver)
        self._opt_sig = _signature(optimality_fn)
        if not isinstance(jit, bool):
            raise TypeError(f"jit must be True or False, got {jit!r}")
        self.traces: TraceCache | None = TraceCache() if jit else None
        self._last_residual: float | None = None
        self._last_problem: _RootProblem | None = None  # a call that deferred F: evaluated later, or on demand
        self._bound: set[Any] = set()  # call shapes whose signatures were checked (see _check_signatures)

    @property
    def last_solve(self) -> KrylovResult | None:
        """The :class:`~curvlab.linalg.KrylovResult` of the latest implicit linear solve (``None`` before the first)."""
        return self.linear.last

    @property
    def last_residual(self) -> float | None:
        r""":math:`\|F(y^*, \theta)\|` at the latest solution (how well the solver solved the optimality condition)."""
        if self._last_problem is not None:
            return self._last_problem.lazy_residual()
        return self._last_residual

    def _check_signatures(self, init: Any, args: tuple, kwargs: dict) -> None:
        # whether a call binds depends only on how many positional arguments and which keywords it has
        key = (len(args), tuple(kwargs)) if kwargs else len(args)
        if key in self._bound:
            return
        self._check_binds(init, args, kwargs)
        if len(self._bound) < 64:
            self._bound.add(key)

    def _check_binds(self, init: Any, args: tuple, kwargs: dict) -> None:
        if self._solver_sig is not None:
            try:
                self._solver_sig.bind(init, *args, **kwargs)
            except TypeError as e:
                raise TypeError(
                    f"{self.solver_name}{self._solver_sig} cannot be called as solver(init, *theta) with "
                    f"{len(args)} positional theta argument(s) and keywords {sorted(kwargs)}: {e}"
                ) from None
        if self._opt_sig is not None:
            try:
                self._opt_sig.bind(init, *args, **kwargs)
            except TypeError as e:
                raise TypeError(
                    f"the signature of {self.optimality_name}{self._opt_sig} does not match the solver's "
                    f"{self._solver_sig if self._solver_sig is not None else ''}: optimality_fn(y, *theta) must "
                    f"accept the same theta as solver(init, *theta), here {len(args)} positional argument(s)"
                    f"{' and keywords ' + str(sorted(kwargs)) if kwargs else ''} after y ({e})"
                ) from None

    def __call__(self, init: Any, *args: Any, **kwargs: Any) -> Any:
        self._check_signatures(init, args, kwargs)
        check_forward_levels(self.solver_name)
        arguments = Arguments(init, args, kwargs)
        problem = _RootProblem(self, arguments, torch.is_grad_enabled())
        theta = arguments.tensors[arguments.n_init :]
        tracked = (
            (problem.grad_mode and any(t.requires_grad for t in theta))
            or functorch_active()
            or torch.autograd.forward_ad._current_level >= 0
            or any(_is_transformed(t) for t in arguments.tensors)
        )
        if tracked and not functorch_active() and not any(_is_transformed(t) for t in arguments.tensors):
            # plain autograd: torch's Function.apply would re-bind forward's signature and unwrap functorch
            # wrappers on every call; neither applies here, so enter the C++ apply directly
            outs = _APPLY(problem, *arguments.tensors)
        elif tracked:
            outs = _Root.apply(problem, *arguments.tensors)
        else:  # nothing to differentiate: just compute (as every torch function does)
            outs = problem.run(arguments.tensors)
        self._last_residual = problem.residual
        self._last_problem = problem if problem.residual is None and problem.deferred is not None else None
        return problem.outputs(outs)

    def __repr__(self) -> str:
        return f"custom_root({self.optimality_name}, solve={self.linear.name!r})({self.solver_name})"


def custom_root(
    optimality_fn: Callable[..., Any],
    solve: str | Callable[..., Any] = "auto",
    has_aux: bool = False,
    *,
    nonconvergence: str = "warn",
    jit: bool = False,
    **solve_options: Any,
) -> Callable[[Callable[..., Any]], _CustomRoot]:
    r"""Decorate ``solver(init, *theta) -> y*`` so that ``y*`` is differentiable in ``theta`` by the IFT.

    Blondel et al. 2021, §2.1: with :math:`F(y^*(\theta), \theta) = 0`,
    :math:`A = \partial_y F`, :math:`B = \partial_\theta F`, the Jacobian is
    :math:`\partial y^* = -A^{-1}B` (eq. (2)); reverse mode solves
    :math:`A^\top u = \bar v` and returns :math:`\bar\theta = -B^\top u` (eq. (4)),
    forward mode returns :math:`-A^{-1}B\dot\theta` (eq. (3)). The solver's own
    iterations are never differentiated (it runs without autograd on detached
    copies of ``theta``), so any solver works — an optimizer loop, scipy, a
    closed form.

    Every tensor in ``theta`` is differentiable: positional and keyword
    arguments, tensors, tuples/lists/dicts of tensors and ``nn.Module``
    arguments (their parameters; the module is re-parametrised while ``F``
    runs). ``y*`` may be a tensor or a tuple/list/dict of tensors. When
    nothing is to be differentiated (no tensor in ``theta`` requires grad, a
    Python float, a frozen module, or ``torch.no_grad()``) the call just
    returns the solution.

    Cost. ``F`` is evaluated once per call, at the solution, and recorded by
    autograd; outside ``torch.func`` transforms every product with
    :math:`A^\top, B^\top` is one backward pass through that graph, and products
    with :math:`A, B` (forward mode) one backward pass through its
    linearisation, built once per call (:mod:`implicit._graph`). With the
    default ``solve="auto"`` a small system (``n <= 256``) is formed with one
    batched product and factored; larger ones use CG when the operator is
    symmetric and GMRES otherwise. Symmetry is known when ``optimality_fn`` is
    ``torch.func.grad(g)`` (then :math:`A = \nabla^2_{yy} g`; Cholesky for a
    small system, no probe) and otherwise probed with one two-column product.
    With ``jit=True`` the small-system path is traced once and replayed (about
    2.4x faster on a 30-variable problem; see ``jit`` below).

    Transforms and higher order. Implemented as a ``torch.autograd.Function``
    with ``setup_context``, a ``jvp`` rule and a ``vmap`` rule, so
    ``torch.func.grad``/``vjp``/``jvp``/``jacrev``/``jacfwd``/``hessian``,
    ``vmap`` (a batch of ``theta`` is solved element by element; a batch of
    cotangents — ``jacrev``, ``is_grads_batched=True``,
    ``torch.autograd.functional.jacobian(vectorize=True)`` — is one block linear
    solve) and ``torch.autograd.forward_ad`` work. The backward pass is itself
    built from differentiable pieces (``y*`` as this function's output and a
    differentiable linear solve), so second derivatives by reverse-over-reverse
    (``jacrev(jacrev)``, double backward) and forward-over-reverse
    (``torch.func.hessian``, ``jacfwd(jacrev)``, ``jacrev(jacfwd)``) are exact, not
    the "treat the solution as a constant" approximation. Forward-over-forward
    (``jacfwd(jacfwd)``, ``jvp`` of ``jvp``) raises ``NotImplementedError``:
    torch's nested forward mode through an ``autograd.Function`` with a ``jvp``
    rule gives wrong results.

    Args:
        optimality_fn: ``F(y, *theta, **kw_theta)``, zero at the solution, shaped
            like ``y`` (as many equations as unknowns). Typically
            ``torch.func.grad(inner_objective)``. It must be written with
            ``torch`` operations that ``torch.func`` can differentiate (use
            ``torch.func.grad``, not ``torch.autograd.grad``, inside it) and must
            take every tensor it depends on through ``theta``, not by closure.
        solve: a method of :func:`curvlab.linalg.solve`: ``"auto"`` (default,
            see above), ``"cg"`` (symmetric positive definite ``A``, e.g.
            ``F = ∇_y g`` at a strict minimum), ``"normal_cg"`` (any invertible
            ``A``), ``"minres"`` (symmetric indefinite), ``"gmres"`` (general),
            ``"neumann"`` (Lorraine et al. 2020's truncated series; ``alpha``
            defaults to about ``1/λ_max`` from power iterations, ``K`` to 20),
            ``"dense"``, or a callable ``solve(matvec, b) -> x`` (``matvec`` is a
            :class:`~curvlab.linops.LinearOperator`, callable on flat vectors).
        has_aux: the solver returns ``(y*, aux)``; ``aux`` is passed through
            undifferentiated (tensor leaves detached). ``optimality_fn`` still
            returns ``F`` alone and receives ``y*`` alone.
        nonconvergence: what to do when the linear solve does not converge:
            ``"warn"`` (a :class:`LinearSolveWarning` stating the residual),
            ``"raise"`` (:class:`LinearSolveError`) or ``"ignore"``.
        jit: trace, once per input signature, the whole reverse-mode
            derivative of a densely factored system (``solve="auto"`` with
            ``n <= dense_max``, or ``"dense"``: :math:`F`, :math:`A`, :math:`B`,
            an LU solve with one refinement step, :math:`-B^\top u`) into a graph
            of ATen operations and replay it in every later backward pass
            (:mod:`implicit._jit`; the eager solve takes over if the traced LU
            fails or misses ``tol``): about 2.4x faster on a 30-variable
            problem, where eager overhead dominates. Semantics of ``jax.jit``: tensors and
            Python values that ``optimality_fn`` reads other than through its
            arguments are frozen at the first call (pass everything that changes
            as ``theta``); the non-tensor ``theta`` are part of the signature.
            Calls that cannot be traced (data-dependent control flow in ``F``,
            ``nn.Module`` arguments, higher-order or ``torch.func`` derivatives,
            forward mode, Krylov solves) run eagerly, exactly as with
            ``jit=False``. ``last_residual`` is then evaluated on demand.
        **solve_options: options of :func:`curvlab.linalg.solve` (``tol``,
            ``atol``, ``maxiter``, ``M``, ``damping``, ``symmetric``,
            ``dense_max``, ``restart``, ``x0``, ``alpha``, ``K``), or keyword
            arguments for a callable. ``ridge`` is a deprecated alias of ``damping``.

    Returns:
        A decorator. The decorated solver is called as ``solver(init, *theta,
        **kw_theta)`` and returns ``y*`` (or ``(y*, aux)``). Its attributes
        ``last_solve`` (:class:`~curvlab.linalg.KrylovResult`) and ``last_residual``
        (:math:`\|F(y^*, \theta)\|`) report on the latest call. An
        :class:`OptimalityWarning` says when ``y*`` is far from a root of ``F``
        (the derivatives are then those of a nearby point).

    Raises:
        TypeError: ``optimality_fn`` not callable, unknown solver option, and at
            call time a signature of ``optimality_fn`` that does not accept the
            solver's arguments (jaxopt #360), an ``F`` that is not a tensor pytree,
            a solver returning ``(y, aux)`` without ``has_aux=True``.
        ValueError: unknown ``solve`` name; at call time ``F`` and ``y`` of
            different sizes, ``optimality_fn`` closing over a tensor that requires
            grad.
        RuntimeError: ``optimality_fn`` computes a gradient with ``torch.autograd.grad``.
        NotImplementedError: forward-over-forward differentiation.
        LinearSolveError: in the backward pass, with ``nonconvergence="raise"``.

    Example:
        >>> X = torch.randn(20, 3, dtype=torch.float64); t = torch.randn(20, dtype=torch.float64)
        >>> def g(w, lam):  # ridge regression
        ...     return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
        >>> @custom_root(torch.func.grad(g))
        ... def ridge(w0, lam):
        ...     return torch.linalg.solve(X.T @ X + lam * torch.eye(3, dtype=X.dtype), X.T @ t)
        >>> lam = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        >>> w = ridge(torch.zeros(3, dtype=torch.float64), lam)
        >>> w.sum().backward()                     # d(sum w*)/d lam by the IFT
        >>> exact = -torch.linalg.solve(X.T @ X + 2 * torch.eye(3, dtype=X.dtype), w.detach()).sum()
        >>> bool(torch.isclose(lam.grad, exact))
        True
    """
    if not callable(optimality_fn):
        raise TypeError(f"optimality_fn must be callable F(y, *theta), got {type(optimality_fn).__name__}")
    symmetric = True if is_gradient_in_y(optimality_fn) else None
    linear = LinearSolver(solve, solve_options, nonconvergence, symmetric=symmetric)

    def decorator(solver: Callable[..., Any]) -> _CustomRoot:
        return _CustomRoot(solver, optimality_fn, linear, bool(has_aux), jit=jit)

    return decorator


#: The code object of the functions that ``torch.func.grad`` returns.
_GRAD_CODE = getattr(torch.func.grad(lambda y: y), "__code__", None)


def is_gradient_in_y(fn: Any) -> bool:
    r"""``fn`` is ``torch.func.grad(g)`` (``argnums=0``, no aux), so :math:`A = \nabla^2_{yy} g` is symmetric.

    Then ``solve="auto"`` needs no symmetry probe (CG, or Cholesky for a small system); any other
    ``fn`` is probed as before. The test reads the closure of ``torch.func.grad``'s wrapper and
    answers ``False`` whenever it is not exactly that wrapper.
    """
    code = getattr(fn, "__code__", None)
    if _GRAD_CODE is None or code is not _GRAD_CODE or not fn.__closure__:
        return False
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__)))
    return cells.get("argnums") == 0 and cells.get("has_aux") is False and callable(cells.get("func"))


def _fixed_point_residual(T: Callable[..., Any]) -> Callable[..., Any]:
    """``F(y, *theta) = T(y, *theta) - y`` (leafwise), with ``T``'s signature."""

    @functools.wraps(T)
    def residual(y: Any, /, *args: Any, **kwargs: Any) -> Any:  # positional-only: T's data may be called y=
        ty = T(y, *args, **kwargs)
        t_leaves, t_def = tree_flatten(ty)
        y_leaves, y_def = tree_flatten(y)
        if t_def != y_def or len(t_leaves) != len(y_leaves):
            raise ValueError(f"T(y, *theta) must return the structure of y ({y_def}), got {t_def}")
        return [a - b for a, b in zip(t_leaves, y_leaves)]

    return residual


def custom_fixed_point(
    T: Callable[..., Any],
    solve: str | Callable[..., Any] = "auto",
    has_aux: bool = False,
    *,
    nonconvergence: str = "warn",
    jit: bool = False,
    **solve_options: Any,
) -> Callable[[Callable[..., Any]], _CustomRoot]:
    r"""Decorate a solver of the fixed point :math:`y^* = T(y^*, \theta)` for implicit differentiation.

    Blondel et al. 2021, §2.2: a fixed point is a root of
    :math:`F(y, \theta) = T(y, \theta) - y`, with
    :math:`A = \partial_y T - I` (not symmetric in general: ``"auto"`` factors a
    small system and otherwise probes symmetry and picks GMRES for a general one
    — jaxopt's default is ``"normal_cg"``, which squares the condition number;
    ``solve="neumann", alpha=-1`` is the classical fixed-point iteration
    :math:`u \leftarrow (\partial_y T)^\top u + \bar v`, convergent when ``T`` is
    a contraction). Everything else is as in :func:`custom_root`.

    Args:
        T: the fixed-point map ``T(y, *theta) -> y`` (same structure as ``y``); its
            ``theta`` may be passed by any keyword, ``y=`` included (jaxopt's
            ``T(x, theta, X=X, y=y)``).
        solve: linear solver (see :func:`custom_root`).
        has_aux: the solver returns ``(y*, aux)``.
        nonconvergence: ``"warn"``, ``"raise"`` or ``"ignore"``.
        jit: trace the dense IFT pieces once per signature (see :func:`custom_root`).
        **solve_options: options of the solver.

    Returns:
        A decorator, as :func:`custom_root`.

    Raises:
        TypeError, ValueError: as :func:`custom_root`.

    Example:
        >>> def T(y, a):  # y = 0.5 * cos(y) + a, a contraction
        ...     return 0.5 * torch.cos(y) + a
        >>> @custom_fixed_point(T)
        ... def fixed_point(y0, a):
        ...     y = y0
        ...     for _ in range(100):
        ...         y = T(y, a)
        ...     return y
        >>> a = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
        >>> y = fixed_point(torch.zeros(1, dtype=torch.float64), a)
        >>> (dy,) = torch.autograd.grad(y.sum(), a)
        >>> bool(torch.isclose(dy, 1 / (1 + 0.5 * torch.sin(y.detach()))))
        True
    """
    if not callable(T):
        raise TypeError(f"T must be callable T(y, *theta), got {type(T).__name__}")
    linear = LinearSolver(solve, solve_options, nonconvergence)
    F = _fixed_point_residual(T)

    def decorator(solver: Callable[..., Any]) -> _CustomRoot:
        return _CustomRoot(solver, F, linear, bool(has_aux), optimality_label="T", jit=jit)

    return decorator


# --------------------------------------------------------------------------- #
# plain functions
# --------------------------------------------------------------------------- #
def _setup(
    optimality_fn: Callable[..., Any],
    solution: Any,
    theta: Any,
    solve: str | Callable[..., Any],
    nonconvergence: str,
    solve_options: dict[str, Any],
    symmetric: bool | None = None,
) -> tuple[Arguments, list[Tensor], _Optimality, LinearSystem]:
    if not callable(optimality_fn):
        raise TypeError(f"optimality_fn must be callable F(y, *theta), got {type(optimality_fn).__name__}")
    if not isinstance(theta, tuple):
        raise TypeError(f"theta must be a tuple of the arguments after y, got {type(theta).__name__}")
    y_leaves, y_def = _validate_y(solution, "solution")
    arguments = Arguments(None, theta, {})
    n = sum(t.numel() for t in y_leaves)
    name = _fn_name(optimality_fn, "optimality_fn")
    fun = _Optimality(optimality_fn, arguments, y_def, n, name)
    linear = LinearSolver(solve, solve_options, nonconvergence, symmetric=symmetric)
    system = LinearSystem(fun, len(y_leaves), linear, transpose=False)
    return arguments, y_leaves, fun, system


def _floats_as_tensors(theta: tuple, like: Tensor) -> tuple:
    """Python floats among ``theta``'s leaves as 0-dim tensors of ``like``'s dtype (so they get a derivative)."""
    leaves, treedef = tree_flatten(theta)
    leaves = [torch.tensor(v, dtype=like.dtype, device=like.device) if isinstance(v, float) else v for v in leaves]
    return tree_unflatten(leaves, treedef)


def _plain(*tensors: Any) -> bool:
    """No transform is running and nothing asks for a derivative of the result: the recorded route applies."""
    if functorch_active() or torch.autograd.forward_ad._current_level >= 0:
        return False
    leaves = [t for t in tree_flatten(list(tensors))[0] if isinstance(t, Tensor)]
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in leaves))


def root_vjp(
    optimality_fn: Callable[..., Any],
    solution: Any,
    theta: tuple,
    cotangent: Any,
    solve: str | Callable[..., Any] = "auto",
    *,
    nonconvergence: str = "warn",
    **solve_options: Any,
) -> tuple:
    r"""Vector-Jacobian product of a root: :math:`\bar\theta = -B^\top A^{-\top}\bar v`.

    Blondel et al. 2021, eq. (4), without a decorator: given the solution
    :math:`y^*` of :math:`F(y, \theta) = 0` and a cotangent :math:`\bar v` shaped
    like it, solve :math:`A^\top u = \bar v` with :math:`A = \partial_y F(y^*, \theta)`
    and return :math:`-(\partial_\theta F)^\top u`. Differentiable again (in
    ``solution``, ``theta`` and ``cotangent``) and usable under ``torch.func``
    transforms; on plain tensors ``F`` is evaluated once and recorded.

    Args:
        optimality_fn: ``F(y, *theta)``, shaped like ``y``.
        solution: :math:`y^*` (tensor or tuple/list/dict of tensors).
        theta: tuple of the arguments after ``y``; Python floats are
            hyperparameters too (their derivative comes back as a 0-dim tensor).
        cotangent: :math:`\bar v`, structured like ``solution``.
        solve: linear solver (see :func:`custom_root`; default ``"auto"``).
        nonconvergence: ``"warn"``, ``"raise"`` or ``"ignore"``.
        **solve_options: options of :func:`curvlab.linalg.solve`.

    Returns:
        A tuple structured like ``theta``: a tensor for every floating-point
        tensor or Python float leaf, a dict of tensors for a module, ``None`` elsewhere.

    Raises:
        TypeError: ``theta`` not a tuple, ``solution`` not a tensor pytree.
        ValueError: ``cotangent`` not shaped like ``solution``; ``F`` not shaped like ``y``.
        NotImplementedError: under forward-over-forward transforms.
        LinearSolveError: with ``nonconvergence="raise"``.

    Example:
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> F = lambda y, b: A @ y - b            # y* = A⁻¹ b, so b̄ = A⁻ᵀ v̄
        >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> (b_bar,) = root_vjp(F, torch.linalg.solve(A, b), (b,), torch.tensor([1.0, 0.0], dtype=torch.float64))
        >>> b_bar
        tensor([ 0.4000, -0.2000], dtype=torch.float64)
    """
    check_forward_levels("root_vjp")
    y0 = tree_flatten(solution)[0]
    if isinstance(theta, tuple) and y0 and isinstance(y0[0], Tensor):
        theta = _floats_as_tensors(theta, y0[0])
    arguments, y, fun, system = _setup(optimality_fn, solution, theta, solve, nonconvergence, solve_options)
    c_leaves, _ = tree_flatten(cotangent)
    if len(c_leaves) != len(y) or any(not isinstance(c, Tensor) or c.shape != t.shape for c, t in zip(c_leaves, y)):
        raise ValueError("cotangent must be structured and shaped like solution")
    th = arguments.tensors
    idx = [i for i, t in enumerate(th) if t.is_floating_point()]
    values: list[Tensor | None] = [None] * len(th)
    if idx:
        v = flat_cat([c.to(y[0].dtype) for c in c_leaves])
        if _plain(y, th, c_leaves):
            rec, ours = _record(fun, y, th, [t.is_floating_point() for t in th])
            _check_closure(fun, rec.F, ours)
            linear = system.solver
            grads = _recorded_vjp(rec, linear, v, idx)
            _warn_residual(linear.last, float(rec.F.detach().norm()), float(flat_cat(y).norm()), "root_vjp")
        else:
            grads = _ift_vjp(system, fun, y, th, v, idx)
        for i, g in zip(idx, grads):
            values[i] = g
    args, _ = arguments.theta_structure(values)
    return tuple(args)


def root_jvp(
    optimality_fn: Callable[..., Any],
    solution: Any,
    theta: tuple,
    tangents: tuple,
    solve: str | Callable[..., Any] = "auto",
    *,
    nonconvergence: str = "warn",
    **solve_options: Any,
) -> Any:
    r"""Jacobian-vector product of a root: :math:`\dot y = -A^{-1} B\dot\theta`.

    Blondel et al. 2021, eq. (3), without a decorator. ``tangents`` is shaped
    like ``theta`` with ``None`` for arguments that do not move. On plain
    tensors ``F`` is evaluated once and linearised once (its recorded graph
    differentiated twice), so each product with ``A`` is one backward pass.

    Args:
        optimality_fn: ``F(y, *theta)``, shaped like ``y``.
        solution: :math:`y^*`.
        theta: tuple of the arguments after ``y`` (Python floats included).
        tangents: tuple structured like ``theta`` (tensors, Python numbers for
            scalar entries, dicts for modules, or ``None``).
        solve: linear solver (see :func:`custom_root`; default ``"auto"``).
        nonconvergence: ``"warn"``, ``"raise"`` or ``"ignore"``.
        **solve_options: options of :func:`curvlab.linalg.solve`.

    Returns:
        :math:`\dot y`, structured like ``solution``.

    Raises:
        TypeError: ``theta`` not a tuple, ``solution`` not a tensor pytree.
        ValueError: ``tangents`` not structured like ``theta``; ``F`` not shaped like ``y``.
        NotImplementedError: under forward-over-forward transforms.
        LinearSolveError: with ``nonconvergence="raise"``.

    Example:
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> F = lambda y, b: A @ y - b
        >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> root_jvp(F, torch.linalg.solve(A, b), (b,), (torch.tensor([1.0, 0.0], dtype=torch.float64),))
        tensor([ 0.4000, -0.2000], dtype=torch.float64)
    """
    check_forward_levels("root_jvp")
    y0 = tree_flatten(solution)[0]
    if isinstance(theta, tuple) and y0 and isinstance(y0[0], Tensor):
        theta = _floats_as_tensors(theta, y0[0])
    arguments, y, fun, system = _setup(optimality_fn, solution, theta, solve, nonconvergence, solve_options)
    if not isinstance(tangents, tuple) or len(tangents) != len(theta):
        raise ValueError(f"tangents must be a tuple of length {len(theta)} like theta")
    t_leaves = arguments.theta_tensors_from(tangents, {}, "tangents")
    th = arguments.tensors
    t_leaves = [
        torch.full_like(t, float(d)) if isinstance(d, (int, float)) and not isinstance(d, bool) else d
        for d, t in zip(t_leaves, th)
    ]
    for d, t in zip(t_leaves, th):
        if d is not None and (not isinstance(d, Tensor) or d.shape != t.shape):
            raise ValueError("every tangent must be None, a number (for a scalar) or a tensor shaped like its theta")
    if _plain(y, th, t_leaves):
        diff = [t.is_floating_point() and d is not None for t, d in zip(th, t_leaves)]
        if any(diff):
            rec, ours = _record(fun, y, th, diff)
            _check_closure(fun, rec.F, ours)
            linear = system.solver
            y_dot = -linear(_operator(rec, linear, transpose=False), rec.b(t_leaves))
            _warn_residual(linear.last, float(rec.F.detach().norm()), float(flat_cat(y).norm()), "root_jvp")
        else:
            y_dot = torch.zeros(fun.n, dtype=y[0].dtype, device=y[0].device)
    else:
        y_dot = _ift_jvp(system, fun, y, th, t_leaves)
    return tree_unflatten(list(split_like(y_dot, y)), fun.y_def)
