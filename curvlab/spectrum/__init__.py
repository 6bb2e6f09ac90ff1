"""Hessian (and GGN, Fisher, ...) spectrum analysis from matrix-vector products.

Works on any symmetric :class:`~curvlab.linops.LinearOperator` — a Hessian, GGN or
Fisher, damped, restricted to some layers (:func:`curvlab.linops.restrict`,
:func:`curvlab.linops.blocks`), or a dense symmetric tensor — in torch, on the
operator's device and dtype.

* :func:`eigsh` — extreme eigenpairs by thick-restart Lanczos with full
  reorthogonalisation (Wu & Simon 2000); reports products used and convergence.
* :func:`trace` — Hutch++ (Meyer et al. 2021), Hutchinson (1989) or XTrace
  (Epperly, Tropp & Webber 2024), with standard errors.
* :func:`diag` — XDiag (Epperly, Tropp & Webber 2024) or Hutchinson (Bekas et al. 2007).
* :func:`density` — spectral density by stochastic Lanczos quadrature (Lin, Saad &
  Yang 2016; Ghorbani, Krishnan & Xiao 2019), returned as a :class:`Density` that
  plots itself.
* :func:`summary` — top and smallest eigenvalues, trace, negative mass, outliers
  versus bulk (Sagun et al. 2017; Papyan 2020).
"""

from .density import Density, density
from .diag import DiagResult, diag
from .eigsh import EigshResult, eigsh
from .summary import SpectrumSummary, split_outliers, summary
from .trace import TraceResult, trace

__all__ = [
    "eigsh",
    "EigshResult",
    "trace",
    "TraceResult",
    "diag",
    "DiagResult",
    "density",
    "Density",
    "summary",
    "SpectrumSummary",
    "split_outliers",
]
