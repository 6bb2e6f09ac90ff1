r"""Loss landscapes: the loss along one or two directions through the parameters.

For parameters :math:`\theta` (flat), directions :math:`d_1, d_2` and a grid of steps,

.. math::
    L(\alpha) = \ell(\theta + \alpha d_1), \qquad L(\alpha, \beta) = \ell(\theta + \alpha d_1 + \beta d_2),

evaluated exactly over the whole data (every batch, weighted as the operators weigh
them). The directions:

* ``"eigen"`` — the top eigenvectors of the Hessian (or of the curvature operator
  handed in), unit norm: the 1-D curve and 2-D surface PyHessian's examples draw (Yao,
  Gholami, Keutzer & Mahoney 2020, "PyHessian: neural networks through the lens of the
  Hessian", IEEE BigData, Fig. 1); near a minimum :math:`L(\alpha) \approx L(0) +
  \tfrac12\lambda_1\alpha^2`.
* ``"filter"`` — filter-normalised random directions (Li, Xu, Taylor, Studer & Goldstein
  2018, "Visualizing the loss landscape of neural nets", NeurIPS, §4): a Gaussian
  direction whose every filter (a row of a weight matrix, one output channel of a
  convolution kernel) is rescaled to the norm of the same filter of :math:`\theta`;
  one-dimensional parameters (biases, normalisation scales) get zero, the paper's
  "ignore biasbn" setting. Steps are then relative to the weights' own scale, which
  makes landscapes of differently scaled networks comparable.
* ``"random"`` — Gaussian directions of unit norm.
* explicit directions — a flat ``(n,)`` / ``(n, k)`` tensor, a structure like the
  parameters, a list of those, or an :class:`~curvlab.spectrum.EigshResult`; used as
  given (not normalised).

The user's model is never modified: a module is evaluated through
:func:`torch.func.functional_call` on copies of its buffers (train-mode BatchNorm
updates the copies, never its running statistics), and for a user function over a
module's parameters the buffers are restored after every evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvlab import distributed as _dist
from curvlab.checks import check_int, check_positive
from curvlab.data import Data
from curvlab.linops._base import LinearOperator
from curvlab.params import ParamSpec

from ._common import Monitor, layout_of, make_generator, unflatten_columns

__all__ = ["Landscape", "landscape", "filter_normalized"]

_KINDS = ("eigen", "filter", "random")


@dataclass
class Landscape:
    r"""A loss landscape from :func:`landscape`: the loss on a 1-D or 2-D grid of steps along directions.

    Attributes:
        alphas: ``(n_a,)`` steps along the first direction.
        betas: ``(n_b,)`` steps along the second direction (``None`` for a 1-D landscape).
        values: ``(n_a,)`` or ``(n_a, n_b)`` losses; ``values[i, j]`` is the loss at
            :math:`\theta + \alpha_i d_1 + \beta_j d_2`.
        directions: ``(n, 1)`` or ``(n, 2)`` flat directions (columns).
        center: the loss at :math:`\theta` itself.
        kind: how the directions were chosen (``"eigen"``, ``"filter"``, ``"random"``, ``"given"``).
        eigenvalues: for ``kind="eigen"``, the eigenvalues of the directions.
        n_evals: loss evaluations over the data.
        layout: a light :class:`~curvlab.params.ParamSpec` of the parameters (for :meth:`as_params`).
    """

    alphas: Tensor
    betas: Tensor | None
    values: Tensor
    directions: Tensor
    center: float
    kind: str
    eigenvalues: Tensor | None = None
    n_evals: int = 0
    layout: Any = field(default=None, repr=False)

    @property
    def ndim(self) -> int:
        """1 or 2."""
        return 1 if self.betas is None else 2

    def as_params(self, i: int | None = None) -> Any:
        """Direction ``i`` (all, as a list, for ``None``) in the structure of the parameters."""
        return unflatten_columns(self.layout, self.directions, i, "Landscape.as_params")

    def __repr__(self) -> str:
        grid = f"{self.alphas.numel()}" + ("" if self.betas is None else f"x{self.betas.numel()}")
        v = self.values
        return (
            f"Landscape({self.ndim}-D, kind={self.kind!r}, grid={grid}, steps in [{float(self.alphas[0]):.3g}, "
            f"{float(self.alphas[-1]):.3g}], loss in [{float(v.min()):.4g}, {float(v.max()):.4g}], "
            f"center={self.center:.6g}, n_evals={self.n_evals})"
        )

    # ------------------------------------------------------------------ plotting
    def plot(
        self,
        ax: Any = None,
        *,
        log: bool = False,
        levels: int = 30,
        surface: bool = False,
        xlabel: str | None = None,
        ylabel: str | None = None,
        title: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Draw the landscape: a curve (1-D), filled contours with a colour bar (2-D) or a 3-D surface.

        Args:
            ax: a matplotlib ``Axes`` (a 3-D one for ``surface=True``; default: a new figure).
            log: logarithmic loss axis / colour scale (the loss must be positive).
            levels: contour levels (2-D).
            surface: draw a 3-D surface instead of contours (2-D only).
            xlabel, ylabel, title: labels (defaults name the directions).
            **kwargs: passed to ``ax.plot`` (1-D) or ``ax.contourf`` / ``ax.plot_surface`` (2-D).

        Returns:
            The ``Axes``.

        Raises:
            ImportError: matplotlib is not installed.
        """
        from .density import _MATPLOTLIB_MISSING, _require_matplotlib

        if ax is None:
            try:
                import matplotlib.pyplot as plt
            except ImportError as e:  # pragma: no cover - exercised by monkeypatching in tests
                raise ImportError(_MATPLOTLIB_MISSING) from e
            fig = plt.figure(figsize=(6.0, 4.6))
            ax = fig.add_subplot(1, 1, 1, projection="3d" if surface else None)
        else:
            _require_matplotlib()
        import numpy as np

        names = {"eigen": "eigenvector", "filter": "filter-normalised direction", "random": "random direction"}
        base = names.get(self.kind, "direction")
        a = self.alphas.detach().double().cpu().numpy()
        v = self.values.detach().double().cpu().numpy()
        if self.betas is None:
            kwargs.setdefault("lw", 1.6)
            ax.plot(a, v, **kwargs)
            ax.plot([0.0], [self.center], "o", color="k", ms=4, label="θ")
            if log:
                ax.set_yscale("log")
            ax.set_xlim(a[0], a[-1])
            ax.set_xlabel(xlabel if xlabel is not None else f"step α along the {base}")
            ax.set_ylabel(ylabel if ylabel is not None else "loss")
        else:
            b = self.betas.detach().double().cpu().numpy()
            A, B = np.meshgrid(a, b, indexing="ij")
            Z = np.log10(v) if log else v
            if surface:
                kwargs.setdefault("cmap", "viridis")
                ax.plot_surface(A, B, Z, **kwargs)
                ax.set_zlabel("log10 loss" if log else "loss")
            else:
                kwargs.setdefault("cmap", "viridis")
                cs = ax.contourf(A, B, Z, levels=levels, **kwargs)
                ax.contour(A, B, Z, levels=levels, colors="k", linewidths=0.3, alpha=0.5)
                ax.figure.colorbar(cs, ax=ax, label="log10 loss" if log else "loss")
                ax.plot([0.0], [0.0], "o", color="w", mec="k", ms=5)
                ax.set_aspect("auto")
            ax.set_xlim(a[0], a[-1])
            ax.set_ylim(b[0], b[-1])
            ax.set_xlabel(xlabel if xlabel is not None else f"α (1st {base})")
            ax.set_ylabel(ylabel if ylabel is not None else f"β (2nd {base})")
        if title:
            ax.set_title(title)
        return ax

    def save(
        self,
        path: str,
        *,
        log: bool = False,
        surface: bool = False,
        dpi: int = 150,
        title: str | None = None,
        xlabel: str | None = None,
        ylabel: str | None = None,
        figsize: tuple[float, float] = (6.0, 4.6),
    ) -> str:
        """Write :meth:`plot` to ``path`` (rank 0 only in a data-parallel run); returns ``path``.

        Raises:
            ImportError: matplotlib is not installed.
        """
        from .density import _require_matplotlib

        if not _dist.is_main_process():
            return path
        _require_matplotlib()
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        ax = fig.add_subplot(1, 1, 1, projection="3d" if surface and self.betas is not None else None)
        self.plot(ax=ax, log=log, surface=surface, xlabel=xlabel, ylabel=ylabel, title=title)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
        return path


