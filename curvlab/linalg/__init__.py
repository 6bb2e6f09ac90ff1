"""Krylov and randomized linear algebra in torch, on the operator's device.

Every routine takes ``A`` as a :class:`~curvlab.linops.LinearOperator`, a dense
2-D tensor, or a plain matvec callable, and computes in ``A``'s dtype on ``A``'s
device, with block products (``A.matmat``) where it can.

Linear solvers (all return a :class:`KrylovResult`, whose ``status`` is a
:class:`~curvlab.Status`):

* :func:`solve` — the one linear-solve registry, ``solve(A, b, method=...)`` with
  ``"auto"`` (dense factorisation for small systems, else CG / MINRES / GMRES by
  symmetry), ``"cg"``, ``"minres"``, ``"gmres"``, ``"normal_cg"``, ``"neumann"``
  (Lorraine et al. 2020), ``"dense"`` or a callable; one default tolerance,
  :func:`default_tol` (``ε^(2/3)`` of the dtype), one operator check.
* :func:`cg` — preconditioned conjugate gradients for symmetric positive
  definite systems, several right-hand sides at once, with Steihaug's
  negative-curvature exit (Hestenes & Stiefel 1952; Nocedal & Wright Alg. 5.3, 7.2).
* :func:`minres` — symmetric indefinite or singular systems, with a shift
  (Paige & Saunders 1975).
* :func:`gmres` — restarted GMRES for general square systems (Saad & Schultz 1986).

Spectral building blocks:

* :func:`lanczos` — symmetric Lanczos with full reorthogonalisation; returns the
  tridiagonal :math:`T` and the basis :math:`Q` (:class:`LanczosResult`).
* :func:`randomized_range_finder`, :func:`randomized_svd`, :func:`randomized_eigh`
  (Halko, Martinsson & Tropp 2011) and :func:`nystrom` (Tropp et al. 2017).
"""

from ._result import KrylovResult, ToleranceWarning, check_operator, default_tol, min_tol
from .cg import cg
from .gmres import gmres
from .lanczos import LanczosResult, lanczos
from .minres import minres
from .randomized import nystrom, randomized_eigh, randomized_range_finder, randomized_svd
from .solve import METHODS, solve

__all__ = [
    "KrylovResult",
    "LanczosResult",
    "METHODS",
    "ToleranceWarning",
    "cg",
    "check_operator",
    "default_tol",
    "gmres",
    "lanczos",
    "min_tol",
    "minres",
    "nystrom",
    "randomized_eigh",
    "randomized_range_finder",
    "randomized_svd",
    "solve",
]
