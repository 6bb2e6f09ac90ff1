"""Moré, Garbow & Hillstrom (1981) test problems for nonlinear least squares, in torch.

J. J. Moré, B. S. Garbow, K. E. Hillstrom, "Testing unconstrained optimization software",
ACM TOMS 7(1), 17-41 (1981). Each problem gives the residual vector ``f(x)`` (``m``
entries), the standard starting point and, where the paper states it, the minimum of
``sum f_i^2`` and a minimizer. Problem numbers follow the paper.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MGHProblem", "PROBLEMS", "get"]


@dataclass
class MGHProblem:
    """One test problem: residuals ``f(x)``, start ``x0``, optional known minimum ``fmin`` of ``Σ f_i²``."""

    number: int
    name: str
    f: Callable[[Tensor], Tensor]
    x0: list[float]
    m: int
    fmin: float | None = None
    xmin: list[float] | None = None

    def start(self, dtype: torch.dtype = torch.float64) -> Tensor:
        return torch.tensor(self.x0, dtype=dtype)


def _t(v: list[float], like: Tensor) -> Tensor:
    return torch.tensor(v, dtype=like.dtype, device=like.device)


def rosenbrock(x: Tensor) -> Tensor:
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def freudenstein_roth(x: Tensor) -> Tensor:
    return torch.stack([-13 + x[0] + ((5 - x[1]) * x[1] - 2) * x[1], -29 + x[0] + ((x[1] + 1) * x[1] - 14) * x[1]])


def powell_badly_scaled(x: Tensor) -> Tensor:
    return torch.stack([1e4 * x[0] * x[1] - 1, torch.exp(-x[0]) + torch.exp(-x[1]) - 1.0001])


def brown_badly_scaled(x: Tensor) -> Tensor:
    return torch.stack([x[0] - 1e6, x[1] - 2e-6, x[0] * x[1] - 2])


def beale(x: Tensor) -> Tensor:
    y = _t([1.5, 2.25, 2.625], x)
    i = torch.arange(1, 4, dtype=x.dtype)
    return y - x[0] * (1 - x[1] ** i)


def jennrich_sampson(x: Tensor) -> Tensor:
    i = torch.arange(1, 11, dtype=x.dtype)
    return 2 + 2 * i - (torch.exp(i * x[0]) + torch.exp(i * x[1]))


def helical_valley(x: Tensor) -> Tensor:
    at = torch.atan(x[1] / x[0]) / (2 * math.pi)
    theta = torch.where(x[0] > 0, at, at + 0.5)
    return torch.stack([10 * (x[2] - 10 * theta), 10 * (torch.sqrt(x[0] ** 2 + x[1] ** 2) - 1), x[2]])


_BARD_Y = [0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96, 1.34, 2.10, 4.39]


def bard(x: Tensor) -> Tensor:
    u = torch.arange(1, 16, dtype=x.dtype)
    v = 16 - u
    w = torch.minimum(u, v)
    return _t(_BARD_Y, x) - (x[0] + u / (v * x[1] + w * x[2]))


_GAUSS_Y = [
    0.0009,
    0.0044,
    0.0175,
    0.0540,
    0.1295,
    0.2420,
    0.3521,
    0.3989,
    0.3521,
    0.2420,
    0.1295,
    0.0540,
    0.0175,
    0.0044,
    0.0009,
]


def gaussian(x: Tensor) -> Tensor:
    t = (8 - torch.arange(1, 16, dtype=x.dtype)) / 2
    return x[0] * torch.exp(-x[1] * (t - x[2]) ** 2 / 2) - _t(_GAUSS_Y, x)


_MEYER_Y = [34780, 28610, 23650, 19630, 16370, 13720, 11540, 9744, 8261, 7030, 6005, 5147, 4427, 3820, 3307, 2872]


def meyer(x: Tensor) -> Tensor:
    t = 45 + 5 * torch.arange(1, 17, dtype=x.dtype)
    return x[0] * torch.exp(x[1] / (t + x[2])) - _t([float(v) for v in _MEYER_Y], x)


def box3d(x: Tensor) -> Tensor:
    t = 0.1 * torch.arange(1, 11, dtype=x.dtype)
    return torch.exp(-t * x[0]) - torch.exp(-t * x[1]) - x[2] * (torch.exp(-t) - torch.exp(-10 * t))


def powell_singular(x: Tensor) -> Tensor:
    return torch.stack(
        [x[0] + 10 * x[1], math.sqrt(5) * (x[2] - x[3]), (x[1] - 2 * x[2]) ** 2, math.sqrt(10) * (x[0] - x[3]) ** 2]
    )


def wood(x: Tensor) -> Tensor:
    return torch.stack(
        [
            10 * (x[1] - x[0] ** 2),
            1 - x[0],
            math.sqrt(90) * (x[3] - x[2] ** 2),
            1 - x[2],
            math.sqrt(10) * (x[1] + x[3] - 2),
            (x[1] - x[3]) / math.sqrt(10),
        ]
    )


_KO_Y = [0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235, 0.0246]
_KO_U = [4.0, 2.0, 1.0, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625]


def kowalik_osborne(x: Tensor) -> Tensor:
    u = _t(_KO_U, x)
    return _t(_KO_Y, x) - x[0] * (u**2 + u * x[1]) / (u**2 + u * x[2] + x[3])


def brown_dennis(x: Tensor) -> Tensor:
    t = torch.arange(1, 21, dtype=x.dtype) / 5
    return (x[0] + t * x[1] - torch.exp(t)) ** 2 + (x[2] + x[3] * torch.sin(t) - torch.cos(t)) ** 2


_OSB1_Y = [
    0.844,
    0.908,
    0.932,
    0.936,
    0.925,
    0.908,
    0.881,
    0.850,
    0.818,
    0.784,
    0.751,
    0.718,
    0.685,
    0.658,
    0.628,
    0.603,
    0.580,
    0.558,
    0.538,
    0.522,
    0.506,
    0.490,
    0.478,
    0.467,
    0.457,
    0.448,
    0.438,
    0.431,
    0.424,
    0.420,
    0.414,
    0.411,
    0.406,
]


def osborne1(x: Tensor) -> Tensor:
    t = 10 * torch.arange(0, 33, dtype=x.dtype)
    return _t(_OSB1_Y, x) - (x[0] + x[1] * torch.exp(-t * x[3]) + x[2] * torch.exp(-t * x[4]))


def biggs_exp6(x: Tensor) -> Tensor:
    t = 0.1 * torch.arange(1, 14, dtype=x.dtype)
    y = torch.exp(-t) - 5 * torch.exp(-10 * t) + 3 * torch.exp(-4 * t)
    return x[2] * torch.exp(-t * x[0]) - x[3] * torch.exp(-t * x[1]) + x[5] * torch.exp(-t * x[4]) - y


def watson(x: Tensor) -> Tensor:
    n = x.numel()
    t = torch.arange(1, 30, dtype=x.dtype) / 29
    j = torch.arange(n, dtype=x.dtype)
    s1 = ((j[1:] * x[1:])[None, :] * t[:, None] ** (j[1:] - 1)[None, :]).sum(1)
    s2 = (x[None, :] * t[:, None] ** j[None, :]).sum(1)
    return torch.cat([s1 - s2**2 - 1, x[:1], (x[1] - x[0] ** 2 - 1).reshape(1)])


def penalty1(x: Tensor) -> Tensor:
    return torch.cat([math.sqrt(1e-5) * (x - 1), ((x**2).sum() - 0.25).reshape(1)])


def variably_dimensioned(x: Tensor) -> Tensor:
    j = torch.arange(1, x.numel() + 1, dtype=x.dtype)
    s = (j * (x - 1)).sum()
    return torch.cat([x - 1, s.reshape(1), (s**2).reshape(1)])


def trigonometric(x: Tensor) -> Tensor:
    n = x.numel()
    i = torch.arange(1, n + 1, dtype=x.dtype)
    return n - torch.cos(x).sum() + i * (1 - torch.cos(x)) - torch.sin(x)


def linear_full_rank(x: Tensor, m: int = 10) -> Tensor:
    n = x.numel()
    s = x.sum()
    return torch.cat([x - 2 * s / m - 1, (-2 * s / m - 1).expand(m - n)])


PROBLEMS: list[MGHProblem] = [
    MGHProblem(1, "rosenbrock", rosenbrock, [-1.2, 1.0], 2, 0.0, [1.0, 1.0]),
    MGHProblem(2, "freudenstein_roth", freudenstein_roth, [0.5, -2.0], 2, 48.9842536792400),
    MGHProblem(3, "powell_badly_scaled", powell_badly_scaled, [0.0, 1.0], 2, 0.0, [1.098159e-5, 9.106146]),
    MGHProblem(4, "brown_badly_scaled", brown_badly_scaled, [1.0, 1.0], 3, 0.0, [1e6, 2e-6]),
    MGHProblem(5, "beale", beale, [1.0, 1.0], 3, 0.0, [3.0, 0.5]),
    MGHProblem(6, "jennrich_sampson", jennrich_sampson, [0.3, 0.4], 10, 124.362182355),
    MGHProblem(7, "helical_valley", helical_valley, [-1.0, 0.0, 0.0], 3, 0.0, [1.0, 0.0, 0.0]),
    MGHProblem(8, "bard", bard, [1.0, 1.0, 1.0], 15, 8.21487730657e-3),
    MGHProblem(9, "gaussian", gaussian, [0.4, 1.0, 0.0], 15, 1.12793276962e-8),
    MGHProblem(10, "meyer", meyer, [0.02, 4000.0, 250.0], 16, 87.9458551718),
    MGHProblem(12, "box3d", box3d, [0.0, 10.0, 20.0], 10, 0.0, [1.0, 10.0, 1.0]),
    MGHProblem(13, "powell_singular", powell_singular, [3.0, -1.0, 0.0, 1.0], 4, 0.0, [0.0, 0.0, 0.0, 0.0]),
    MGHProblem(14, "wood", wood, [-3.0, -1.0, -3.0, -1.0], 6, 0.0, [1.0, 1.0, 1.0, 1.0]),
    MGHProblem(15, "kowalik_osborne", kowalik_osborne, [0.25, 0.39, 0.415, 0.39], 11, 3.07505603849e-4),
    MGHProblem(16, "brown_dennis", brown_dennis, [25.0, 5.0, -5.0, -1.0], 20, 85822.2016263563),
    MGHProblem(17, "osborne1", osborne1, [0.5, 1.5, -1.0, 0.01, 0.02], 33, 5.46489469748e-5),
    MGHProblem(18, "biggs_exp6", biggs_exp6, [1.0, 2.0, 1.0, 1.0, 1.0, 1.0], 13),
    MGHProblem(20, "watson6", watson, [0.0] * 6, 31, 2.28767005355e-3),
    MGHProblem(23, "penalty1_4", penalty1, [1.0, 2.0, 3.0, 4.0], 5, 2.24997750529e-5),
    MGHProblem(
        25, "variably_dimensioned_8", variably_dimensioned, [1 - j / 8 for j in range(1, 9)], 10, 0.0, [1.0] * 8
    ),
    MGHProblem(26, "trigonometric_5", trigonometric, [0.2] * 5, 5, 0.0),
    MGHProblem(32, "linear_full_rank_5_10", linear_full_rank, [1.0] * 5, 10, 5.0, [-1.0] * 5),
]


def get(name: str) -> MGHProblem:
    """The problem called ``name``."""
    for p in PROBLEMS:
        if p.name == name:
            return p
    raise KeyError(name)
