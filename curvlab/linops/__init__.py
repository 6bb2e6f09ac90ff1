"""Matrix-free linear operators: Hessian, GGN, empirical Fisher, Jacobian, Gram.

Every operator is a :class:`LinearOperator` acting on flat parameter vectors;
``op.spec.unflatten(v)`` turns such a vector back into the parameters' structure.

User functions are evaluated under a :class:`curvlab.params.ModuleState` (the module's buffers
as a snapshot that is never written, dropout masks fixed per batch, attention on the math kernel);
operators whose products re-evaluate the function check that it stays the same
(:class:`NondeterministicError`). :func:`batched_vjp` is the package's one vector-Jacobian helper.
"""

from ._autodiff import NondeterministicError, batched_vjp
from ._base import DenseOperator, IdentityOperator, LinearOperator, MatvecOperator, aslinearoperator
from .fisher import FisherOperator, fisher
from .ggn import GGNOperator, ggn
from .hessian import HessianOperator, hessian
from .jacobian import GramOperator, JacobianOperator, gram, jacobian
from .mfac import MFACInverse, MFACStatic, obs_prune
from .restrict import RestrictedOperator, blocks, restrict

__all__ = [
    "LinearOperator",
    "MatvecOperator",
    "DenseOperator",
    "IdentityOperator",
    "aslinearoperator",
    "hessian",
    "HessianOperator",
    "ggn",
    "GGNOperator",
    "fisher",
    "FisherOperator",
    "jacobian",
    "JacobianOperator",
    "gram",
    "GramOperator",
    "restrict",
    "blocks",
    "RestrictedOperator",
    "MFACInverse",
    "MFACStatic",
    "obs_prune",
    "NondeterministicError",
    "batched_vjp",
]
