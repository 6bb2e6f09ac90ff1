"""Input handling and random probes shared by the spectrum estimators."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from curvlab import distributed as _dist
from curvlab.checks import check_int
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


def exact_diagonal(A: LinearOperator, block_size: int, mon: Monitor | None = None, what: str = "diag") -> Tensor:
    """``diag(A)`` from products with the unit vectors (``n`` products; for ``budget >= n``).

    Raises:
        ValueError: a block of products is not finite.
    """
    n = A.shape[0]
    bs = block_size
    out = torch.empty(n, dtype=A.dtype, device=A.device)
    for i in range(0, n, bs):
        j = min(n, i + bs)
        E = torch.zeros(n, j - i, dtype=A.dtype, device=A.device)
        E[torch.arange(i, j, device=A.device), torch.arange(j - i, device=A.device)] = 1.0
        Y = A.matmat(E)
        check_finite(Y, what, f"products {i + 1}-{j} with unit vectors")
        out[i:j] = torch.diagonal(Y[i:j])
        if mon is not None:
            mon.update(phase="exact")
            if mon.callback is not None:
                mon.stop({"phase": "exact", "columns_done": j, "columns": n})  # the exact diagonal cannot stop early
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


# --------------------------------------------------------------------------- progress and callbacks
Callback = Callable[[dict[str, Any]], Any]


class Monitor:
    """Progress bar and user callback of one spectrum routine (or of a :func:`summary` spanning several).

    The bar (tqdm, on the main process of a data-parallel run only) counts the products
    with ``A`` as they happen. :meth:`stop` hands ``info`` to the user's callback and says
    whether it asked to stop; in a data-parallel run the decision is shared (a stop on any
    rank stops every rank), so the ranks stay in step through the collectives.
    """

    def __init__(self, A: LinearOperator, progress: Any, callback: Any, desc: str, total: int | None = None) -> None:
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False, got {progress!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable (info dict -> bool), got {type(callback).__name__}")
        self.A = A
        self.callback = callback
        self.start = A.n_matvecs
        self._seen = A.n_matvecs
        self.stage = desc
        self.bar = None
        if progress and _dist.is_main_process():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="matvec", leave=True)

    @property
    def n_matvecs(self) -> int:
        """Products taken since the monitor started."""
        return self.A.n_matvecs - self.start

    def set_stage(self, stage: str, total: int | None = None) -> None:
        """Name the running stage in the bar (for :func:`summary`)."""
        self.stage = stage
        if self.bar is not None:
            self.bar.set_description(stage)
            if total is not None:
                self.bar.total = self.n_matvecs + total
                self.bar.refresh()

    def update(self, **postfix: Any) -> None:
        """Advance the bar to the current product count, showing ``postfix``."""
        if self.bar is None:
            return
        now = self.A.n_matvecs
        if now > self._seen:
            self.bar.update(now - self._seen)
            self._seen = now
        if postfix:
            self.bar.set_postfix(
                {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in postfix.items()}, refresh=False
            )

    def stop(self, info: dict[str, Any]) -> bool:
        """Call the callback with ``info`` (plus ``stage`` and ``n_matvecs``); ``True`` when it asks to stop."""
        if self.callback is None:
            return False
        info = {"stage": self.stage, "n_matvecs": self.n_matvecs, **info}
        want = bool(self.callback(info))
        if self.A.distributed:
            want = float(_dist.all_reduce_sum(float(want))) > 0
        return want

    def close(self) -> None:
        if self.bar is not None:
            self.update()
            self.bar.close()
            self.bar = None


# --------------------------------------------------------------------------- numerics
def nonfinite_error(what: str, where: str) -> ValueError:
    """The error the estimators raise when the operator's products are not finite (a ``ValueError``)."""
    from curvlab.linalg.randomized import NonFiniteError

    return NonFiniteError(
        f"{what}: the operator op returned non-finite values (nan or inf) in {where}; the curvature is not "
        "finite at this point (check the loss and the parameters for nan/inf, or a loss that overflows)"
    )


def check_finite(t: Tensor, what: str, where: str) -> None:
    """Raise :func:`nonfinite_error` unless ``t`` is finite (one host synchronisation)."""
    if not bool(torch.isfinite(t).all()):
        raise nonfinite_error(what, where)


def pow2_scale(w: Tensor) -> float:
    r"""A power of two :math:`s \approx \max_i |w_i|` (``1`` for a zero or non-finite ``w``).

    Dividing by a power of two is exact, so Lanczos on :math:`A/s` gives the same digits as on
    :math:`A` in the normal floating-point range — and stays accurate far outside it, where the
    squares inside vector norms would underflow or overflow (an operator scaled by
    :math:`10^{-170}` in float64 or :math:`10^{-25}` in float32).
    """
    m = float(w.abs().max()) if w.numel() else 0.0
    if not (m > 0.0 and math.isfinite(m)):
        return 1.0
    return math.ldexp(1.0, math.frexp(m)[1] - 1)


