r"""M-FAC: matrix-free inverse empirical-Fisher products (Frantar, Kurtic & Alistarh 2021).

Reference: E. Frantar, E. Kurtic, D. Alistarh, "M-FAC: Efficient Matrix-Free Approximations of
Second-Order Information", NeurIPS 2021 (code: IST-DASLab/M-FAC).

The model is the damped empirical Fisher over :math:`m` stored gradients :math:`g_1, \dots, g_m`
(the rows of the window :math:`G \in \mathbb{R}^{m \times d}`),

.. math::
    F = \lambda I + \frac1m \sum_{i=1}^m g_i g_i^\top = \lambda I + \tfrac1m G^\top G,

whose inverse follows from :math:`m` Sherman-Morrison steps (paper, Eq. 3):
:math:`F_0^{-1} = \lambda^{-1} I`, :math:`v_k = F_{k-1}^{-1} g_k`,
:math:`F_k^{-1} = F_{k-1}^{-1} - v_k v_k^\top / (m + g_k^\top v_k)`, so that

.. math::
    F^{-1} x = \lambda^{-1} x - \sum_{k=1}^m \frac{v_k (v_k^\top x)}{m + g_k^\top v_k}.

* :class:`MFACInverse` — the *dynamic* algorithm (paper, Section 3.2, "sliding window"):
  nothing :math:`d`-sized but the window is stored. The small matrices are the Gram matrix
  :math:`GG^\top`, the matrix :math:`D_{kj} = g_k^\top F_{k-1}^{-1} g_j` (:math:`j \ge k`), which is
  the upper triangle of the unpivoted LU factor :math:`U` of :math:`\lambda^{-1}GG^\top + mI` minus
  :math:`mI`, the denominators :math:`m + D_{kk}`, and the lower-triangular coefficient matrix
  :math:`B` with diagonal :math:`\lambda^{-1}` such that :math:`v_k = \sum_j B_{kj} g_j`. A product
  costs :math:`O(dm + m^2)`; replacing the oldest gradient :math:`O(dm + m^3)`.
* :class:`MFACStatic` — the *static* algorithm (paper, Section 3.1, for compression): the
  :math:`v_k` are precomputed once in :math:`O(dm^2)`; then :math:`F^{-1}x` and the diagonal of
  :math:`F^{-1}` cost :math:`O(dm)`. Optionally block-diagonal (the paper's pruning setting).
* :func:`obs_prune` — one-shot Optimal-Brain-Surgeon pruning with scores
  :math:`w_q^2 / (2[F^{-1}]_{qq})` and the OBS weight update (paper, Section 5.1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._base import LinearOperator

__all__ = ["MFACInverse", "MFACStatic", "obs_prune"]


# --------------------------------------------------------------------------- #
# The small-matrix structure shared by both algorithms
# --------------------------------------------------------------------------- #
def _check_damping(damping: Any) -> float:
    try:
        lam = float(damping)
    except (TypeError, ValueError):
        raise TypeError(f"damping must be a number > 0, got {type(damping).__name__}") from None
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"damping must be a finite number > 0, got {damping!r}")
    return lam


def _check_small_dtype(small_dtype: Any) -> torch.dtype:
    if not (isinstance(small_dtype, torch.dtype) and small_dtype.is_floating_point):
        raise TypeError(f"small_dtype must be a floating-point torch.dtype, got {small_dtype!r}")
    return small_dtype


def _check_grads(grads: Any, name: str = "grads") -> Tensor:
    if not isinstance(grads, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (m, d), got {type(grads).__name__}")
    if grads.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D tensor of shape (m, d) (one gradient per row), got {tuple(grads.shape)}"
        )
    if not grads.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {grads.dtype}")
    if grads.shape[1] == 0:
        raise ValueError(f"{name} must have at least one column (d >= 1), got shape {tuple(grads.shape)}")
    if not bool(torch.isfinite(grads).all()):
        raise ValueError(f"{name} contains non-finite values")
    return grads


def _factor(gram: Tensor, lam: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(D, denom, B)`` of the recursive Sherman-Morrison structure from the Gram matrix ``GGᵀ``.

    The matrix :math:`M = \lambda^{-1}GG^\top + mI` is symmetric positive definite, so its unpivoted
    LU factorization is :math:`M = (\tilde L)(\operatorname{diag}(L) L^\top)` with :math:`L` the
    Cholesky factor and :math:`\tilde L = L \operatorname{diag}(L)^{-1}` unit lower triangular.
    Then (paper, Section 3.2) :math:`U = \operatorname{diag}(L)L^\top`, :math:`D = \operatorname{triu}(U - mI)`,
    :math:`\mathrm{denom}_k = m + D_{kk} = L_{kk}^2` and, from
    :math:`v_k = \lambda^{-1} g_k - \sum_{i<k} (D_{ik}/\mathrm{denom}_i) v_i`,
    :math:`B = \lambda^{-1} \tilde L^{-1}` (lower triangular with diagonal :math:`\lambda^{-1}`).
    Works batched over leading dimensions. Cost :math:`O(m^3)`.
    """
    m = gram.shape[-1]
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    M = gram / lam + m * eye
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info != 0).any()):
        raise FloatingPointError(
            "M-FAC: the m x m matrix GGᵀ/damping + mI is not numerically positive definite "
            "(non-finite gradients or a damping too small for the dtype)"
        )
    dL = L.diagonal(dim1=-2, dim2=-1)
    denom = dL * dL
    U = dL.unsqueeze(-1) * L.transpose(-2, -1)
    D = torch.triu(U - m * eye)
    L_unit = L / dL.unsqueeze(-2)
    B = torch.linalg.solve_triangular(L_unit, eye.expand_as(L) / lam, upper=False, unitriangular=True)
    return D, denom, B