# --------------------------------------------------------------------------- directions
def filter_normalized(direction: Tensor, spec: ParamSpec, x: Tensor, ignore_1d: bool = True) -> Tensor:
    r"""Filter-normalise a flat direction (Li et al. 2018, §4): every filter scaled to the norm of :math:`\theta`'s.

    A filter is a slice along the first (output) dimension of a parameter with two or more
    dimensions: a row of a ``Linear`` weight, an output channel of a convolution kernel.
    One-dimensional parameters (biases, normalisation scales and shifts) are zeroed
    (``ignore_1d``, the paper's choice) or scaled as one filter.

    Args:
        direction: ``(n,)`` flat direction.
        spec: the parameters' :class:`~curvlab.params.ParamSpec`.
        x: ``(n,)`` flat parameters :math:`\theta`.
        ignore_1d: zero the one-dimensional parameters.

    Returns:
        The normalised ``(n,)`` direction (a filter of :math:`\theta` that is zero stays zero).
    """
    out = []
    for d, t, shape in zip(torch.split(direction, spec.numels), torch.split(x, spec.numels), spec.shapes):
        if len(shape) <= 1:
            out.append(torch.zeros_like(d) if ignore_1d else d * (t.norm() / d.norm().clamp_min(1e-30)))
            continue
        D, T = d.reshape(shape[0], -1), t.reshape(shape[0], -1)
        scale = T.norm(dim=1, keepdim=True) / D.norm(dim=1, keepdim=True).clamp_min(1e-30)
        out.append((D * scale).reshape(-1))
    return torch.cat(out)


