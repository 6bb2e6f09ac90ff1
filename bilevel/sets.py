r"""Simple closed convex sets with a Euclidean projection, for constrained variables.

A set acts on the *flat* vector of a variable (see :class:`curvlab.params.ParamSpec`):
:meth:`Set.project` takes a 1-D tensor and returns its projection
:math:`\Pi_C(v) = \arg\min_{u \in C} \|u - v\|`, and :meth:`Set.contains` says whether a
point lies in the set. Bounds given in the variable's own structure (e.g. a dict of
tensors) are flattened by :class:`~bilevel.BilevelProblem` when the set is attached.

Example:
    >>> import torch
    >>> Box(0.0, 1.0).project(torch.tensor([-1.0, 0.5, 2.0]))
    tensor([0.0000, 0.5000, 1.0000])
    >>> Ball(1.0).project(torch.tensor([3.0, 4.0]))
    tensor([0.6000, 0.8000])
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["Set", "Box", "Ball", "NonNegative", "Simplex"]


def _check_vector(v: Any) -> Tensor:
    if not isinstance(v, Tensor) or v.ndim != 1:
        raise ValueError(f"sets project flat 1-D tensors, got {getattr(v, 'shape', type(v).__name__)}")
    return v


class Set:
    """Base class: a closed convex set with a Euclidean projection on flat vectors."""

    def project(self, v: Tensor) -> Tensor:
        """The Euclidean projection of the flat vector ``v`` onto the set."""
        raise NotImplementedError

    def contains(self, v: Tensor, atol: float = 1e-8) -> bool:
        """Whether ``v`` lies in the set (up to ``atol``): ``‖Π(v) − v‖∞ <= atol``."""
        v = _check_vector(v)
        return bool((self.project(v) - v).abs().max() <= atol) if v.numel() else True

    def _bind(self, spec: Any, name: str) -> Set:
        """A copy whose tensor data are flat vectors of the variable described by ``spec``."""
        return self

    @staticmethod
    def _flat_bound(b: Any, spec: Any, name: str) -> Any:
        if isinstance(b, (int, float)):
            return float(b)
        if isinstance(b, Tensor) and b.numel() == 1:
            return b.reshape(()).to(device=spec.device, dtype=spec.dtype)
        if isinstance(b, Tensor) and b.shape == (spec.size,):
            return b.to(device=spec.device, dtype=spec.dtype)
        try:
            flat = spec.flatten(b)
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                f"{name}: a bound must be a number, a flat tensor of size {spec.size} or a structure shaped like "
                f"the variable; got {getattr(b, 'shape', type(b).__name__)}"
            ) from e
        if flat.shape != (spec.size,):
            raise ValueError(f"{name}: bound has {flat.numel()} entries, the variable has {spec.size}")
        return flat.to(device=spec.device, dtype=spec.dtype)


class Box(Set):
    r"""The box :math:`\{v : \text{lower} \le v \le \text{upper}\}`; projection by clamping.

    Args:
        lower, upper: numbers, flat tensors, or structures shaped like the variable;
            ``None`` or ``±inf`` for no bound on that side.

    Raises:
        ValueError: if ``lower > upper`` somewhere.
    """

    def __init__(self, lower: Any = -math.inf, upper: Any = math.inf) -> None:
        self.lower = -math.inf if lower is None else lower
        self.upper = math.inf if upper is None else upper
        lo, up = self.lower, self.upper
        if isinstance(lo, (int, float, Tensor)) and isinstance(up, (int, float, Tensor)):
            try:
                bad = bool(torch.as_tensor(lo, dtype=torch.float64).gt(torch.as_tensor(up, dtype=torch.float64)).any())
            except RuntimeError:
                bad = False
            if bad:
                raise ValueError(f"Box: lower must be <= upper, got lower={lo!r}, upper={up!r}")

    def project(self, v: Tensor) -> Tensor:
        v = _check_vector(v)
        lo = self.lower if isinstance(self.lower, float) else torch.as_tensor(self.lower, dtype=v.dtype)
        up = self.upper if isinstance(self.upper, float) else torch.as_tensor(self.upper, dtype=v.dtype)
        if isinstance(lo, float) and isinstance(up, float):
            return v.clamp(min=None if lo == -math.inf else lo, max=None if up == math.inf else up)
        lo_t = torch.as_tensor(lo, dtype=v.dtype, device=v.device).expand_as(v)
        up_t = torch.as_tensor(up, dtype=v.dtype, device=v.device).expand_as(v)
        return torch.minimum(torch.maximum(v, lo_t), up_t)

    def _bind(self, spec: Any, name: str) -> Box:
        return Box(self._flat_bound(self.lower, spec, name), self._flat_bound(self.upper, spec, name))

    def __repr__(self) -> str:
        return f"Box(lower={self.lower!r}, upper={self.upper!r})"


class NonNegative(Box):
    r"""The nonnegative orthant :math:`\{v : v \ge 0\}`."""

    def __init__(self) -> None:
        super().__init__(0.0, math.inf)

    def _bind(self, spec: Any, name: str) -> NonNegative:
        return self

    def __repr__(self) -> str:
        return "NonNegative()"


class Ball(Set):
    r"""The Euclidean ball :math:`\{v : \|v - c\|_2 \le r\}` over the whole flat vector.

    Projection: :math:`c + (v - c)\min(1, r / \|v - c\|)`.

    Args:
        radius: ``r > 0``.
        center: ``c``: a number (every entry), a flat tensor or a structure shaped like the variable.
    """

    def __init__(self, radius: float, center: Any = 0.0) -> None:
        if not (isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0):
            raise ValueError(f"Ball: radius must be a finite number > 0, got {radius!r}")
        self.radius = float(radius)
        self.center = center

    def project(self, v: Tensor) -> Tensor:
        v = _check_vector(v)
        c = torch.as_tensor(self.center, dtype=v.dtype, device=v.device)
        d = v - c
        n = torch.linalg.vector_norm(d)
        scale = torch.clamp(self.radius / n.clamp_min(torch.finfo(v.dtype).tiny), max=1.0)
        return c + d * scale

    def _bind(self, spec: Any, name: str) -> Ball:
        return Ball(self.radius, self._flat_bound(self.center, spec, name))

    def __repr__(self) -> str:
        return f"Ball(radius={self.radius!r}, center={self.center!r})"


class Simplex(Set):
    r"""The probability simplex :math:`\{v : v \ge 0, \sum_i v_i = s\}` (``s = 1`` by default).

    Projection by sorting (Duchi et al. 2008, "Efficient Projections onto the
    :math:`\ell_1`-Ball", Figure 1), :math:`O(n \log n)`.
    """

    def __init__(self, total: float = 1.0) -> None:
        if not (isinstance(total, (int, float)) and total > 0):
            raise ValueError(f"Simplex: total must be a number > 0, got {total!r}")
        self.total = float(total)

    def project(self, v: Tensor) -> Tensor:
        v = _check_vector(v)
        u, _ = torch.sort(v, descending=True)
        css = torch.cumsum(u, 0) - self.total
        ind = torch.arange(1, v.numel() + 1, dtype=v.dtype, device=v.device)
        cond = u - css / ind > 0
        rho = int(torch.nonzero(cond).max())
        theta = css[rho] / (rho + 1)
        return torch.clamp(v - theta, min=0)

    def __repr__(self) -> str:
        return f"Simplex(total={self.total!r})"
