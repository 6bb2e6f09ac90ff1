"""Implicit differentiation of solutions (custom_root, custom_fixed_point, hypergradients).

Blondel et al. 2021, "Efficient and Modular Implicit Differentiation": write
the optimality condition ``F(y, *theta) = 0`` of an inner problem; the implicit
function theorem, with ``torch.func`` products of ``F`` and one linear solve,
differentiates the solution ``y*(theta)`` whatever solver produced it.

* :func:`custom_root` / :func:`custom_fixed_point` — decorators for solvers.
* :func:`root_vjp` / :func:`root_jvp` — the same derivatives as plain functions.
* :func:`hypergradient` — the IFT hypergradient of a bilevel problem with
  ``F = ∇_y g`` (Lorraine et al. 2020's Neumann variant via ``solve="neumann"``).
* The linear solve is :func:`curvlab.linalg.solve` (``solve="auto"``, ``"cg"``,
  ``"minres"``, ``"gmres"``, ``"normal_cg"``, ``"neumann"``, ``"dense"``, or any
  callable ``solve(matvec, b) -> x``). The old ``SOLVES``, ``LinearSolveInfo``
  and ``solve_cg`` … ``solve_dense`` are deprecated aliases.

Packaging note: this top-level package shares its name with PyPI's ``implicit``
(a collaborative-filtering library, which installs a top-level ``implicit/``
too); the two cannot live in one environment, and importing this package
fails with a clear error when the other one's files are found in its place.
"""

from pathlib import Path as _Path


def _check_not_mixed_with_pypi_implicit() -> None:
    """Raise ``ImportError`` if PyPI's collaborative-filtering ``implicit`` wrote files into this package."""
    here = _Path(__file__).resolve().parent
    markers = ("als.py", "bpr.py", "lmf.py", "recommender_base.py", "nearest_neighbours.py", "cpu", "gpu")
    found = sorted(m for m in markers if (here / m).exists())
    if found:
        raise ImportError(
            f"the 'implicit' package at {here} is mixed with PyPI's collaborative-filtering 'implicit' "
            f"(found its files {found}). Both install a top-level 'implicit/' directory, so installing one "
            "overwrites the other. curvlab's implicit differentiation needs an environment without PyPI's "
            "'implicit': run `pip uninstall implicit`, then reinstall curvlab (`pip install --force-reinstall "
            "curvlab`), or use separate virtual environments."
        )


_check_not_mixed_with_pypi_implicit()

from ._hypergradient import hypergradient  # noqa: E402
from ._linear_solve import (  # noqa: E402, F401 - the solve_* are deprecated aliases
    LinearSolveError,
    LinearSolveWarning,
    solve_cg,
    solve_dense,
    solve_gmres,
    solve_minres,
    solve_neumann,
    solve_normal_cg,
)
from ._root import OptimalityWarning, custom_fixed_point, custom_root, root_jvp, root_vjp  # noqa: E402

__all__ = [
    "LinearSolveError",
    "LinearSolveWarning",
    "OptimalityWarning",
    "custom_fixed_point",
    "custom_root",
    "hypergradient",
    "root_jvp",
    "root_vjp",
]

#: Deprecated names (still importable): ``SOLVES``, ``LinearSolveInfo``, ``solve_cg`` … ``solve_dense``.
_DEPRECATED = (
    "SOLVES",
    "LinearSolveInfo",
    "solve_cg",
    "solve_dense",
    "solve_gmres",
    "solve_minres",
    "solve_neumann",
    "solve_normal_cg",
)


def __getattr__(name: str):  # noqa: ANN202 - module attribute hook
    if name in ("SOLVES", "LinearSolveInfo"):
        from . import _linear_solve

        return getattr(_linear_solve, name)
    raise AttributeError(f"module 'implicit' has no attribute {name!r}")