def _given_directions(directions: Any, spec: ParamSpec) -> Tensor:
    """Explicit directions as flat ``(n, k)`` columns."""
    from .eigsh import EigshResult

    n = spec.size
    if isinstance(directions, EigshResult):
        return directions.eigenvectors
    if isinstance(directions, Tensor):
        if directions.ndim in (1, 2) and directions.shape[0] == n:
            return directions.reshape(n, -1)
        raise ValueError(
            f"directions must have shape ({n},) or ({n}, k) (the parameters' size), got {tuple(directions.shape)}"
        )
    items = directions if isinstance(directions, list) and not isinstance(directions, Tensor) else [directions]
    cols = []
    for d in items:
        if isinstance(d, Tensor) and d.shape == (n,):
            cols.append(d)
            continue
        try:
            cols.append(spec.flatten_tree(d))
        except Exception as e:  # noqa: BLE001 - any mismatch: say what was expected
            raise ValueError(
                f"directions must be 'eigen', 'filter', 'random', a flat ({n},) or ({n}, k) tensor, a structure "
                f"like the parameters, a list of those, or an EigshResult; got {type(d).__name__}"
            ) from e
    return torch.stack([c.detach() for c in cols], dim=1)


# --------------------------------------------------------------------------- the loss
class _Loss:
    """The data loss as a function of the flat parameters, without touching the user's module."""

    def __init__(self, fn: Callable[[Any, Any], Tensor], spec: ParamSpec, data: Data, module: nn.Module | None):
        self.fn, self.spec, self.data, self.module = fn, spec, data, module

    def __call__(self, x: Tensor) -> float:
        saved = {k: b.clone() for k, b in self.module.named_buffers()} if self.module is not None else None
        total = None
        try:
            with torch.no_grad():
                p = self.spec.unflatten(x)
                for batch, w in self.data.weighted_batches():
                    v = self.fn(p, batch)
                    if not isinstance(v, Tensor) or v.numel() != 1:
                        raise ValueError(
                            f"the loss must be a scalar tensor, got {getattr(v, 'shape', type(v).__name__)}"
                        )
                    v = v.reshape(()) * w
                    total = v if total is None else total + v
        finally:
            if saved is not None:  # a user function may run a train-mode module: give the buffers back
                with torch.no_grad():
                    for k, b in self.module.named_buffers():
                        b.copy_(saved[k])
        assert total is not None
        if self.data.distributed:
            total = _dist.all_reduce_sum(total)
        return float(total)


