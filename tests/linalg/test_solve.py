"""The one linear-solve registry ``curvlab.linalg.solve`` against dense ``torch.linalg.solve``."""

from __future__ import annotations

import warnings

import pytest
import torch

from curvlab import Status
from curvlab.linalg import KrylovResult, ToleranceWarning, cg, default_tol, gmres, min_tol, minres, solve
from curvlab.linops import MatvecOperator

DT = torch.float64


def spd(n: int = 12, seed: int = 0, dtype: torch.dtype = DT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(n, n, generator=g, dtype=DT)
    return (Q @ Q.T / n + torch.eye(n, dtype=DT)).to(dtype)


def ill_spd(n: int, log_cond: float, seed: int = 0, dtype: torch.dtype = DT) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = (Q * torch.logspace(-log_cond, 0, n, dtype=DT)) @ Q.T
    return (0.5 * (A + A.T)).to(dtype)


def nonsym(n: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n, generator=g, dtype=DT) / n**0.5 + 3 * torch.eye(n, dtype=DT)


def sym_indefinite(n: int = 12, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    ev = torch.linspace(-3, 4, n, dtype=DT)
    ev[ev.abs() < 0.5] = 0.7
    return Q @ torch.diag(ev) @ Q.T


def rhs(n: int, *cols: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, *cols, generator=torch.Generator().manual_seed(seed), dtype=DT)


def forms(A: torch.Tensor, symmetric: bool) -> dict:
    return {
        "tensor": A,
        "callable": lambda v: A @ v,
        "operator": MatvecOperator(lambda v: A @ v, A.shape[0], A.dtype, symmetric=symmetric),
    }


METHODS = ["auto", "cg", "minres", "gmres", "normal_cg", "dense"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", ["tensor", "callable", "operator"])
def test_spd_every_method_and_form(method: str, form: str) -> None:
    A = spd()
    b = rhs(12)
    res = solve(forms(A, True)[form], b, method)
    assert isinstance(res, KrylovResult) and res.converged and res.status is Status.CONVERGED
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    # converged is a statement about the true residual, reported relative to ‖b‖
    true = torch.linalg.vector_norm(b - A @ res.x)
    assert true <= default_tol(DT) * torch.linalg.vector_norm(b) * 1.0001
    assert float(res.relative_residual) <= default_tol(DT)
    torch.testing.assert_close(res.rhs_norm, torch.linalg.vector_norm(b))
    assert res.method == ("dense" if method == "auto" else method)


@pytest.mark.parametrize("method", ["gmres", "normal_cg", "dense", "auto"])
def test_nonsymmetric(method: str) -> None:
    A = nonsym()
    b = rhs(12)
    res = solve(lambda v: A @ v, b, method)
    assert res.converged
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("method", ["minres", "gmres", "dense", "normal_cg", "auto"])
def test_symmetric_indefinite(method: str) -> None:
    A = sym_indefinite()
    b = rhs(12)
    res = solve(A, b, method)
    assert res.converged
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_block_right_hand_sides_and_damping(method: str) -> None:
    A = spd()
    B = rhs(12, 3)
    op = MatvecOperator(lambda v: A @ v, 12, DT, matmat=lambda V: A @ V, symmetric=True)
    res = solve(op, B, method, damping=0.5)
    ref = torch.linalg.solve(A + 0.5 * torch.eye(12, dtype=DT), B)
    assert res.converged and res.x.shape == (12, 3) and res.residual_norm.shape == (3,)
    torch.testing.assert_close(res.x, ref, rtol=1e-9, atol=1e-10)


def test_auto_chooses_by_size_and_symmetry() -> None:
    n = 40
    A, N, S = ill_spd(n, 2.0), nonsym(n), sym_indefinite(n)
    b = rhs(n)
    assert solve(lambda v: A @ v, b).method == "dense"  # small: materialised with one block product, factored
    assert solve(lambda v: A @ v, b).n_matvecs == n
    # matrix-free beyond dense_max: symmetry is probed with one two-column product (untagged callables)
    r_sym = solve(lambda v: A @ v, b, dense_max=10)
    r_gen = solve(lambda v: N @ v, b, dense_max=10)
    assert r_sym.method == "cg" and r_gen.method == "gmres"
    assert r_sym.info["symmetry_probe_products"] == 2
    tagged = MatvecOperator(lambda v: A @ v, n, DT, symmetric=True)
    assert solve(tagged, b, dense_max=10).info["symmetry_probe_products"] == 0
    assert solve(lambda v: A @ v, b, dense_max=10, symmetric=False).method == "gmres"
    # symmetric indefinite: CG meets negative curvature, auto falls back to MINRES
    r_ind = solve(lambda v: S @ v, b, dense_max=10, symmetric=True)
    assert r_ind.method == "minres" and r_ind.converged and r_ind.info["fallback_from"] == "cg"
    for r, M in ((r_sym, A), (r_gen, N), (r_ind, S)):
        torch.testing.assert_close(r.x, torch.linalg.solve(M, b), rtol=1e-7, atol=1e-9)


def truncated_neumann(A: torch.Tensor, b: torch.Tensor, alpha: float, K: int) -> torch.Tensor:
    """α Σ_{j<K} (I - αA)^j b, by dense matrix powers."""
    M = torch.eye(A.shape[0], dtype=A.dtype) - alpha * A
    return alpha * sum(torch.linalg.matrix_power(M, j) for j in range(K)) @ b


@pytest.mark.parametrize("K", [1, 2, 5, 30])
def test_neumann_is_lorraines_truncated_series(K: int) -> None:
    A = spd()
    alpha = 1.0 / float(torch.linalg.eigvalsh(A).max())
    b = rhs(12)
    op = MatvecOperator(lambda v: A @ v, 12, DT, symmetric=True)
    res = solve(op, b, "neumann", alpha=alpha, K=K)
    torch.testing.assert_close(res.x, truncated_neumann(A, b, alpha, K), rtol=1e-12, atol=1e-12)
    assert res.n_matvecs == K - 1  # K terms cost K - 1 products (Lorraine et al., Algorithm 3)
    # the reported residual bounds the true one (symmetric A, convergent series)
    assert torch.linalg.vector_norm(b - A @ res.x) <= res.residual_norm * (1 + 1e-12)
    assert res.status is (Status.CONVERGED if res.converged else Status.MAX_ITER)
    B = rhs(12, 2)
    X = solve(A, B, "neumann", alpha=alpha, K=K).x
    torch.testing.assert_close(X, truncated_neumann(A, B, alpha, K), rtol=1e-12, atol=1e-12)


def test_neumann_default_alpha_and_negative_definite() -> None:
    A = spd()
    b = rhs(12)
    lmax = float(torch.linalg.eigvalsh(A).max())
    res = solve(A, b, "neumann", K=3000)  # alpha estimated by power iterations
    # ‖Av‖/‖v‖ <= λ_max: alpha >= 1/λ_max, and the estimate is good enough that alpha < 2/λ_max
    assert res.info["alpha_estimated"] and 0.9999 / lmax <= res.info["alpha"] < 2.0 / lmax
    assert res.converged
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    neg = solve(-A, b, "neumann", K=3000)  # a fixed-point system: negative alpha
    assert neg.info["alpha"] < 0 and neg.converged
    torch.testing.assert_close(neg.x, torch.linalg.solve(-A, b), rtol=1e-9, atol=1e-10)
    # too large a step: the series diverges and says so
    div = solve(A, b, "neumann", alpha=3.0 / lmax, K=50)
    assert not div.converged and div.status is Status.DIVERGED


def test_normal_cg_transposes_a_plain_callable_and_meets_the_true_residual() -> None:
    A = nonsym()
    b = rhs(12)
    res = solve(lambda v: A @ v, b, "normal_cg")  # no rmatvec: Aᵀ from a vjp of the matvec
    assert res.converged and torch.linalg.vector_norm(b - A @ res.x) <= res.residual_norm * (1 + 1e-9) + 1e-300
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)


def test_dense_singular_and_ill_conditioned() -> None:
    A = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=DT))
    res = solve(A, torch.ones(3, dtype=DT), "dense")  # incompatible singular system
    assert not res.converged and res.status is Status.BREAKDOWN
    torch.testing.assert_close(res.x, torch.tensor([1.0, 0.5, 0.0], dtype=DT))  # least-squares solution
    ok = solve(A, torch.tensor([1.0, 1.0, 0.0], dtype=DT), "dense")  # compatible: solved
    assert ok.converged


