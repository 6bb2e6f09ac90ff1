"""implicit's thin layer over ``curvlab.linalg.solve``: the nonconvergence policy and the deprecated aliases.

The solves themselves are tested against dense references in ``tests/linalg/test_solve.py``.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import implicit
from curvlab.linalg import KrylovResult, cg
from curvlab.linops import MatvecOperator
from implicit._linear_solve import LinearSolver

DT = torch.float64


def spd(n: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(n, n, generator=g, dtype=DT)
    return Q @ Q.T / n + torch.eye(n, dtype=DT)


def op_of(A: torch.Tensor, symmetric: bool = True) -> MatvecOperator:
    return MatvecOperator(lambda v: A @ v, A.shape[0], DT, symmetric=symmetric)


def test_solver_reports_a_krylov_result_and_counts_products() -> None:
    A = spd()
    op = op_of(A)
    solver = LinearSolver("cg", {"tol": 1e-12}, "raise")
    x = solver(op, torch.ones(12, dtype=DT))
    info = solver.last
    assert isinstance(info, KrylovResult) and info.converged and info.method == "cg"
    assert info.n_matvecs == op.n_matvecs > 0
    assert float(info.residual_norm) <= 1e-12 * float(info.rhs_norm)
    torch.testing.assert_close(x, torch.linalg.solve(A, torch.ones(12, dtype=DT)))


def test_nonconvergence_policies() -> None:
    A = spd(40)
    b = torch.randn(40, dtype=DT)
    op = op_of(A)
    with pytest.raises(implicit.LinearSolveError, match="residual") as exc:
        LinearSolver("cg", {"maxiter": 2}, "raise")(op, b)
    assert not exc.value.info.converged and exc.value.info.max_relative_residual > 1e-8
    assert exc.value.info.status == "max_iter"
    with pytest.warns(implicit.LinearSolveWarning, match="did not converge"):
        LinearSolver("cg", {"maxiter": 2}, "warn")(op, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LinearSolver("cg", {"maxiter": 2}, "ignore")(op, b)


def test_negative_curvature_is_named() -> None:
    with pytest.raises(implicit.LinearSolveError, match="minres"):
        LinearSolver("cg", {}, "raise")(op_of(-spd()), torch.ones(12, dtype=DT))


def test_user_callables_go_through_the_registry() -> None:
    A = spd()
    b = torch.randn(3, 12, dtype=DT).T.contiguous()

    def my_solve(matvec, rhs):
        return cg(matvec, rhs, tol=1e-13)

    solver = LinearSolver(my_solve, {}, "raise")
    X = solver(op_of(A), b)
    torch.testing.assert_close(X, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-10)
    assert solver.last.method == "my_solve" and solver.last.converged


def test_bad_solve_arguments() -> None:
    with pytest.raises(ValueError, match="unknown solve 'lu'"):
        LinearSolver("lu", {}, "warn")
    with pytest.raises(TypeError, match="has no option 'tolerance'"):
        LinearSolver("cg", {"tolerance": 1e-3}, "warn")
    with pytest.raises(TypeError, match="callable"):
        LinearSolver(3, {}, "warn")
    with pytest.raises(ValueError, match="nonconvergence"):
        LinearSolver("cg", {}, "loud")


def test_deprecated_aliases_warn_and_agree_with_linalg_solve() -> None:
    A = spd()
    b = torch.randn(12, dtype=DT)
    ref = torch.linalg.solve(A + 0.5 * torch.eye(12, dtype=DT), b)
    for name in ("cg", "normal_cg", "minres", "gmres", "dense"):
        with pytest.warns(DeprecationWarning, match=f"solve_{name}"):
            x = getattr(implicit, f"solve_{name}")(A, b, ridge=0.5)
        torch.testing.assert_close(x, ref, rtol=1e-9, atol=1e-10)
    with pytest.warns(DeprecationWarning, match="SOLVES"):
        x, info = implicit.SOLVES["cg"](op_of(A), b, tol=1e-12)
    assert "neumann" in implicit.SOLVES and isinstance(info, KrylovResult)
    torch.testing.assert_close(x, torch.linalg.solve(A, b))
    with pytest.warns(DeprecationWarning, match="LinearSolveInfo"):
        assert implicit.LinearSolveInfo is KrylovResult
    with pytest.warns(DeprecationWarning, match="ridge"):
        LinearSolver("cg", {"ridge": 0.1}, "warn")


def test_import_fails_loudly_when_mixed_with_pypi_implicit(tmp_path: Path) -> None:
    """Issue 13's packaging note: PyPI's collaborative-filtering ``implicit`` also installs ``implicit/``."""
    import shutil

    src = Path(implicit.__file__).parent
    dst = tmp_path / "implicit"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    (dst / "als.py").write_text("# a file of PyPI's implicit\n")
    # import the copy under its own name in a fresh interpreter (the editable install maps "implicit" to the tree)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('implicit_copy', {str(dst / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(dst)!r}])\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "collaborative-filtering" in out.stderr
    assert "pip uninstall implicit" in out.stderr