def _module_loss(model: nn.Module, loss_fn: Callable[..., Tensor]) -> Callable[[Any, Any], Tensor]:
    """``(params, (inputs, targets)) -> loss`` of a module on copies of its buffers (mean of per-sample losses)."""
    from curvlab.linops._autodiff import split_supervised_batch

    def fn(p: Any, batch: Any) -> Tensor:
        inputs, y = split_supervised_batch(batch)
        bufs = {k: b.clone() for k, b in model.named_buffers()}
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        out = torch.func.functional_call(model, {**p, **bufs}, args)
        loss = loss_fn(out, y)
        return loss.mean() if loss.ndim else loss

    return fn


def _callable_model_loss(model: Callable[..., Tensor], loss_fn: Callable[..., Tensor]) -> Callable[[Any, Any], Tensor]:
    from curvlab.linops._autodiff import split_supervised_batch

    def fn(p: Any, batch: Any) -> Tensor:
        inputs, y = split_supervised_batch(batch)
        loss = loss_fn(model(p, inputs), y)
        return loss.mean() if loss.ndim else loss

    return fn


def _setup(f: Any, params: Any, args: tuple, data: Any, reduction: str) -> tuple[_Loss, Tensor, Any]:
    """The loss, the flat point and the curvature operator to take eigenvectors of (built lazily)."""
    if isinstance(f, LinearOperator):
        op = f
        spec = getattr(op, "spec", None)
        if not isinstance(spec, ParamSpec) or not hasattr(op, "data"):
            raise TypeError(
                "landscape needs a loss: a function f(params, batch), an nn.Module with a loss_fn, or a curvature "
                f"operator built by curvlab.linops.hessian / ggn / fisher; got a {type(op).__name__}"
            )
        if hasattr(op, "f"):  # a Hessian of f(params[, batch], *args)
            fn = _function_loss(op.f, op.args, op.data)
        else:  # GGN / Fisher: model and per-sample loss
            model = op.model
            fn = (
                _module_loss(model, op.loss_fn)
                if isinstance(model, nn.Module)
                else _callable_model_loss(model, op.loss_fn)
            )
        module = spec.module if not isinstance(getattr(op, "model", None), nn.Module) else None
        return _Loss(fn, spec, op.data, module), op.x, op
    if isinstance(f, nn.Module):
        loss_fn = params
        if not callable(loss_fn):
            raise TypeError(
                "landscape(model, loss_fn, data=...): the second argument must be the loss function "
                f"loss_fn(outputs, targets), got {type(loss_fn).__name__}"
            )
        if data is None:
            raise ValueError("landscape(model, loss_fn, data=...) needs data: (inputs, targets) batches")
        spec = ParamSpec(f)
        d = Data(data, reduction)
        fn = _module_loss(f, loss_fn)

        def make_op() -> LinearOperator:
            from curvlab.linops import hessian

            return hessian(lambda p, b: fn(p, b), f, data=d)

        return _Loss(fn, spec, d, None), spec.flatten(), make_op
    if not callable(f):
        raise TypeError(f"f must be a loss function, an nn.Module or a curvature operator, got {type(f).__name__}")
    if params is None:
        raise ValueError("params is None: pass the parameters the loss f(params, batch) is evaluated at")
    spec = ParamSpec(params)
    d = Data(data, reduction)
    fn = _function_loss(f, args, d)

    def make_hessian() -> LinearOperator:
        from curvlab.linops import hessian

        return hessian(f, params, *args, data=d)

    return _Loss(fn, spec, d, spec.module), spec.flatten(), make_hessian


