r"""Solvers on the uniform ``init`` / ``step`` / ``solve`` contract.

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

Stopping (every ``solve``): ``status`` is a :class:`curvlab.Status`; ``"converged"`` means a test held —
by default the gradient norm fell to ``rtol`` = ``sqrt(eps)`` of the dtype times its initial value
(scale-free; an explicit ``tol`` is an absolute gradient-norm tolerance), or the solver's own test
(GaussNewton: MINPACK's ``ftol/xtol/gtol``; a line search at the dtype's limit of precision); ``"nan"``
whenever a non-finite value stopped the run (``raise_on_nan=True`` raises instead). See
:meth:`Solver.solve`.

Glossary — one name for one thing, in every solver (and the names :mod:`bilevel`, :mod:`implicit` and
:mod:`curvlab.optim` use for the same things):

* ``lr`` — step size; with a line search the first trial / the cap :math:`t_{\max}`.
* ``damping`` — any :math:`\lambda I` added to a curvature matrix: Levenberg–Marquardt, M-FAC, ScaledGD(λ),
  saddle-free Newton's λ/γ, NewtonCG's :math:`H + \lambda I`, a ridge on an implicit linear solve.
  Old names: ``ridge``, ``shift`` (a shift :math:`-\sigma` is ``damping=σ``), ``damp`` (``optim.MFAC``).
* ``adaptive_damping`` — the damping follows a rule (:class:`RatioDamping`; ScaledGD: PrecGD's λ_t).
* ``damping_increase`` / ``damping_decrease`` / ``min_damping`` / ``rho_low`` / ``rho_high`` —
  :class:`RatioDamping`'s ``increase`` / ``decrease`` / ``floor`` / thresholds, by these names on a solver.
* ``line_search`` — Armijo backtracking (:class:`Armijo`) on / off.
* ``c1`` — Armijo sufficient-decrease constant. Old name: ``c`` (EGN).
* ``shrink`` — backtracking factor; ``grow`` — reset rule of the next first trial,
  :math:`\min(\text{grow}\cdot t, t_{\max})`; ``max_backtracks`` — trials per search (``Armijo.max_trials``).
* ``momentum`` — heavy-ball / EMA coefficient in [0, 1).
* ``k`` — rank, subspace size or number of singular directions.
* ``cg_tol`` / ``cg_maxiter`` — relative tolerance / iteration cap of a fixed inner CG solve.
* ``solve`` / ``solve_options`` — a pluggable inner linear solve (a :func:`curvlab.linalg.solve` method)
  and its options (``tol``, ``maxiter``, …) in one dict. Old name: ``solve_tol``.
* ``inner_lr`` / ``inner_steps`` — step size / iterations of an inner (lower-level) solver per outer
  step. Old names: ``lr_inner``, ``lr_y``; ``T``, ``n_inner_steps``.
* ``jacobian`` — how a dense Jacobian is taken (``"auto"``, ``"per_sample"``, ``"rows"``);
  ``chunk_size`` — products per vectorised pass (the memory bound).
* ``ftol`` / ``xtol`` / ``gtol`` — MINPACK's relative reduction / step / cosine tolerances (GaussNewton).
* ``seed`` — seed of a solver's random choices (a resumed run is bit-identical).

``solve()`` arguments: ``max_iter``, ``tol`` (absolute gradient norm), ``rtol`` (relative to the initial
gradient norm), ``time_limit`` (seconds), ``callback``, ``progress``, ``state`` (resume), ``raise_on_nan``.
Sven's ``rtol`` / ``atol`` are the singular-value cuts of its pseudo-inverse (``torch.linalg.pinv``'s
names), not stopping tolerances. Old names keep working for one release with a ``DeprecationWarning``
(each solver's ``aliases``; the ``options`` decorator maps them).
"""

from ._base import Solver, check_run_args, options, run_loop, solve
from .adam import Adam
from .damping import RatioDamping, gain_ratio, interpolated_increase
from .egn import EGN
from .gauss_newton import GaussNewton
from .gradient_descent import GradientDescent
from .lbfgs import lbfgs_direction, lbfgs_update
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
    "lbfgs_direction",
    "lbfgs_update",
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