# --------------------------------------------------------------------------- #
# Dynamic algorithm
# --------------------------------------------------------------------------- #
class MFACInverse(LinearOperator):
    r"""Inverse of the damped empirical Fisher :math:`(\lambda I + \frac1m G^\top G)^{-1}` over a sliding window.

    The *dynamic algorithm* of Frantar, Kurtic & Alistarh (2021, Section 3.2 and Algorithm 2
    of the appendix): the window :math:`G` (``ngrads × d``) is a ring buffer; :meth:`update`
    replaces the oldest gradient. Besides the window only :math:`m \times m` matrices are kept
    (:attr:`gram` :math:`= GG^\top` and, computed from it, :attr:`D`, :attr:`denom`, :attr:`B`;
    see :func:`_factor`). A product is

    .. math::
        q = B\,(Gx), \qquad F^{-1}x = \lambda^{-1}x - G^\top B^\top (q \oslash \mathrm{denom}),

    i.e. :math:`q_k = v_k^\top x` and :math:`F^{-1}x = \lambda^{-1}x - \sum_k v_k q_k/\mathrm{denom}_k`
    with :math:`v = BG` never formed: :math:`O(dm + m^2)`. (The paper's loop
    ``q[i:] -= D[i-1, i:] q[i-1] / denom[i-1]`` computes the same :math:`q` from :math:`\lambda^{-1}Gx`;
    the triangular product is its vectorized form.) :meth:`update` writes the new row of
    :math:`G` and of :math:`GG^\top` (:math:`O(dm)`) and refactors the small matrices (:math:`O(m^3)`,
    lazily, at the next product). No :math:`d \times d` matrix is ever formed.

    Before the window is full only the filled rows count: :math:`m` is the number of stored
    gradients (with none, :math:`F^{-1} = \lambda^{-1}I`). (The reference optimizer instead
    starts from ``ngrads`` zero rows and always divides by ``ngrads``.)

    The window is stored in the gradients' dtype (e.g. float32) on their device; the small
    matrices in ``small_dtype`` (float64 by default) on the same device.

    Args:
        grads: initial gradients, shape ``(k, d)``, one per row (``k`` may be 0: pass
            ``torch.empty(0, d)`` to start empty); they fill the first ``k`` slots.
        damping: :math:`\lambda > 0` (paper default ``1e-5`` for optimization and pruning; ``1e-6`` for BERT).
        ngrads: window size :math:`m` (default ``k``; the paper's optimizer uses 1024).
        small_dtype: dtype of the :math:`m \times m` matrices.

    Raises:
        TypeError: if ``grads`` is not a floating-point tensor or ``small_dtype`` not a float dtype.
        ValueError: if ``grads`` is not 2-D or has non-finite entries, ``damping <= 0``,
            or ``ngrads < max(k, 1)``.

    Example:
        >>> import torch
        >>> from curvlab.linops import MFACInverse
        >>> G = torch.randn(4, 10, dtype=torch.float64)
        >>> op = MFACInverse(G, damping=0.1)
        >>> F = 0.1 * torch.eye(10, dtype=torch.float64) + G.T @ G / 4
        >>> x = torch.randn(10, dtype=torch.float64)
        >>> torch.allclose(op @ x, torch.linalg.solve(F, x))
        True
    """

    def __init__(
        self,
        grads: Tensor,
        damping: float = 1e-5,
        *,
        ngrads: int | None = None,
        small_dtype: torch.dtype = torch.float64,
    ) -> None:
        grads = _check_grads(grads)
        k, d = grads.shape
        if ngrads is None:
            ngrads = k
        if not isinstance(ngrads, int) or isinstance(ngrads, bool) or ngrads < max(k, 1):
            raise ValueError(
                f"ngrads must be an integer >= max(number of initial gradients, 1) = {max(k, 1)}, got {ngrads!r}"
                + (" (pass ngrads= to start from an empty window)" if k == 0 else "")
            )
        super().__init__((d, d), grads.dtype, grads.device, symmetric=True, psd=True)
        self.damping = _check_damping(damping)
        self.small_dtype = _check_small_dtype(small_dtype)
        self.ngrads = ngrads
        self.grads = torch.zeros(ngrads, d, dtype=grads.dtype, device=grads.device)
        self.grads[:k] = grads
        self.gram = torch.zeros(ngrads, ngrads, dtype=small_dtype, device=grads.device)
        if k:
            self.gram[:k, :k] = (grads @ grads.T).to(small_dtype)
        self.count = k
        self.next = k % ngrads
        self._factors: tuple[Tensor, Tensor, Tensor] | None = None

    # ----------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """The operator's data as a plain dict of tensors and ints (for ``torch.save`` / solver states)."""
        return {"grads": self.grads, "gram": self.gram, "count": self.count, "next": self.next, "damping": self.damping}

    @classmethod
    def from_state(cls, state: dict[str, Any], *, copy: bool = False) -> MFACInverse:
        """Rebuild an operator from :meth:`state` (no Gram recomputation; ``copy`` clones the tensors)."""
        try:
            grads, gram = state["grads"], state["gram"]
            count, nxt, lam = int(state["count"]), int(state["next"]), state["damping"]
        except KeyError as e:
            raise ValueError(f"an MFACInverse state needs the key {e}") from None
        m, d = grads.shape
        if gram.shape != (m, m) or not (0 <= count <= m) or not (0 <= nxt < m):
            raise ValueError(
                f"inconsistent MFACInverse state: window {tuple(grads.shape)}, gram "
                f"{tuple(gram.shape)}, count {count}, next {nxt}"
            )
        op = cls.__new__(cls)
        LinearOperator.__init__(op, (d, d), grads.dtype, grads.device, symmetric=True, psd=True)
        op.damping = _check_damping(lam)
        op.small_dtype = gram.dtype
        op.ngrads = m
        op.grads = grads.clone() if copy else grads
        op.gram = gram.to(grads.device).clone() if copy else gram.to(grads.device)
        op.count, op.next = count, nxt
        op._factors = None
        return op

    # ----------------------------------------------------------- structure
    def _structure(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._factors is None:
            n = self.count
            self._factors = _factor(self.gram[:n, :n], self.damping)
        return self._factors

    @property
    def D(self) -> Tensor:  # noqa: N802 - the paper's name
        r"""The paper's :math:`D` (``count × count``): :math:`D_{kj} = g_k^\top F_{k-1}^{-1} g_j`, :math:`j \ge k`."""
        return self._structure()[0]

    @property
    def denom(self) -> Tensor:
        r"""The Sherman-Morrison denominators :math:`m + g_k^\top F_{k-1}^{-1} g_k`."""
        return self._structure()[1]

    @property
    def B(self) -> Tensor:  # noqa: N802 - the paper's name
        r"""The coefficient matrix :math:`B` (lower triangular): :math:`v_k = F_{k-1}^{-1}g_k = \sum_j B_{kj} g_j`."""
        return self._structure()[2]

    # ----------------------------------------------------------- products
    def _apply(self, X: Tensor, GX: Tensor | None = None) -> Tensor:
        """``F⁻¹ X`` for ``X`` of shape ``(d, k)``; ``GX`` optionally the precomputed ``G X``."""
        n, lam = self.count, self.damping
        if n == 0:
            return X / lam
        G = self.grads[:n]
        _, denom, B = self._structure()
        q = (G @ X if GX is None else GX).to(self.small_dtype)
        q = B @ q
        c = B.T @ (q / denom.unsqueeze(-1))
        return X / lam - G.T @ c.to(self.dtype)

    def _matvec(self, v: Tensor) -> Tensor:
        return self._apply(v.unsqueeze(-1)).squeeze(-1)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._apply(V)

    # ----------------------------------------------------------- window
    def _push(self, g: Tensor) -> Tensor:
        if not isinstance(g, Tensor) or g.shape != (self.shape[0],):
            raise ValueError(
                f"update: expected a gradient of shape ({self.shape[0]},), got "
                f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}"
            )
        if not bool(torch.isfinite(g).all()):
            raise ValueError("update: the gradient has non-finite entries; it was not added to the window")
        g = g.to(device=self.device, dtype=self.dtype)
        slot = self.next
        self.grads[slot] = g
        n = max(self.count, slot + 1)
        row = self.grads[:n] @ g  # the new row of GGᵀ: O(dm)
        r = row.to(self.small_dtype)
        self.gram[slot, :n] = r
        self.gram[:n, slot] = r
        self.count = n
        self.next = (slot + 1) % self.ngrads
        self._factors = None
        return row

    def update(self, g: Tensor) -> MFACInverse:
        """Replace the oldest gradient in the window by ``g`` (fill an empty slot first); returns ``self``.

        Cost :math:`O(dm)` here plus :math:`O(m^3)` to refactor the small matrices at the next product.

        Raises:
            ValueError: if ``g`` does not have shape ``(d,)`` or is not finite.
        """
        self._push(g)
        return self

    def update_matvec(self, g: Tensor) -> Tensor:
        r"""Push ``g`` (as :meth:`update`) and return :math:`F^{-1} g` with the updated window.

        Reuses :math:`Gg` (the new Gram row) for the product, as the reference ``update_mul``.
        """
        row = self._push(g)
        self.n_matvecs += 1
        return self._apply(g.to(self.dtype).unsqueeze(-1), row.unsqueeze(-1)).squeeze(-1)

    def __repr__(self) -> str:
        return (
            f"MFACInverse(d={self.shape[0]}, filled={self.count}/{self.ngrads}, damping={self.damping:g}, "
            f"dtype={self.dtype}, small_dtype={self.small_dtype}, device={self.device})"
        )


