"""The pluggable linear solves of ``implicit`` against dense ``torch.linalg.solve``."""

from __future__ import annotations

import warnings

import pytest
import torch

import implicit
from curvlab.linalg import cg as curvlab_cg
from curvlab.linops import MatvecOperator
from implicit._linear_solve import LinearSolver

DT = torch.float64


def spd(n: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(n, n, generator=g, dtype=DT)
    return Q @ Q.T / n + torch.eye(n, dtype=DT)


def nonsym(n: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n, generator=g, dtype=DT) / n**0.5 + 3 * torch.eye(n, dtype=DT)


def sym_indefinite(n: int = 12, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    ev = torch.linspace(-3, 4, n, dtype=DT)
    ev[ev.abs() < 0.5] = 0.7
    return Q @ torch.diag(ev) @ Q.T


def truncated_neumann(A: torch.Tensor, b: torch.Tensor, alpha: float, K: int) -> torch.Tensor:
    """α Σ_{j<K} (I - αA)^j b, by dense matrix powers."""
    n = A.shape[0]
    M = torch.eye(n, dtype=A.dtype) - alpha * A
    S = sum(torch.linalg.matrix_power(M, j) for j in range(K))
    return alpha * S @ b


SOLVE_FNS = {
    "cg": implicit.solve_cg,
    "normal_cg": implicit.solve_normal_cg,
    "minres": implicit.solve_minres,
    "gmres": implicit.solve_gmres,
    "dense": implicit.solve_dense,
}


@pytest.mark.parametrize("name", ["cg", "normal_cg", "minres", "gmres", "dense"])
@pytest.mark.parametrize("form", ["callable", "tensor", "operator"])
def test_spd_solves_match_dense(name: str, form: str) -> None:
    A = spd()
    b = torch.randn(12, dtype=DT)
    matvec = {"callable": lambda v: A @ v, "tensor": A, "operator": MatvecOperator(lambda v: A @ v, 12, DT)}[form]
    x = SOLVE_FNS[name](matvec, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["normal_cg", "gmres", "dense"])
def test_nonsymmetric_solves(name: str) -> None:
    A = nonsym()
    b = torch.randn(12, dtype=DT)
    x = SOLVE_FNS[name](lambda v: A @ v, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["minres", "gmres", "dense", "normal_cg"])
def test_symmetric_indefinite_solves(name: str) -> None:
    A = sym_indefinite()
    b = torch.randn(12, dtype=DT)
    x = SOLVE_FNS[name](lambda v: A @ v, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["cg", "normal_cg", "minres", "gmres", "dense"])
def test_block_right_hand_sides(name: str) -> None:
    A = spd()
    B = torch.randn(12, 3, dtype=DT)
    X = SOLVE_FNS[name](MatvecOperator(lambda v: A @ v, 12, DT, matmat=lambda V: A @ V), B)
    torch.testing.assert_close(X, torch.linalg.solve(A, B), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("K", [1, 2, 5, 30])
def test_neumann_is_the_truncated_series(K: int) -> None:
    A = spd()
    alpha = 1.0 / float(torch.linalg.eigvalsh(A).max())
    b = torch.randn(12, dtype=DT)
    x = implicit.solve_neumann(lambda v: A @ v, b, alpha=alpha, K=K)
    torch.testing.assert_close(x, truncated_neumann(A, b, alpha, K), rtol=1e-12, atol=1e-12)
    B = torch.randn(12, 2, dtype=DT)
    X = implicit.solve_neumann(A, B, alpha=alpha, K=K)
    torch.testing.assert_close(X, truncated_neumann(A, B, alpha, K), rtol=1e-12, atol=1e-12)


def test_neumann_converges_and_handles_negative_definite() -> None:
    A = spd()
    b = torch.randn(12, dtype=DT)
    lmax = float(torch.linalg.eigvalsh(A).max())
    x = implicit.solve_neumann(A, b, alpha=1.0 / lmax, K=2000)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-10)
    x = implicit.solve_neumann(-A, b, alpha=-1.0 / lmax, K=2000)  # negative α for a negative definite system
    torch.testing.assert_close(x, torch.linalg.solve(-A, b), rtol=1e-10, atol=1e-10)


def test_neumann_options_are_checked() -> None:
    A = spd()
    b = torch.ones(12, dtype=DT)
    with pytest.raises(ValueError, match="alpha"):
        LinearSolver("neumann", {}, "warn")(MatvecOperator(lambda v: A @ v, 12, DT), b)
    with pytest.raises(ValueError, match="K"):
        implicit.solve_neumann(A, b, alpha=0.1, K=0)
    with pytest.raises(ValueError, match="alpha"):
        implicit.solve_neumann(A, b, alpha=0.0)


def test_ridge_option() -> None:
    A = spd()
    b = torch.randn(12, dtype=DT)
    ref = torch.linalg.solve(A + 0.5 * torch.eye(12, dtype=DT), b)
    for name in ("cg", "minres", "gmres", "dense"):
        torch.testing.assert_close(SOLVE_FNS[name](A, b, ridge=0.5), ref, rtol=1e-10, atol=1e-10)
    # normal_cg: ridge regularises AᵀA
    ref_n = torch.linalg.solve(A.T @ A + 0.5 * torch.eye(12, dtype=DT), A.T @ b)
    torch.testing.assert_close(implicit.solve_normal_cg(A, b, ridge=0.5), ref_n, rtol=1e-10, atol=1e-10)


def test_normal_cg_derives_the_transpose_of_a_plain_callable() -> None:
    A = nonsym()
    b = torch.randn(12, dtype=DT)
    x = implicit.solve_normal_cg(lambda v: A @ v, b)  # no rmatvec given: Aᵀ by a vjp of the matvec
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)


def test_solver_reports_info_and_counts_products() -> None:
    A = spd()
    op = MatvecOperator(lambda v: A @ v, 12, DT)
    solver = LinearSolver("cg", {"tol": 1e-12}, "raise")
    x = solver(op, torch.ones(12, dtype=DT))
    info = solver.last
    assert info is not None and info.converged and info.method == "cg"
    assert info.n_matvecs == op.n_matvecs > 0
    assert info.residual_norm <= 1e-12 * info.rhs_norm * 10
    torch.testing.assert_close(x, torch.linalg.solve(A, torch.ones(12, dtype=DT)))


def test_nonconvergence_policies() -> None:
    A = spd(40)
    b = torch.randn(40, dtype=DT)
    op = MatvecOperator(lambda v: A @ v, 40, DT)
    with pytest.raises(implicit.LinearSolveError, match="residual") as exc:
        LinearSolver("cg", {"maxiter": 2}, "raise")(op, b)
    assert not exc.value.info.converged and exc.value.info.relative_residual > 1e-8
    with pytest.warns(implicit.LinearSolveWarning, match="did not converge"):
        LinearSolver("cg", {"maxiter": 2}, "warn")(op, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LinearSolver("cg", {"maxiter": 2}, "ignore")(op, b)


def test_negative_curvature_is_named() -> None:
    A = -spd()
    op = MatvecOperator(lambda v: A @ v, 12, DT)
    with pytest.raises(implicit.LinearSolveError, match="minres"):
        LinearSolver("cg", {}, "raise")(op, torch.ones(12, dtype=DT))


def test_user_callables() -> None:
    A = spd()
    b = torch.randn(3, 12, dtype=DT).T.contiguous()

    def my_solve(matvec, rhs):  # returns a KrylovResult: converged flag and residual are picked up
        return curvlab_cg(matvec, rhs, tol=1e-13)

    solver = LinearSolver(my_solve, {}, "raise")
    X = solver(MatvecOperator(lambda v: A @ v, 12, DT), b)
    torch.testing.assert_close(X, torch.linalg.solve(A, b), rtol=1e-10, atol=1e-10)
    assert solver.last.method == "my_solve" and solver.last.converged

    def exact(matvec, rhs):  # a plain tensor; ignores matvec (e.g. a known inverse)
        return torch.linalg.solve(A, rhs)

    x = LinearSolver(exact, {}, "raise")(MatvecOperator(lambda v: A @ v, 12, DT), b[:, 0])
    torch.testing.assert_close(x, torch.linalg.solve(A, b[:, 0]))

    with pytest.raises(ValueError, match="shape"):
        LinearSolver(lambda m, r: r[:3], {}, "raise")(MatvecOperator(lambda v: A @ v, 12, DT), b[:, 0])
    with pytest.raises(TypeError, match="return a tensor"):
        LinearSolver(lambda m, r: "x", {}, "raise")(MatvecOperator(lambda v: A @ v, 12, DT), b[:, 0])


def test_bad_solve_arguments() -> None:
    with pytest.raises(ValueError, match="unknown solve 'lu'"):
        LinearSolver("lu", {}, "warn")
    with pytest.raises(TypeError, match="has no option 'tolerance'"):
        LinearSolver("cg", {"tolerance": 1e-3}, "warn")
    with pytest.raises(TypeError, match="callable"):
        LinearSolver(3, {}, "warn")
    with pytest.raises(ValueError, match="nonconvergence"):
        LinearSolver("cg", {}, "loud")
    with pytest.raises(ValueError, match="square"):
        implicit.solve_cg(torch.ones(3, 4, dtype=DT), torch.ones(3, dtype=DT))


def test_float32_default_tolerance() -> None:
    A = spd().float()
    b = torch.randn(12)
    x = implicit.solve_cg(A, b)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-4, atol=1e-4)
