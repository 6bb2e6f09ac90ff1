"""M-FAC operators: dynamic (sliding window) and static inverse-Fisher products, diagonal, OBS pruning."""

from __future__ import annotations

import pytest
import torch

from curvlab.linops import MFACInverse, MFACStatic, obs_prune

F64 = torch.float64


def dense_inv(G: torch.Tensor, lam: float) -> torch.Tensor:
    """(λI + (1/m) GᵀG)⁻¹ computed densely (λ⁻¹I with no rows)."""
    d = G.shape[1]
    F = lam * torch.eye(d, dtype=G.dtype)
    if G.shape[0]:
        F = F + G.T @ G / G.shape[0]
    return torch.linalg.inv(F)


def test_dynamic_matches_dense_full_window():
    G = torch.randn(8, 40, dtype=F64)
    op = MFACInverse(G, damping=0.05)
    ref = dense_inv(G, 0.05)
    x = torch.randn(40, dtype=F64)
    X = torch.randn(40, 5, dtype=F64)
    torch.testing.assert_close(op @ x, ref @ x, rtol=0, atol=1e-9)
    torch.testing.assert_close(op.matmat(X), ref @ X, rtol=0, atol=1e-9)
    torch.testing.assert_close(op.to_dense(), ref, rtol=0, atol=1e-9)
    assert op.is_symmetric and op.is_psd and op.shape == (40, 40)


@pytest.mark.parametrize("lam", [1e-3, 0.3])
def test_dynamic_ring_buffer_before_and_after_full(lam):
    d, m = 25, 6
    grads = torch.randn(15, d, dtype=F64) * torch.linspace(0.1, 3, 15, dtype=F64)[:, None]
    op = MFACInverse(torch.empty(0, d, dtype=F64), lam, ngrads=m)
    x = torch.randn(d, dtype=F64)
    torch.testing.assert_close(op @ x, x / lam, rtol=0, atol=0)
    for i in range(grads.shape[0]):
        window = grads[max(0, i - m + 1) : i + 1]  # the last min(i+1, m) gradients
        y = op.update_matvec(grads[i])
        ref = dense_inv(window, lam)
        scale = ref.abs().max()
        torch.testing.assert_close(y, ref @ grads[i], rtol=0, atol=1e-9 * scale)
        torch.testing.assert_close(op @ x, ref @ x, rtol=0, atol=1e-9 * scale)
        assert op.count == min(i + 1, m)
    assert op.next == grads.shape[0] % m


def test_dynamic_partial_initial_window_and_update():
    d = 12
    G = torch.randn(3, d, dtype=F64)
    op = MFACInverse(G, 0.1, ngrads=5)
    x = torch.randn(d, dtype=F64)
    torch.testing.assert_close(op @ x, dense_inv(G, 0.1) @ x, rtol=0, atol=1e-9)
    g = torch.randn(d, dtype=F64)
    assert op.update(g) is op
    torch.testing.assert_close(op @ x, dense_inv(torch.cat([G, g[None]]), 0.1) @ x, rtol=0, atol=1e-9)


def test_dynamic_paper_structure():
    """D, denom and B are the paper's quantities: the loop over D gives q_k = v_kᵀx, v_k = (BG)_k = F_{k-1}⁻¹ g_k."""
    d, m, lam = 15, 5, 0.2
    G = torch.randn(m, d, dtype=F64)
    op = MFACInverse(G, lam)
    x = torch.randn(d, dtype=F64)
    # the paper's product loop
    q = (G @ x) / lam
    for i in range(1, m):
        q[i:] -= op.D[i - 1, i:] * q[i - 1] / op.denom[i - 1]
    res = x / lam - G.T @ ((q / op.denom) @ op.B)
    torch.testing.assert_close(res, dense_inv(G, lam) @ x, rtol=0, atol=1e-10)
    # v_k = F_{k-1}^{-1} g_k with F_{k-1} over the first k-1 gradients but the full 1/m scaling
    V = op.B @ G
    for k in range(m):
        Fk = lam * torch.eye(d, dtype=F64) + G[:k].T @ G[:k] / m
        torch.testing.assert_close(V[k], torch.linalg.solve(Fk, G[k]), rtol=0, atol=1e-10)
        assert float(op.denom[k]) == pytest.approx(m + float(G[k] @ V[k]), rel=1e-12)
    assert torch.equal(torch.diagonal(op.B), torch.full((m,), 1 / lam, dtype=F64))


