"""L-BFGS two-loop recursion against the dense BFGS inverse update (Nocedal & Wright 2006, eq. (6.17))."""

import pytest
import torch

from curvlab.solvers import lbfgs_direction, lbfgs_update

DT = torch.float64


def _dense_bfgs(S, Y, n):
    gamma = float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1])
    H = gamma * torch.eye(n, dtype=DT)
    eye = torch.eye(n, dtype=DT)
    for s, y in zip(S, Y):
        rho = 1.0 / float(s @ y)
        V = eye - rho * torch.outer(y, s)
        H = V.T @ H @ V + rho * torch.outer(s, s)
    return H


def test_two_loop_equals_dense_bfgs_inverse():
    gen = torch.Generator().manual_seed(0)
    n = 7
    Q = torch.randn(n, n, generator=gen, dtype=DT)
    A = Q @ Q.T + n * torch.eye(n, dtype=DT)
    S, Y = [], []
    for _ in range(5):
        s = torch.randn(n, generator=gen, dtype=DT)
        S, Y = lbfgs_update(S, Y, s, A @ s, memory=10)
    g = torch.randn(n, generator=gen, dtype=DT)
    torch.testing.assert_close(lbfgs_direction(g, S, Y), -_dense_bfgs(S, Y, n) @ g)


def test_full_memory_on_quadratic_recovers_newton_step():
    n = 4
    A = torch.diag(torch.tensor([1.0, 3.0, 10.0, 30.0], dtype=DT))
    S, Y = [], []
    for i in range(n):
        s = torch.zeros(n, dtype=DT)
        s[i] = 1.0
        S, Y = lbfgs_update(S, Y, s, A @ s, memory=n)
    g = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT)
    torch.testing.assert_close(lbfgs_direction(g, S, Y), -torch.linalg.solve(A, g))


def test_update_skips_bad_curvature_and_bounds_memory():
    s = torch.tensor([1.0, 0.0], dtype=DT)
    S, Y = lbfgs_update([], [], s, -s)  # sᵀy < 0: skipped
    assert S == [] and Y == []
    S0, Y0 = [], []
    for k in range(5):
        S1, Y1 = lbfgs_update(S0, Y0, s * (k + 1), s, memory=3)
        assert len(S0) == min(k, 3)  # inputs not modified
        S0, Y0 = S1, Y1
    assert len(S0) == 3 and float(S0[-1][0]) == 5.0
    assert torch.equal(lbfgs_direction(s, [], []), -s)
    with pytest.raises(ValueError, match="memory"):
        lbfgs_update([], [], s, s, memory=0)
    with pytest.raises(ValueError, match="same number"):
        lbfgs_direction(s, [s], [])