def _function_loss(f: Callable[..., Tensor], args: tuple, data: Data) -> Callable[[Any, Any], Tensor]:
    def fn(p: Any, batch: Any) -> Tensor:
        return f(p, *args) if batch is None and data.kind == "none" else f(p, batch, *args)

    return fn


def _keep_buffers(module: nn.Module | None) -> Callable[[], None]:
    """Snapshot ``module``'s buffers; the returned function writes them back (a no-op without a module)."""
    if module is None:
        return lambda: None
    saved = {k: b.clone() for k, b in module.named_buffers()}

    def restore() -> None:
        with torch.no_grad():
            for k, b in module.named_buffers():
                if k in saved and not torch.equal(b, saved[k]):
                    b.copy_(saved[k])

    return restore


def _span(span: Any) -> tuple[float, float]:
    if isinstance(span, tuple):
        if len(span) != 2 or not all(math.isfinite(float(s)) for s in span) or not float(span[0]) < float(span[1]):
            raise ValueError(f"span must be a positive number or a (lo, hi) pair with lo < hi, got {span!r}")
        return float(span[0]), float(span[1])
    else:
        s = check_positive(span, "span")
        return -s, s


def _directions(
    loss: _Loss,
    x: Tensor,
    curv: Any,
    directions: Any,
    dim: int | None,
    generator: torch.Generator | None,
    seed: int | None,
) -> tuple[Tensor, str, Tensor | None]:
    """The ``(n, k)`` directions, their kind and (for eigenvectors) their eigenvalues."""
    spec = loss.spec
    if dim is not None:
        dim = check_int(dim, "dim", 1, 2)
    if isinstance(directions, str):
        if directions not in _KINDS:
            raise ValueError(f"directions must be one of {_KINDS} or explicit directions, got {directions!r}")
        k = dim or 1
        kind = directions
        eig = None
        gen = make_generator(generator, seed, x.device, distributed=loss.data.distributed)
        if directions == "eigen":
            from .eigsh import eigsh

            op = curv if isinstance(curv, LinearOperator) else curv()
            res = eigsh(op, k=k, generator=gen)
            D, eig = res.eigenvectors, res.eigenvalues
        else:
            D = torch.randn(spec.size, k, generator=gen, dtype=x.dtype, device=x.device)
            if directions == "filter":
                D = torch.stack([filter_normalized(D[:, j], spec, x) for j in range(k)], dim=1)
            else:
                D = D / torch.linalg.vector_norm(D, dim=0, keepdim=True)
    else:
        kind, eig = "given", None
        D = _given_directions(directions, spec).to(dtype=x.dtype, device=x.device)
        if dim is not None and D.shape[1] != dim:
            raise ValueError(f"dim={dim} but {D.shape[1]} directions were given")
        if D.shape[1] > 2:
            raise ValueError(f"a landscape takes 1 or 2 directions, got {D.shape[1]}")
        if D.shape[0] != spec.size:
            raise ValueError(f"directions must have {spec.size} entries (the parameters), got {D.shape[0]}")
    if not bool(torch.isfinite(D).all()):
        raise ValueError("the directions are not finite (an eigensolver that met a non-finite operator?)")
    return D, kind, eig


