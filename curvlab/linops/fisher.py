r"""Fisher operators: the empirical Fisher :math:`\frac1N \sum_n \nabla\ell_n \nabla\ell_nᵀ` and the Monte-Carlo Fisher.

The **empirical** Fisher uses the gradients of the losses at the data's own labels; the
**Monte-Carlo** (sampled-label) Fisher uses labels drawn from the model's predictive
distribution :math:`\hat y \sim p(y \mid f(x_n; \theta))`, which makes it an unbiased estimate
of the true Fisher — equal, for the negative log-likelihoods of exponential families in their
natural parameters (softmax cross-entropy, squared error, logistic loss), to the GGN in
expectation (Kunstner, Hennig & Balles 2019, "Limitations of the empirical Fisher
approximation for natural gradient descent", Sec. 3; Martens 2020, "New insights and
perspectives on the natural gradient method", Sec. 9.2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from ..checks import check_choice, check_int
from ..data import Batch
from ..params import ModuleState, _mix
from ._autodiff import (
    CompiledProducts,
    _grad,
    call_model,
    compile_options,
    per_sample_losses,
    split_supervised_batch,
)
from .ggn import OutputCurvature

__all__ = ["FisherOperator", "fisher", "LIKELIHOODS"]


def _repeat(y: Any, S: int) -> Any:
    """``S`` copies of a batch's targets stacked along the sample dimension."""
    if isinstance(y, Tensor):
        return y.repeat((S,) + (1,) * (y.ndim - 1)) if y.ndim else y
    return y


#: the predictive distributions ``fisher(kind="mc")`` samples labels from
LIKELIHOODS = ("categorical", "gaussian", "bernoulli")
_KINDS = ("empirical", "mc")


def _likelihood_of(loss_fn: Any) -> str | None:
    """The likelihood behind a torch loss (``None`` when it cannot be told)."""
    if loss_fn is F.cross_entropy or isinstance(loss_fn, nn.CrossEntropyLoss):
        return "categorical"
    if loss_fn is F.mse_loss or isinstance(loss_fn, nn.MSELoss):
        return "gaussian"
    if loss_fn is F.binary_cross_entropy_with_logits or isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return "bernoulli"
    return None


