r"""The :class:`BilevelProblem`: outer and inner objectives, starting points, data, constraints and sets.

.. math::
    \min_{x \in X} F(x) = f(x, y^*(x)), \qquad
    y^*(x) \in \arg\min_{y \in Y,\ c(x, y) \le 0} g(x, y).

The user's functions see their variables in the structures they were given
(tensors, tuples/lists/dicts of tensors, or the ``{name: tensor}`` dict of an
``nn.Module`` for :func:`torch.func.functional_call`); solvers work on flat
vectors and ask the problem for values, gradients and second-order products
(oracles) on one batch or on the whole data (``batch=ALL``).

Data-parallel (:mod:`curvlab.distributed`), as :class:`curvlab.Problem`: a problem created
under a process group holds this rank's shards of ``outer_data`` and ``inner_data`` (fixed at
creation). Over the data (``ALL``) values, gradients and second-order products are sums of
globally weighted batch terms, all-reduced; on one batch each rank evaluates its own batch and
the results are averaged weighted by the batches' sample counts (the global mini-batch). Each
oracle call is one collective (value and gradients concatenated), so every rank gets the same
numbers and the solvers' states stay identical. The ``*_diff`` methods (unrolled
differentiation, :class:`~bilevel.ITD`) return the global value through a differentiable
all-reduce whose backward sums the gradients reaching ``x`` and ``y`` over the ranks, so
(higher-order) derivatives through them are the global ones too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvlab import distributed as _dist
from curvlab.checks import check_choice
from curvlab.data import Batch, Data, Stream
from curvlab.params import ParamSpec
from curvlab.problems import ALL

from .sets import Set

__all__ = ["BilevelProblem", "ALL"]


class _Source(Stream):
    """Draws batches from one :class:`~curvlab.data.Data` by draw number (endless epochs)."""

    def pairs(self, batch: Batch) -> Any:
        """``(batch, weight)`` pairs: every batch, weighted, for ``ALL``; else the batch itself."""
        if batch is ALL:
            if self.data.kind == "none" and not self.data.distributed:
                return [(None, 1.0)]
            return self.data.weighted_batches()
        return [(batch, 1.0)]

    def first(self) -> Batch:
        return next(iter(self.data.batches()))


def _zeros_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _unflatten(spec: ParamSpec, flat: Tensor) -> Any:
    """``spec.unflatten(flat)``, without split/view graph nodes when the variable is one 1-D tensor."""
    if spec.kind == "tensor" and len(spec.shapes[0]) == 1 and flat.shape == spec.shapes[0]:
        return flat
    return spec.unflatten(flat)


class BilevelProblem:
    r"""A bilevel problem :math:`\min_x f(x, y^*(x))`, :math:`y^*(x) = \arg\min_y g(x, y)`.

    Args:
        outer: ``outer(x, y, batch) -> scalar`` — the upper-level objective ``f``
            (e.g. a validation loss). ``batch`` is ``None`` when ``outer_data`` is ``None``.
        inner: ``inner(x, y, batch) -> scalar`` — the lower-level objective ``g``
            (e.g. a regularised training loss), minimised over ``y``.
        x0: starting upper-level variable (hyperparameters): a tensor, a
            tuple/list/dict of tensors, or an ``nn.Module`` (the functions then
            receive a ``{name: tensor}`` dict; use :func:`torch.func.functional_call`).
        y0: starting lower-level variable, same kinds.
        outer_data, inner_data: ``None``, one batch, or an iterable of batches (as
            in :mod:`curvlab`); over several batches the objective is the
            sample-weighted mean of the batch objectives.
        constraints: ``constraints(x, y) -> tensor`` of lower-level constraints,
            feasible where every entry is ``<= 0`` (coupled constraints as in
            LV-HBA, Yao et al. 2024, problem (1)). Only solvers with
            ``supports_constraints`` accept such a problem.
        x_set, y_set: :class:`~bilevel.sets.Set` instances (e.g.
            :class:`~bilevel.sets.Box`, :class:`~bilevel.sets.Ball`) onto which
            solvers project ``x`` and ``y``.

    :meth:`value` gives :math:`F(x) = f(x, y^*(x))` with an exact, self-checking inner solve
    (:func:`bilevel.solve_inner`). ``nn.Module`` variables are evaluated under their
    :class:`~curvlab.params.ModuleState` (the module's buffers are a snapshot: no evaluation writes
    into the user's module, e.g. a train-mode BatchNorm's running statistics).

    Attributes:
        xspec, yspec: the :class:`~curvlab.params.ParamSpec` of ``x`` and ``y``.
        x0, y0: the starting points as flat 1-D tensors (copies).
        dx, dy: their sizes.
        constrained: whether ``constraints`` was given.
        stochastic: whether either data is an iterable of several batches.
        x_set, y_set: the sets, bound to the flat layout (``None`` when absent).

    Raises:
        TypeError: ``outer``/``inner``/``constraints`` not callable, ``x0``/``y0`` not
            tensors or supported structures, sets of the wrong type.
        ValueError: ``outer``/``inner`` not returning scalars, ``constraints`` not
            returning a tensor, evaluation failing on the first batches, mixed dtypes/devices.

    Example:
        >>> import torch
        >>> p = BilevelProblem(lambda x, y, b: ((y - 1) ** 2).sum() + (x ** 2).sum(),
        ...                    lambda x, y, b: ((y - x) ** 2).sum(), torch.zeros(2), torch.zeros(2))
        >>> p.dx, p.dy, p.constrained, p.stochastic
        (2, 2, False, False)
    """

    def __init__(
        self,
        outer: Callable[..., Tensor],
        inner: Callable[..., Tensor],
        x0: Any,
        y0: Any,
        outer_data: Any = None,
        inner_data: Any = None,
        constraints: Callable[..., Tensor] | None = None,
        x_set: Set | None = None,
        y_set: Set | None = None,
    ) -> None:
        for fn, name in ((outer, "outer"), (inner, "inner")):
            if not callable(fn):
                raise TypeError(f"{name} must be a function {name}(x, y, batch) -> scalar, got {type(fn).__name__}")
        if constraints is not None and not callable(constraints):
            raise TypeError(
                f"constraints must be a function constraints(x, y) -> tensor (feasible where <= 0), "
                f"got {type(constraints).__name__}"
            )
        for s, name in ((x_set, "x_set"), (y_set, "y_set")):
            if s is not None and not isinstance(s, Set):
                raise TypeError(
                    f"{name} must be a bilevel.sets.Set (Box, Ball, NonNegative, Simplex) or None, "
                    f"got {type(s).__name__}"
                )
        self.outer = outer
        self.inner = inner
        self.constraints = constraints
        self.xspec = ParamSpec(x0, "x0")
        self.yspec = ParamSpec(y0, "y0")
        if self.xspec.device != self.yspec.device:
            raise ValueError(f"x0 and y0 must live on one device, got {self.xspec.device} and {self.yspec.device}")
        if self.xspec.dtype != self.yspec.dtype:
            raise ValueError(f"x0 and y0 must share one dtype, got {self.xspec.dtype} and {self.yspec.dtype}")
        self.x0 = self.xspec.flatten()
        self.y0 = self.yspec.flatten()
        # the ModuleStates of module variables (curvlab.params contract: buffers as functional inputs)
        self._scopes = [s.state for s in (self.xspec, self.yspec) if s.state.module is not None]
        self.dx = self.xspec.size
        self.dy = self.yspec.size
        self.dtype = self.xspec.dtype
        self.device = self.xspec.device
        self.outer_data = Data(outer_data)
        self.inner_data = Data(inner_data)
        self._outer_src = _Source(self.outer_data)
        self._inner_src = _Source(self.inner_data)
        self.x_set = None if x_set is None else x_set._bind(self.xspec, "x_set")
        self.y_set = None if y_set is None else y_set._bind(self.yspec, "y_set")
        self._check()

    # ------------------------------------------------------------------ info
    @property
    def constrained(self) -> bool:
        """Whether the lower level has constraints ``c(x, y) <= 0``."""
        return self.constraints is not None

    @property
    def stochastic(self) -> bool:
        """Whether the outer or the inner data is an iterable of several batches."""
        return self.outer_data.multi or self.inner_data.multi

    @property
    def distributed(self) -> bool:
        """Whether this problem is one rank's part of a data-parallel run (fixed at creation)."""
        return self.outer_data.distributed or self.inner_data.distributed

    def _reduce(self, which: str, parts: Tensor, batch: Batch) -> Tensor:
        r"""All-reduce this rank's ``parts`` (a flat tensor) of the ``which`` objective into the global ones.

        Over the data (``ALL``) the parts carry global batch weights and are summed; on one
        batch each rank's parts are weighted by its batch's sample count :math:`n_r` and the
        sum divided by :math:`\sum_r n_r` (one collective): the global mini-batch. A no-op
        when the ``which`` data is not data-parallel.
        """
        data = self.outer_data if which == "outer" else self.inner_data
        if not data.distributed:
            return parts
        if batch is ALL:
            return _dist.all_reduce_sum(parts)  # type: ignore[return-value]
        n = float(data.local_size(batch))
        tot = _dist.all_reduce_sum(torch.cat([parts * n, parts.new_full((1,), n)]))
        return tot[:-1] / tot[-1]  # type: ignore[index]

    def __repr__(self) -> str:
        return (
            f"BilevelProblem(dx={self.dx}, dy={self.dy}, constrained={self.constrained}, "
            f"stochastic={self.stochastic}, x_set={self.x_set!r}, y_set={self.y_set!r})"
        )

    # ------------------------------------------------------------- checking
    def _call(
        self, fn: Callable[..., Tensor], name: str, x: Tensor, y: Tensor, batch: Batch, weight: float = 1.0
    ) -> Tensor:
        """``weight * fn(x, y, batch)`` as a 0-d tensor (no extra graph nodes for plain 1-D tensors, weight 1)."""
        scopes = self._scopes
        if scopes:  # nn.Module x / y: run on the snapshot of their buffers (the user's module is never written)
            with scopes[0].scope(), scopes[-1].scope():
                out = fn(_unflatten(self.xspec, x), _unflatten(self.yspec, y), batch)
        else:
            out = fn(_unflatten(self.xspec, x), _unflatten(self.yspec, y), batch)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValueError(
                f"{name}(x, y, batch) must return a scalar tensor, got {getattr(out, 'shape', type(out).__name__)}"
            )
        out = out if out.dim() == 0 else out.reshape(())
        return out if weight == 1.0 else out * weight

    def _check(self) -> None:
        for fn, name, src in ((self.outer, "outer", self._outer_src), (self.inner, "inner", self._inner_src)):
            batch = src.first()
            try:
                with torch.no_grad():
                    self._call(fn, name, self.x0, self.y0, batch)
            except (RuntimeError, IndexError, TypeError, KeyError) as e:
                raise ValueError(
                    f"evaluating {name}(x0, y0, batch) on the first batch of {name}_data failed: {e}. "
                    f"{name} must accept (x, y, batch) (batch is None without data) with x, y in the "
                    "structures of x0, y0"
                ) from e
        if self.constraints is not None:
            try:
                with torch.no_grad():
                    c = self.constraints(self.xspec.unflatten(self.x0), self.yspec.unflatten(self.y0))
            except (RuntimeError, IndexError, TypeError, KeyError) as e:
                raise ValueError(f"evaluating constraints(x0, y0) failed: {e}") from e
            if not isinstance(c, Tensor):
                raise ValueError(
                    f"constraints(x, y) must return a tensor (feasible where <= 0), got {type(c).__name__}"
                )
            self.n_constraints = int(c.numel())
        else:
            self.n_constraints = 0

    # ---------------------------------------------------------------- data
    def draw_outer(self, position: int) -> Batch:
        """The outer batch at draw number ``position`` (endless epochs; ``None`` without data)."""
        return self._outer_src.draw(position)

    def draw_inner(self, position: int) -> Batch:
        """The inner batch at draw number ``position`` (endless epochs; ``None`` without data)."""
        return self._inner_src.draw(position)

    # -------------------------------------------------------------- values
    def _local_value(self, which: str, x: Tensor, y: Tensor, batch: Batch) -> Tensor:
        """This rank's (globally weighted, for ``ALL``) part of the ``which`` objective, with its graph."""
        fn, src = (self.outer, self._outer_src) if which == "outer" else (self.inner, self._inner_src)
        return sum(self._call(fn, which, x, y, b, w) for b, w in src.pairs(batch))  # type: ignore[return-value]

    def _global_diff(self, which: str, x: Tensor, y: Tensor, batch: Batch) -> Tensor:
        """The global ``which`` objective of a data-parallel run, differentiable through the ranks' sum."""
        local = self._local_value(which, _dist.shared_variable(x), _dist.shared_variable(y), batch).reshape(1)
        if batch is not ALL:  # the global mini-batch: weight n_r / sum_r n_r
            n = float((self.outer_data if which == "outer" else self.inner_data).local_size(batch))
            local = local * (n / float(_dist.all_reduce_sum(n)))
        return _dist.all_reduce_sum_differentiable(local).reshape(())

    def f_diff(self, x: Tensor, y: Tensor, batch: Batch = ALL) -> Tensor:
        """Outer objective ``f(x, y)`` keeping the autograd graph (for unrolled differentiation)."""
        if self.outer_data.distributed:
            return self._global_diff("outer", x, y, batch)
        return sum(self._call(self.outer, "outer", x, y, b, w) for b, w in self._outer_src.pairs(batch))  # type: ignore[return-value]

    def g_diff(self, x: Tensor, y: Tensor, batch: Batch = ALL) -> Tensor:
        """Inner objective ``g(x, y)`` keeping the autograd graph (for unrolled differentiation)."""
        if self.inner_data.distributed:
            return self._global_diff("inner", x, y, batch)
        return sum(self._call(self.inner, "inner", x, y, b, w) for b, w in self._inner_src.pairs(batch))  # type: ignore[return-value]

    def f(self, x: Tensor, y: Tensor, batch: Batch = ALL) -> Tensor:
        """Outer objective at flat ``(x, y)`` on one batch or (``ALL``) all outer data; 0-d, no graph."""
        with torch.no_grad():
            if self.outer_data.distributed:  # one collective
                return self._reduce("outer", self._local_value("outer", x, y, batch).reshape(1), batch).reshape(())
            return self.f_diff(x, y, batch)

    def g(self, x: Tensor, y: Tensor, batch: Batch = ALL) -> Tensor:
        """Inner objective at flat ``(x, y)`` on one batch or (``ALL``) all inner data; 0-d, no graph."""
        with torch.no_grad():
            if self.inner_data.distributed:  # one collective
                return self._reduce("inner", self._local_value("inner", x, y, batch).reshape(1), batch).reshape(())
            return self.g_diff(x, y, batch)

    # ----------------------------------------------------------- gradients
    def _value_grads(
        self, which: str, x: Tensor, y: Tensor, batch: Batch, want_x: bool = True, want_y: bool = True
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        fn, src = (self.outer, self._outer_src) if which == "outer" else (self.inner, self._inner_src)
        val: Tensor | None = None
        gx: Tensor | None = None
        gy: Tensor | None = None
        for b, w in src.pairs(batch):
            with torch.enable_grad():
                xl = x.detach().requires_grad_(want_x)
                yl = y.detach().requires_grad_(want_y)
                v = self._call(fn, which, xl, yl, b, w)
                inputs = [t for t, need in ((xl, want_x), (yl, want_y)) if need]
                grads = list(torch.autograd.grad(v, inputs, allow_unused=True)) if v.requires_grad else [None] * 2
            val = v.detach() if val is None else val + v.detach()
            if want_x:
                g = _zeros_if_none(grads.pop(0), x)
                gx = g if gx is None else gx + g
            if want_y:
                g = _zeros_if_none(grads.pop(0), y)
                gy = g if gy is None else gy + g
        assert val is not None
        data = self.outer_data if which == "outer" else self.inner_data
        if data.distributed:  # one collective: [∇x, ∇y, value]
            parts = [t.reshape(-1) for t in (gx, gy) if t is not None]
            both = self._reduce(which, torch.cat([*parts, val.reshape(1).to(x.dtype)]), batch)
            val = both[-1].to(val.dtype)
            if gx is not None:
                gx = both[: gx.numel()].reshape(gx.shape)
            if gy is not None:
                gy = both[-1 - gy.numel() : -1].reshape(gy.shape)
        return val, gx, gy

    def f_and_grad(self, x: Tensor, y: Tensor, batch: Batch = ALL) -> tuple[Tensor, Tensor, Tensor]:
        """``(f, ∇_x f, ∇_y f)`` at ``(x, y)`` — one gradient oracle call."""
        v, gx, gy = self._value_grads("outer", x, y, batch)
        return v, gx, gy  # type: ignore[return-value]

    def g_and_grad(self, x: Tensor, y: Tensor, batch: Batch = ALL) -> tuple[Tensor, Tensor, Tensor]:
        """``(g, ∇_x g, ∇_y g)`` at ``(x, y)`` — one gradient oracle call."""
        v, gx, gy = self._value_grads("inner", x, y, batch)
        return v, gx, gy  # type: ignore[return-value]

    def grad_f(self, x: Tensor, y: Tensor, batch: Batch = ALL) -> tuple[Tensor, Tensor]:
        """``(∇_x f, ∇_y f)`` at ``(x, y)``."""
        _, gx, gy = self._value_grads("outer", x, y, batch)
        return gx, gy  # type: ignore[return-value]

    def grad_g(self, x: Tensor, y: Tensor, batch: Batch = ALL) -> tuple[Tensor, Tensor]:
        """``(∇_x g, ∇_y g)`` at ``(x, y)``."""
        _, gx, gy = self._value_grads("inner", x, y, batch)
        return gx, gy  # type: ignore[return-value]

    def grad_f_x(self, x: Tensor, y: Tensor, batch: Batch = ALL) -> Tensor:
        """``∇_x f(x, y)``."""
        return self._value_grads("outer", x, y, batch, want_y=False)[1]  # type: ignore[return-value]

    def grad_f_y(self, x: Tensor, y: Tensor, batch: Batch = ALL) -> Tensor:
        """``∇_y f(x, y)``."""
        return self._value_grads("outer", x, y, batch, want_x=False)[2]  # type: ignore[return-value]

    def grad_g_x(self, x: Tensor, y: Tensor, batch: Batch = ALL) -> Tensor:
        """``∇_x g(x, y)``."""
        return self._value_grads("inner", x, y, batch, want_y=False)[1]  # type: ignore[return-value]

    def grad_g_y(self, x: Tensor, y: Tensor, batch: Batch = ALL) -> Tensor:
        """``∇_y g(x, y)``."""
        return self._value_grads("inner", x, y, batch, want_x=False)[2]  # type: ignore[return-value]

    # ------------------------------------------------------- second order
    def second_g(
        self, x: Tensor, y: Tensor, v: Tensor, batch: Batch = ALL, want_xy: bool = True, want_yy: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        r"""``(∇²_xy g · v, ∇²_yy g · v)``: the x- and y-gradients of :math:`\langle \nabla_y g(x, y), v\rangle`.

        One double-backward pass gives both (count it as one HVP oracle call).
        """
        jx: Tensor | None = None
        hy: Tensor | None = None
        for b, w in self._inner_src.pairs(batch):
            with torch.enable_grad():
                xl = x.detach().requires_grad_(want_xy)
                yl = y.detach().requires_grad_(True)
                g = self._call(self.inner, "inner", xl, yl, b, w)
                (gy,) = torch.autograd.grad(g, yl, create_graph=True, allow_unused=True)
                if gy is None or not gy.requires_grad:
                    outs: list[Tensor | None] = [None, None]
                else:
                    dot = (gy * v.detach()).sum()
                    inputs = [t for t, need in ((xl, want_xy), (yl, want_yy)) if need]
                    outs = list(torch.autograd.grad(dot, inputs, allow_unused=True))
                    if not want_xy:
                        outs.insert(0, None)
            if want_xy:
                t = _zeros_if_none(outs[0], x)
                jx = t if jx is None else jx + t
            if want_yy:
                t = _zeros_if_none(outs[1], y)
                hy = t if hy is None else hy + t
        if self.inner_data.distributed:  # one collective: [∇²_xy g·v, ∇²_yy g·v]
            parts = [t.reshape(-1) for t in (jx, hy) if t is not None]
            both = self._reduce("inner", torch.cat(parts), batch)
            if jx is not None:
                jx = both[: jx.numel()].reshape(jx.shape)
            if hy is not None:
                hy = both[both.numel() - hy.numel() :].reshape(hy.shape)
        return jx, hy

    def hvp_yy_g(self, x: Tensor, y: Tensor, v: Tensor, batch: Batch = ALL) -> Tensor:
        """``∇²_yy g(x, y) · v`` (a ``dy``-vector)."""
        return self.second_g(x, y, v, batch, want_xy=False)[1]  # type: ignore[return-value]

    def jvp_xy_g(self, x: Tensor, y: Tensor, v: Tensor, batch: Batch = ALL) -> Tensor:
        r"""``∇²_xy g(x, y) · v`` (a ``dx``-vector): the x-gradient of :math:`\langle \nabla_y g, v\rangle`."""
        return self.second_g(x, y, v, batch, want_yy=False)[0]  # type: ignore[return-value]

    def hvp_yy_operator(self, x: Tensor, y: Tensor, batch: Batch = ALL) -> Callable[[Tensor], Tensor]:
        r"""A function ``v -> ∇²_yy g(x, y) v`` that builds :math:`\nabla_y g` once and reuses its graph.

        Each product is then one backward pass (no forward recomputation), which
        is what Krylov and Neumann loops want. Data-parallel, each product is one all-reduce.
        """
        graphs: list[tuple[Tensor, Tensor]] = []
        for b, w in self._inner_src.pairs(batch):
            with torch.enable_grad():
                yl = y.detach().requires_grad_(True)
                g = self._call(self.inner, "inner", x.detach(), yl, b, w)
                (gy,) = torch.autograd.grad(g, yl, create_graph=True)
            graphs.append((yl, gy))

        def matvec(v: Tensor) -> Tensor:
            out = torch.zeros_like(y)
            for yl, gy in graphs:
                if gy.requires_grad:
                    (h,) = torch.autograd.grad(gy, yl, v.detach(), retain_graph=True, allow_unused=True)
                    if h is not None:
                        out = out + h
            return self._reduce("inner", out, batch) if self.inner_data.distributed else out

        return matvec

    # --------------------------------------------------------- constraints
    def c(self, x: Tensor, y: Tensor) -> Tensor:
        """Lower-level constraint values ``c(x, y)`` as a flat 1-D tensor (feasible where ``<= 0``)."""
        if self.constraints is None:
            raise ValueError("this problem has no constraints")
        with torch.no_grad():
            return self.constraints(self.xspec.unflatten(x), self.yspec.unflatten(y)).reshape(-1)

    def grad_c_dot(self, x: Tensor, y: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
        r"""``(∇_x ⟨λ, c(x, y)⟩, ∇_y ⟨λ, c(x, y)⟩)``, i.e. :math:`(J_x c^\top \lambda, J_y c^\top \lambda)`."""
        if self.constraints is None:
            raise ValueError("this problem has no constraints")
        with torch.enable_grad():
            xl = x.detach().requires_grad_(True)
            yl = y.detach().requires_grad_(True)
            cv = self.constraints(self.xspec.unflatten(xl), self.yspec.unflatten(yl)).reshape(-1)
            dot = (cv * lam.detach().to(cv.dtype)).sum()
            if not dot.requires_grad:
                return torch.zeros_like(x), torch.zeros_like(y)
            gx, gy = torch.autograd.grad(dot, (xl, yl), allow_unused=True)
        return _zeros_if_none(gx, x), _zeros_if_none(gy, y)

    # ------------------------------------------------------- projections
    def project_x(self, x: Tensor) -> Tensor:
        """Projection of flat ``x`` onto ``x_set`` (identity without one)."""
        return x if self.x_set is None else self.x_set.project(x)

    def project_y(self, y: Tensor) -> Tensor:
        """Projection of flat ``y`` onto ``y_set`` (identity without one)."""
        return y if self.y_set is None else self.y_set.project(y)

    # ---------------------------------------------------------- F(x)
    def value(
        self,
        x: Any = None,
        y0: Any = None,
        *,
        on_failure: str = "warn",
        return_y: bool = False,
        **options: Any,
    ) -> Any:
        r"""The upper-level objective :math:`F(x) = f(x, y^*(x))` with an exact inner solve.

        :math:`y^*(x)` comes from :func:`bilevel.solve_inner` (Newton-CG on the whole inner data,
        projected gradient with a ``y_set``; a tolerance reachable in the dtype) from ``y0``; the
        solve checks its own convergence: when it fails (not converged, a non-finite value, the
        deadline) :math:`F` is still evaluated at the iterate it reached, and a
        :class:`bilevel.InnerSolveWarning` is issued (``on_failure="warn"``, the default), a
        :class:`bilevel.InnerSolveError` raised (``"raise"``) or nothing said (``"ignore"``) —
        never a silent :math:`F` at a poor :math:`y`. :math:`f` is evaluated on all outer data.

        Args:
            x: the upper-level point: flat (shape ``(dx,)``) or in the structure of ``x0``
                (``None``: ``x0``).
            y0: warm start of the inner solve, flat or in the structure of ``y0`` (``None``: the problem's ``y0``).
            on_failure: ``"warn"``, ``"raise"`` or ``"ignore"``.
            return_y: also return the inner solution (flat) and the solve's :class:`bilevel.InnerResult`.
            **options: passed to :func:`bilevel.solve_inner` (``tol``, ``rtol``, ``max_iter``,
                ``solver``, ``deadline``, ``scale``).

        Returns:
            ``F(x)`` as a float; with ``return_y=True`` the tuple ``(F(x), y, inner_result)``.

        Raises:
            ValueError: a bad ``on_failure`` or ``x`` / ``y0`` that do not fit the problem.
            bilevel.InnerSolveError: the inner solve failed and ``on_failure="raise"``.

        Example:
            >>> import torch
            >>> p = BilevelProblem(lambda x, y, b: ((y - 1) ** 2).sum(),
            ...                    lambda x, y, b: ((y - x) ** 2).sum(), torch.zeros(2), torch.zeros(2))
            >>> round(p.value(torch.tensor([1.0, 3.0])), 6)
            4.0
        """
        import warnings

        from ._inner import InnerSolveError, InnerSolveWarning, solve_inner

        check_choice(on_failure, "on_failure", ("warn", "raise", "ignore"))
        xf = self._flat_arg(x, self.xspec, self.x0, "x")
        yf = None if y0 is None else self._flat_arg(y0, self.yspec, self.y0, "y0")
        res = solve_inner(self, xf, yf, **options)
        F = float(self.f(xf, res.y, ALL))
        if not res.converged:
            msg = (
                f"BilevelProblem.value: the inner solve did not converge (status {res.status.value}, "
                f"‖∇_y g‖ = {res.grad_norm:.3g} > tol {res.tol:.3g} after {res.n_iter} iterations: {res.message}); "
                f"F(x) = {F:.6g} is f at that iterate"
            )
            if on_failure == "raise":
                raise InnerSolveError(msg, res)
            if on_failure == "warn":
                warnings.warn(msg, InnerSolveWarning, stacklevel=2)
        return (F, res.y, res) if return_y else F

    def _flat_arg(self, v: Any, spec: ParamSpec, like: Tensor, name: str) -> Tensor:
        """``v`` as a flat vector of ``spec``'s size, dtype and device (flat tensors or the user's structure)."""
        if v is None:
            return like
        ref = "x0" if spec is self.xspec else "y0"
        if isinstance(v, Tensor) and v.shape == (spec.size,):
            flat = v
        else:
            try:
                flat = spec.flatten(v)
            except (TypeError, KeyError, IndexError, AttributeError, ValueError, RuntimeError) as e:
                raise ValueError(f"{name} must be a flat tensor of shape ({spec.size},) or shaped like {ref}") from e
        if flat.shape != (spec.size,) or not flat.is_floating_point():
            raise ValueError(f"{name} must be a flat tensor of shape ({spec.size},) or shaped like {ref}")
        return flat.detach().to(dtype=like.dtype, device=like.device)

    # ---------------------------------------------------------- structures
    def to_user_x(self, x: Tensor) -> Any:
        """Flat ``x`` in the structure of ``x0`` (a new module for modules), detached."""
        return self.xspec.to_user(x)

    def to_user_y(self, y: Tensor) -> Any:
        """Flat ``y`` in the structure of ``y0`` (a new module for modules), detached."""
        return self.yspec.to_user(y)
