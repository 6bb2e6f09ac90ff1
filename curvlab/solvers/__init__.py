"""Solvers on the uniform ``init`` / ``step`` / ``solve`` contract.

Every solver is a dataclass of hyperparameters (with the paper's defaults);
``solver.solve(problem, max_iter=..., tol=...)`` or ``curvlab.solve(problem, solver)``
runs it and returns a :class:`curvlab.Result`.
"""

from ._base import Solver, check_run_args, options, run_loop, solve
from ._line_search import LineSearchResult, armijo
from .adam import Adam
from .egn import EGN
from .gauss_newton import GaussNewton
from .gradient_descent import GradientDescent
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
    "LineSearchResult",
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