class FisherOperator(OutputCurvature):
    r"""Fisher :math:`F = w \sum_n J_nᵀ\, \mathbb E[g_n g_nᵀ]\, J_n`, :math:`g_n = \nabla_o \ell(o_n, \cdot)`.

    * ``kind="empirical"``: :math:`F = w\sum_n \nabla_\theta\ell_n \nabla_\theta\ell_nᵀ` at the
      data's labels. Never forms per-sample gradients: with :math:`J_\ell` the Jacobian of the
      vector of per-sample losses, :math:`F v = w\, J_\ellᵀ (J_\ell v)` — two reverse passes.
    * ``kind="mc"``: labels :math:`\hat y_{ns} \sim p(\cdot \mid o_n)`, :math:`s = 1..S`, drawn once
      per batch (the same in every product) and :math:`F = \frac{w}{S}\sum_{n,s} J_nᵀ g_{ns} g_{ns}ᵀ J_n`
      with :math:`g_{ns} = \nabla_o \ell(o_n, \hat y_{ns})`: a Jacobian-vector product, an output-space
      product with the sampled gradients, a vector-Jacobian product.

    ``w = 1/N`` for ``reduction="mean"``, 1 for ``"sum"``. Build it with :func:`fisher`.
    """

    _what = "the per-sample losses"

    def _build(self, x: Tensor, batch: Batch, weight: float) -> dict[str, Any]:
        inputs, y = split_supervised_batch(batch)
        out = call_model(self.model, self.spec, x, inputs)
        w = self._sample_weight()
        if self.kind == "empirical":
            losses = per_sample_losses(self.loss_fn, out, y)
            piece = self._jacobian_pieces(x, losses)
            piece["w"] = w
            piece["value"] = losses.detach().sum() * w
            piece["grad"] = _grad(losses, x, torch.full_like(losses, w).detach(), False, retain=True)
            return piece
        piece = self._jacobian_pieces(x, out)
        od = out.detach().requires_grad_(True)
        losses = per_sample_losses(self.loss_fn, od, y)
        (g_true,) = torch.autograd.grad(losses.sum() * w, od)
        piece["w"] = w / self.mc_samples
        piece["G"] = self._sampled_gradients(od.detach(), y, self._batch_index)
        piece["value"] = losses.detach().sum() * w
        piece["grad"] = _grad(out, x, g_true, False, retain=True)
        return piece

    def _build_at(self, i: int, batch: Batch, weight: float) -> dict[str, Any]:
        self._batch_index = i
        return super()._build_at(i, batch, weight)

    # ------------------------------------------------------------- sampling
    def _sample_labels(self, o: Tensor, y: Any, gen: torch.Generator) -> Any:
        """Labels drawn from the predictive distribution at the outputs ``o`` (the form of ``y``)."""
        if self.likelihood == "categorical":
            probs = torch.softmax(o, dim=1)
            flat = probs.movedim(1, -1).reshape(-1, probs.shape[1])
            idx = torch.multinomial(flat, 1, generator=gen).reshape(probs.movedim(1, -1).shape[:-1])
            if isinstance(y, Tensor) and y.is_floating_point() and y.shape == o.shape:  # soft labels: one-hot
                return F.one_hot(idx, o.shape[1]).movedim(-1, 1).to(o.dtype)
            return idx.to(y.dtype) if isinstance(y, Tensor) else idx
        if self.likelihood == "bernoulli":
            return torch.bernoulli(torch.sigmoid(o), generator=gen).to(o.dtype)
        # gaussian: loss = c ||o - y||^2 per sample -> p(y|o) = N(o, I / (2c))
        c = self._gaussian_scale(o, y)
        eps = torch.randn(o.shape, generator=gen, dtype=o.dtype, device=o.device)
        return o + eps / torch.sqrt(2 * c).reshape((-1,) + (1,) * (o.ndim - 1))

    def _gaussian_scale(self, o: Tensor, y: Any) -> Tensor:
        """Per-sample ``c`` of a squared-error loss ``c ||o - y||²`` (the loss one unit away from the mean)."""
        e = torch.zeros_like(o).reshape(o.shape[0], -1)
        e[:, 0] = 1
        with torch.no_grad():
            c = per_sample_losses(self.loss_fn, o, o + e.reshape(o.shape)) - per_sample_losses(self.loss_fn, o, o)
        if not bool((c > 0).all()):
            raise ValueError(
                "fisher(kind='mc', likelihood='gaussian') needs a squared-error loss c·||o - y||² with c > 0"
            )
        return c

    def _nll(self, o: Tensor, yhat: Any) -> Tensor:
        """Per-sample negative log-likelihood of labels ``yhat`` (summed over any non-batch position)."""
        if self.likelihood == "categorical":
            logp = torch.log_softmax(o, dim=1)
            if isinstance(yhat, Tensor) and yhat.is_floating_point() and yhat.shape == o.shape:
                nll = -(yhat * logp).sum(1)
            else:
                nll = -logp.gather(1, yhat.long().unsqueeze(1)).squeeze(1)
        else:  # bernoulli
            nll = F.binary_cross_entropy_with_logits(o, yhat, reduction="none")
        return nll.reshape(o.shape[0], -1).sum(1)

    def _sampled_gradients(self, o: Tensor, y: Any, i: int) -> Tensor:
        r"""``(S, b, ...)``: output gradients of the losses at ``S`` sampled label sets, scaled to the likelihood.

        For a loss :math:`\ell = s\,(-\log p)` (e.g. a mean over ``c`` logistic outputs, ``s = 1/c``) the
        Fisher of the loss is :math:`s\,\mathbb E[\nabla(-\log p)\nabla(-\log p)ᵀ] = \mathbb E[g gᵀ]/s`, so the
        gradients come back divided by :math:`\sqrt s` (``s`` measured per sample as :math:`\ell / (-\log p)`
        at the sampled labels); the Gaussian likelihood absorbs ``s`` in its variance instead.
        """
        S, b = self.mc_samples, o.shape[0]
        gen = torch.Generator(device=o.device).manual_seed(_mix(self.mc_seed, i))
        rep = o.detach().repeat((S,) + (1,) * (o.ndim - 1))  # (S*b, ...): all label sets in one pass
        y_rep = None if self.likelihood != "gaussian" else _repeat(y, S)
        yhat = self._sample_labels(rep, _repeat(y, S) if y_rep is None else y_rep, gen)
        with torch.enable_grad():
            oo = rep.requires_grad_(True)
            losses = per_sample_losses(self.loss_fn, oo, yhat)
            (g,) = torch.autograd.grad(losses.sum(), oo)
        if self.likelihood != "gaussian":
            with torch.no_grad():
                scale = losses.detach() / self._nll(rep.detach(), yhat)
            if not bool((scale > 0).all()):
                raise ValueError(
                    f"fisher(kind='mc', likelihood={self.likelihood!r}): the loss is not a positive multiple of the "
                    "negative log-likelihood at the sampled labels"
                )
            g = g / scale.sqrt().reshape((-1,) + (1,) * (g.ndim - 1))
        return g.reshape((S, b) + tuple(o.shape[1:]))

    # ------------------------------------------------------------- products
    def _q(self, piece: dict[str, Any], U: Tensor, batched: bool) -> Tensor:
        if self.kind == "empirical":
            return piece["w"] * U
        G = piece["G"]  # (S, b, ...)
        S, b = G.shape[0], G.shape[1]
        Gf = G.reshape(S, b, -1)
        if not batched:
            coef = (Gf * U.reshape(1, b, -1)).sum(-1)  # (S, b)
            return piece["w"] * (coef[..., None] * Gf).sum(0).reshape(U.shape)
        k = U.shape[0]
        coef = torch.einsum("sbc,kbc->skb", Gf, U.reshape(k, b, -1))
        return piece["w"] * torch.einsum("skb,sbc->kbc", coef, Gf).reshape(U.shape)

    def _fisher_one(self, x: Tensor, v: Tensor, batch: Batch, w: float) -> Tensor:
        r"""Functional :math:`w\,J_\ell^\top J_\ell v` (:math:`w = 1/N` or 1) on one batch.

        ``jvp`` then ``vjp`` of the per-sample losses.

        This is the function ``compile=True`` compiles (empirical Fisher only).
        """
        inputs, y = split_supervised_batch(batch)

        def losses_fn(z: Tensor) -> Tensor:
            return per_sample_losses(self.loss_fn, call_model(self.model, self.spec, z, inputs), y)

        _, jv = torch.func.jvp(losses_fn, (x,), (v,))
        _, pullback = torch.func.vjp(losses_fn, x)
        return pullback(self._sample_weight() * jv)[0]  # per-sample losses: the weight is 1/N (or 1), not n_b/N

    def _value_of(self, o: Tensor, y: Any, weight: float) -> Tensor:
        return per_sample_losses(self.loss_fn, o, y).sum() * self._sample_weight()


