"""Solvers on the uniform ``init`` / ``step`` / ``solve`` contract.

Every solver is a dataclass of hyperparameters (with the paper's defaults);
``solver.solve(problem, max_iter=..., tol=...)`` or ``curvlab.solve(problem, solver)``
runs it and returns a :class:`curvlab.Result`.

Shared components (one of each, used by every solver here and by :mod:`bilevel`):

* :class:`Armijo` / :func:`armijo` → :class:`LineSearchResult` — the Armijo backtracking line
  search (non-finite trials shrink the step, ``status`` ``"converged"`` / ``"line_search_failed"`` /
  ``"nan"``, a reset rule for the next first trial, and a ``precision_limit`` flag for a failure
  caused by rounding); see :mod:`curvlab.solvers.line_search`.
* :class:`RatioDamping` (+ :func:`gain_ratio`, :func:`interpolated_increase`) — the
  Levenberg–Marquardt / trust-region ratio rule for a damping or a trust radius, with the
  papers' presets (Moré 1978, EGN 2024, the EGN authors' trust-region factors); see
  :mod:`curvlab.solvers.damping`.
* :func:`run_loop` / :func:`check_run_args` — the one iteration loop and its argument checks.
"""

from ._base import Solver, check_run_args, options, run_loop, solve
from .adam import Adam
from .damping import RatioDamping, gain_ratio, interpolated_increase
from .egn import EGN
from .gauss_newton import GaussNewton
from .gradient_descent import GradientDescent
from .line_search import Armijo, LineSearchResult, armijo
from .mfac import MFAC
from .newton_cg import NewtonCG
from .saddle_free_newton import SaddleFreeNewton
from .scaled_gd import ScaledGD
from .sven import Sven

__all__ = [
    "Solver",
    "options",
    "run_loop",
    "check_run_args",
    "solve",
    "armijo",
    "Armijo",
    "LineSearchResult",
    "RatioDamping",
    "gain_ratio",
    "interpolated_increase",
    "GradientDescent",
    "Adam",
    "NewtonCG",
    "GaussNewton",
    "EGN",
    "Sven",
    "ScaledGD",
    "SaddleFreeNewton",
    "MFAC",
]
