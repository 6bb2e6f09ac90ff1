r"""Curvature over part of the data: per class, per sample, over random mini-batches.

A curvature operator from :mod:`curvlab.linops` (Hessian, GGN, Fisher, or a sum / scaling /
damping / restriction of them) is a function, a point and data. :func:`with_data` keeps
the function, the point and every option and swaps the data; :func:`per_class` and
:func:`per_sample` filter the operator's own data (lazily, batch by batch, never copying
the dataset); :func:`batch_size_spectrum` draws random mini-batches of several sizes and
reports the top eigenvalue's mean and spread per size — the batch-size dependence of
:math:`\lambda_{\max}` that sets the largest stable step of SGD (Jastrzębski et al.
2018, "Width of minima reached by stochastic gradient descent is influenced by learning
rate to batch size ratio"; Cohen et al. 2021, "Gradient descent on neural networks
typically occurs at the edge of stability", App. on mini-batch sharpness).

With ``reduction="mean"`` (the default) the operator over a subset is the curvature of
the *mean* loss over that subset, so for classes :math:`c` with :math:`N_c` samples,
:math:`H = \sum_c (N_c/N) H_c`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from curvlab.checks import check_int
from curvlab.data import Data
from curvlab.linops._autodiff import CurvatureBase, split_supervised_batch
from curvlab.linops._base import IdentityOperator, LinearOperator, _ScaledOperator, _SumOperator
from curvlab.linops.restrict import RestrictedOperator
from curvlab.params import tree_map
from curvlab.status import Status

from ._common import Monitor

__all__ = ["with_data", "per_class", "per_sample", "batch_size_spectrum", "BatchSpectrum"]


# --------------------------------------------------------------------------- data views
def _take(batch: Any, mask: Tensor, n: int) -> Any:
    """The samples ``mask`` of a batch: every tensor with a leading dimension ``n`` is indexed."""
    return tree_map(lambda t: t[mask.to(t.device)] if t.ndim and t.shape[0] == n else t, batch)


class FilteredData:
    """A re-iterable view of the samples of a :class:`~curvlab.data.Data` that ``keep`` selects.

    ``keep(batch, offset) -> (n_b,) bool`` is called on every batch with the index of its
    first sample in the pass; batches left empty are skipped. Nothing is copied ahead of
    time: each pass filters the batches as they come (a ``DataLoader`` is read once per pass).
    """

    def __init__(self, data: Data, keep: Callable[[Any, int], Tensor]) -> None:
        self.data = data
        self.keep = keep

    def __iter__(self) -> Iterator[Any]:
        offset = 0
        for batch in self.data.batches():
            if batch is None:
                raise ValueError("the operator has no data to filter (its function closes over it)")
            n = self.data.batch_size_fn(batch)
            mask = torch.as_tensor(self.keep(batch, offset)).reshape(-1)
            offset += n
            if mask.dtype != torch.bool or mask.numel() != n:
                raise ValueError(
                    f"keep must return a boolean mask of shape ({n},), got {mask.dtype} {tuple(mask.shape)}"
                )
            if bool(mask.any()):
                yield batch if bool(mask.all()) else _take(batch, mask, n)


def _default_labels(batch: Any) -> Tensor:
    return split_supervised_batch(batch)[1]


def with_data(op: LinearOperator, data: Any) -> LinearOperator:
    """The same curvature operator (function, point, options) over other ``data``.

    Args:
        op: a curvature operator from :mod:`curvlab.linops` (``hessian``, ``ggn``, ``fisher``),
            or a sum / scaling / ``damped()`` / :func:`~curvlab.linops.restrict` of them.
        data: one batch, an iterable of batches, or a :class:`~curvlab.data.Data`
            (the operator's ``reduction`` and ``batch_size_fn`` are kept).

    Returns:
        A new operator of the same shape; ``op`` is not modified.

    Raises:
        TypeError: ``op`` holds no curvature operator over data.
    """
    out = _rebuild(op, data)
    if out is None:
        raise TypeError(
            f"with_data needs a curvature operator built over data (curvlab.linops.hessian / ggn / fisher, "
            f"or sums, scalings, restrictions of them), got {type(op).__name__}"
        )
    return out


def _rebuild(op: LinearOperator, data: Any) -> LinearOperator | None:
    if isinstance(op, IdentityOperator):
        return op
    if isinstance(op, _ScaledOperator):
        inner = _rebuild(op.op, data)
        return None if inner is None else _ScaledOperator(inner, op.alpha)
    if isinstance(op, _SumOperator):
        parts = [_rebuild(o, data) for o in op.ops]
        if all(p is None or isinstance(p, IdentityOperator) for p in parts):
            return None
        if any(p is None for p in parts):
            raise TypeError("with_data: a term of the sum is not a curvature operator over data (a dense matrix?)")
        return _SumOperator(parts)  # type: ignore[arg-type]
    if isinstance(op, RestrictedOperator):
        parent = _rebuild(op.parent, data)
        if parent is None:
            return None
        block = None if op.block is None else _rebuild(op.block, data)
        return RestrictedOperator(parent, op.indices, names=op.names, spec=op.spec, block=block)
    if isinstance(op, CurvatureBase) and isinstance(getattr(op, "data", None), Data):
        old = op.data
        d = data if isinstance(data, Data) else Data(data, old.reduction, old.batch_size_fn)
        new = copy.copy(op)
        new.data = d
        new._reset_point()
        LinearOperator.__init__(new, op.shape, op.dtype, op.device, symmetric=op.is_symmetric, psd=op.is_psd)
        return new
    return None


def _data_of(op: LinearOperator) -> Data:
    """The data of the first curvature operator inside ``op``."""
    if isinstance(op, CurvatureBase) and isinstance(getattr(op, "data", None), Data):
        return op.data
    for attr in ("ops", "op", "parent", "block"):
        child = getattr(op, attr, None)
        for c in child if isinstance(child, list) else [child]:
            if isinstance(c, LinearOperator):
                try:
                    return _data_of(c)
                except TypeError:
                    continue
    raise TypeError(f"{type(op).__name__} holds no curvature operator over data")


def per_class(
    op: LinearOperator,
    classes: Any = None,
    *,
    labels: Callable[[Any], Tensor] | None = None,
) -> dict[int, LinearOperator]:
    r"""The operator over the samples of each class: :math:`H_c`, the curvature of the mean loss on class :math:`c`.

    With the default ``reduction="mean"``, :math:`H = \sum_c \frac{N_c}{N} H_c`. Per-class
    spectra show which classes carry the outliers (Papyan 2020; see also
    :func:`~curvlab.spectrum.class_decomposition`).

    Args:
        op: a curvature operator over supervised data (``(inputs, targets)`` batches), or a
            sum / scaling / restriction of one.
        classes: the class labels to build (default: every label in the data, sorted).
        labels: ``labels(batch) -> (n_b,)`` class labels (default: the batch's targets).

    Returns:
        ``{class: operator}``.

    Raises:
        TypeError: ``op`` holds no curvature operator over data.
        ValueError: a requested class has no sample.
    """
    data = _data_of(op)
    lab = labels or _default_labels
    if classes is None:
        found: set[int] = set()
        for b in data.batches():
            found.update(int(c) for c in torch.unique(lab(b)).tolist())
        classes = sorted(found)
    out: dict[int, LinearOperator] = {}
    for c in classes:
        view = FilteredData(data, lambda b, _o, c=c: lab(b) == c)
        if next(iter(view), None) is None:
            raise ValueError(f"class {c!r} has no sample in the operator's data")
        out[int(c)] = with_data(op, view)
    return out


def per_sample(op: LinearOperator, indices: Any) -> dict[int, LinearOperator]:
    """The operator over single samples (their index in one pass over the data): the curvature of one loss term.

    Args:
        op: a curvature operator over data (or a sum / scaling / restriction of one).
        indices: sample indices (an int or an iterable of ints, counted over one pass of the data;
            this process's samples in a data-parallel run).

    Returns:
        ``{index: operator}``.

    Raises:
        ValueError: an index outside the data.
    """
    data = _data_of(op)
    idx = [indices] if isinstance(indices, int) else [int(i) for i in indices]
    n = data.n_total() if not data.distributed else sum(data.batch_size_fn(b) for b in data.batches())
    out: dict[int, LinearOperator] = {}
    for i in idx:
        if not 0 <= i < n:
            raise ValueError(f"sample index {i} outside the data's {n} samples")
        view = FilteredData(data, lambda b, o, i=i: torch.arange(o, o + data.batch_size_fn(b)) == i)
        out[i] = with_data(op, view)
    return out


def _subset(data: Data, chosen: Tensor) -> FilteredData:
    keep_set = chosen.sort().values

    def keep(b: Any, o: int) -> Tensor:
        ids = torch.arange(o, o + data.batch_size_fn(b))
        return torch.isin(ids, keep_set)

    return FilteredData(data, keep)


# --------------------------------------------------------------------------- batch-size dependence
@dataclass
class BatchSpectrum:
    r"""Top eigenvalues of the curvature over random mini-batches, per batch size (:func:`batch_size_spectrum`).

    Attributes:
        batch_sizes: ``(S,)`` the sizes.
        eigenvalues: ``(S, R, k)`` the top-``k`` eigenvalues of each of the ``R`` mini-batches.
        mean: ``(S, k)`` their mean per size.
        std: ``(S, k)`` their standard deviation over the mini-batches (``correction=1``).
        std_error: ``(S, k)`` the standard error of the mean, ``std / sqrt(R)``.
        full: ``(k,)`` the top eigenvalues over the whole data.
        n_samples: samples in the whole data.
        indices: ``indices[s][r]`` the samples of mini-batch ``r`` of size ``batch_sizes[s]``.
        converged: every eigenvalue run converged.
        n_matvecs: products used (with the mini-batch operators and the full one).
    """

    batch_sizes: Tensor
    eigenvalues: Tensor
    mean: Tensor
    std: Tensor
    std_error: Tensor
    full: Tensor
    n_samples: int
    indices: list[list[Tensor]] = field(repr=False)
    converged: bool
    n_matvecs: int

    def __repr__(self) -> str:
        rows = ", ".join(
            f"{int(b)}: {float(m):.4g}±{float(e):.2g}"
            for b, m, e in zip(self.batch_sizes, self.mean[:, 0], self.std_error[:, 0])
        )
        return f"BatchSpectrum(λ_max by batch size {{{rows}}}, full data ({self.n_samples}): {float(self.full[0]):.4g})"

    def plot(
        self, ax: Any = None, *, i: int = 0, errors: str = "std_error", title: str | None = None, **kwargs: Any
    ) -> Any:
        """Eigenvalue ``i`` (0: the largest) against the batch size with error bars, and the full-data value.

        Args:
            ax: a matplotlib ``Axes`` (default: a new figure).
            i: which of the top eigenvalues.
            errors: ``"std_error"`` (of the mean) or ``"std"`` (the spread of single mini-batches).
            title: the title.
            **kwargs: passed to ``ax.errorbar``.

        Returns:
            The ``Axes``.

        Raises:
            ValueError: an unknown ``errors``.
            ImportError: matplotlib is not installed.
        """
        from .density import _MATPLOTLIB_MISSING, _require_matplotlib

        if errors not in ("std_error", "std"):
            raise ValueError(f"errors must be 'std_error' or 'std', got {errors!r}")
        if ax is None:
            try:
                import matplotlib.pyplot as plt
            except ImportError as e:  # pragma: no cover
                raise ImportError(_MATPLOTLIB_MISSING) from e
            _, ax = plt.subplots(figsize=(5.6, 4.0))
        else:
            _require_matplotlib()
        b = self.batch_sizes.double().numpy()
        m = self.mean[:, i].double().cpu().numpy()
        e = getattr(self, errors)[:, i].double().cpu().numpy()
        kwargs.setdefault("fmt", "o-")
        kwargs.setdefault("capsize", 3)
        ax.errorbar(b, m, yerr=e, label=f"mini-batches (mean ± {'s.e.' if errors == 'std_error' else 'std'})", **kwargs)
        ax.axhline(float(self.full[i]), color="k", ls="--", lw=0.8, label=f"full data ({self.n_samples})")
        ax.set_xscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("λ_max" if i == 0 else f"λ_{i + 1}")
        if title:
            ax.set_title(title)
        ax.legend(fontsize=8)
        return ax


def batch_size_spectrum(
    op: LinearOperator,
    batch_sizes: Any,
    *,
    n_batches: int = 8,
    k: int = 1,
    tol: float = 1e-6,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> BatchSpectrum:
    r"""How the top eigenvalues of the curvature depend on the mini-batch size.

    For every size :math:`b`, draws ``n_batches`` mini-batches of :math:`b` samples uniformly
    without replacement from the operator's data, builds the operator over each
    (:func:`with_data`: same function and point) and computes its top-``k`` eigenvalues with
    :func:`~curvlab.spectrum.eigsh`; reports their mean, standard deviation and standard
    error per size, beside the full-data values. A mini-batch Hessian's :math:`\lambda_{\max}`
    is biased upwards for small batches (its expectation is at least the full one's, by
    convexity of :math:`\lambda_{\max}`): the plot shows by how much.

    Args:
        op: a curvature operator over data (or a sum / scaling / restriction of one).
        batch_sizes: the sizes (ints between 1 and the number of samples).
        n_batches: mini-batches per size (``>= 2`` for a spread).
        k: top eigenvalues per mini-batch.
        tol: the eigensolver's tolerance (:func:`~curvlab.spectrum.eigsh`).
        seed, generator: the draws of the mini-batches (a CPU generator) and of the eigensolver's starts.
        progress: a tqdm bar over the mini-batches (main process only).

    Returns:
        A :class:`BatchSpectrum` (``.plot()`` draws :math:`\lambda_{\max}` against the size with error bars).

    Raises:
        ValueError: a size outside ``[1, n]``, ``n_batches < 2``, a non-finite operator.
        TypeError: ``op`` holds no curvature operator over data.
    """
    from .eigsh import eigsh

    data = _data_of(op)
    if data.distributed:
        raise ValueError("batch_size_spectrum draws sample indices of one process; run it without a process group")
    n = data.n_total()
    sizes = [
        check_int(b, "batch_sizes[i]", 1, n)
        for b in (batch_sizes if hasattr(batch_sizes, "__iter__") else [batch_sizes])
    ]
    if not sizes:
        raise ValueError("batch_sizes is empty")
    n_batches = check_int(n_batches, "n_batches", 2)
    k = check_int(k, "k", 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    g = generator if generator is not None else torch.Generator().manual_seed(0 if seed is None else int(seed))
    g_eig = torch.Generator(device=op.device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
    counter = _Count()
    mon = Monitor(counter, progress, None, "batch_size_spectrum", total=len(sizes) * n_batches + 1)  # type: ignore[arg-type]
    vals = torch.empty(len(sizes), n_batches, k, dtype=torch.float64)
    indices: list[list[Tensor]] = []
    converged = True
    n_mv = 0
    try:
        full = eigsh(op, k=k, tol=tol, generator=g_eig)
        if full.status is Status.NAN:
            raise ValueError(f"batch_size_spectrum: the operator op is not finite: {full.message}")
        converged &= full.converged
        n_mv += full.n_matvecs
        counter.n_matvecs += 1
        mon.update()
        for s, b in enumerate(sizes):
            row = []
            for r in range(n_batches):
                chosen = torch.randperm(n, generator=g)[:b]
                row.append(chosen.sort().values)
                sub = with_data(op, _subset(data, chosen))
                res = eigsh(sub, k=k, tol=tol, generator=g_eig)
                if res.status is Status.NAN:
                    raise ValueError(f"batch_size_spectrum: a mini-batch operator is not finite: {res.message}")
                converged &= res.converged
                n_mv += res.n_matvecs
                vals[s, r] = res.eigenvalues.double().cpu()
                counter.n_matvecs += 1
                mon.update(batch=b)
            indices.append(row)
    finally:
        mon.close()
    std = vals.std(dim=1, correction=1)
    return BatchSpectrum(
        batch_sizes=torch.tensor(sizes),
        eigenvalues=vals,
        mean=vals.mean(dim=1),
        std=std,
        std_error=std / math.sqrt(n_batches),
        full=full.eigenvalues.double().cpu(),
        n_samples=n,
        indices=indices,
        converged=bool(converged),
        n_matvecs=n_mv,
    )


class _Count:
    def __init__(self) -> None:
        self.n_matvecs = 0
        self.distributed = False
