"""eigsh (thick-restart Lanczos) against dense eigvalsh of small float64 Hessians and GGNs."""

from __future__ import annotations

import pickle

import pytest
import torch

import curvlab as cl
from curvlab.spectrum import EigshResult, eigsh
from tests.conftest import dense_hessian, make_mlp

TOL = 1e-8


def _hessian_and_dense(loss: str):
    params, model, loss_fn, f, X, Y, spec = make_mlp(loss, n=30, d=6, h=10, c=5)
    H = cl.linops.hessian(f, params, data=(X, Y))
    return H, dense_hessian(f, spec, (X, Y))


def _ggn_and_dense(loss: str):
    params, model, loss_fn, f, X, Y, spec = make_mlp(loss, n=60, d=6, h=10, c=5)
    G = cl.linops.ggn(model, loss_fn, params, (X, Y))
    return G, G.to_dense()


@pytest.fixture(scope="module")
def operators():
    torch.manual_seed(0)
    H_mse, Hd_mse = _hessian_and_dense("mse")
    H_ce, Hd_ce = _hessian_and_dense("ce")
    return {
        "hessian-mse": (H_mse, Hd_mse),
        "hessian-ce": (H_ce, Hd_ce),
        "ggn-mse": _ggn_and_dense("mse"),
        "ggn-ce": _ggn_and_dense("ce"),
    }


def _expected(evals_desc: torch.Tensor, which: str, k: int) -> torch.Tensor:
    if which == "LA":
        return evals_desc[:k]
    if which == "SA":
        return evals_desc[-k:]
    if which == "BE":
        return torch.cat([evals_desc[: k - k // 2], evals_desc[evals_desc.numel() - k // 2 :]])
    idx = torch.argsort(evals_desc.abs(), descending=True)[:k]
    return torch.sort(evals_desc[idx], descending=True).values


CASES = [(name, which) for name in ("hessian-mse", "hessian-ce", "ggn-mse") for which in ("LA", "SA", "BE", "LM")]
# The cross-entropy GGN has an exact null space (softmax shift invariance: one direction per
# hidden unit) right next to eigenvalues ~1e-7 ‖G‖, which no Krylov method separates: top end only.
CASES += [("ggn-ce", "LA"), ("ggn-ce", "LM")]


@pytest.mark.parametrize(("name", "which"), CASES)
def test_eigsh_matches_dense(operators, name, which):
    op, dense = operators[name]
    k = 6
    true = torch.linalg.eigvalsh(dense).flip(0)
    scale = float(true.abs().max())
    res = eigsh(op, k=k, which=which, ncv=16, seed=0)  # ncv < n = 120: restarts happen
    vals, vecs = res
    assert isinstance(res, EigshResult) and res.converged
    assert vals.shape == (k,) and vecs.shape == (op.shape[0], k)
    assert bool((vals[:-1] >= vals[1:]).all()), "eigenvalues must be sorted descending"
    torch.testing.assert_close(vals, _expected(true, which, k), atol=TOL * scale, rtol=0)
    resid = torch.linalg.vector_norm(dense @ vecs - vecs * vals, dim=0)
    assert float(resid.max()) <= 1e-8 * scale
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=vecs.dtype), atol=1e-10, rtol=0)
    # the reported residual norms are the true ones
    torch.testing.assert_close(res.residual_norms, resid, atol=1e-9 * scale, rtol=0)


def test_result_reports_cost_and_unpacks(operators):
    H, Hd = operators["hessian-ce"]
    before = H.n_matvecs
    res = eigsh(H, k=3, seed=1)
    assert res.n_matvecs == H.n_matvecs - before > 0
    vals, vecs = res
    assert res.eigenvalues is vals and res.eigenvectors is vecs
    assert len(res) == 2 and res.which == "LA" and res.n_restarts >= 0
    assert "converged=True" in repr(res)
    again = pickle.loads(pickle.dumps(res))
    assert again.n_matvecs == res.n_matvecs and torch.equal(again[0], vals)


def test_seed_reproducible_and_generator(operators):
    H, _ = operators["hessian-mse"]
    a = eigsh(H, k=4, seed=3)
    b = eigsh(H, k=4, seed=3)
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, atol=0, rtol=0)
    c = eigsh(H, k=4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.eigenvalues, c.eigenvalues, atol=0, rtol=0)


