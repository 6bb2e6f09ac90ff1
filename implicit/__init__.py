"""Implicit differentiation of solutions (custom_root, custom_fixed_point, hypergradients).

Blondel et al. 2021, "Efficient and Modular Implicit Differentiation": write
the optimality condition ``F(y, *theta) = 0`` of an inner problem; the implicit
function theorem, with ``torch.func`` products of ``F`` and one linear solve,
differentiates the solution ``y*(theta)`` whatever solver produced it.

* :func:`custom_root` / :func:`custom_fixed_point` — decorators for solvers.
* :func:`root_vjp` / :func:`root_jvp` — the same derivatives as plain functions.
* :func:`hypergradient` — the IFT hypergradient of a bilevel problem with
  ``F = ∇_y g`` (Lorraine et al. 2020's Neumann variant via ``solve="neumann"``).
* ``solve_cg``, ``solve_normal_cg``, ``solve_minres``, ``solve_gmres``,
  ``solve_neumann``, ``solve_dense`` — the pluggable linear solves; any
  callable ``solve(matvec, b) -> x`` works too.
"""

from ._hypergradient import hypergradient
from ._linear_solve import (
    SOLVES,
    LinearSolveError,
    LinearSolveInfo,
    LinearSolveWarning,
    solve_cg,
    solve_dense,
    solve_gmres,
    solve_minres,
    solve_neumann,
    solve_normal_cg,
)
from ._root import custom_fixed_point, custom_root, root_jvp, root_vjp

__all__ = [
    "SOLVES",
    "LinearSolveError",
    "LinearSolveInfo",
    "LinearSolveWarning",
    "custom_fixed_point",
    "custom_root",
    "hypergradient",
    "root_jvp",
    "root_vjp",
    "solve_cg",
    "solve_dense",
    "solve_gmres",
    "solve_minres",
    "solve_neumann",
    "solve_normal_cg",
]
