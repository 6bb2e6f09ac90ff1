r"""Hessian operator: :math:`H = \nabla^2 f(x)`, matrix-free."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..data import Batch
from ..params import ModuleState
from ._autodiff import (
    CompiledProducts,
    CurvatureBase,
    _grad,
    _independent,
    apply_model,
    compile_options,
    loss_value,
    split_supervised_batch,
    warn_train_mode_dropout,
)
from ._base import LinearOperator

__all__ = ["HessianOperator", "hessian"]

_MODES = ("auto", "reverse", "forward")


class HessianOperator(CurvatureBase, LinearOperator):
    r"""The Hessian :math:`H = \nabla^2 F(x)` of a scalar function, as a symmetric operator.

    Over data, :math:`F(x) = \sum_b w_b f(x, \text{batch}_b)` with :math:`w_b = n_b/N`
    (``reduction="mean"``, each batch's ``f`` being a batch mean) or :math:`w_b = 1`
    (``reduction="sum"``).

    Build it with :func:`hessian`. Besides the products it exposes the value and
    gradient at the point (computed with the first product, at no extra cost):
    :attr:`value`, :attr:`gradient`.
    """

    _what = "f"

    def __init__(
        self,
        f: Callable[..., Tensor],
        params: Any,
        args: tuple = (),
        data: Any = None,
        reduction: str = "mean",
        mode: str = "auto",
        cache: bool | str = "auto",
        batch_size_fn: Callable[[Batch], int] | None = None,
        compile: bool | dict[str, Any] = False,  # noqa: A002
        *,
        check_deterministic: bool = True,
        module: nn.Module | None = None,
        state: ModuleState | None = None,
        key: int | None = None,
    ) -> None:
        if not callable(f):
            raise TypeError(f"f must be callable, got {type(f).__name__}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self._setup(
            params,
            data,
            reduction,
            batch_size_fn,
            cache,
            state=state,
            key=key,
            module=module,
            check_deterministic=check_deterministic,
        )
        n = self.spec.size
        LinearOperator.__init__(self, (n, n), self.spec.dtype, self.spec.device, symmetric=True)
        self.f, self.args = f, tuple(args)
        self.mode = "reverse" if mode == "auto" else mode
        opts = compile_options(compile)
        self._compiled = None if opts is None else CompiledProducts(self._hvp_one, opts)
        self._value: Tensor | None = None
        self._gradient: Tensor | None = None

    # -------------------------------------------------------------- function
    def _f(self, x: Tensor, batch: Batch) -> Tensor:
        p = self.spec.unflatten(x)
        out = self.f(p, *self.args) if batch is None else self.f(p, batch, *self.args)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ValueError(f"f must return a scalar tensor, got {getattr(out, 'shape', type(out).__name__)}")
        return out.reshape(())

    def _uses_pieces(self) -> bool:
        return self.mode != "forward" and self._compiled is None

    def _build(self, x: Tensor, batch: Batch, weight: float) -> dict[str, Any]:
        val = self._f(x, batch) * weight
        g = torch.autograd.grad(val, x, create_graph=True, allow_unused=True)[0] if val.requires_grad else None
        if g is None:
            raise _independent("f")
        return {"x": x, "g": g, "value": val.detach()}

    def _value_grad(self) -> None:
        val = torch.zeros((), dtype=self.spec.dtype, device=self.spec.device)
        grad = self._zeros(None)
        if self._uses_pieces():
            for piece in self._pieces():
                val = val + piece["value"]
                grad = grad + piece["g"].detach()
        else:
            for i, batch, w in self._batches():
                with torch.enable_grad(), self._scope(i):
                    z = self._leaf()
                    v = self._f(z, batch) * w
                    (g,) = torch.autograd.grad(v, z, allow_unused=True) if v.requires_grad else (None,)
                if g is None:
                    raise _independent("f")
                val, grad = val + v.detach(), grad + g
        both = self._sum_ranks(torch.cat([grad, val.reshape(1).to(grad.dtype)]))
        self._value, self._gradient = both[-1].to(val.dtype), both[:-1]

    @property
    def value(self) -> Tensor:
        """:math:`F(x)` at the operator's point."""
        if self._value is None:
            self._value_grad()
        assert self._value is not None
        return self._value

    @property
    def gradient(self) -> Tensor:
        r""":math:`\nabla F(x)` at the operator's point (flat)."""
        if self._gradient is None:
            self._value_grad()
        assert self._gradient is not None
        return self._gradient

    # -------------------------------------------------------------- products
    def _reverse(self, V: Tensor, batched: bool) -> Tensor:
        out = self._zeros(V.shape[0] if batched else None)
        for piece in self._pieces():
            out = out + _grad(piece["g"], piece["x"], V, batched, retain=self.cache)
        return self._sum_ranks(out)

    def _functional(self, fn: Callable[[int, Batch, float], Tensor], like: Tensor) -> Tensor:
        """Sum over the batches of a functional (uncached) product ``fn(i, batch, w)``, checked and all-reduced."""
        out = torch.zeros_like(like)
        for i, batch, w in self._batches():
            with self._scope(i):
                out = out + fn(i, batch, w)
            self._record(i, batch, None)
        self._end_pass()
        return self._sum_ranks(out)

    @property
    def _records_value(self) -> bool:  # functional products see no value: the check compares the data
        return self._uses_pieces()

    def _forward_one(self, v: Tensor, batch: Batch, w: float) -> Tensor:
        def grad_fn(x: Tensor) -> Tensor:
            return torch.func.grad(lambda z: self._f(z, batch) * w)(x)

        return torch.func.jvp(grad_fn, (self.x,), (v,))[1]

    def _forward_block(self, V: Tensor, batch: Batch, w: float) -> Tensor:
        if V.ndim == 1:
            return self._forward_one(V, batch, w)
        try:
            return torch.func.vmap(lambda v: self._forward_one(v, batch, w), in_dims=1, out_dims=1)(V)
        except RuntimeError:
            return torch.stack([self._forward_one(V[:, j], batch, w) for j in range(V.shape[1])], dim=1)

    def _hvp_one(self, x: Tensor, v: Tensor, batch: Batch, w: float) -> Tensor:
        """Forward-over-reverse product on one batch: the function ``compile=True`` compiles."""
        return torch.func.jvp(lambda z: torch.func.grad(lambda q: self._f(q, batch) * w)(z), (x,), (v,))[1]

    def _products(self, V: Tensor) -> Tensor:
        if self._compiled is not None:
            compiled = self._compiled
            return self._functional(lambda i, b, w: compiled(self.x, V, b, w), V)
        if self.mode == "forward":
            return self._functional(lambda i, b, w: self._forward_block(V, b, w), V)
        if V.ndim == 1:
            return self._reverse(V, batched=False)
        return self._reverse(V.T.contiguous(), batched=True).T

    def _matvec(self, v: Tensor) -> Tensor:
        return self._products(v)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._products(V)


def _is_supervised_form(f: Any, params: Any) -> bool:
    """``hessian(model, loss_fn, ...)``: the second argument is a loss (a callable, no module with parameters)."""
    if not callable(params) or isinstance(params, (Tensor, tuple, list, dict)):
        return False
    if isinstance(params, nn.Module):
        return not any(p.requires_grad for p in params.parameters())
    return True


class _SupervisedObjective:
    r"""``(params, (inputs, targets)) -> loss``: the batch mean of per-sample losses, or the reduced scalar as is."""

    def __init__(self, model: Any, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.model, self.loss_fn = model, loss_fn

    def __call__(self, p: Any, batch: Batch) -> Tensor:
        inputs, y = split_supervised_batch(batch)
        losses, per_sample = loss_value(self.loss_fn, apply_model(self.model, p, inputs), y)
        return losses.mean() if per_sample else losses


def hessian(
    f: Callable[..., Tensor],
    params: Any,
    *args: Any,
    data: Any = None,
    reduction: str = "mean",
    mode: str = "auto",
    cache: bool | str = "auto",
    batch_size_fn: Callable[[Batch], int] | None = None,
    compile: bool | dict[str, Any] = False,  # noqa: A002
    check_deterministic: bool = True,
    module: nn.Module | None = None,
    state: ModuleState | None = None,
    key: int | None = None,
) -> HessianOperator:
    r"""Matrix-free Hessian :math:`\nabla^2 F(x)` of a scalar function at ``params``.

    .. math::
        F(x) = f(x, *args)  \quad\text{or, over data,}\quad
        F(x) = \sum_b w_b\, f(x, \text{batch}_b, *args),

    with :math:`w_b = n_b / N` (``reduction="mean"``) or 1 (``"sum"``).

    Two call forms:

    * functional: ``hessian(f, params, *args, data=...)`` with ``f(params, *args)`` or
      ``f(params, batch, *args)``;
    * supervised, as :func:`~curvlab.linops.ggn`: ``hessian(model, loss_fn, data=...)`` with an
      ``nn.Module`` (its trainable parameters are the point), or
      ``hessian(model_fn, loss_fn, params, data=...)`` with ``model_fn(params, inputs)``.
      ``loss_fn(outputs, targets)`` returns per-sample losses (averaged over the batch) or a
      reduced scalar (``F.cross_entropy``, ``nn.CrossEntropyLoss()``: taken as the batch mean);
      ``data`` holds ``(inputs, targets)`` batches.

    Two product modes give the same matrix:

    * ``"reverse"`` (the default, ``"auto"``): reverse-over-reverse. The gradient's
      graph is built once per batch and every product is one backward pass over
      it — the cheapest when many products are taken at one point (Lanczos, CG);
      see ``benchmarks/RESULTS.md``.
    * ``"forward"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad``,
      with ``vmap`` over columns for :meth:`~LinearOperator.matmat`; keeps no graph. It is
      slower on CPU (``benchmarks/spectrum.py --sections modes``: 1.7-2.9x per product,
      1.4-1.5x per 8-column block on two digits MLPs; up to 11x on other models): use it
      only when the cached graph does not fit in memory. ``"auto"`` picks ``"reverse"``.

    Module state (:mod:`curvlab.params`): with a module (``params`` a module, the supervised
    form, or ``module=``) the module's buffers are a snapshot that no product writes to
    (train-mode BatchNorm normalises with batch statistics; running statistics are untouched),
    dropout masks are fixed per batch (the same in every product; a warning says so for a
    module in train mode), and attention runs on torch's math kernel (the fused kernels have
    no second derivative).

    Args:
        f: ``f(params, *args) -> scalar``, or ``f(params, batch, *args)`` when ``data`` is given.
            ``params`` arrive in the structure they were handed in (a dict for modules). In the
            supervised form: the model.
        params: the point: a tensor, tuple/list/dict of tensors, or an ``nn.Module``. In the
            supervised form: the loss function.
        *args: extra arguments passed to ``f`` (supervised form: the parameters of a functional model).
        data: ``None``, one batch, or an iterable of batches.
        reduction: ``"mean"`` or ``"sum"`` over batches (see above).
        mode: ``"auto"``, ``"reverse"`` or ``"forward"``.
        cache: keep each batch's graph between products (``"auto"``: only for a single batch).
        batch_size_fn: number of samples in a batch (default: leading dimension).
        compile: compile the products with :func:`torch.compile` (``True``, or a dict of its
            options, e.g. ``{"mode": "max-autotune"}``); off by default. Compiled products
            are forward-over-reverse (``mode`` is then ignored) and compile once per batch
            shape, which pays off for many products at one point on a GPU
            (``benchmarks/scaling.py``).
        check_deterministic: verify that products which re-evaluate the function (several
            batches without cache, ``cache=False``, ``mode="forward"``, ``compile=True``) see the
            same batches and values in every pass; the check is free (it compares what the
            products compute anyway) and raises :class:`~curvlab.linops.NondeterministicError` at
            the second product. Cached products replay one graph and are never checked.
        module: the module whose buffers ``f`` reads when ``params`` are plain tensors taken from it.
        state: a :class:`~curvlab.params.ModuleState` to evaluate under (a problem passes its own).
        key: random-number key of a single batch (a problem passes a drawn batch's key).

    Returns:
        A symmetric :class:`HessianOperator` of shape ``(P, P)`` with ``P`` the number of parameters.

    Raises:
        TypeError: if ``f`` is not callable or ``params`` has an unsupported type.
        ValueError: on an unknown ``mode``/``reduction``, if ``f`` does not return a scalar or
            does not depend on ``params`` (raised at the first product).

    Example:
        >>> import torch, curvlab as cl
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> H = cl.linops.hessian(lambda x: 0.5 * x @ A @ x, torch.zeros(2))
        >>> H @ torch.tensor([1.0, 0.0])
        tensor([2., 1.])
        >>> net = torch.nn.Linear(3, 2)
        >>> X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> cl.linops.hessian(net, torch.nn.CrossEntropyLoss(), data=(X, y)).shape
        (8, 8)
    """
    kw = dict(check_deterministic=check_deterministic, module=module, state=state, key=key)
    if _is_supervised_form(f, params):
        if not callable(f):
            raise TypeError(f"model must be callable or an nn.Module, got {type(f).__name__}")
        if len(args) > 1:
            raise TypeError(
                "hessian(model, loss_fn, params, data=...) takes at most one positional argument after loss_fn"
            )
        point = args[0] if args else f
        if not args and not isinstance(f, nn.Module):
            raise ValueError("hessian(model_fn, loss_fn, params, data=...): pass the parameters of a functional model")
        if data is None:
            raise ValueError(
                "hessian(model, loss_fn, data=...) needs data: one (inputs, targets) batch or an iterable of them"
            )
        warn_train_mode_dropout(f, "hessian")
        objective = _SupervisedObjective(f, params)
        return HessianOperator(objective, point, (), data, reduction, mode, cache, batch_size_fn, compile, **kw)
    warn_train_mode_dropout(params if isinstance(params, nn.Module) else module, "hessian")
    return HessianOperator(f, params, args, data, reduction, mode, cache, batch_size_fn, compile, **kw)
