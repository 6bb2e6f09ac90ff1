r"""The optimality condition recorded once by plain autograd, and the transform checks around it.

Outside ``torch.func`` transforms (the common case: ``loss.backward()``,
``torch.autograd.grad``, ``torch.autograd.forward_ad``, :func:`~implicit.root_vjp`
on plain tensors) every product that implicit differentiation needs comes from
*one* evaluation of :math:`F(y^*, \theta)` with ``y*`` and ``theta`` as autograd
leaves (Blondel et al. 2021, eqs. (3)–(4)):

* :math:`A^\top u` and :math:`B^\top u` — one backward pass each through the
  recorded graph (``retain_graph``), ``k`` of them at once with
  ``is_grads_batched``;
* :math:`A v` and :math:`B\dot\theta` — the same graph differentiated twice:
  :math:`g(u) = \partial F^\top u` is recorded once with ``create_graph`` at a
  symbolic ``u``, and each product is one backward pass of the linear map
  :math:`g` (the "double-vjp" linearisation, built once per call).

No product builds a fresh ``torch.func`` transform, so a product costs one pass
through the autograd engine. Inside transforms the differentiable products of
:mod:`implicit._linear_system` are used instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "Recorded",
    "check_forward_levels",
    "functorch_active",
    "is_legacy_batched",
    "legacy_level",
]


def _interpreters() -> list[str]:
    try:
        stack = torch._C._functorch.get_interpreter_stack() or []
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        return []
    return [str(i.key()) for i in stack]


def functorch_active() -> bool:
    """A ``torch.func`` transform (grad, vjp, jvp, vmap, jacrev, jacfwd, hessian) is running."""
    return torch._C._functorch.maybe_current_level() is not None


def check_forward_levels(what: str) -> None:
    """Refuse forward-over-forward differentiation, which torch computes wrongly through ``autograd.Function``.

    torch's nested forward mode through an :class:`torch.autograd.Function` with a ``jvp``
    rule returns zero or wrong second derivatives (a minimal Function shows it, torch 2.x),
    so ``jacfwd(jacfwd(f))`` and ``jvp(jvp(...))`` through implicit differentiation stop here
    with the routes that are exact.

    Raises:
        NotImplementedError: two or more forward-mode levels are active.
    """
    n_jvp = sum(k.endswith("Jvp") for k in _interpreters())
    if n_jvp == 0 and torch.autograd.forward_ad._current_level >= 0:
        n_jvp = 1
    if n_jvp >= 2:
        raise NotImplementedError(
            f"{what}: forward-over-forward differentiation (torch.func.jacfwd(jacfwd(f)), jvp of jvp) is not "
            "supported: torch's nested forward mode through an autograd.Function with a jvp rule gives wrong "
            "second derivatives. Use torch.func.hessian(f) (= jacfwd(jacrev(f))), jacrev(jacfwd(f)) or "
            "jacrev(jacrev(f)) instead: each has at most one forward level and is exact."
        )


def is_legacy_batched(t: object) -> bool:
    """``t`` is batched by ``torch.autograd.grad(..., is_grads_batched=True)`` (the legacy vmap)."""
    return isinstance(t, Tensor) and bool(torch._C._functorch.is_legacy_batchedtensor(t))


def legacy_level() -> int:
    """The innermost legacy-vmap level (that of ``is_grads_batched``)."""
    level = torch._C._vmapmode_increment_nesting()
    torch._C._vmapmode_decrement_nesting()
    return level - 1


def _flat(gs: Sequence[Tensor], batched: bool) -> Tensor:
    if batched:
        return (
            torch.cat([g.reshape(g.shape[0], -1) for g in gs], dim=1)
            if len(gs) > 1
            else gs[0].reshape(gs[0].shape[0], -1)
        )
    return torch.cat([g.reshape(-1) for g in gs]) if len(gs) > 1 else gs[0].reshape(-1)


def _split(x: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat ``(n,)`` vector, or a ``(k, n)`` batch, into pieces shaped like ``like``."""
    sizes = [t.numel() for t in like]
    if x.ndim == 1:
        return [p.reshape(t.shape) for p, t in zip(torch.split(x, sizes), like)]
    return [p.reshape(x.shape[0], *t.shape) for p, t in zip(torch.split(x, sizes, dim=1), like)]


def _vjp(outputs: object, inputs: Sequence[Tensor], g: object, batched: bool) -> list[Tensor]:
    """``torch.autograd.grad`` on a retained graph; ``batched``: vmapped over the leading dim of ``g``."""

    def one(gg: object) -> tuple[Tensor, ...]:
        return torch.autograd.grad(outputs, inputs, gg, retain_graph=True, allow_unused=True, materialize_grads=True)

    if not batched:
        return list(one(g))
    return list(torch.func.vmap(one)(g))


def foreign_leaves(out: Tensor, ours: Sequence[Tensor]) -> list[Tensor]:
    """Autograd leaves of ``out``'s graph that require grad and are not in ``ours`` (tensors captured by closure)."""
    ids = {id(t) for t in ours}
    seen: set[int] = set()
    stack = [out.grad_fn]
    found: list[Tensor] = []
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if var is not None and id(var) not in ids:
            found.append(var)
        stack.extend(f for f, _ in fn.next_functions)
    return found


