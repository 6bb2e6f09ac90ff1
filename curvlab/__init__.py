"""curvlab: second-order and bilevel optimization in PyTorch.

Matrix-free curvature operators (:mod:`curvlab.linops`), Krylov and randomized
linear algebra (:mod:`curvlab.linalg`), problems and the uniform ``solve`` loop,
second-order solvers (:mod:`curvlab.solvers`), their ``torch.optim``
adapters (:mod:`curvlab.optim`) and Hessian spectrum analysis
(:mod:`curvlab.spectrum`). Everything runs data-parallel on ``torch.distributed``
when a process group is initialised (:mod:`curvlab.distributed`).
"""

from . import checks, data, distributed, linalg, linops, optim, params, solvers, spectrum
from ._result import History, Result
from .problems import ALL, LeastSquares, Minimize, Problem, SupervisedLoss
from .solvers import solve
from .status import Status

__version__ = "0.1.0"
__all__ = [
    "checks",
    "data",
    "params",
    "Status",
    "distributed",
    "linalg",
    "linops",
    "optim",
    "solvers",
    "spectrum",
    "Problem",
    "Minimize",
    "LeastSquares",
    "SupervisedLoss",
    "ALL",
    "Result",
    "History",
    "solve",
]