# --------------------------------------------------------------------------- #
# Static algorithm
# --------------------------------------------------------------------------- #
class MFACStatic(LinearOperator):
    r"""Static M-FAC (paper, Section 3.1): :math:`F^{-1}` with all :math:`v_k = F_{k-1}^{-1}g_k` precomputed.

    Precomputation (:math:`O(dm^2)`): the Gram matrix :math:`GG^\top`, the structure of
    :func:`_factor`, and :math:`V = BG` (row :math:`k` is :math:`v_k`; the paper computes the same
    rows by the recursion :math:`v_k = \lambda^{-1}g_k - \sum_{i<k} (v_i^\top g_k / \mathrm{denom}_i) v_i`).
    Then

    .. math::
        F^{-1}x = \lambda^{-1}x - V^\top\big((Vx) \oslash \mathrm{denom}\big), \qquad
        [F^{-1}]_{qq} = \lambda^{-1} - \sum_k V_{kq}^2 / \mathrm{denom}_k,

    both in :math:`O(dm)`. With ``block_size`` the Fisher is block diagonal over consecutive
    blocks of coordinates, each with its own :math:`F_b = \lambda I + \frac1m G_b^\top G_b`
    (the paper's pruning experiments use blocks of 128 weights with damping 1e-5).

    The rows :math:`v_k` are stored in the gradients' dtype; the small matrices and the
    accumulation of :math:`BG` use ``small_dtype``.

    Args:
        grads: gradients, shape ``(m, d)`` with ``m >= 1``.
        damping: :math:`\lambda > 0` (paper default ``1e-5``).
        block_size: size of the diagonal blocks (``None``: one block, the full Fisher).
        small_dtype: dtype of the :math:`m \times m` matrices.

    Raises:
        TypeError, ValueError: on bad ``grads`` (see :class:`MFACInverse`), ``damping <= 0``,
            or ``block_size < 1``.
    """

    def __init__(
        self,
        grads: Tensor,
        damping: float = 1e-5,
        *,
        block_size: int | None = None,
        small_dtype: torch.dtype = torch.float64,
    ) -> None:
        grads = _check_grads(grads)
        m, d = grads.shape
        if m == 0:
            raise ValueError("MFACStatic needs at least one gradient (grads of shape (m, d) with m >= 1)")
        bs = d if block_size is None else block_size
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
            raise ValueError(f"block_size must be None or an integer >= 1, got {block_size!r}")
        bs = min(bs, d)
        super().__init__((d, d), grads.dtype, grads.device, symmetric=True, psd=True)
        self.damping = _check_damping(damping)
        self.small_dtype = _check_small_dtype(small_dtype)
        self.m, self.block_size = m, bs
        nb = -(-d // bs)
        self.n_blocks = nb
        Gb = self._blocked(grads.T)  # (nb, bs, m)
        Gb = Gb.transpose(-2, -1).contiguous()  # (nb, m, bs)
        gram = (Gb @ Gb.transpose(-2, -1)).to(small_dtype)
        _, denom, B = _factor(gram, self.damping)
        self.denom = denom  # (nb, m)
        # V = B G, accumulated in small_dtype over column chunks (O(d m^2)), stored in the grads' dtype
        V = torch.empty_like(Gb)
        step = max(1, (1 << 22) // max(1, nb * m))
        for c0 in range(0, bs, step):
            sl = slice(c0, min(bs, c0 + step))
            V[..., sl] = (B @ Gb[..., sl].to(small_dtype)).to(grads.dtype)
        self.V = V  # (nb, m, bs): V[b, k] = v_k restricted to block b

    def _blocked(self, X: Tensor) -> Tensor:
        """``(d, k)`` -> ``(n_blocks, block_size, k)``, zero-padded (exact: padded coordinates carry no gradient)."""
        d, k = X.shape
        pad = self.n_blocks * self.block_size - d
        if pad:
            X = torch.cat([X, X.new_zeros(pad, k)])
        return X.reshape(self.n_blocks, self.block_size, k)

    def _apply(self, X: Tensor) -> Tensor:
        d = self.shape[0]
        Xb = self._blocked(X)  # (nb, bs, k)
        q = (self.V @ Xb).to(self.small_dtype) / self.denom.unsqueeze(-1)  # (nb, m, k)
        out = Xb / self.damping - self.V.transpose(-2, -1) @ q.to(self.dtype)
        return out.reshape(-1, X.shape[1])[:d]

    def _matvec(self, v: Tensor) -> Tensor:
        return self._apply(v.unsqueeze(-1)).squeeze(-1)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._apply(V)

    def diagonal(self) -> Tensor:
        r"""The diagonal of :math:`F^{-1}`, :math:`\lambda^{-1} - \sum_k V_{kq}^2/\mathrm{denom}_k` (O(dm))."""
        w = (1.0 / self.denom).to(self.dtype)  # (nb, m)
        out = torch.full((self.n_blocks, self.block_size), 1.0 / self.damping, dtype=self.dtype, device=self.device)
        rows = max(1, (1 << 22) // max(1, self.n_blocks * self.block_size))
        for r0 in range(0, self.m, rows):
            sl = slice(r0, min(self.m, r0 + rows))
            out -= (self.V[:, sl].square() * w[:, sl].unsqueeze(-1)).sum(1)
        return out.reshape(-1)[: self.shape[0]]

    def __repr__(self) -> str:
        return (
            f"MFACStatic(d={self.shape[0]}, m={self.m}, block_size={self.block_size}, "
            f"damping={self.damping:g}, dtype={self.dtype})"
        )


# --------------------------------------------------------------------------- #
# OBS pruning
# --------------------------------------------------------------------------- #
def obs_prune(
    weights: Tensor,
    fisher_inv: LinearOperator,
    sparsity: float,
    *,
    mask: Tensor | None = None,
    update: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""One step of M-FAC / Optimal-Brain-Surgeon pruning (paper, Section 5.1; Hassibi & Stork 1993).

    Removing weight :math:`q` alone costs :math:`\rho_q = w_q^2 / (2[F^{-1}]_{qq})` and is
    best compensated by :math:`\delta w = -\frac{w_q}{[F^{-1}]_{qq}} F^{-1} e_q`. To reach
    ``sparsity`` this step drops the kept weights of lowest score and applies the *sum* of their
    single-weight updates, :math:`\delta w = F^{-1}t` with :math:`t_q = -w_q/[F^{-1}]_{qq}` on the
    dropped set (correlations between dropped weights ignored), then sets them to exactly zero —
    as the paper's reference pruner (and WoodFisher) do. The paper reaches high sparsity by
    repeating this step ``nrecomps`` times (16 by default) along a geometric sparsity schedule,
    recollecting gradients at the pruned point each time; that loop belongs to the caller (see
    ``examples/mfac_pruning.py``).

    Args:
        weights: flat weights, shape ``(d,)``.
        fisher_inv: the inverse Fisher over the *kept* coordinates (dimension ``mask.sum()``),
            with a ``diagonal()`` method — an :class:`MFACStatic` built from ``grads[:, mask]``.
        sparsity: target fraction of zero weights over all ``d`` coordinates, in ``[0, 1]``.
        mask: ``(d,)`` bool, ``True`` where the weight is kept (default: all kept).
        update: apply the OBS weight update (``False``: only choose by OBS score and zero).

    Returns:
        ``(new_weights, new_mask)``; pruned entries are exactly zero.

    Raises:
        ValueError: on shape mismatches, a sparsity outside ``[0, 1]``, or a non-positive diagonal.
        TypeError: if ``fisher_inv`` has no ``diagonal()``.
    """
    if not isinstance(weights, Tensor) or weights.ndim != 1:
        raise ValueError(f"weights must be a flat (d,) tensor, got {getattr(weights, 'shape', type(weights).__name__)}")
    d = weights.shape[0]
    if not (isinstance(sparsity, (int, float)) and 0 <= sparsity <= 1):
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if mask is None:
        mask = torch.ones(d, dtype=torch.bool, device=weights.device)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (d,):
        raise ValueError(f"mask must be a bool tensor of shape ({d},)")
    if not callable(getattr(fisher_inv, "diagonal", None)):
        raise TypeError(f"fisher_inv must provide diagonal() (e.g. MFACStatic), got {type(fisher_inv).__name__}")
    kept = int(mask.sum())
    if fisher_inv.shape != (kept, kept):
        raise ValueError(
            f"fisher_inv must act on the {kept} kept coordinates (shape ({kept}, {kept})), "
            f"got {fisher_inv.shape}; build it from grads[:, mask]"
        )
    w = weights.detach().clone()
    ndrop = int(d * sparsity) - (d - kept)
    if ndrop <= 0:
        return w, mask.clone()
    wk = w[mask].to(fisher_inv.dtype)
    diag = fisher_inv.diagonal()
    if not bool((diag > 0).all()):
        raise ValueError("the diagonal of fisher_inv must be positive (increase the damping)")
    scores = wk.square() / (2 * diag)
    drop = torch.topk(scores, ndrop, largest=False).indices
    if update:
        t = torch.zeros_like(wk)
        t[drop] = -wk[drop] / diag[drop]
        wk = wk + fisher_inv.matvec(t)
    wk[drop] = 0
    keep_k = torch.ones(kept, dtype=torch.bool, device=w.device)
    keep_k[drop] = False
    new_mask = mask.clone()
    new_mask[mask] = keep_k
    w[mask] = wk.to(w.dtype)
    w[~new_mask] = 0
    return w, new_mask