class Recorded:
    r"""``F(y, θ)`` recorded by plain autograd at one point; products with :math:`A, A^\top, B, B^\top`.

    Args:
        F: the flat optimality value, computed from ``y`` and ``theta`` with grad enabled.
        y: the ``y`` leaves (requiring grad) ``F`` was computed from.
        theta: the ``theta`` tensors; those that are differentiated require grad.
    """

    def __init__(self, F: Tensor, y: Sequence[Tensor], theta: Sequence[Tensor]) -> None:
        self.F, self.y, self.theta = F, list(y), list(theta)
        self.n = F.numel()
        self._lin: tuple[Tensor, list[Tensor], list[Tensor]] | None = None

    # ------------------------------------------------------------- reverse mode
    def _grad(self, inputs: Sequence[Tensor], g: Tensor, batched: bool) -> list[Tensor]:
        """Vector-Jacobian products of ``F`` with ``g`` (``(n,)``, or ``(k, n)`` when ``batched``).

        A batch is one ``torch.func.vmap`` over ``torch.autograd.grad`` on the recorded graph (several
        times faster on CPU than ``is_grads_batched``, whose legacy vmap lacks batching rules).
        """
        if not self.F.requires_grad:  # F does not depend on any leaf
            lead = (g.shape[0],) if batched else ()
            return [torch.zeros(lead + tuple(t.shape), dtype=t.dtype, device=t.device) for t in inputs]
        return _vjp(self.F, inputs, g, batched)

    def at(self, u: Tensor) -> Tensor:
        r""":math:`A^\top u` for ``u`` of shape ``(n,)``."""
        return _flat(self._grad(self.y, u, False), False)

    def at_block(self, U: Tensor) -> Tensor:
        r""":math:`A^\top U` for ``U`` of shape ``(n, k)``: one batched pass (else a loop)."""
        if U.shape[1] == 1:
            return self.at(U[:, 0]).unsqueeze(1)
        try:
            return _flat(self._grad(self.y, U.T.contiguous(), True), True).T
        except RuntimeError:
            return torch.stack([self.at(U[:, j]) for j in range(U.shape[1])], dim=1)

    def bt(self, U: Tensor, idx: Sequence[int]) -> list[Tensor]:
        r""":math:`-B^\top U` for ``theta[idx]``, shaped like them (``(k, *shape)`` for ``(n, k)``)."""
        inputs = [self.theta[i] for i in idx]
        if U.ndim == 1:
            return [-g for g in self._grad(inputs, U, False)]
        try:
            gs = self._grad(inputs, U.T.contiguous(), True)
        except RuntimeError:
            cols = [self._grad(inputs, U[:, j], False) for j in range(U.shape[1])]
            gs = [torch.stack([c[i] for c in cols]) for i in range(len(inputs))]
        return [-g for g in gs]

    def jacobian(self, idx: Sequence[int]) -> tuple[Tensor, list[Tensor]] | None:
        r""":math:`A` ``(n, n)`` and the rows of :math:`B` for ``theta[idx]`` (each ``(n, *shape)``), in one pass.

        One batched backward pass with the identity as cotangents (row ``i`` of
        :math:`[A\; B]` is :math:`e_i^\top \partial F`); ``None`` where the batched
        pass is not available (the caller then uses products).
        """
        inputs = [*self.y, *(self.theta[i] for i in idx)]
        eye = torch.eye(self.n, dtype=self.F.dtype, device=self.F.device)
        try:
            gs = self._grad(inputs, eye, True)
        except RuntimeError:
            return None
        return _flat(gs[: len(self.y)], True), list(gs[len(self.y) :])

    # ------------------------------------------------------------- forward mode
    def _linearized(self) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        r"""``u0`` with :math:`\partial_y F^\top u_0` and :math:`\partial_\theta F^\top u_0` (``create_graph``)."""
        if self._lin is None:
            with torch.enable_grad():
                u0 = torch.zeros_like(self.F).requires_grad_()
                inputs = [*self.y, *[t for t in self.theta if t.requires_grad]]
                gs = torch.autograd.grad(
                    self.F, inputs, u0, create_graph=True, allow_unused=True, materialize_grads=True
                )
            self._lin = (u0, list(gs[: len(self.y)]), list(gs[len(self.y) :]))
        return self._lin

    def _second(self, outs: Sequence[Tensor], tangents: Sequence[Tensor], batched: bool) -> Tensor:
        u0 = self._lin[0]  # type: ignore[index]
        pairs = [(o, t) for o, t in zip(outs, tangents) if o.requires_grad]
        if not pairs:
            lead = (tangents[0].shape[0],) if batched else ()
            return torch.zeros(lead + (self.n,), dtype=u0.dtype, device=u0.device)
        (g,) = _vjp([o for o, _ in pairs], [u0], [t for _, t in pairs], batched)
        return g.reshape(g.shape[0], -1) if batched else g.reshape(-1)

    def a(self, v: Tensor) -> Tensor:
        r""":math:`A v` for ``v`` of shape ``(n,)``."""
        _, gy, _ = self._linearized()
        return self._second(gy, _split(v, self.y), False)

    def a_block(self, V: Tensor) -> Tensor:
        r""":math:`A V` for ``V`` of shape ``(n, k)``."""
        if V.shape[1] == 1:
            return self.a(V[:, 0]).unsqueeze(1)
        _, gy, _ = self._linearized()
        try:
            return self._second(gy, _split(V.T.contiguous(), self.y), True).T
        except RuntimeError:
            return torch.stack([self.a(V[:, j]) for j in range(V.shape[1])], dim=1)

    def b(self, tangents: Sequence[Tensor | None]) -> Tensor:
        r""":math:`B\dot\theta` (flat ``(n,)``); ``tangents`` aligned with ``theta`` (``None``: zero)."""
        _, _, gt = self._linearized()
        diff = [(t, d) for t, d in zip(self.theta, tangents) if t.requires_grad]
        outs, tans = [], []
        for o, (t, d) in zip(gt, diff):
            if d is not None:
                outs.append(o)
                tans.append(d.to(t.dtype).reshape(t.shape))
        if not outs:
            return torch.zeros(self.n, dtype=self.F.dtype, device=self.F.device)
        return self._second(outs, tans, False)