# --------------------------------------------------------------------------- landscape
def landscape(
    f: Any,
    params: Any = None,
    *args: Any,
    data: Any = None,
    reduction: str = "mean",
    directions: Any = "eigen",
    dim: int | None = None,
    n_points: int | None = None,
    span: float | tuple[float, float] = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> Landscape:
    r"""The loss along one or two directions through the parameters, as data (and a figure via ``.plot``).

    Three ways to name the loss (the first two as :func:`~curvlab.linops.hessian` and
    :func:`~curvlab.linops.ggn` take it):

    * ``landscape(f, params, *args, data=...)`` — ``f(params, batch, *args) -> scalar``
      (``f(params, *args)`` without data);
    * ``landscape(model, loss_fn, data=...)`` — an ``nn.Module`` and
      ``loss_fn(outputs, targets)`` (reduced or per-sample losses; per-sample ones are
      averaged) over ``(inputs, targets)`` batches;
    * ``landscape(op)`` — a curvature operator from :mod:`curvlab.linops` (its function,
      point and data; ``"eigen"`` directions are then its eigenvectors: the GGN's for a GGN).

    See the module docstring for the directions and papers. The loss is the exact data loss
    (``reduction`` as for the operators); the grid of steps is ``n_points`` values in
    ``[-span, span]`` per direction (an odd count includes :math:`\theta` itself).

    Args:
        f: the loss function, an ``nn.Module``, or a curvature operator.
        params: the point (for a function), or ``loss_fn`` (for a module).
        *args: extra arguments of ``f``.
        data: ``None``, one batch, or an iterable of batches.
        reduction: ``"mean"`` or ``"sum"`` over batches (see :class:`curvlab.data.Data`).
        directions: ``"eigen"`` (default: top eigenvectors of the Hessian), ``"filter"``,
            ``"random"``, or explicit directions (module docstring).
        dim: 1 or 2 directions (default: the number of explicit directions, else 1).
        n_points: grid points per direction (default 51 for 1-D, 21 for 2-D).
        span: the grid's half-width (a number, or ``(lo, hi)``).
        generator, seed: for random directions and the eigensolver's start.
        progress: a tqdm bar over the evaluations (main process only).

    Returns:
        A :class:`Landscape` (``.values`` on the grid ``.alphas`` × ``.betas``, ``.plot()``,
        ``.save(path)``).

    Raises:
        ValueError: an unknown ``directions``, ``dim`` not 1 or 2, directions of the wrong size,
            non-finite directions, a module form without data.
        TypeError: a loss that is neither a function, a module nor a curvature operator.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
        >>> L = landscape(lambda x: 0.5 * x @ A @ x, torch.zeros(2, dtype=torch.float64), n_points=5, seed=0)
        >>> [round(v, 3) for v in L.values.tolist()]  # 0.5 * 3 * alpha^2 along the top eigenvector
        [1.5, 0.375, 0.0, 0.375, 1.5]
    """
    loss, x, curv = _setup(f, params, args, data, reduction)
    spec = loss.spec
    restore = _keep_buffers(spec.module)  # the user's module ends as it started, whatever runs it
    mon: Monitor | None = None
    try:
        D, kind, eig = _directions(loss, x, curv, directions, dim, generator, seed)
        k = D.shape[1]
        npts = check_int(n_points, "n_points", 2) if n_points is not None else (51 if k == 1 else 21)
        lo, hi = _span(span)
        steps = torch.linspace(lo, hi, npts, dtype=torch.float64)
        count = _Evals(loss.data.distributed)
        mon = Monitor(count, progress, None, "landscape", total=npts**k)  # type: ignore[arg-type]
        center = loss(x)
        values = torch.empty((npts,) * k, dtype=torch.float64)
        for i, a in enumerate(steps.tolist()):
            xa = x + a * D[:, 0]
            for j, b in enumerate(steps.tolist() if k == 2 else [None]):
                values[(i, j) if k == 2 else i] = loss(xa if b is None else xa + b * D[:, 1])
                count.n_matvecs += 1
                mon.update()
    finally:
        if mon is not None:
            mon.close()
        restore()
    return Landscape(
        alphas=steps,
        betas=None if k == 1 else steps.clone(),
        values=values,
        directions=D,
        center=center,
        kind=kind,
        eigenvalues=eig,
        n_evals=npts**k + 1,
        layout=layout_of(spec),
    )


class _Evals:
    """What the progress bar counts: loss evaluations (one tick each)."""

    def __init__(self, distributed: bool) -> None:
        self.n_matvecs = 0
        self.distributed = distributed
