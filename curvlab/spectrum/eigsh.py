r"""Extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

The method (Wu & Simon 2000, "Thick-restart Lanczos method for large symmetric
eigenvalue problems", SIAM J. Matrix Anal. Appl. 22(2); Stathopoulos, Saad &
Wu 1998, "Dynamic thick restarting of the Davidson, and the implicitly
restarted Arnoldi methods", SIAM J. Sci. Comput. 19(1)) keeps an orthonormal
basis :math:`V_m` of at most ``ncv`` vectors and the Lanczos relation

.. math::

    A V_m = V_m H_m + \beta_m v_{m+1} e_m^\top, \qquad H_m = V_m^\top A V_m .

The Rayleigh–Ritz pairs :math:`(\theta_i, V_m s_i)` of :math:`H_m = S \Theta S^\top`
have residual norms :math:`\|A V_m s_i - \theta_i V_m s_i\| = |\beta_m|\,|e_m^\top s_i|`,
read off for free. When the basis is full and the wanted pairs have not converged,
the method *restarts thickly*: it keeps the :math:`p` best Ritz vectors
:math:`V_m S_p` (the wanted ones and, as in ARPACK's exact-shift restart, half
of the unwanted slots filled with their nearest neighbours; Lehoucq & Sorensen
1996), appends :math:`v_{m+1}`, and continues the Lanczos process from the arrow
matrix :math:`\begin{bmatrix}\Theta_p & \beta_m S_p^\top e_m\\ \cdot & \alpha\end{bmatrix}`.
Thick restarting is mathematically equivalent to the implicitly restarted
Lanczos method with exact shifts that ``scipy.sparse.linalg.eigsh`` (ARPACK)
uses, with none of its bulge-chasing. Every new vector is reorthogonalised
against the whole basis by classical Gram–Schmidt applied twice (CGS2), so no
spurious copies of converged Ritz values appear (Golub & Van Loan, *Matrix
Computations*, 4th ed., §10.3.1). A breakdown (an invariant Krylov subspace)
continues with a fresh random vector orthogonal to the basis. Further copies of a
repeated eigenvalue enter a single-vector Krylov space only through rounding, so
they are usually, but not always, found before the wanted pairs converge (as with
ARPACK); check ``k`` against an expected multiplicity with a smaller ``tol``.

The iteration runs on :math:`A/s` with :math:`s` a power of two near the size of the
first product (exact: the same digits as on :math:`A`), so an operator of any scale —
:math:`10^{-200}` or :math:`10^{200}` in float64 — is handled alike; the
eigenvalues and residuals are scaled back. A non-finite product stops the run with
``status="nan"`` (NaN eigenvalues, never a Ritz value computed from it).

Everything runs in torch in the operator's dtype on its device; the host
synchronises once per step (the breakdown and finiteness tests) and once per
convergence test.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from curvlab.checks import check_int
from curvlab.linalg import default_tol
from curvlab.status import Status

from ._common import (
    Callback,
    Monitor,
    as_symmetric_operator,
    make_generator,
    param_layout,
    pow2_scale,
    unflatten_columns,
)

__all__ = ["EigshResult", "eigsh"]

_WHICH = ("LA", "SA", "BE", "LM")


class EigshResult(tuple):
    """``(eigenvalues, eigenvectors)`` from :func:`eigsh`, with diagnostics as attributes.

    Unpacks like the 2-tuple scipy returns: ``vals, vecs = eigsh(H, k=5)``.

    Attributes:
        eigenvalues: ``(k,)`` Ritz values, sorted in descending order.
        eigenvectors: ``(n, k)`` orthonormal Ritz vectors (flat); column ``i`` belongs to
            ``eigenvalues[i]``. :meth:`as_params` gives them in the parameters' structure.
        status: a :class:`~curvlab.Status`: ``"converged"`` (every requested pair met the
            tolerance), ``"max_iter"`` (``maxiter`` restarts ran out first), ``"nan"`` (a product
            was not finite: the eigenvalues and eigenvectors are NaN), ``"callback"`` (the
            callback stopped the run: the current Ritz pairs).
        message: why the run stopped, in words.
        n_matvecs: products with the operator used.
        converged: ``status == "converged"``.
        residual_norms: ``(k,)`` Lanczos residual norms :math:`\\|A x_i - \\theta_i x_i\\|`
            (exact in exact arithmetic, accurate to rounding with full reorthogonalisation).
        n_restarts: thick restarts taken.
        tol: the tolerance used (relative to the estimate :attr:`anorm` of :math:`\\|A\\|_2`).
        anorm: the largest absolute Ritz value seen, a lower bound on :math:`\\|A\\|_2`.
        which: the part of the spectrum requested.
        layout: a light :class:`~curvlab.params.ParamSpec` of the operator's parameters (``None``
            for a dense matrix or a matvec callable), used by :meth:`as_params`.
    """

    n_matvecs: int
    converged: bool
    status: Status
    message: str
    residual_norms: Tensor
    n_restarts: int
    tol: float
    anorm: float
    which: str
    layout: Any

    def __new__(cls, eigenvalues: Tensor, eigenvectors: Tensor, **info: Any) -> EigshResult:
        self = super().__new__(cls, (eigenvalues, eigenvectors))
        info.setdefault("layout", None)
        self.__dict__.update(info)
        return self

    @property
    def eigenvalues(self) -> Tensor:
        return self[0]

    @property
    def eigenvectors(self) -> Tensor:
        return self[1]

    def as_params(self, i: int | None = None) -> Any:
        """Eigenvector ``i`` (all of them, as a list, for ``i=None``) in the structure of the parameters.

        For an operator over an ``nn.Module`` (:func:`~curvlab.linops.hessian`,
        :func:`~curvlab.linops.ggn`, ...) this is a dict ``{parameter name: tensor}`` with the
        parameters' shapes, the form :func:`torch.func.functional_call` and ``state_dict``
        use; for parameters handed in as a dict / tuple / list / tensor, that structure. A
        restricted operator (:func:`~curvlab.linops.restrict`, :func:`~curvlab.linops.blocks`)
        gives its own parameters only. The tensors are copies (they do not alias
        :attr:`eigenvectors`).

        Raises:
            ValueError: the operator was not built over parameters (a dense matrix or a matvec
                callable), or ``i`` out of range.

        Example:
            >>> H = cl.linops.hessian(loss, model, data=(X, y))  # doctest: +SKIP
            >>> top = eigsh(H, k=1).as_params(0)  # doctest: +SKIP
            >>> top["fc1.weight"].shape  # doctest: +SKIP
            torch.Size([64, 64])
        """
        return unflatten_columns(self.layout, self[1], i, "EigshResult.as_params")

    def __getnewargs_ex__(self) -> tuple[tuple[Tensor, Tensor], dict[str, Any]]:
        return (self[0], self[1]), dict(self.__dict__)

    def __repr__(self) -> str:
        return (
            f"EigshResult(eigenvalues={self[0]}, which={self.which!r}, status={self.status.value!r}, "
            f"converged={self.converged}, "
            f"n_matvecs={self.n_matvecs}, n_restarts={self.n_restarts}, "
            f"max_residual={float(self.residual_norms.max()) if self.residual_norms.numel() else 0.0:.3g})"
        )


def _select(theta: Tensor, which: str, count: int) -> Tensor:
    """Indices of the ``count`` Ritz values (``theta`` ascending) wanted by ``which``, best first."""
    m = theta.shape[0]
    dev = theta.device
    if which == "LA":
        return torch.arange(m - 1, m - 1 - count, -1, device=dev)
    if which == "SA":
        return torch.arange(count, device=dev)
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True, stable=True)[:count]
    top = count - count // 2  # scipy's convention: the odd one out comes from the top
    return torch.cat([torch.arange(m - 1, m - 1 - top, -1, device=dev), torch.arange(count // 2, device=dev)])


def _random_orthogonal(V: Tensor, generator: torch.Generator | None) -> Tensor:
    """A unit vector orthogonal to the columns of ``V`` (``V`` may have zero columns)."""
    n = V.shape[0]
    for _ in range(5):
        r = torch.randn(n, generator=generator, dtype=V.dtype, device=V.device)
        for _ in range(2):
            if V.shape[1]:
                r = r - V @ (V.T @ r)
        nr = torch.linalg.vector_norm(r)
        if float(nr) > 1e-3:  # r had a component outside span(V) (norm of a Gaussian ~ sqrt(n) before)
            return r / nr
    raise RuntimeError("could not draw a vector orthogonal to the Lanczos basis (the basis spans the space)")


def eigsh(
    op: Any,
    k: int = 6,
    *,
    which: str = "LA",
    tol: float | None = None,
    maxiter: int | None = None,
    ncv: int | None = None,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    check_multiplicity: bool = False,
    progress: bool = False,
    callback: Callback | None = None,
) -> EigshResult:
    r"""``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Works on any symmetric :class:`~curvlab.linops.LinearOperator` (Hessian, GGN,
    Fisher, their damped or restricted versions, sums, a dense symmetric tensor)
    and uses only products with it (Wu & Simon 2000; see the module docstring).

    A Ritz pair :math:`(\theta, x)` is accepted when its residual satisfies

    .. math::
        \|A x - \theta x\|_2 \le \mathrm{tol}\cdot \|A\|_2,

    with :math:`\|A\|_2` estimated by the largest absolute Ritz value seen. That
    bounds the eigenvalue error by :math:`\mathrm{tol}\,\|A\|_2`; for an eigenvalue
    separated by a gap :math:`\delta` from the rest the error is about
    :math:`(\mathrm{tol}\,\|A\|_2)^2/\delta` (Parlett, *The Symmetric Eigenvalue
    Problem*, Thm. 11.7.1).

    Defaults (chosen so that results can be trusted without tuning):

    * ``tol = eps^(2/3)`` of the operator's dtype (3.7e-11 in float64, 2.4e-5 in
      float32): ARPACK's own accuracy floor for Ritz values (``dsconv``).
    * ``ncv = min(n, max(3k, 40))``: twice scipy's (ARPACK's) ``max(2k + 1, 20)``
      for small ``k``. The ends of a trained network's curvature spectrum are often
      clustered (the bulk edge for ``"SA"``), and there a larger basis loses less at
      each restart: on the digits MLP of ``benchmarks/spectrum.py`` the smallest 5
      eigenvalues take 1609 products with ``ncv=20`` and 428 with ``ncv=40``. Easy
      cases (a few outliers) stop mid-cycle and do not pay for the larger basis; the
      memory is ``n * (ncv + 1)`` numbers.
    * ``maxiter = 1000`` restarts; ``status`` (and ``converged``) says whether the tolerance was met.

    Limits: a Krylov method separates eigenvalues in proportion to their gaps
    relative to the spectrum's width. Wanted eigenvalues inside a cluster far
    narrower than that — e.g. the smallest eigenvalues of a cross-entropy GGN or
    Hessian, an exact null space (softmax shift invariance) next to eigenvalues of
    :math:`10^{-7}\|A\|` — converge very slowly; ``converged=False`` then says so
    after ``maxiter`` restarts. Further copies of a repeated eigenvalue appear only
    through rounding and may be missed when the run converges early (as in ARPACK);
    ``check_multiplicity=True`` guards against that.

    Args:
        op: a symmetric ``(n, n)`` :class:`~curvlab.linops.LinearOperator` or a dense
            symmetric tensor.
        k: number of eigenpairs, ``1 <= k < n`` (use ``torch.linalg.eigh(op.to_dense())``
            for the whole spectrum of a small operator).
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"BE"``
            both ends (``k - k//2`` from the top, ``k//2`` from the bottom, as in scipy),
            ``"LM"`` largest magnitude.
        tol: relative residual tolerance (see above); ``0`` means machine precision.
        maxiter: maximum number of thick restarts (``0``: a single Lanczos cycle).
        ncv: Lanczos basis size, ``k < ncv <= n``. Larger bases need fewer products
            and more memory (``n * ncv`` entries).
        v0: start vector ``(n,)`` (default: Gaussian, drawn with ``generator``).
        generator: :class:`torch.Generator` on the operator's device, for reproducibility.
        seed: alternative to ``generator``: seed a fresh one.
        check_multiplicity: after convergence, run one more full Lanczos cycle from a fresh
            random direction orthogonal to the basis, keeping the converged pairs, and stop
            only when the wanted pairs converge again. A copy of a wanted eigenvalue that the
            first start vector did not contain then shows up (its direction is in the fresh
            vector with probability 1). Costs about ``ncv - k`` more products (default off, as
            in ARPACK).
        progress: show a tqdm bar of the products (on the main process of a data-parallel run).
        callback: ``callback(info) -> bool``, called at every convergence test with a dict:
            ``n_matvecs``, ``n_restarts``, ``eigenvalues`` (the current wanted Ritz values,
            descending), ``residual_norms`` and ``tol`` (the absolute residual they must reach).
            Returning ``True`` stops the run with ``status="callback"`` and the current pairs.

    Returns:
        An :class:`EigshResult`: unpacks as ``(eigenvalues, eigenvectors)`` with the
        eigenvalues sorted in descending order and eigenvectors as flat ``(n, k)`` columns;
        ``.as_params(i)`` gives eigenvector ``i`` in the structure of the parameters (a dict
        ``{name: tensor}`` for an ``nn.Module``); ``.status``, ``.n_matvecs``,
        ``.residual_norms``, ``.n_restarts`` report the outcome, cost and accuracy. A
        non-finite product gives ``status="nan"`` and NaN eigenpairs.

    Raises:
        ValueError: ``op`` not symmetric or not square, ``k`` not an int in ``[1, n)``,
            an unknown ``which``, ``ncv`` not in ``(k, n]``, negative ``tol``,
            ``v0`` of the wrong shape / dtype / device or zero, non-integer ``ncv`` / ``maxiter``.
        TypeError: ``op`` of an unsupported type, a non-bool ``progress``, a non-callable ``callback``.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> vals, vecs = eigsh(A, k=3, seed=0)
        >>> [round(float(v), 8) for v in vals]
        [100.0, 99.0, 98.0]
    """
    A = as_symmetric_operator(op, "eigsh")
    mon = Monitor(A, progress, callback, "eigsh")
    try:
        return _eigsh(A, k, which, tol, maxiter, ncv, v0, generator, seed, check_multiplicity, mon)
    finally:
        mon.close()


def _eigsh(
    A: Any,
    k: int,
    which: str,
    tol: float | None,
    maxiter: int | None,
    ncv: int | None,
    v0: Tensor | None,
    generator: torch.Generator | None,
    seed: int | None,
    check_multiplicity: bool,
    mon: Monitor,
) -> EigshResult:
    """:func:`eigsh` on a validated operator, reporting to ``mon`` (shared with :func:`summary`)."""
    n = A.shape[0]
    dtype, device = A.dtype, A.device
    k = check_int(k, "k", 1)
    if k >= n:
        raise ValueError(
            f"eigsh needs k < n = {n}, got k={k}; for all eigenvalues of a small operator use "
            "torch.linalg.eigh(op.to_dense())"
        )
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    m = min(n, max(3 * k, 40)) if ncv is None else check_int(ncv, "ncv", 1)
    if not k < m <= n:
        raise ValueError(f"ncv must satisfy k < ncv <= n, i.e. {k} < ncv <= {n}, got {m}")
    if tol is None:
        tol_f = default_tol(dtype)
    else:
        tol_f = float(tol)
        if not tol_f >= 0 or tol_f == float("inf"):
            raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    tol_f = max(tol_f, float(torch.finfo(dtype).eps))
    max_restarts = 1000 if maxiter is None else check_int(maxiter, "maxiter", 0)
    if not isinstance(check_multiplicity, bool):
        raise TypeError(f"check_multiplicity must be True or False, got {check_multiplicity!r}")
    gen = make_generator(generator, seed, device, distributed=A.distributed)

    if v0 is None:
        v0 = torch.randn(n, generator=gen, dtype=dtype, device=device)
    elif not isinstance(v0, Tensor) or v0.shape != (n,):
        raise ValueError(f"v0 must be a tensor of shape ({n},), got {getattr(v0, 'shape', type(v0).__name__)}")
    elif v0.dtype != dtype or v0.device != device:
        raise ValueError(f"v0 must have op's dtype {dtype} and device {device}, got {v0.dtype} on {v0.device}")
    v0s = v0 / pow2_scale(v0)  # a norm that neither underflows nor overflows
    v0n = torch.linalg.vector_norm(v0s)
    if not bool(torch.isfinite(v0n)) or float(v0n) == 0.0:
        raise ValueError("v0 must be a nonzero finite vector")
    layout = param_layout(A)

    small = torch.promote_types(dtype, torch.float32)  # eigh of the small projected matrix
    V = torch.zeros(n, m + 1, dtype=dtype, device=device)
    H = torch.zeros(m, m, dtype=dtype, device=device)
    V[:, 0] = v0s / v0n
    eps = float(torch.finfo(dtype).eps)
    brk_tol = max(n, 10) * eps
    anorm = 0.0
    start = A.n_matvecs
    scale: float | None = None  # Lanczos runs on A / scale (a power of two: exact)
    p = 0  # vectors kept by the last restart
    n_restarts = 0
    beta_last = torch.zeros((), dtype=dtype, device=device)
    check_every = max(1, m // 16)  # test convergence every few steps, so a run stops mid-cycle
    verifying = False  # in the multiplicity check's extra cycle (tested only once the basis is full)
    verified = False  # that cycle has been started (it runs once)
    status: Status | None = None
    message = ""
    theta = S = res = wanted = None
    size = 0
    while status is None:
        converged = False
        for j in range(p, m):
            w = A.matvec(V[:, j])
            if scale is None:
                scale = pow2_scale(w)
            w = w / scale
            Vj = V[:, : j + 1]
            h = Vj.T @ w
            w = w - Vj @ h
            h2 = Vj.T @ w  # second Gram-Schmidt pass (CGS2)
            w = w - Vj @ h2
            h = h + h2
            H[: j + 1, j] = h
            H[j, : j + 1] = h
            beta = torch.linalg.vector_norm(w)
            # one host sync per step (the breakdown test): beta and ||A v_j|| = sqrt(beta^2 + ||h||^2)
            beta_f, avj = torch.stack([beta, torch.sqrt(beta * beta + h @ h)]).tolist()
            if not (math.isfinite(beta_f) and math.isfinite(avj)):
                status = Status.NAN
                message = f"product {A.n_matvecs - start} with the operator was not finite (nan or inf)"
                break
            anorm = max(anorm, avj)
            if beta_f <= brk_tol * anorm:
                # invariant subspace: its Ritz pairs are exact; go on with a fresh direction
                beta_last = torch.zeros((), dtype=dtype, device=device)
                V[:, j + 1] = 0.0 if j + 1 == m else _random_orthogonal(V[:, : j + 1], gen)
            else:
                V[:, j + 1] = w / beta
                beta_last = beta
            size = j + 1
            mon.update(restarts=n_restarts)
            if size <= k or (size < m and ((size - p) % check_every or verifying)):
                continue
            Hs = H[:size, :size]
            theta, S = torch.linalg.eigh((0.5 * (Hs + Hs.T)).to(small))
            theta, S = theta.to(dtype), S.to(dtype)
            res = beta_last.abs() * S[size - 1, :].abs()  # ||A x - theta x|| of every Ritz pair
            anorm = max(anorm, float(theta.abs().max()))
            wanted = _select(theta, which, k)
            conv = res[wanted] <= tol_f * anorm
            if bool(conv.all()):
                converged = True
                break
            if mon.callback is not None and mon.stop(
                {
                    "n_restarts": n_restarts,
                    "eigenvalues": torch.sort(theta[wanted], descending=True).values * scale,
                    "residual_norms": res[wanted] * scale,
                    "tol": tol_f * anorm * scale,
                }
            ):
                status, message = Status.CALLBACK, "stopped by the callback"
                break
        if status is not None:
            break
        if converged and check_multiplicity and not verified:
            # keep the converged pairs, go on from a fresh direction orthogonal to them
            verifying = verified = True
            p = k
            keep = wanted
            V[:, :p] = V[:, :size] @ S[:, keep]
            V[:, p] = _random_orthogonal(V[:, :p], gen)
            H.zero_()
            H[:p, :p] = torch.diag(theta[keep])
            continue
        if converged:
            status = Status.CONVERGED
            message = f"every wanted Ritz pair has residual <= tol * ||A|| (tol={tol_f:.3g})"
            break
        if n_restarts >= max_restarts:
            status = Status.MAX_ITER
            message = f"reached maxiter={max_restarts} restarts before the wanted pairs converged"
            break
        verifying = False
        # thick restart: keep the wanted Ritz vectors and half of the spare slots (nearest on the wanted side)
        p = min(k + (m - k) // 2, m - 1)
        keep = _select(theta, which, p)
        V[:, :p] = V[:, :m] @ S[:, keep]
        V[:, p] = V[:, m]
        H.zero_()
        H[:p, :p] = torch.diag(theta[keep])
        n_restarts += 1

    assert scale is not None
    info = dict(
        n_matvecs=A.n_matvecs - start,
        converged=status is Status.CONVERGED,
        status=status,
        message=message,
        n_restarts=n_restarts,
        tol=tol_f,
        anorm=anorm * scale,
        which=which,
        layout=layout,
    )
    if status is Status.NAN or theta is None:
        # no Ritz pair to report: a non-finite product, or a callback stop before the first test
        nan = torch.full((k,), float("nan"), dtype=dtype, device=device)
        vecs = torch.full((n, k), float("nan"), dtype=dtype, device=device)
        if status is not Status.NAN:  # the callback stopped the first cycle: Ritz pairs of the basis so far
            return _partial(V, H, size, beta_last, which, k, scale, info) or EigshResult(
                nan, vecs, residual_norms=nan.clone(), **info
            )
        return EigshResult(nan, vecs, residual_norms=nan.clone(), **info)
    vals = theta[wanted] * scale
    vecs = V[:, :size] @ S[:, wanted]
    rn = res[wanted] * scale
    order = torch.argsort(vals, descending=True, stable=True)
    return EigshResult(vals[order], vecs[:, order], residual_norms=rn[order], **info)


def _partial(
    V: Tensor, H: Tensor, size: int, beta_last: Tensor, which: str, k: int, scale: float, info: dict[str, Any]
) -> EigshResult | None:
    """Ritz pairs of the first ``size`` basis vectors (``None`` when there are fewer than ``k``)."""
    if size < k:
        return None
    Hs = H[:size, :size]
    theta, S = torch.linalg.eigh((0.5 * (Hs + Hs.T)).to(torch.promote_types(H.dtype, torch.float32)))
    theta, S = theta.to(H.dtype), S.to(H.dtype)
    wanted = _select(theta, which, k)
    res = beta_last.abs() * S[size - 1, :].abs()
    vals = theta[wanted] * scale
    order = torch.argsort(vals, descending=True, stable=True)
    return EigshResult(
        vals[order], (V[:, :size] @ S[:, wanted])[:, order], residual_norms=(res[wanted] * scale)[order], **info
    )
