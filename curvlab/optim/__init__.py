"""``torch.optim.Optimizer`` adapters of curvlab's network-training solvers.

For users who keep their own training loop: each optimizer takes a closure that
evaluates the model on the current mini-batch (without calling ``backward``) and
returns what the method needs, and round-trips its state through ``state_dict`` /
``load_state_dict``.

* :class:`EGN` — ``closure() -> (per_sample_losses, outputs)``.
* :class:`Sven` — ``closure() -> per_sample_losses``.
* :class:`SaddleFreeNewton` — ``closure() -> loss``.
* :class:`MFAC` — plain ``torch.optim`` convention (uses ``p.grad``; optional closure calls ``backward``).
* :class:`ClosureOptimizer` — the shared base (flat parameter view, state handling).

Each adapter's options are its solver's dataclass fields — same names, order and defaults,
generated rather than copied (:func:`~curvlab.optim._base.adapter_options`), so
``curvlab.optim.EGN(params, **fields)`` accepts exactly what ``curvlab.solvers.EGN`` does;
``MFAC(damp=)`` is a deprecated alias of ``damping=``. Trial points of a step (line searches,
damping searches) replay the random-number state of the step's first closure call (the same
dropout masks); pass ``module=model`` to keep BatchNorm statistics out of the trial calls too
(see :mod:`curvlab.optim._base` for what can and cannot be guaranteed without it).

Data-parallel (:mod:`curvlab.distributed`): every adapter takes ``distributed`` (default
``None``: whether a process group of several ranks is active when it is created). Then each
rank's closure sees its part of the global mini-batch and every rank takes the same step —
M-FAC and saddle-free Newton average gradients, Hessian-vector products and losses over the
ranks like DDP; EGN and Sven all-gather their per-sample rows, which gives exactly the step of
one process on the union of the batches. Start from equal parameters on every rank.
"""

from ._base import ClosureOptimizer
from .egn import EGN
from .mfac import MFAC
from .saddle_free_newton import SaddleFreeNewton
from .sven import Sven

__all__ = ["ClosureOptimizer", "EGN", "Sven", "MFAC", "SaddleFreeNewton"]
