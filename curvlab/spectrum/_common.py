"""Input handling and random probes shared by the spectrum estimators."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from curvlab.linops._base import DenseOperator, LinearOperator

__all__: list[str] = []


def as_symmetric_operator(A: Any, what: str, name: str = "op") -> LinearOperator:
    """``A`` as a square symmetric :class:`LinearOperator` (a LinearOperator or a dense symmetric tensor).

    Raises:
        TypeError: ``A`` is neither a :class:`LinearOperator` nor a tensor.
        ValueError: ``A`` is not square, not floating point, or not (tagged) symmetric.
    """
    if isinstance(A, Tensor):
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"{what}: {name} must be a square matrix, got shape {tuple(A.shape)}")
        if not A.is_floating_point():
            raise ValueError(f"{what}: {name} must be floating point, got dtype {A.dtype}")
        # symmetric up to rounding (e.g. a matrix assembled from products): symmetrise it
        scale = float(A.abs().max()) if A.numel() else 0.0
        if float((A - A.T).abs().max()) > float(torch.finfo(A.dtype).eps) ** 0.5 * scale:
            raise ValueError(f"{what} needs a symmetric matrix; the tensor {name} is not symmetric")
        A = DenseOperator(A if torch.equal(A, A.T) else 0.5 * (A + A.T), symmetric=True)
    if not isinstance(A, LinearOperator):
        raise TypeError(
            f"{what}: {name} must be a curvlab LinearOperator or a 2-D tensor, got {type(A).__name__}; "
            "wrap a matvec callable with curvlab.linops.aslinearoperator(f, shape=n, symmetric=True)"
        )
    if A.shape[0] != A.shape[1]:
        raise ValueError(f"{what} needs a square operator, got shape {A.shape}")
    if not A.is_symmetric:
        raise ValueError(
            f"{what} needs a symmetric operator, but {name} ({type(A).__name__}, shape {A.shape}) is not tagged "
            "symmetric; build it with symmetric=True if it is"
        )
    if not (A.dtype.is_floating_point and not A.dtype.is_complex):
        raise ValueError(f"{what} needs a real floating-point operator, got dtype {A.dtype}")
    return A


def check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an ``int >= minimum``.

    Raises:
        TypeError: not an integer.
        ValueError: below ``minimum``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {int(value)}")
    return int(value)


def check_positive(value: Any, name: str) -> float:
    """``value`` as a finite float ``> 0``.

    Raises:
        TypeError: not a real number.
        ValueError: not finite or not positive.
    """
    if isinstance(value, bool) or not (
        isinstance(value, numbers.Real) or (isinstance(value, Tensor) and value.ndim == 0)
    ):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not (0 < v < float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {v}")
    return v


def make_generator(
    generator: torch.Generator | None, seed: int | None, device: torch.device, *, distributed: bool = False
) -> torch.Generator | None:
    """The generator to draw probes with: ``generator``, a fresh one seeded with ``seed``, or ``None`` (global RNG).

    For a data-parallel operator (``distributed=True``, see :mod:`curvlab.distributed`) with
    neither given, a fresh generator seeded by rank 0 and broadcast, so every rank draws the
    same probes.

    Raises:
        ValueError: both given, or ``generator`` on another device than the operator.
        TypeError: ``seed`` not an int, ``generator`` not a :class:`torch.Generator`.
    """
    if generator is not None and seed is not None:
        raise ValueError("pass either generator= or seed=, not both")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        g = torch.Generator(device=device)
        g.manual_seed(int(seed))
        return g
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if torch.device(generator.device).type != device.type:
            raise ValueError(
                f"generator lives on {generator.device} but the operator on {device}; "
                f"create it with torch.Generator(device={str(device)!r})"
            )
    if generator is None and distributed:
        from .. import distributed as _dist

        return _dist.synced_generator(None, device)
    return generator


def estimator_setup(
    op: Any,
    what: str,
    method: str,
    methods: tuple[str, ...],
    budget: Any,
    min_budget: dict[str, int],
    block_size: Any,
    generator: torch.Generator | None,
    seed: int | None,
) -> tuple[LinearOperator, int, int, torch.Generator | None]:
    """Validate the arguments of a stochastic estimator (:func:`trace`, :func:`diag`).

    Returns:
        ``(operator, budget, block_size, generator)`` — the generator synced across ranks
        for a data-parallel operator.
    """
    A = as_symmetric_operator(op, what)
    if method not in methods:
        raise ValueError(f"method must be one of {methods}, got {method!r}")
    budget = check_int(budget, "budget", 1)
    if budget < min_budget[method]:
        raise ValueError(
            f"budget too small: {method} needs at least {min_budget[method]} products "
            f"(for a standard error), got {budget}"
        )
    bs = check_block_size(block_size, A.device)
    return A, budget, bs, make_generator(generator, seed, A.device, distributed=A.distributed)


def rademacher(n: int, k: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """An ``(n, k)`` matrix of independent Rademacher (±1) entries."""
    bits = torch.randint(0, 2, (n, k), generator=generator, device=device, dtype=torch.int8)
    return (2 * bits - 1).to(dtype)


def default_tol(dtype: torch.dtype) -> float:
    r"""``eps^(2/3)`` of ``dtype`` — ARPACK's floor for relative Ritz-value accuracy (``dsconv``, ``eps23``)."""
    return float(torch.finfo(dtype).eps) ** (2.0 / 3.0)


