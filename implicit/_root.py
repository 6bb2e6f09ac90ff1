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

Products with :math:`A`, :math:`A^\top`, :math:`B`, :math:`B^\top` come from
``torch.func.jvp``/``vjp`` of the user's :math:`F`; the linear solve is
pluggable (:mod:`implicit._linear_solve`). Fixed points :math:`y = T(y, \theta)`
use :math:`F = T - y` (Blondel et al., §2.2).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function
from torch.utils._pytree import tree_flatten, tree_unflatten

from curvlab.linalg import KrylovResult

from ._linear_solve import LinearSolver
from ._linear_system import LinearSystem, closure_hint, jvp, linear_solve
from ._tree import Arguments, flat_cat, split_like

__all__ = ["custom_fixed_point", "custom_root", "root_jvp", "root_vjp"]

_TENSOR = object()  # placeholder for a tensor leaf of aux


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
        y = tree_unflatten(list(y_leaves), self.y_def)
        with self.arguments.theta(theta) as (args, kwargs):
            out = self.fn(y, *args, **kwargs)
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


def _ift_vjp(
    system: LinearSystem, fun: _Optimality, y: Sequence[Tensor], theta: Sequence[Tensor], v: Tensor, idx: list[int]
) -> list[Tensor]:
    r"""Reverse mode (Blondel et al. eq. (4)): :math:`u = A^{-\top}\bar v`, return :math:`-B^\top u`.

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
    r"""Forward mode (Blondel et al. eq. (3)): :math:`\dot y = -A^{-1} B\dot\theta` as a flat vector."""
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


# --------------------------------------------------------------------------- #
# custom_root
# --------------------------------------------------------------------------- #
class _RootProblem:
    """Everything one call of a decorated solver needs (passed through ``Function.apply`` as a constant)."""

    def __init__(self, root: _CustomRoot, arguments: Arguments) -> None:
        self.root = root
        self.arguments = arguments
        self.n_y: int | None = None
        self.y_def: Any = None
        self.y_meta: list[tuple[torch.Size, torch.dtype]] | None = None
        self.aux_def: Any = None
        self.aux_leaves: list[Any] = []  # non-tensor aux leaves (_TENSOR where a tensor goes)
        self.optimality: _Optimality | None = None
        self.system: LinearSystem | None = None
        self.residual: float | None = None

    # forward: run the solver, record structures, validate F once
    def run(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        root, arguments = self.root, self.arguments
        tensors = [t.detach() for t in tensors]
        init = arguments.init(tensors[: arguments.n_init])
        theta = tensors[arguments.n_init :]
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
            self._check_optimality(y_out, theta)
        return (*y_out, *aux_out)

    def _check_optimality(self, y: list[Tensor], theta: list[Tensor]) -> None:
        assert self.optimality is not None
        try:
            with torch.enable_grad():
                F = self.optimality(y, theta)
        except RuntimeError as e:
            if "does not require grad" not in str(e):
                raise
            raise RuntimeError(
                f"{self.root.optimality_name} failed at the solution: {e}. If it computes a gradient with "
                "torch.autograd.grad, write it with torch.func.grad instead (e.g. optimality_fn = "
                "torch.func.grad(inner_objective)): implicit differentiates F with torch.func transforms."
            ) from e
        if F.dtype != y[0].dtype:
            raise TypeError(
                f"{self.root.optimality_name} returned F of dtype {F.dtype} for y of dtype {y[0].dtype}; "
                "they must match"
            )
        if F.requires_grad:
            raise ValueError(
                f"{self.root.optimality_name} depends on a tensor that requires grad but is not among the "
                "arguments theta (it closes over it), so its gradient would be silently dropped. Pass every "
                "tensor you differentiate with respect to as an argument: solver(init, *theta) and "
                "optimality_fn(y, *theta) (nn.Module arguments are supported)."
            )
        self.residual = float(torch.linalg.vector_norm(F.detach()))

    def outputs(self, outs: Sequence[Tensor]) -> Any:
        assert self.n_y is not None
        y = tree_unflatten(list(outs[: self.n_y]), self.y_def)
        if not self.root.has_aux:
            return y
        it = iter(outs[self.n_y :])
        aux = tree_unflatten([next(it) if a is _TENSOR else a for a in self.aux_leaves], self.aux_def)
        return y, aux


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
        g_y = grads[:n_y]
        if not idx or all(g is None for g in g_y):
            return tuple(out)
        v = flat_cat([torch.zeros_like(t) if g is None else g for g, t in zip(g_y, y)])
        for i, g in zip(idx, _ift_vjp(problem.system, problem.optimality, y, theta, v, idx)):
            out[1 + n_init + i] = g
        return tuple(out)

    @staticmethod
    def jvp(ctx: Any, _problem_t: Any, *tangents: Tensor | None) -> tuple[Tensor, ...]:
        problem: _RootProblem = ctx.problem
        n_y, n_init = problem.n_y, problem.arguments.n_init
        saved = ctx.saved_tensors
        y, theta = saved[:n_y], saved[n_y:]
        y_dot = split_like(_ift_jvp(problem.system, problem.optimality, y, theta, tangents[n_init:]), y)
        n_aux = sum(a is _TENSOR for a in problem.aux_leaves)
        return (*y_dot, *([None] * n_aux))

    @staticmethod
    def vmap(info: Any, in_dims: tuple, problem: _RootProblem, *tensors: Tensor) -> tuple[tuple, tuple]:
        # An arbitrary solver is not vmap-able (it may stop on data-dependent tests); solve per batch element.
        dims = in_dims[1:]
        outs = []
        with closure_hint(vmap_loop=True):
            for i in range(info.batch_size):
                outs.append(_Root.apply(problem, *[t if d is None else t.select(d, i) for t, d in zip(tensors, dims)]))
        stacked = tuple(torch.stack([o[j] for o in outs]) for j in range(len(outs[0])))
        return stacked, (0,) * len(stacked)


def _is_transformed(t: Tensor) -> bool:
    """``t`` is being traced by a ``torch.func`` transform (grad, vmap, jvp)."""
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:  # pragma: no cover - older torch
        return False


def _forward_ad_active() -> bool:
    try:
        return torch.autograd.forward_ad._current_level >= 0
    except AttributeError:  # pragma: no cover
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
    ) -> None:
        if not callable(solver):
            raise TypeError(f"custom_root decorates a solver function, got {type(solver).__name__}")
        functools.update_wrapper(self, solver)
        self.solver, self.optimality_fn, self.linear, self.has_aux = solver, optimality_fn, linear, has_aux
        self.solver_name = _fn_name(solver, "solver")
        self.optimality_name = _fn_name(optimality_fn, optimality_label)
        self._solver_sig = _signature(solver)
        self._opt_sig = _signature(optimality_fn)
        self._last_residual: float | None = None

    @property
    def last_solve(self) -> KrylovResult | None:
        """The :class:`~curvlab.linalg.KrylovResult` of the latest implicit linear solve (``None`` before the first)."""
        return self.linear.last

    @property
    def last_residual(self) -> float | None:
        r""":math:`\|F(y^*, \theta)\|` at the latest solution (how well the solver solved the optimality condition)."""
        return self._last_residual

    def _check_signatures(self, init: Any, args: tuple, kwargs: dict) -> None:
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

    def _check_differentiable(self, arguments: Arguments) -> None:
        if not torch.is_grad_enabled():
            return
        theta = arguments.tensors[arguments.n_init :]
        if any(t.requires_grad or _is_transformed(t) for t in theta) or _forward_ad_active():
            return
        if not any(t.is_floating_point() for t in theta):
            what = "theta holds no floating-point tensor"
        else:
            what = "none of the tensors in theta requires grad"
        raise ValueError(
            f"{self.solver_name}: {what}, so y* could not be differentiated with respect to anything (gradients "
            "w.r.t. Python numbers, or tensors without requires_grad=True, are impossible). Pass the "
            "hyperparameters as tensors with requires_grad=True (e.g. torch.tensor(0.1, requires_grad=True)), "
            "or call the solver under torch.no_grad() if you only want y*."
        )

    def __call__(self, init: Any, *args: Any, **kwargs: Any) -> Any:
        self._check_signatures(init, args, kwargs)
        arguments = Arguments(init, args, kwargs)
        self._check_differentiable(arguments)
        problem = _RootProblem(self, arguments)
        outs = _Root.apply(problem, *arguments.tensors)
        self._last_residual = problem.residual
        return problem.outputs(outs)

    def __repr__(self) -> str:
        return f"custom_root({self.optimality_name}, solve={self.linear.name!r})({self.solver_name})"


def custom_root(
    optimality_fn: Callable[..., Any],
    solve: str | Callable[..., Any] = "cg",
    has_aux: bool = False,
    *,
    nonconvergence: str = "warn",
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
    runs). ``y*`` may be a tensor or a tuple/list/dict of tensors.

    Transforms and higher order. Implemented as a ``torch.autograd.Function``
    with ``setup_context``, a ``jvp`` rule and a ``vmap`` rule, so
    ``torch.func.grad``/``vjp``/``jvp``/``jacrev``/``jacfwd``/``hessian``,
    ``vmap`` (a batch of ``theta`` is solved element by element; a batch of
    cotangents — ``jacrev`` — is one block linear solve) and
    ``torch.autograd.forward_ad`` all work. The backward pass is itself built
    from differentiable pieces (``y*`` as this function's output and a
    differentiable linear solve), so second and higher derivatives are exact,
    not the "treat the solution as a constant" approximation.

    Args:
        optimality_fn: ``F(y, *theta, **kw_theta)``, zero at the solution, shaped
            like ``y`` (as many equations as unknowns). Typically
            ``torch.func.grad(inner_objective)``. It must be written with
            ``torch`` operations that ``torch.func`` can differentiate (use
            ``torch.func.grad``, not ``torch.autograd.grad``, inside it) and must
            take every tensor it depends on through ``theta``, not by closure.
        solve: the linear solver: ``"cg"`` (symmetric positive definite ``A``,
            e.g. ``F = ∇_y g`` at a strict minimum), ``"normal_cg"`` (any
            invertible ``A``), ``"minres"`` (symmetric indefinite), ``"gmres"``
            (general), ``"neumann"`` (Lorraine et al. 2020's truncated series; needs
            ``alpha``, optionally ``K``), ``"dense"`` (small problems), or a
            callable ``solve(matvec, b) -> x`` (``matvec`` is a
            :class:`~curvlab.linops.LinearOperator`, callable on flat vectors).
        has_aux: the solver returns ``(y*, aux)``; ``aux`` is passed through
            undifferentiated (tensor leaves detached). ``optimality_fn`` still
            returns ``F`` alone and receives ``y*`` alone.
        nonconvergence: what to do when the linear solve does not converge:
            ``"warn"`` (a :class:`LinearSolveWarning` stating the residual),
            ``"raise"`` (:class:`LinearSolveError`) or ``"ignore"``.
        **solve_options: options of the named solver (``tol``, ``atol``,
            ``maxiter``, ``M``, ``ridge``, ``restart``, ``x0``, ``alpha``, ``K``;
            see ``implicit.solve_*``), or keyword arguments for a callable.

    Returns:
        A decorator. The decorated solver is called as ``solver(init, *theta,
        **kw_theta)`` and returns ``y*`` (or ``(y*, aux)``). Its attributes
        ``last_solve`` (:class:`~curvlab.linalg.KrylovResult`) and ``last_residual``
        (:math:`\|F(y^*, \theta)\|`) report on the latest call.

    Raises:
        TypeError: ``optimality_fn`` not callable, unknown solver option, and at
            call time a signature of ``optimality_fn`` that does not accept the
            solver's arguments (jaxopt #360), or an ``F`` that is not a tensor pytree.
        ValueError: unknown ``solve`` name; at call time: no tensor in ``theta``
            requires grad while grad mode is on; ``F`` and ``y`` of different
            sizes; ``optimality_fn`` closing over a tensor that requires grad.
        LinearSolveError: in the backward pass, with ``nonconvergence="raise"``.

    Example:
        >>> X = torch.randn(20, 3, dtype=torch.float64); t = torch.randn(20, dtype=torch.float64)
        >>> def g(w, lam):  # ridge regression
        ...     return 0.5 * ((X @ w - t) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
        >>> @custom_root(torch.func.grad(g), solve="cg")
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
    linear = LinearSolver(solve, solve_options, nonconvergence)

    def decorator(solver: Callable[..., Any]) -> _CustomRoot:
        return _CustomRoot(solver, optimality_fn, linear, bool(has_aux))

    return decorator


def _fixed_point_residual(T: Callable[..., Any]) -> Callable[..., Any]:
    """``F(y, *theta) = T(y, *theta) - y`` (leafwise), with ``T``'s signature."""

    @functools.wraps(T)
    def residual(y: Any, *args: Any, **kwargs: Any) -> Any:
        ty = T(y, *args, **kwargs)
        t_leaves, t_def = tree_flatten(ty)
        y_leaves, y_def = tree_flatten(y)
        if t_def != y_def or len(t_leaves) != len(y_leaves):
            raise ValueError(f"T(y, *theta) must return the structure of y ({y_def}), got {t_def}")
        return [a - b for a, b in zip(t_leaves, y_leaves)]

    return residual