def test_dynamic_float32_window_float64_small():
    G = torch.randn(10, 300)
    op = MFACInverse(G, 1e-2)
    assert op.grads.dtype == torch.float32 and op.gram.dtype == F64 and op.B.dtype == F64
    x = torch.randn(300)
    y = op @ x
    assert y.dtype == torch.float32
    ref = dense_inv(G.double(), 1e-2) @ x.double()
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-4


def test_dynamic_state_round_trip():
    G = torch.randn(4, 9, dtype=F64)
    op = MFACInverse(G, 0.1, ngrads=6)
    op2 = MFACInverse.from_state(op.state(), copy=True)
    g = torch.randn(9, dtype=F64)
    x = torch.randn(9, dtype=F64)
    torch.testing.assert_close(op.update_matvec(g), op2.update_matvec(g), rtol=0, atol=0)
    torch.testing.assert_close(op @ x, op2 @ x, rtol=0, atol=0)


def test_dynamic_bad_inputs():
    G = torch.randn(3, 5, dtype=F64)
    with pytest.raises(ValueError, match="damping"):
        MFACInverse(G, 0.0)
    with pytest.raises(ValueError, match="damping"):
        MFACInverse(G, float("nan"))
    with pytest.raises(ValueError, match="2-D"):
        MFACInverse(torch.randn(5, dtype=F64), 0.1)
    with pytest.raises(TypeError, match="floating"):
        MFACInverse(torch.ones(3, 5, dtype=torch.int64), 0.1)
    with pytest.raises(ValueError, match="ngrads"):
        MFACInverse(G, 0.1, ngrads=2)
    with pytest.raises(ValueError, match="ngrads"):
        MFACInverse(torch.empty(0, 5, dtype=F64), 0.1)
    with pytest.raises(ValueError, match="non-finite"):
        MFACInverse(torch.full((2, 5), float("nan"), dtype=F64), 0.1)
    with pytest.raises(TypeError, match="small_dtype"):
        MFACInverse(G, 0.1, small_dtype=torch.int32)
    op = MFACInverse(G, 0.1, ngrads=4)
    with pytest.raises(ValueError, match="shape"):
        op.update(torch.randn(6, dtype=F64))
    with pytest.raises(ValueError, match="non-finite"):
        op.update(torch.tensor([1.0, float("inf"), 0, 0, 0], dtype=F64))
    assert op.count == 3  # the rejected gradients were not added
    with pytest.raises(ValueError, match="shape"):
        op @ torch.randn(4, dtype=F64)


