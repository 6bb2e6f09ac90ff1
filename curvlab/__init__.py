"""curvlab: second-order and bilevel optimization in PyTorch.

Matrix-free curvature operators (:mod:`curvlab.linops`), Krylov and randomized
linear algebra (:mod:`curvlab.linalg`), problems and the uniform ``solve`` loop,
and second-order solvers (:mod:`curvlab.solvers`).
"""

from . import linalg, linops, solvers
from ._result import History, Result
from .problems import ALL, LeastSquares, Minimize, Problem, SupervisedLoss
from .solvers import solve

__version__ = "0.1.0"
__all__ = [
    "linalg",
    "linops",
    "solvers",
    "Problem",
    "Minimize",
    "LeastSquares",
    "SupervisedLoss",
    "ALL",
    "Result",
    "History",
    "solve",
]
