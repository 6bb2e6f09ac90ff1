"""Bilevel problems and solvers.

:math:`\\min_x f(x, y^*(x))` with :math:`y^*(x) = \\arg\\min_y g(x, y)` (optionally
with lower-level constraints :math:`c(x, y) \\le 0` and simple sets for ``x``, ``y``).

* :class:`BilevelProblem` — the problem: ``outer(x, y, batch)``, ``inner(x, y, batch)``, starting points, data.
* Solvers on one ``init`` / ``step`` / ``solve`` contract (switch by changing one line):
  :class:`IFT`, :class:`AID`, :class:`ITD` (and F2SA, BO-REP, LV-HBA).
* :func:`solve_inner` — the one lower-level solve (Newton-CG / projected gradient, reachable tolerance);
  :func:`inner_step_size` — ``1/L`` by an HVP power iteration; :class:`InnerSolveWarning`.
* :mod:`bilevel.sets` — :class:`Box`, :class:`Ball`, :class:`NonNegative`, :class:`Simplex`.
* :mod:`bilevel.problems` — shipped problems (quadratic, logistic regression, hyper-cleaning, ...).
"""

from . import problems, sets
from ._base import BilevelResult, BilevelSolver
from ._inner import (
    InnerResult,
    InnerSolveError,
    InnerSolveWarning,
    default_inner_rtol,
    inner_lipschitz,
    inner_step_size,
    solve_inner,
)
from ._problem import ALL, BilevelProblem
from .aid import AID
from .ift import IFT
from .itd import ITD
from .sets import Ball, Box, NonNegative, Set, Simplex

__all__ = [
    "ALL",
    "BilevelProblem",
    "BilevelResult",
    "BilevelSolver",
    "InnerResult",
    "InnerSolveWarning",
    "InnerSolveError",
    "default_inner_rtol",
    "solve_inner",
    "inner_step_size",
    "inner_lipschitz",
    "Set",
    "Box",
    "Ball",
    "NonNegative",
    "Simplex",
    "problems",
    "sets",
    "IFT",
    "AID",
    "ITD",
    "F2SA",
    "BOREP",
    "LVHBA",
]

from ._composite import Composite  # noqa: E402
from ._hypergradient import Hypergradient, implicit_hypergradient, unrolled_hypergradient  # noqa: E402
from .borep import BOREP  # noqa: E402
from .f2sa import F2SA  # noqa: E402
from .lvhba import LVHBA  # noqa: E402

__all__ += ["Composite", "Hypergradient", "implicit_hypergradient", "unrolled_hypergradient"]