# ---------------------------------------------------------------------- static
@pytest.mark.parametrize("lam", [1e-3, 0.5])
def test_static_matches_dense(lam):
    G = torch.randn(7, 30, dtype=F64)
    op = MFACStatic(G, lam)
    ref = dense_inv(G, lam)
    scale = ref.abs().max()
    x, X = torch.randn(30, dtype=F64), torch.randn(30, 4, dtype=F64)
    torch.testing.assert_close(op @ x, ref @ x, rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(op.matmat(X), ref @ X, rtol=0, atol=1e-9 * scale)
    torch.testing.assert_close(op.diagonal(), torch.diagonal(ref), rtol=0, atol=1e-9 * scale)
    # the precomputed rows are the v_k of the dynamic algorithm
    dyn = MFACInverse(G, lam)
    torch.testing.assert_close(op.V[0], dyn.B @ G, rtol=0, atol=1e-9 * scale)


def test_static_blocks_match_block_diagonal_dense():
    d, bs, lam = 23, 5, 0.1
    G = torch.randn(6, d, dtype=F64)
    op = MFACStatic(G, lam, block_size=bs)
    ref = torch.zeros(d, d, dtype=F64)
    for b0 in range(0, d, bs):
        sl = slice(b0, min(d, b0 + bs))
        ref[sl, sl] = dense_inv(G[:, sl], lam)
    x = torch.randn(d, dtype=F64)
    torch.testing.assert_close(op @ x, ref @ x, rtol=0, atol=1e-9)
    torch.testing.assert_close(op.diagonal(), torch.diagonal(ref), rtol=0, atol=1e-9)
    torch.testing.assert_close(op.to_dense(), ref, rtol=0, atol=1e-9)


def test_static_bad_inputs():
    with pytest.raises(ValueError, match="at least one gradient"):
        MFACStatic(torch.empty(0, 4, dtype=F64), 0.1)
    with pytest.raises(ValueError, match="block_size"):
        MFACStatic(torch.randn(2, 4, dtype=F64), 0.1, block_size=0)
    with pytest.raises(ValueError, match="damping"):
        MFACStatic(torch.randn(2, 4, dtype=F64), -1.0)


# ---------------------------------------------------------------------- OBS
def test_obs_single_weight_matches_dense_formula():
    d, lam = 20, 0.05
    G = torch.randn(6, d, dtype=F64)
    w = torch.randn(d, dtype=F64)
    Finv = dense_inv(G, lam)
    diag = torch.diagonal(Finv)
    q = int(torch.argmin(w**2 / (2 * diag)))
    ref = w - (w[q] / diag[q]) * Finv[:, q]
    new_w, mask = obs_prune(w, MFACStatic(G, lam), 1 / d)
    assert int((~mask).sum()) == 1 and not bool(mask[q])
    assert float(new_w[q]) == 0.0
    torch.testing.assert_close(new_w, ref, rtol=0, atol=1e-9)


def test_obs_many_weights_sum_of_updates_and_mask():
    d, lam = 30, 0.1
    G = torch.randn(5, d, dtype=F64)
    w = torch.randn(d, dtype=F64)
    Finv = dense_inv(G, lam)
    diag = torch.diagonal(Finv)
    drop = torch.argsort(w**2 / (2 * diag))[:15]
    t = torch.zeros(d, dtype=F64)
    t[drop] = -w[drop] / diag[drop]
    ref = w + Finv @ t
    ref[drop] = 0
    new_w, mask = obs_prune(w, MFACStatic(G, lam), 0.5)
    torch.testing.assert_close(new_w, ref, rtol=0, atol=1e-9)
    assert int((~mask).sum()) == 15 and bool((new_w[~mask] == 0).all())
    # second step on the kept coordinates only, to 80 % sparsity
    new_w2, mask2 = obs_prune(new_w, MFACStatic(G[:, mask], lam), 0.8, mask=mask)
    assert int((~mask2).sum()) == 24 and bool((new_w2[~mask2] == 0).all())
    assert bool((mask2 <= mask).all())
    # without the update only the pruned weights change
    w3, m3 = obs_prune(w, MFACStatic(G, lam), 0.5, update=False)
    torch.testing.assert_close(w3[m3], w[m3], rtol=0, atol=0)


def test_obs_bad_inputs():
    G = torch.randn(3, 6, dtype=F64)
    w = torch.randn(6, dtype=F64)
    with pytest.raises(ValueError, match="sparsity"):
        obs_prune(w, MFACStatic(G, 0.1), 1.5)
    with pytest.raises(ValueError, match="kept coordinates"):
        obs_prune(w, MFACStatic(G[:, :5], 0.1), 0.5)
    with pytest.raises(TypeError, match="diagonal"):
        obs_prune(w, MFACInverse(G, 0.1), 0.5)
    with pytest.raises(ValueError, match="flat"):
        obs_prune(w[None], MFACStatic(G, 0.1), 0.5)
