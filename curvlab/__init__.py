"""curvlab: second-order and bilevel optimization in PyTorch."""

from . import linalg, linops

__version__ = "0.1.0"
__all__ = ["linalg", "linops"]
