r"""Empirical Fisher operator :math:`F = \frac1N \sum_n \nabla\ell_n \nabla\ell_nᵀ`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..data import Batch
from ._autodiff import CompiledProducts, _grad, call_model, compile_options, per_sample_losses, split_supervised_batch
from .ggn import OutputCurvature

__all__ = ["FisherOperator", "fisher"]


class FisherOperator(OutputCurvature):
    r"""Empirical Fisher :math:`F = w \sum_n g_n g_nᵀ`, :math:`g_n = \nabla_\theta \ell_n`.

    Never forms per-sample gradients: with :math:`J_\ell` the Jacobian of the vector of
    per-sample losses, :math:`F v = w\, J_\ellᵀ (J_\ell v)` — two reverse passes.
    ``w = 1/N`` for ``reduction="mean"``, 1 for ``"sum"``. Build it with :func:`fisher`.
    """

    def _build(self, x: Tensor, batch: Batch, weight: float) -> dict[str, Any]:
        inputs, y = split_supervised_batch(batch)
        out = call_model(self.model, self.spec, x, inputs)
        losses = per_sample_losses(self.loss_fn, out, y)
        w = self._sample_weight()
        piece = self._jacobian_pieces(x, losses)
        piece["w"] = w
        piece["value"] = losses.detach().sum() * w
        piece["grad"] = _grad(losses, x, torch.full_like(losses, w).detach(), False, retain=True)
        return piece

    def _q(self, piece: dict[str, Any], U: Tensor, batched: bool) -> Tensor:
        return piece["w"] * U

    def _fisher_one(self, x: Tensor, v: Tensor, batch: Batch, w: float) -> Tensor:
        r"""Functional :math:`w\,J_\ell^\top J_\ell v` on one batch (``jvp`` then ``vjp`` of the per-sample losses).

        This is the function ``compile=True`` compiles.
        """
        inputs, y = split_supervised_batch(batch)

        def losses_fn(z: Tensor) -> Tensor:
            return per_sample_losses(self.loss_fn, call_model(self.model, self.spec, z, inputs), y)

        _, jv = torch.func.jvp(losses_fn, (x,), (v,))
        _, pullback = torch.func.vjp(losses_fn, x)
        return pullback(w * jv)[0]


def fisher(
    model_fn: Any,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    params: Any,
    data: Any,
    *,
    reduction: str = "mean",
    cache: bool | str = "auto",
    batch_size_fn: Callable[[Batch], int] | None = None,
    compile: bool | dict[str, Any] = False,  # noqa: A002
) -> FisherOperator:
    r"""Matrix-free empirical Fisher of a supervised loss.

    .. math::
        F = \frac{1}{N} \sum_{n=1}^{N} \nabla_\theta \ell_n\, \nabla_\theta \ell_nᵀ,
        \qquad \ell_n = \ell(f(x_n; \theta), y_n)

    (without the :math:`1/N` for ``reduction="sum"``), summed exactly over every batch.

    Args:
        model_fn: ``model_fn(params, inputs) -> outputs`` or an ``nn.Module``.
        loss_fn: ``loss_fn(outputs, targets) -> per-sample losses`` of shape ``(batch,)``.
        params: the point; ``None`` takes the module's parameters.
        data: one ``(inputs, targets)`` batch or an iterable of them.
        reduction: ``"mean"`` or ``"sum"``.
        cache: keep each batch's graphs between products (``"auto"``: single batch only).
        batch_size_fn: number of samples in a batch (default: leading dimension).
        compile: compile the products with :func:`torch.compile` (``True`` or a dict of its
            options); off by default. Compiled products are functional per batch (``jvp``
            then ``vjp`` of the per-sample losses) and keep no graphs.

    Returns:
        A positive-semidefinite :class:`FisherOperator` of shape ``(P, P)``.

    Raises:
        TypeError: if ``model_fn`` or ``loss_fn`` is not callable.
        ValueError: if ``data`` is missing or ``loss_fn`` does not return per-sample losses.
    """
    op = FisherOperator.__new__(FisherOperator)
    op._init_common(model_fn, loss_fn, params, data, reduction, cache, batch_size_fn, True)
    opts = compile_options(compile)
    op._compiled = None if opts is None else CompiledProducts(op._fisher_one, opts)
    return op