def custom_fixed_point(
    T: Callable[..., Any],
    solve: str | Callable[..., Any] = "normal_cg",
    has_aux: bool = False,
    *,
    nonconvergence: str = "warn",
    **solve_options: Any,
) -> Callable[[Callable[..., Any]], _CustomRoot]:
    r"""Decorate a solver of the fixed point :math:`y^* = T(y^*, \theta)` for implicit differentiation.

    Blondel et al. 2021, §2.2: a fixed point is a root of
    :math:`F(y, \theta) = T(y, \theta) - y`, with
    :math:`A = \partial_y T - I` (not symmetric in general, hence the
    ``"normal_cg"`` default; ``"gmres"`` is often faster, and
    ``solve="neumann", alpha=-1`` is the classical fixed-point iteration
    :math:`u \leftarrow (\partial_y T)^\top u + \bar v`, convergent when ``T`` is
    a contraction). Everything else is as in :func:`custom_root`.

    Args:
        T: the fixed-point map ``T(y, *theta) -> y`` (same structure as ``y``).
        solve: linear solver (see :func:`custom_root`).
        has_aux: the solver returns ``(y*, aux)``.
        nonconvergence: ``"warn"``, ``"raise"`` or ``"ignore"``.
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
        return _CustomRoot(solver, F, linear, bool(has_aux), optimality_label="T")

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


def root_vjp(
    optimality_fn: Callable[..., Any],
    solution: Any,
    theta: tuple,
    cotangent: Any,
    solve: str | Callable[..., Any] = "cg",
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
    transforms.

    Args:
        optimality_fn: ``F(y, *theta)``, shaped like ``y``.
        solution: :math:`y^*` (tensor or tuple/list/dict of tensors).
        theta: tuple of the arguments after ``y``.
        cotangent: :math:`\bar v`, structured like ``solution``.
        solve: linear solver (see :func:`custom_root`).
        nonconvergence: ``"warn"``, ``"raise"`` or ``"ignore"``.
        **solve_options: options of the solver.

    Returns:
        A tuple structured like ``theta``: a tensor for every floating-point
        tensor leaf, a dict of tensors for a module, ``None`` elsewhere.

    Raises:
        TypeError: ``theta`` not a tuple, ``solution`` not a tensor pytree.
        ValueError: ``cotangent`` not shaped like ``solution``; ``F`` not shaped like ``y``.
        LinearSolveError: with ``nonconvergence="raise"``.

    Example:
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> F = lambda y, b: A @ y - b            # y* = A⁻¹ b, so b̄ = A⁻ᵀ v̄
        >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> (b_bar,) = root_vjp(F, torch.linalg.solve(A, b), (b,), torch.tensor([1.0, 0.0], dtype=torch.float64))
        >>> b_bar
        tensor([ 0.4000, -0.2000], dtype=torch.float64)
    """
    arguments, y, fun, system = _setup(optimality_fn, solution, theta, solve, nonconvergence, solve_options)
    c_leaves, _ = tree_flatten(cotangent)
    if len(c_leaves) != len(y) or any(not isinstance(c, Tensor) or c.shape != t.shape for c, t in zip(c_leaves, y)):
        raise ValueError("cotangent must be structured and shaped like solution")
    th = arguments.tensors
    idx = [i for i, t in enumerate(th) if t.is_floating_point()]
    values: list[Tensor | None] = [None] * len(th)
    if idx:
        v = flat_cat([c.to(y[0].dtype) for c in c_leaves])
        for i, g in zip(idx, _ift_vjp(system, fun, y, th, v, idx)):
            values[i] = g
    args, _ = arguments.theta_structure(values)
    return tuple(args)