def fisher(
    model_fn: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    params: Any,
    data: Any,
    *,
    kind: str = "empirical",
    mc_samples: int = 1,
    likelihood: str | None = None,
    seed: int | None = None,
    reduction: str = "mean",
    cache: bool | str = "auto",
    batch_size_fn: Callable[[Batch], int] | None = None,
    compile: bool | dict[str, Any] = False,  # noqa: A002
    check_deterministic: bool = True,
    state: ModuleState | None = None,
    key: int | None = None,
) -> FisherOperator:
    r"""Matrix-free Fisher of a supervised loss: empirical (data labels) or Monte-Carlo (sampled labels).

    .. math::
        F_{\text{emp}} = \frac{1}{N} \sum_{n=1}^{N} \nabla_\theta \ell_n\, \nabla_\theta \ell_nᵀ,
        \qquad
        F_{\text{MC}} = \frac{1}{NS} \sum_{n=1}^{N}\sum_{s=1}^{S}
            \nabla_\theta \ell(f(x_n;\theta), \hat y_{ns})\, \nabla_\theta \ell(f(x_n;\theta), \hat y_{ns})ᵀ,

    with :math:`\ell_n = \ell(f(x_n; \theta), y_n)` and :math:`\hat y_{ns} \sim p(y \mid f(x_n;\theta))`
    (without the :math:`1/N` for ``reduction="sum"``), summed exactly over every batch. The
    empirical Fisher is the one optimizers such as M-FAC approximate; it is *not* the Fisher
    information and can be a poor curvature model far from a minimum (Kunstner et al. 2019). The
    MC Fisher is an unbiased estimate of the Fisher information (= the GGN for cross-entropy,
    squared error and logistic losses) at a cost of :math:`S` output-space gradients per sample.
    Its labels are drawn once per batch from a generator seeded by ``(seed, batch index)``, so
    the operator is one fixed matrix (same products every time).

    Args:
        model_fn: ``model_fn(params, inputs) -> outputs`` or an ``nn.Module``.
        loss_fn: ``loss_fn(outputs, targets)``: per-sample losses ``(batch,)`` or a reduced scalar
            (per-sample losses are then those of one-sample batches).
        params: the point; ``None`` takes the module's parameters.
        data: one ``(inputs, targets)`` batch or an iterable of them.
        kind: ``"empirical"`` (default) or ``"mc"`` (sampled labels).
        mc_samples: labels :math:`S` drawn per sample (``kind="mc"``).
        likelihood: the distribution the loss is the negative log of, for ``kind="mc"``:
            ``"categorical"`` (softmax cross-entropy; ``targets`` class indices or probabilities),
            ``"gaussian"`` (squared error :math:`c\|o - y\|^2`, variance :math:`1/2c`) or
            ``"bernoulli"`` (binary cross-entropy with logits). Default: told from ``loss_fn``
            when it is ``F.cross_entropy`` / ``nn.CrossEntropyLoss``, ``F.mse_loss`` /
            ``nn.MSELoss`` or ``F.binary_cross_entropy_with_logits`` / ``nn.BCEWithLogitsLoss``.
        seed: base seed of the sampled labels (default: the module state's seed).
        reduction: ``"mean"`` or ``"sum"``.
        cache: keep each batch's graphs between products (``"auto"``: single batch only).
        batch_size_fn: number of samples in a batch (default: leading dimension).
        compile: compile the products with :func:`torch.compile` (``True`` or a dict of its
            options; empirical Fisher only); off by default. Compiled products are functional per
            batch (``jvp`` then ``vjp`` of the per-sample losses) and keep no graphs.
        check_deterministic: verify products that re-evaluate the model against the first pass
            (see :func:`~curvlab.linops.hessian`).
        state: a :class:`~curvlab.params.ModuleState` to evaluate under (a problem passes its own).
        key: random-number key of a single batch (a problem passes a drawn batch's key).

    Returns:
        A positive-semidefinite :class:`FisherOperator` of shape ``(P, P)``.

    Raises:
        TypeError: if ``model_fn`` or ``loss_fn`` is not callable.
        ValueError: if ``data`` is missing, ``loss_fn`` returns neither per-sample losses nor a
            scalar, ``kind``/``likelihood``/``mc_samples`` are invalid, or ``kind="mc"`` comes
            without a likelihood that can be told from ``loss_fn``.

    Example:
        >>> import torch, curvlab as cl
        >>> net = torch.nn.Linear(3, 2)
        >>> X, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> Fmc = cl.linops.fisher(net, torch.nn.CrossEntropyLoss(), None, (X, y), kind="mc", mc_samples=4)
        >>> Fmc.shape, Fmc.is_psd
        ((8, 8), True)
    """

    check_choice(kind, "kind", _KINDS)
    check_int(mc_samples, "mc_samples", minimum=1)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    lik = None
    if kind == "mc":
        lik = likelihood if likelihood is not None else _likelihood_of(loss_fn)
        if lik is None:
            raise ValueError(
                "fisher(kind='mc') samples labels from the model's predictive distribution: pass "
                "likelihood='categorical' (cross-entropy), 'gaussian' (squared error) or 'bernoulli' "
                "(binary cross-entropy with logits); it could not be told from loss_fn"
            )
        check_choice(lik, "likelihood", LIKELIHOODS)
        if compile not in (False, None):
            raise ValueError("compile=True is available for kind='empirical' only")
    elif likelihood is not None:
        check_choice(likelihood, "likelihood", LIKELIHOODS)
    op = FisherOperator.__new__(FisherOperator)
    op.kind, op.likelihood, op.mc_samples = kind, lik, int(mc_samples)
    op._batch_index = 0
    op._init_common(
        model_fn,
        loss_fn,
        params,
        data,
        reduction,
        cache,
        batch_size_fn,
        True,
        check_deterministic=check_deterministic,
        state=state,
        key=key,
        what="fisher",
    )
    op.mc_seed = op.state.seed if seed is None else int(seed)
    opts = compile_options(compile)
    op._compiled = None if opts is None else CompiledProducts(op._fisher_one, opts)
    return op
