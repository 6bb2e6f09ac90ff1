r"""Papyan's class / cross-class decomposition of the cross-entropy Gauss-Newton matrix.

For softmax cross-entropy with logits :math:`z_i = f(x_i;\theta) \in \mathbb R^C` and
probabilities :math:`p_i`, the output-space Hessian is
:math:`\operatorname{diag}(p_i) - p_i p_i^\top = \sum_{c'} p_{i,c'}(e_{c'} - p_i)(e_{c'} - p_i)^\top`,
so the GGN of the mean loss over :math:`N` samples is a sum of outer products,

.. math::
    G = \frac1N\sum_i \sum_{c'} \delta_{i,c'}\delta_{i,c'}^\top, \qquad
    \delta_{i,c'} = \sqrt{p_{i,c'}}\; J_i^\top (e_{c'} - p_i) \in \mathbb R^P,

:math:`J_i = \partial z_i/\partial\theta` (:math:`-\delta_{i,c'}/\sqrt{p_{i,c'}}` is the gradient
of the loss had the label been :math:`c'`). Grouping the samples by their class
:math:`c` (:math:`N_c` samples, :math:`\pi_c = N_c/N`) and centring at the class means
:math:`\delta_{c,c'} = \operatorname{Ave}_{i \in c}\,\delta_{i,c'}` splits it exactly into

.. math::
    G = \underbrace{\sum_{c} \pi_c\, \delta_{c,c}\delta_{c,c}^\top}_{G_1:\ \text{class}}
      + \underbrace{\sum_{c \ne c'} \pi_c\, \delta_{c,c'}\delta_{c,c'}^\top}_{G_2:\ \text{cross-class}}
      + \underbrace{\sum_{c,c'} \pi_c \operatorname{Ave}_{i\in c}
        (\delta_{i,c'} - \delta_{c,c'})(\delta_{i,c'} - \delta_{c,c'})^\top}_{G_3:\ \text{within-class}}

(Papyan 2019, "Measurements of three-level hierarchical structure in the outliers in
the spectrum of deepnet Hessians", ICML, §2–3; Papyan 2020, "Traces of class/cross-class
structure pervade deep learning spectra", JMLR 21, §3). :math:`G_1 + G_2` has rank at most
:math:`C^2`; Papyan finds the GGN's (and the Hessian's) outliers to be its eigenvalues and
the bulk to come from :math:`G_3`. :func:`class_decomposition` computes the :math:`C^2`
mean vectors exactly (one pass over the data with :math:`C` backward passes per sample
batch), the eigenpairs of :math:`G_1 + G_2` from their :math:`C^2 \times C^2` Gram matrix, and
all four matrices as operators.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from curvlab.data import Data
from curvlab.linops._autodiff import split_supervised_batch
from curvlab.linops._base import LinearOperator, _ScaledOperator, _SumOperator
from curvlab.params import ParamSpec

from ._common import layout_of, unflatten_columns

__all__ = ["ClassDecomposition", "class_decomposition"]


class LowRankOperator(LinearOperator):
    r""":math:`U \operatorname{diag}(w) U^\top` for a tall ``U`` (``(n, r)``) and weights ``w >= 0`` (PSD)."""

    def __init__(self, U: Tensor, w: Tensor) -> None:
        super().__init__((U.shape[0], U.shape[0]), U.dtype, U.device, symmetric=True, psd=bool((w >= 0).all()))
        self.U, self.w = U, w

    def _matvec(self, v: Tensor) -> Tensor:
        return self.U @ (self.w * (self.U.T @ v))

    def _matmat(self, V: Tensor) -> Tensor:
        return self.U @ (self.w[:, None] * (self.U.T @ V))


@dataclass
class ClassDecomposition:
    r"""Papyan's decomposition :math:`G = G_1 + G_2 + G_3` of a cross-entropy GGN (:func:`class_decomposition`).

    Attributes:
        means: ``(n, C, C)`` the class means :math:`\delta_{c,c'}` (``means[:, c, c2]``).
        class_sizes: ``(C,)`` samples per class :math:`N_c`.
        priors: ``(C,)`` :math:`\pi_c = N_c / N`.
        ggn: the GGN :math:`G` (a :class:`~curvlab.linops.GGNOperator`).
        class_term: :math:`G_1` (``c' = c``), a low-rank operator.
        cross_term: :math:`G_2` (``c' != c``), a low-rank operator.
        means_term: :math:`G_1 + G_2`, a low-rank operator.
        within: :math:`G_3 = G - (G_1 + G_2)`, an operator.
        eigenvalues: the nonzero eigenvalues of :math:`G_1 + G_2`, descending (at most ``C²``).
        eigenvectors: ``(n, r)`` their orthonormal eigenvectors.
        layout: the parameters' structure (for :meth:`as_params`).
    """

    means: Tensor
    class_sizes: Tensor
    priors: Tensor
    ggn: LinearOperator
    class_term: LinearOperator
    cross_term: LinearOperator
    means_term: LinearOperator
    within: LinearOperator
    eigenvalues: Tensor
    eigenvectors: Tensor
    layout: Any = field(default=None, repr=False)

    @property
    def n_classes(self) -> int:
        return int(self.class_sizes.numel())

    def as_params(self, i: int | None = None) -> Any:
        """Eigenvector ``i`` of :math:`G_1 + G_2` (all, as a list, for ``None``) in the parameters' structure."""
        return unflatten_columns(self.layout, self.eigenvectors, i, "ClassDecomposition.as_params")

    def __repr__(self) -> str:
        top = ", ".join(f"{float(v):.4g}" for v in self.eigenvalues[: min(5, self.eigenvalues.numel())])
        return (
            f"ClassDecomposition(C={self.n_classes}, n={self.means.shape[0]}, samples={int(self.class_sizes.sum())}, "
            f"top eigenvalues of G1+G2: [{top}{', ...' if self.eigenvalues.numel() > 5 else ''}])"
        )


def _is_cross_entropy(loss_fn: Any, o: Tensor, y: Tensor) -> bool:
    with torch.no_grad():
        got = loss_fn(o, y)
        ref = F.cross_entropy(o, y, reduction="none")
        if got.ndim == 0:
            ref = ref.mean()
        return got.shape == ref.shape and bool(torch.allclose(got, ref, rtol=1e-5, atol=1e-6))


def _outputs(model: Any, spec: ParamSpec, x: Tensor, inputs: Any) -> Tensor:
    """Logits at the flat parameters ``x``; a module runs on copies of its buffers (never updated)."""
    p = spec.unflatten(x)
    if isinstance(model, nn.Module):
        bufs = {k: b.clone() for k, b in model.named_buffers()}
        return torch.func.functional_call(model, {**p, **bufs}, inputs if isinstance(inputs, tuple) else (inputs,))
    return model(p, inputs)


def class_decomposition(
    model: Any,
    data: Any = None,
    params: Any = None,
    *,
    n_classes: int | None = None,
) -> ClassDecomposition:
    r"""Split the cross-entropy GGN into class, cross-class and within-class parts (Papyan 2019, 2020).

    See the module docstring for the formulas. Two ways to call it:

    * ``class_decomposition(model, data, params=None)`` — an ``nn.Module`` (or
      ``model_fn(params, inputs) -> logits`` with ``params``) over ``(inputs, labels)``
      batches; the loss is the mean softmax cross-entropy;
    * ``class_decomposition(G)`` — a GGN from :func:`~curvlab.linops.ggn` whose loss is the
      softmax cross-entropy (checked on the first batch).

    Args:
        model: the model, or a GGN operator.
        data: one ``(inputs, labels)`` batch or an iterable of them (not with a GGN).
        params: the point (default: the module's parameters).
        n_classes: ``C`` (default: the number of logits).

    Returns:
        A :class:`ClassDecomposition` (the ``C²`` means, the operators :math:`G, G_1, G_2, G_3`
        and the eigenpairs of :math:`G_1 + G_2`).

    Raises:
        ValueError: a GGN whose loss is not the softmax cross-entropy, labels outside
            ``[0, C)``, a model whose outputs are not ``(batch, C)`` logits, missing data.
    """
    from curvlab.linops import GGNOperator, ggn

    if isinstance(model, GGNOperator):
        G = model
        if data is not None or params is not None:
            raise ValueError("class_decomposition(G): the GGN brings its own data and point")
        fn, spec, x, d = G.model, G.spec, G.x, G.data
        first = next(iter(d.batches()))
        inputs, y = split_supervised_batch(first)
        o = _outputs(fn, spec, x, inputs)
        if not _is_cross_entropy(G.loss_fn, o, y):
            raise ValueError(
                "class_decomposition needs the GGN of the softmax cross-entropy; G's loss_fn is another loss"
            )
    else:
        if data is None:
            raise ValueError("class_decomposition(model, data): data must hold (inputs, labels) batches")
        if params is None and not isinstance(model, nn.Module):
            raise ValueError("params is None: pass the parameters, or an nn.Module as model")
        G = ggn(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), params, data)
        fn, spec, x, d = model, G.spec, G.x, G.data
    if not isinstance(d, Data) or d.reduction != "mean":
        raise ValueError("class_decomposition needs the GGN of the mean loss (reduction='mean')")
    n = spec.size
    S: Tensor | None = None  # (n, C, C) sums of delta_{i,c'} per class c
    counts: Tensor | None = None
    for batch in d.batches():
        inputs, y = split_supervised_batch(batch)
        leaf = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            o = _outputs(fn, spec, leaf, inputs)
            if o.ndim != 2:
                raise ValueError(f"the model must return (batch, C) logits, got shape {tuple(o.shape)}")
            C = n_classes if n_classes is not None else o.shape[1]
            if o.shape[1] != C:
                raise ValueError(f"n_classes={C} but the model returns {o.shape[1]} logits")
            y = y.to(o.device).long()
            if bool(((y < 0) | (y >= C)).any()):
                raise ValueError(f"labels must lie in [0, {C}), got values from {int(y.min())} to {int(y.max())}")
            if S is None:
                S = torch.zeros(n, C, C, dtype=x.dtype, device=x.device)
                counts = torch.zeros(C, dtype=torch.long)
            assert counts is not None
            p = torch.softmax(o.detach(), dim=1)
            eye = torch.eye(C, dtype=o.dtype, device=o.device)
            present = torch.unique(y).tolist()
            for cp in range(C):
                # cotangent of every sample: sqrt(p_{i,c'}) (e_{c'} - p_i); one backward per true class c
                U = p[:, cp].sqrt()[:, None] * (eye[cp][None, :] - p)
                for c in present:
                    mask = (y == c).to(U.dtype)[:, None]
                    (gc,) = torch.autograd.grad(o, leaf, U * mask, retain_graph=True, allow_unused=True)
                    if gc is not None:
                        S[:, c, cp] += gc
            counts += torch.bincount(y.cpu(), minlength=C)
    if S is None or counts is None:
        raise ValueError("class_decomposition: the data holds no batch")
    if d.distributed:
        from curvlab import distributed as _dist

        S = _dist.all_reduce_sum(S)  # type: ignore[assignment]
        counts = _dist.all_reduce_sum(counts.to(x.device)).cpu()  # type: ignore[union-attr]
    C = counts.numel()
    N = int(counts.sum())
    nc = counts.to(x.dtype).to(x.device)
    means = S / nc.clamp_min(1)[None, :, None]  # delta_{c,c'} (zero for an empty class)
    priors = nc / N
    w = priors[:, None].expand(C, C)  # weight pi_c of delta_{c,c'}
    diag = torch.eye(C, dtype=torch.bool, device=x.device)
    M = means.reshape(n, C * C)
    class_term = LowRankOperator(M[:, diag.reshape(-1)], w[diag])
    cross_term = LowRankOperator(M[:, ~diag.reshape(-1)], w[~diag])
    means_term = LowRankOperator(M, w.reshape(-1))
    # eigenpairs of M W M^T from the C^2 x C^2 Gram matrix of M W^{1/2}
    B = M * w.reshape(-1).sqrt()[None, :]
    lam, Vs = torch.linalg.eigh(B.T @ B)
    keep = lam > lam.max().clamp_min(0) * C * C * torch.finfo(lam.dtype).eps
    lam, Vs = lam[keep].flip(0), Vs[:, keep].flip(1)
    vecs = (B @ Vs) / lam.sqrt()[None, :]
    within = _SumOperator([G, _ScaledOperator(means_term, -1.0)])
    return ClassDecomposition(
        means=means,
        class_sizes=counts,
        priors=priors,
        ggn=G,
        class_term=class_term,
        cross_term=cross_term,
        means_term=means_term,
        within=within,
        eigenvalues=lam,
        eigenvectors=vecs,
        layout=layout_of(spec),
    )