def zero_threshold(anorm: float, n: int, dtype: torch.dtype) -> float:
    r"""Eigenvalues below :math:`\sqrt n\,\varepsilon\,\|A\|` in magnitude are zero to the operator's rounding.

    A product :math:`Av` sums :math:`n` terms; its rounding error is :math:`\gamma\,\|A\|\,\|v\|` with
    :math:`\gamma` of order :math:`\sqrt n\,\varepsilon` for rounding errors that behave like
    independent random variables (Higham & Mary 2019, "A new approach to probabilistic rounding
    error analysis", SIAM J. Sci. Comput. 41(5), Thm. 3.1) — the worst case is :math:`n\varepsilon`
    (Higham, *Accuracy and Stability of Numerical Algorithms*, 2002, §3.1). An eigenvalue of that
    size cannot be told apart from zero by products in this dtype: in float32 a singular GGN's
    smallest computed eigenvalue is :math:`\sim 10^{-7}\|A\|`, not zero.
    """
    return math.sqrt(max(n, 1)) * float(torch.finfo(dtype).eps) * float(anorm)


def find_spec(A: LinearOperator) -> Any:
    """The :class:`~curvlab.params.ParamSpec` behind ``A`` (``None`` for an operator not over parameters)."""
    from curvlab.linops.restrict import find_spec as _find

    return _find(A)


def param_layout(A: LinearOperator) -> Any:
    """A light :class:`~curvlab.params.ParamSpec` (shapes and names on the ``meta`` device) of ``A``'s parameters.

    It turns flat vectors of ``A``'s size into the parameters' structure (a dict ``{name: tensor}``
    for an ``nn.Module`` or a dict, a tuple / list, a tensor) without holding the parameters or
    the module (results that carry it pickle small). ``None`` for an operator not over parameters.
    """
    spec = find_spec(A)
    if spec is None or spec.size != A.shape[0]:
        return None
    return layout_of(spec)


def layout_of(spec: Any) -> Any:
    """The light (``meta``-device) :class:`~curvlab.params.ParamSpec` of ``spec`` (see :func:`param_layout`)."""
    from curvlab.params import ParamSpec

    metas = [torch.empty(s, dtype=spec.dtype, device="meta") for s in spec.shapes]
    if spec.kind == "tensor":
        return ParamSpec(metas[0])
    if spec.kind in ("tuple", "list"):
        return ParamSpec(tuple(metas) if spec.kind == "tuple" else list(metas))
    return ParamSpec(dict(zip(spec.keys, metas)))


def unflatten_columns(layout: Any, V: Tensor, i: int | None, what: str) -> Any:
    """Column ``i`` of ``V`` (all columns, as a list, for ``i=None``) in the structure of ``layout``.

    Raises:
        ValueError: no layout (the operator was not built over parameters), ``i`` out of range.
    """
    if layout is None:
        raise ValueError(
            f"{what}: the operator carries no parameter structure (a dense matrix or a matvec callable); "
            "the flat columns are all there is"
        )
    k = V.shape[1]
    if i is None:
        return [layout.unflatten(V[:, j].contiguous()) for j in range(k)]
    if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not -k <= int(i) < k:
        raise ValueError(f"i must be an int in [{-k}, {k}), got {i!r}")
    return layout.unflatten(V[:, int(i)].contiguous())


def products(
    A: LinearOperator, V: Tensor, block_size: int, mon: Monitor, what: str, phase: str, can_stop: bool = True
) -> tuple[Tensor, bool]:
    """``A @ V`` in column blocks, each checked to be finite, asking the callback after each block.

    Returns:
        ``(A @ V[:, :j], stopped)``: the first ``j`` columns, ``j = k`` unless the callback asked to
        stop (only with ``can_stop``) after an earlier block; ``stopped`` also when it asked after
        the last block (the caller then skips its later phases).

    Raises:
        ValueError: a block of products is not finite.
    """
    k = V.shape[1]
    out: list[Tensor] = []
    done = 0
    for i in range(0, k, block_size):
        Y = A.matmat(V[:, i : i + block_size])
        done = i + Y.shape[1]
        check_finite(Y, what, f"products {i + 1}-{done} of the {phase} phase")
        out.append(Y)
        mon.update(phase=phase)
        if mon.callback is not None:
            if mon.stop({"phase": phase, "columns_done": done, "columns": k}) and can_stop:
                return torch.cat(out, dim=1), True
    if not out:
        return V.new_zeros(A.shape[0], 0), False
    return torch.cat(out, dim=1), False