def test_user_callable() -> None:
    A = spd()
    B = rhs(12, 3)

    def my_solve(matvec, b):  # returns a KrylovResult
        return cg(matvec, b, tol=1e-13)

    res = solve(lambda v: A @ v, B, my_solve, symmetric=True)
    assert res.method == "my_solve" and res.converged
    torch.testing.assert_close(res.x, torch.linalg.solve(A, B), rtol=1e-10, atol=1e-10)
    rough = solve(A, B[:, 0], lambda m, b: 0.9 * torch.linalg.solve(A, b))  # honest: residual 10 %
    assert not rough.converged and float(rough.relative_residual) == pytest.approx(0.1, rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        solve(A, B[:, 0], lambda m, b: b[:3])
    with pytest.raises(TypeError, match="return a tensor"):
        solve(A, B[:, 0], lambda m, b: "x")


def test_input_errors_name_the_argument() -> None:
    A, N = spd(), nonsym()
    b = rhs(12)
    for method in ("cg", "minres"):
        with pytest.raises(ValueError, match="tensor A is not symmetric"):
            solve(N, b, method)
    with pytest.raises(ValueError, match="not symmetric"):
        cg(N, b)
    with pytest.raises(ValueError, match="not symmetric"):
        minres(N, b)
    with pytest.raises(ValueError, match="not tagged symmetric"):
        solve(MatvecOperator(lambda v: A @ v, 12, DT), b, "cg")
    from curvlab.linalg import lanczos, randomized_eigh

    with pytest.raises(ValueError, match="not symmetric"):  # the same check serves the Lanczos-type routines
        lanczos(N, 3)
    with pytest.raises(ValueError, match="not symmetric"):
        randomized_eigh(N, 2)
    gmres(N, b)  # no symmetry needed
    with pytest.raises(ValueError, match="unknown method 'lu'"):
        solve(A, b, "lu")
    with pytest.raises(TypeError, match="has no option 'tolerance'"):
        solve(A, b, "cg", tolerance=1e-3)
    with pytest.raises(TypeError, match="no x0"):
        solve(A, b, "neumann", x0=b)
    with pytest.raises(ValueError, match="damping"):
        solve(A, b, damping=-1.0)
    with pytest.raises(ValueError, match="square"):
        solve(torch.ones(3, 4, dtype=DT), torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="b must have"):
        solve(A, torch.ones(5, dtype=DT))
    with pytest.raises(ValueError, match="alpha"):
        solve(A, b, "neumann", alpha=0.0)
    with pytest.raises(ValueError, match="K"):
        solve(A, b, "neumann", alpha=0.1, K=0)
    with pytest.raises(TypeError, match="method"):
        solve(A, b, 3)


def test_default_tolerance_is_one_rule() -> None:
    assert default_tol(torch.float64) == pytest.approx(torch.finfo(torch.float64).eps ** (2 / 3))
    assert default_tol(torch.float32) == pytest.approx(torch.finfo(torch.float32).eps ** (2 / 3))
    assert min_tol(torch.float32) == pytest.approx(10 * torch.finfo(torch.float32).eps)
    A = spd().float()
    b = rhs(12).float()
    for method in METHODS:
        res = solve(A, b, method)
        assert res.converged and res.x.dtype == torch.float32, method
        torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-4, atol=1e-4)


