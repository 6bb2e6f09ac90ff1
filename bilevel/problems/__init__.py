"""Bilevel problems with known answers or real data, for tests, examples and benchmarks.

* :func:`quadratic` — quadratic bilevel problem with closed-form solution and hypergradient
  (deterministic, or stochastic with ``n_batches``).
* :func:`logreg` — L2-regularised logistic regression hyperparameter selection (breast cancer, digits,
  an ijcnn-like ``make_classification`` set, or your own arrays).
* :func:`weight_decay` — per-layer weight decay of an MLP (``nn.Module`` inner variable, float32) on digits.
* :func:`hyper_cleaning` — data hyper-cleaning with per-example weights (digits, Fashion-MNIST).
* :func:`lvhba_toy` — LV-HBA's toy problem with a coupled lower-level constraint and known solution.
* :func:`constrained_svm` — linear SVM hyperparameters with margin constraints in the lower level.
"""

from ._constrained import ConstrainedSVM, LVHBAToy, constrained_svm, lvhba_toy
from ._hyper_cleaning import HyperCleaning, hyper_cleaning
from ._logreg import LogRegHyperparameter, logreg
from ._quadratic import QuadraticBilevel, quadratic
from ._weight_decay import WeightDecayMLP, weight_decay

__all__ = [
    "QuadraticBilevel",
    "quadratic",
    "LogRegHyperparameter",
    "logreg",
    "WeightDecayMLP",
    "weight_decay",
    "HyperCleaning",
    "hyper_cleaning",
    "LVHBAToy",
    "lvhba_toy",
    "ConstrainedSVM",
    "constrained_svm",
]