def root_jvp(
    optimality_fn: Callable[..., Any],
    solution: Any,
    theta: tuple,
    tangents: tuple,
    solve: str | Callable[..., Any] = "cg",
    *,
    nonconvergence: str = "warn",
    **solve_options: Any,
) -> Any:
    r"""Jacobian-vector product of a root: :math:`\dot y = -A^{-1} B\dot\theta`.

    Blondel et al. 2021, eq. (3), without a decorator. ``tangents`` is shaped
    like ``theta`` with ``None`` for arguments that do not move.

    Args:
        optimality_fn: ``F(y, *theta)``, shaped like ``y``.
        solution: :math:`y^*`.
        theta: tuple of the arguments after ``y``.
        tangents: tuple structured like ``theta`` (tensors, dicts for modules, or ``None``).
        solve: linear solver (see :func:`custom_root`).
        nonconvergence: ``"warn"``, ``"raise"`` or ``"ignore"``.
        **solve_options: options of the solver.

    Returns:
        :math:`\dot y`, structured like ``solution``.

    Raises:
        TypeError: ``theta`` not a tuple, ``solution`` not a tensor pytree.
        ValueError: ``tangents`` not structured like ``theta``; ``F`` not shaped like ``y``.
        LinearSolveError: with ``nonconvergence="raise"``.

    Example:
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> F = lambda y, b: A @ y - b
        >>> b = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> root_jvp(F, torch.linalg.solve(A, b), (b,), (torch.tensor([1.0, 0.0], dtype=torch.float64),))
        tensor([ 0.4000, -0.2000], dtype=torch.float64)
    """
    arguments, y, fun, system = _setup(optimality_fn, solution, theta, solve, nonconvergence, solve_options)
    if not isinstance(tangents, tuple) or len(tangents) != len(theta):
        raise ValueError(f"tangents must be a tuple of length {len(theta)} like theta")
    t_leaves = arguments.theta_tensors_from(tangents, {}, "tangents")
    for d, t in zip(t_leaves, arguments.tensors):
        if d is not None and (not isinstance(d, Tensor) or d.shape != t.shape):
            raise ValueError("every tangent must be None or a tensor shaped like its theta entry")
    y_dot = _ift_jvp(system, fun, y, arguments.tensors, t_leaves)
    return tree_unflatten(list(split_like(y_dot, y)), fun.y_def)