def test_tolerance_below_precision_is_clipped_and_converged_is_true() -> None:
    """Issue 13: cg in float32 with tol=1e-12 said converged at a true residual of 3.4e-6."""
    A = ill_spd(60, 2.5, dtype=torch.float32)
    b = rhs(60).float()
    with pytest.warns(ToleranceWarning, match="tol=1e-12 is below"):
        res = cg(A, b, tol=1e-12)
    true = float(torch.linalg.vector_norm(b - A @ res.x) / torch.linalg.vector_norm(b))
    if res.converged:
        assert true <= min_tol(torch.float32) * 1.0001
    else:
        assert res.status is Status.STALLED and res.info["residual_checks"] >= 1
    # the reported residual is the true one once it was checked
    assert float(res.relative_residual) == pytest.approx(true, rel=1e-3)
    for fn in (minres, gmres):
        with pytest.warns(ToleranceWarning):
            r = fn(A, b, tol=1e-12)
        t = float(torch.linalg.vector_norm(b - A @ r.x) / torch.linalg.vector_norm(b))
        assert not r.converged or t <= min_tol(torch.float32) * 1.01
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cg(A, b, tol=0.0, atol=1e-3)  # a purely absolute test is not clipped


def test_status_vocabulary() -> None:
    A = spd(40)
    b = rhs(40)
    for fn in (cg, minres, gmres):
        r = fn(A, b, maxiter=2)
        assert r.status is Status.MAX_ITER and r.status == "max_iter" and not r.converged
    r = cg(torch.diag(torch.tensor([1.0, -1.0], dtype=DT)), torch.ones(2, dtype=DT))
    assert r.status is Status.NEGATIVE_CURVATURE
    nan = cg(lambda v: v * float("nan"), torch.ones(3, dtype=DT))
    assert nan.status in (Status.NAN, Status.BREAKDOWN) and not nan.converged
    for method in METHODS + ["neumann"]:
        assert isinstance(solve(A, b, method, **({"K": 3} if method == "neumann" else {})).status, Status)


def test_dense_tensor_with_symmetric_word_factors_by_cholesky_and_still_checks_shape() -> None:
    g = torch.Generator().manual_seed(5)
    Q = torch.randn(9, 9, generator=g, dtype=torch.float64)
    A = Q @ Q.T + 9 * torch.eye(9, dtype=torch.float64)
    b = torch.randn(9, 2, generator=g, dtype=torch.float64)
    res = solve(A, b, symmetric=True)
    assert res.method == "dense" and res.info["factorization"] == "cholesky" and res.converged
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-12, atol=1e-14)
    lu = solve(A, b, symmetric=False)  # the caller's word again: LU, same solution
    assert lu.info["factorization"] == "lu" and lu.converged
    torch.testing.assert_close(lu.x, res.x, rtol=1e-12, atol=1e-14)
    assert solve(A, b).info["factorization"] == "cholesky"  # no word: tested numerically
    with pytest.raises(ValueError, match="square"):
        solve(torch.ones(3, 4, dtype=torch.float64), b[:3], symmetric=True)
