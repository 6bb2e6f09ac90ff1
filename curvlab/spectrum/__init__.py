r"""Hessian (and GGN, Fisher, ...) spectrum analysis from matrix-vector products.

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
* :func:`landscape` — the loss along top eigenvectors or random / filter-normalised
  directions, 1-D and 2-D (Yao et al. 2020; Li et al. 2018), as a :class:`Landscape`.
* :func:`per_class`, :func:`per_sample`, :func:`with_data` — the operator over part of
  the data; :func:`batch_size_spectrum` — :math:`\lambda_{\max}` over random mini-batches
  of several sizes, with error bars; :func:`class_decomposition` — Papyan's class /
  cross-class / within-class split of the cross-entropy GGN (Papyan 2019, 2020).

Every routine takes ``progress=True`` (a tqdm bar, on the main process of a data-parallel
run) and the iterative ones a ``callback``; eigenvectors and diagonals come back in the
parameters' structure through ``.as_params()``.
"""

from .classes import ClassDecomposition, class_decomposition
from .density import Density, density
from .diag import DiagResult, diag
from .eigsh import EigshResult, eigsh
from .landscape import Landscape, filter_normalized, landscape
from .subsets import BatchSpectrum, batch_size_spectrum, per_class, per_sample, with_data
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
    "landscape",
    "Landscape",
    "filter_normalized",
    "per_class",
    "per_sample",
    "with_data",
    "batch_size_spectrum",
    "BatchSpectrum",
    "class_decomposition",
    "ClassDecomposition",
]