def test_not_converged_is_reported():
    A = torch.diag(torch.linspace(0.0, 1.0, 400, dtype=torch.float64))  # clustered: slow convergence
    res = eigsh(A, k=5, ncv=8, maxiter=0, tol=1e-12, seed=0)
    assert not res.converged and res.n_restarts == 0 and res.n_matvecs == 8
    assert float(res.residual_norms.max()) > 1e-12


def test_repeated_eigenvalues_found_with_multiplicity():
    d = torch.cat([torch.full((4,), 5.0), torch.linspace(0.0, 1.0, 60)]).double()
    res = eigsh(torch.diag(d), k=5, seed=0)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 5.0, 5.0, 5.0, 1.0]).double(), atol=1e-10, rtol=0)
    I = cl.linops.IdentityOperator(30, torch.float64, "cpu", scale=2.0)
    torch.testing.assert_close(eigsh(I, k=3, seed=0).eigenvalues, torch.full((3,), 2.0).double())


def test_full_basis_is_exact():
    A = torch.randn(12, 12, dtype=torch.float64)
    A = A + A.T
    res = eigsh(A, k=11, which="SA", seed=0)  # ncv = n: one exact cycle
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(A).flip(0)[1:], atol=1e-10, rtol=0)


def test_damped_and_float32(operators):
    H, Hd = operators["hessian-mse"]
    top = torch.linalg.eigvalsh(Hd).flip(0)[:3]
    damped = eigsh(H.damped(0.5), k=3, seed=0).eigenvalues
    torch.testing.assert_close(damped, top + 0.5, atol=1e-8, rtol=0)
    A32 = Hd.float()
    res = eigsh(A32, k=3, seed=0)
    assert res.eigenvalues.dtype == torch.float32 and res.eigenvectors.dtype == torch.float32
    assert res.converged and res.tol == pytest.approx(torch.finfo(torch.float32).eps ** (2 / 3))
    torch.testing.assert_close(res.eigenvalues.double(), top, atol=1e-4 * float(top[0]), rtol=0)


def test_v0_start_vector():
    A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
    res = eigsh(A, k=2, v0=torch.ones(50, dtype=torch.float64))
    torch.testing.assert_close(res.eigenvalues, torch.tensor([50.0, 49.0]).double(), atol=1e-9, rtol=0)


def test_errors():
    A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="k < n"):
        eigsh(A, k=10)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        eigsh(A, k=0)
    with pytest.raises(ValueError, match="k must be an integer"):
        eigsh(A, k=2.0)
    with pytest.raises(ValueError, match="which must be one of"):
        eigsh(A, k=2, which="LR")
    with pytest.raises(ValueError, match="ncv"):
        eigsh(A, k=3, ncv=3)
    with pytest.raises(ValueError, match="tol"):
        eigsh(A, k=3, tol=-1.0)
    with pytest.raises(ValueError, match="v0"):
        eigsh(A, k=3, v0=torch.ones(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="nonzero"):
        eigsh(A, k=3, v0=torch.zeros(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="either generator= or seed="):
        eigsh(A, k=3, seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="not symmetric"):
        eigsh(torch.triu(torch.ones(5, 5, dtype=torch.float64)), k=2)
    nonsym = cl.linops.MatvecOperator(lambda v: v, 5, torch.float64)
    with pytest.raises(ValueError, match="symmetric"):
        eigsh(nonsym, k=2)
    with pytest.raises(TypeError, match="LinearOperator"):
        eigsh(lambda v: v, k=2)