def matmat_blocks(A: LinearOperator, V: Tensor, block_size: int) -> Tensor:
    """``A @ V`` in column blocks of at most ``block_size``.

    Bounds the memory of batched products: a batched Hessian-vector product holds one
    set of intermediates per column.
    """
    k = V.shape[1]
    if k <= block_size:
        return A.matmat(V)
    return torch.cat([A.matmat(V[:, i : i + block_size]) for i in range(0, k, block_size)], dim=1)


def check_block_size(block_size: Any, device: torch.device) -> int:
    """The columns per batched product: ``block_size``, or by default 8 on CPU and 32 on accelerators.

    Batched Hessian-vector products (``vmap`` over the backward pass) pay off on GPUs; on a CPU
    they are no faster per column than single products beyond a few columns and hold one set
    of intermediates per column (measured in ``benchmarks/spectrum.py``'s setting: 5.2 ms per
    column one at a time, 5.7 ms in blocks of 8, 8.9 ms in blocks of 32, one thread).
    """
    if block_size is None:
        return 8 if device.type == "cpu" else 32
    return check_int(block_size, "block_size", 1)


def exact_diagonal(A: LinearOperator, block_size: int) -> Tensor:
    """``diag(A)`` from products with the unit vectors (``n`` products; for ``budget >= n``)."""
    n = A.shape[0]
    bs = block_size
    out = torch.empty(n, dtype=A.dtype, device=A.device)
    for i in range(0, n, bs):
        j = min(n, i + bs)
        E = torch.zeros(n, j - i, dtype=A.dtype, device=A.device)
        E[torch.arange(i, j, device=A.device), torch.arange(j - i, device=A.device)] = 1.0
        out[i:j] = torch.diagonal(A.matmat(E)[i:j])
    return out


def leave_one_out_basis(R: Tensor) -> Tensor | None:
    r"""The normalised columns :math:`s_i` of :math:`R^{-\top}` (Epperly, Tropp & Webber 2024, §2.1).

    With :math:`Y = QR`, the range of :math:`Y` without column ``i`` is spanned by
    :math:`Q(I - s_i s_i^\top)`, since :math:`s_i \perp R e_j` for all :math:`j \ne i`.
    Returns ``None`` when ``R`` is numerically singular (``Y`` rank deficient: then
    ``range(Q)`` already contains ``range(A)`` and the low-rank part is exact).
    """
    d = torch.diagonal(R).abs()
    s = R.shape[0]
    if float(d.min()) <= max(s, 10) * float(torch.finfo(R.dtype).eps) * float(d.max()):
        return None
    eye = torch.eye(s, dtype=R.dtype, device=R.device)
    Rinv_t = torch.linalg.solve_triangular(R.T, eye, upper=False)
    return Rinv_t / torch.linalg.vector_norm(Rinv_t, dim=0)
