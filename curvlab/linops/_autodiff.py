"""Shared autodiff machinery for the curvature operators (and the solvers' dense Jacobians).

All operators here live at a fixed point ``x`` (a flat parameter vector) and
take many products there. The products are reverse-mode passes over graphs
that are built once per batch and then reused ("cached"):

* Hessian:  ``g = ∇f(x)`` with ``create_graph=True``; ``H v = ∂(gᵀv)/∂x`` is one
  backward pass over the gradient's graph.
* Jacobians of an output ``o(x)``: ``Jᵀu`` is one backward pass over the
  forward graph; ``J v`` uses the double-vjp identity ``J v = ∂/∂u (Jᵀu)ᵀv``
  with a dummy ``u``, one backward pass over the (linear-in-``u``) vjp graph.

Every vector-Jacobian product of the package, for one cotangent or a stack of them,
goes through :func:`batched_vjp` (the solvers' dense Jacobians included).

A piece of a batch holds the leaf ``x`` and what its graphs produced. With ``cache=False``
nothing is kept and each product rebuilds the graphs batch by batch (memory of one batch,
about twice the work).

Module state (:mod:`curvlab.params`): every batch is evaluated inside the operator's
:class:`~curvlab.params.ModuleState` scope — the module's buffers are a snapshot (never
written), torch's random numbers are keyed by the batch (dropout masks are the same in every
product), and attention runs on the math kernel (twice differentiable).

Determinism check (``check_deterministic=True``, the default): an operator whose products
re-evaluate the function (several batches without cache, ``cache=False``, ``mode="forward"``,
``compile=True``) records, in its first pass over the data, each batch's size, a fingerprint
of its tensors (their float64 sums) and the function's value there, and compares them in every
later pass (free: the values come with the products; one host synchronisation per product).
A changed batch (a shuffling ``DataLoader``, random augmentation) or a changed value (randomness
curvlab does not control) raises :class:`NondeterministicError` at the second product, before a
Krylov method can silently go wrong. Operators that replay one cached graph (one batch, the
default) cannot change between products and are not checked.

Data-parallel (:mod:`curvlab.distributed`): an operator created under a process group
sums its products over this rank's batches (with globally normalised weights) and
all-reduces them — one collective per product — so every rank holds the product of the
operator over the whole dataset. A rank without batches contributes zeros and stays in
every collective.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as _dist
from ..data import Batch, Data
from ..params import ModuleState, ParamSpec, batch_key, tree_leaves, tree_map

__all__ = [
    "batched_vjp",
    "NondeterministicError",
    "call_model",
    "apply_model",
    "split_supervised_batch",
    "per_sample_losses",
    "loss_value",
    "CurvatureBase",
]

#: on CPU, inputs of at least this many entries make a loop of backward passes cheaper than
#: ``is_grads_batched`` (vmap over the backward); below it, Python's per-call overhead dominates.
#: A size rule, not a timing, so that the path (and every bit of the result) is reproducible.
_CPU_LOOP_NUMEL = 1 << 15


class NondeterministicError(ValueError):
    """An operator changed between two products: its data or its function is not deterministic."""


def _zeros_for(inputs: Sequence[Tensor], k: int | None) -> list[Tensor]:
    return [
        torch.zeros(((k,) if k is not None else ()) + tuple(t.shape), dtype=t.dtype, device=t.device) for t in inputs
    ]


def _vjp_once(outputs: Tensor, ins: list[Tensor], go: Tensor, retain: bool) -> list[Tensor]:
    gs = torch.autograd.grad(outputs, ins, go, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(ins, gs)]


def batched_vjp(
    outputs: Tensor,
    inputs: Tensor | Sequence[Tensor],
    cotangents: Tensor,
    batched: bool = False,
    retain: bool = True,
) -> Any:
    """Vector-Jacobian product(s) of ``outputs`` w.r.t. ``inputs``: the one helper every layer uses.

    ``batched=False``: ``cotangents`` has the shape of ``outputs`` and the result the shape of
    ``inputs``. ``batched=True``: ``cotangents`` is a stack ``(k, *outputs.shape)`` and every
    result gets a leading ``k``. Inputs that ``outputs`` does not depend on get zeros.

    On CUDA a stack goes through one vmapped backward (``is_grads_batched``), with a loop as
    fallback for ops without a batching rule. On CPU, inputs of 32,768 entries or more (a big
    graph) take a loop of passes, which beats the vmapped backward there (1.6x on a
    64-256-256-10 MLP with 85k parameters, 1,797 samples); smaller ones the vmapped backward
    (up to 10x faster than a loop of 0.5 ms passes on a 500-parameter MLP). The rule is by
    size, not by timing, so a run and its resumed copy take the same path bit for bit.

    Args:
        outputs: a tensor computed with autograd from ``inputs``.
        inputs: one tensor or a sequence of tensors.
        cotangents: one cotangent or (``batched``) a stack of them.
        batched: whether ``cotangents`` is a stack.
        retain: keep the graph after the (last) pass.

    Returns:
        A tensor (``inputs`` a tensor) or a list of tensors.
    """
    single = isinstance(inputs, Tensor)
    ins = [inputs] if single else list(inputs)  # type: ignore[list-item]
    k = cotangents.shape[0] if batched else None
    if not outputs.requires_grad or not ins:
        out = _zeros_for(ins, k)
    elif not batched:
        out = _vjp_once(outputs, ins, cotangents, retain)
    elif k == 0:
        out = _zeros_for(ins, 0)
    else:
        out = _batched(outputs, ins, cotangents, retain)
    return out[0] if single else out


def _batched(outputs: Tensor, ins: list[Tensor], cot: Tensor, retain: bool) -> list[Tensor]:
    k = cot.shape[0]
    if k == 1 or (ins[0].device.type == "cpu" and sum(t.numel() for t in ins) >= _CPU_LOOP_NUMEL):
        rows = [_vjp_once(outputs, ins, cot[j], retain or j < k - 1) for j in range(k)]
        return [torch.stack([r[i] for r in rows]) for i in range(len(ins))]
    try:
        gs = torch.autograd.grad(outputs, ins, cot, retain_graph=True, allow_unused=True, is_grads_batched=True)
    except RuntimeError:  # an op without a batching rule: one pass per cotangent
        rows = [_vjp_once(outputs, ins, cot[j], retain or j < k - 1) for j in range(k)]
        return [torch.stack([r[i] for r in rows]) for i in range(len(ins))]
    return [torch.zeros((k, *t.shape), dtype=t.dtype, device=t.device) if g is None else g for t, g in zip(ins, gs)]


def _grad(outputs: Tensor, inputs: Tensor, grad_outputs: Tensor, batched: bool, retain: bool = True) -> Tensor:
    """``batched_vjp`` for one input tensor (the operators' internal spelling)."""
    return batched_vjp(outputs, inputs, grad_outputs, batched, retain)  # type: ignore[no-any-return]


def compile_options(compile: bool | dict[str, Any]) -> dict[str, Any] | None:  # noqa: A002
    """``None`` (eager) or the keyword arguments for :func:`torch.compile` from an operator's ``compile`` option.

    Raises:
        TypeError: ``compile`` is neither a bool nor a dict.
        RuntimeError: ``torch.compile`` is not available in this torch build.
    """
    if compile is False or compile is None:
        return None
    if compile is True:
        opts: dict[str, Any] = {}
    elif isinstance(compile, dict):
        opts = dict(compile)
    else:
        raise TypeError(f"compile must be a bool or a dict of torch.compile options, got {type(compile).__name__}")
    if not hasattr(torch, "compile"):
        raise RuntimeError("compile=True needs torch.compile (torch >= 2.0)")
    opts.setdefault("dynamic", False)
    return opts


class CompiledProducts:
    """Lazily compiled functional product ``fn(x, V, batch, weight)`` with a vmapped block version.

    ``fn`` maps one vector ``v`` to its product on one batch; :meth:`__call__` applies it to a
    vector or (vmapped over columns) to a ``(n, k)`` block. Compilation happens on first use
    (and again for a new batch shape); a block whose ops have no batching rule falls back to a
    loop over the columns.
    """

    def __init__(self, fn: Callable[..., Tensor], options: dict[str, Any]) -> None:
        self.fn = fn
        self.options = options
        self._vec: Any = None
        self._mat: Any = None

    def __call__(self, x: Tensor, V: Tensor, batch: Batch, weight: float) -> Tensor:
        if V.ndim == 1:
            if self._vec is None:
                self._vec = torch.compile(self.fn, **self.options)
            return self._vec(x, V, batch, weight)
        if self._mat is None:
            self._mat = torch.compile(
                torch.func.vmap(self.fn, in_dims=(None, 1, None, None), out_dims=1), **self.options
            )
        try:
            return self._mat(x, V, batch, weight)
        except (RuntimeError, NotImplementedError):
            return torch.stack([self(x, V[:, j], batch, weight) for j in range(V.shape[1])], dim=1)


def call_model(model: Any, spec: ParamSpec, x: Tensor, inputs: Any) -> Tensor:
    """Evaluate ``model`` at the flat parameters ``x`` on ``inputs``.

    ``model`` is a callable ``model(params, inputs)`` or an ``nn.Module`` (called
    through :func:`torch.func.functional_call` with the parameters of ``x``; frozen
    parameters and buffers are the module's own — inside a :class:`~curvlab.params.ModuleState`
    scope, the snapshot's).
    """
    return apply_model(model, spec.unflatten(x), inputs)


def apply_model(model: Any, params: Any, inputs: Any) -> Tensor:
    """``model(params, inputs)``, or :func:`torch.func.functional_call` of an ``nn.Module`` with ``params``."""
    if isinstance(model, nn.Module):
        if isinstance(inputs, tuple):
            return torch.func.functional_call(model, params, inputs)
        return torch.func.functional_call(model, params, (inputs,))
    return model(params, inputs)


def split_supervised_batch(batch: Batch, name: str = "data") -> tuple[Any, Tensor]:
    """``(inputs, targets)`` of a supervised batch (a 2-tuple/list or a dict with 'x'/'y')."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and {"x", "y"} <= set(batch):
        return batch["x"], batch["y"]
    raise ValueError(
        f"each batch of {name} must be an (inputs, targets) pair or a dict with keys 'x' and 'y', "
        f"got {type(batch).__name__}"
    )


def _bad_loss(out: Tensor, got: Any) -> ValueError:
    return ValueError(
        "loss_fn(outputs, targets) must return per-sample losses of shape (batch,) = "
        f"({out.shape[0]},) or a reduced scalar (e.g. F.cross_entropy's default mean), "
        f"got {getattr(got, 'shape', type(got).__name__)}"
    )


def loss_value(loss_fn: Callable[[Tensor, Tensor], Tensor], out: Tensor, y: Any) -> tuple[Tensor, bool]:
    """``loss_fn(out, y)`` checked: ``(per-sample losses (b,), True)`` or ``(reduced scalar (), False)``.

    Raises:
        ValueError: any other shape.
    """
    losses = loss_fn(out, y)
    if not isinstance(losses, Tensor):
        raise _bad_loss(out, losses)
    if losses.ndim == 1 and out.ndim > 0 and losses.shape[0] == out.shape[0]:
        return losses, True
    if losses.numel() == 1 and losses.ndim <= 1:
        return losses.reshape(()), False
    raise _bad_loss(out, losses)


def _one_sample_losses(loss_fn: Callable[[Tensor, Tensor], Tensor], out: Tensor, y: Any) -> Tensor:
    """Per-sample losses of a reduced loss: the loss of every one-sample batch (vmapped; a loop as fallback)."""

    def one(o: Tensor, t: Any) -> Tensor:
        return loss_fn(o.unsqueeze(0), tree_map(lambda s: s.unsqueeze(0), t)).reshape(())

    try:
        return torch.func.vmap(one)(out, y)
    except (RuntimeError, NotImplementedError, ValueError, TypeError):
        return torch.stack([one(out[i], tree_map(lambda s, i=i: s[i], y)) for i in range(out.shape[0])])


def per_sample_losses(loss_fn: Callable[[Tensor, Tensor], Tensor], out: Tensor, y: Any) -> Tensor:
    """``loss_fn(out, y)`` as a vector of per-sample losses ``(b,)``.

    A reduced loss (a scalar, e.g. ``F.cross_entropy(o, y)`` or ``nn.CrossEntropyLoss()``) is
    evaluated on every one-sample batch: the per-sample losses of a mean or sum reduction.

    Raises:
        ValueError: the loss returns neither per-sample losses nor a scalar.
    """
    losses, per_sample = loss_value(loss_fn, out, y)
    if per_sample:
        return losses
    return _one_sample_losses(loss_fn, out, y)


def _independent(what: str) -> ValueError:
    return ValueError(
        f"{what} does not depend on params: the products would be zero. Compute it from the params it "
        "receives — for a module, torch.func.functional_call(model, params, (inputs,)) — not from the "
        "module's own parameters (the habit loss = crit(model(x), y) closes over them); or pass the "
        "module itself: hessian(model, loss_fn, data=...), ggn(model, loss_fn, None, data)"
    )


def _fingerprint(batch: Batch) -> list[Tensor]:
    return [t.detach().sum(dtype=torch.float64).reshape(()) for t in tree_leaves(batch) if t.numel() > 0]


class CurvatureBase:
    """Per-batch graph builder, cache, module-state scope and determinism check shared by the operators.

    Subclasses implement ``_build(x, batch, weight) -> dict`` (the graph pieces of one batch,
    with a ``"value"`` entry used by the determinism check) and use :meth:`_pieces` to iterate
    over them, or :meth:`_batches` + :meth:`_scope` for functional (uncached) products, and
    finish every product with :meth:`_sum_ranks`.
    """

    _what = "the operator's function"

    def _setup(
        self,
        params: Any,
        data: Any,
        reduction: str,
        batch_size_fn: Any,
        cache: bool | str,
        *,
        state: ModuleState | None = None,
        key: int | None = None,
        module: nn.Module | None = None,
        check_deterministic: bool = True,
    ) -> None:
        if not isinstance(check_deterministic, bool):
            raise TypeError(f"check_deterministic must be True or False, got {check_deterministic!r}")
        if state is not None and not isinstance(state, ModuleState):
            raise TypeError(f"state must be a curvlab.params.ModuleState or None, got {type(state).__name__}")
        self.spec = params if isinstance(params, ParamSpec) else ParamSpec(params, module=module, state=state)
        self.state: ModuleState = state if state is not None else self.spec.state
        self.x = self.spec.flatten()
        self.data = data if isinstance(data, Data) else Data(data, reduction, batch_size_fn)
        if cache == "auto":
            cache = not self.data.multi
        if not isinstance(cache, bool):
            raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
        self.cache = cache
        self.check_deterministic = check_deterministic
        self._key = key
        self._cached: list[dict[str, Any]] | None = None
        self._reference: Tensor | None = None  # per-batch signature of the first pass
        self._pass: list[Tensor] = []
        self._pending: Tensor | None = None  # this pass's mismatch, checked at the end of the product
        self._mismatch_msg = ""

    @property
    def distributed(self) -> bool:
        """Whether the operator's products are all-reduced over the ranks (fixed at creation)."""
        return self.data.distributed

    # ------------------------------------------------------------------ state
    def _key_of(self, i: int) -> int:
        """Random-number key of batch ``i``: the problem's key of a drawn batch, else :func:`batch_key` ``(i)``."""
        return self._key if self._key is not None and not self.data.multi else batch_key(i)

    def _scope(self, i: int) -> Any:
        return self.state.scope(self._key_of(i), math_attention=True)

    def _batches(self) -> Iterator[tuple[int, Batch, float]]:
        """``(index, batch, weight)`` over this rank's (non-empty) batches."""
        for i, (b, w) in enumerate(self.data.weighted_batches()):
            yield i, b, w

    def _leaf(self) -> Tensor:
        return self.x.detach().clone().requires_grad_(True)

    def _build(self, x: Tensor, batch: Batch, weight: float) -> dict[str, Any]:
        raise NotImplementedError

    def _build_at(self, i: int, batch: Batch, weight: float) -> dict[str, Any]:
        with torch.enable_grad(), self._scope(i):
            return self._build(self._leaf(), batch, weight)

    # ------------------------------------------------------------- the passes
    @property
    def _verifies(self) -> bool:
        """Whether products re-evaluate the function (and are therefore checked)."""
        return self.check_deterministic and not (self.cache and self._uses_pieces())

    def _uses_pieces(self) -> bool:
        return True

    def _record(self, i: int, batch: Batch, value: Tensor | None) -> None:
        if not self._verifies:
            return
        parts = [torch.tensor(float(self.data.local_size(batch)), dtype=torch.float64, device=self.x.device)]
        parts += [p.to(self.x.device) for p in _fingerprint(batch)]
        if value is not None:
            parts.append(value.detach().to(device=self.x.device, dtype=torch.float64).reshape(()))
        self._pass.append(torch.stack(parts))

    def _end_pass(self) -> None:
        """Compare this pass's signature with the first pass's; the verdict is read in :meth:`_sum_ranks`."""
        if not self._verifies:
            return
        rows, self._pass = self._pass, []
        widths = {r.numel() for r in rows}
        if not rows:  # no batch on this rank (an empty shard)
            sig: Tensor | None = torch.zeros(0, 0, dtype=torch.float64, device=self.x.device)
        else:
            sig = torch.stack(rows) if len(widths) == 1 else None
        if self._reference is None:
            self._reference = sig if sig is not None else torch.zeros(0, 0, dtype=torch.float64, device=self.x.device)
            return
        ref = self._reference
        if sig is None or sig.shape != ref.shape:
            n_now = len(rows)
            self._mismatch_msg = (
                f"the data changed between two passes ({ref.shape[0]} batches, then {n_now}, or batches of "
                "other structures)"
            )
            self._pending = torch.ones((), dtype=torch.float64, device=self.x.device)
            return
        # relative to each entry and to its column's typical size (a value near zero, e.g. a loss with
        # cancelling terms, must not flag the rounding of a re-evaluation)
        tol = torch.finfo(self.spec.dtype).eps ** 0.5
        scale = ref.abs() + ref.abs().mean(0, keepdim=True) + torch.finfo(torch.float64).tiny
        bad = (sig - ref).abs() > tol * scale
        self._pending = bad.any().to(torch.float64)
        self._bad = bad
        self._sig = sig

    def _explain(self) -> str:
        if self._mismatch_msg:
            return self._mismatch_msg
        bad, sig, ref = self._bad, self._sig, self._reference
        assert ref is not None
        rows = torch.nonzero(bad.any(1)).flatten().tolist()
        i = rows[0]
        cols = torch.nonzero(bad[i]).flatten().tolist()
        data_cols = range(sig.shape[1] - (1 if self._records_value else 0))
        if any(c in data_cols for c in cols):
            return f"the data changed between two passes (batch {i} of this rank's data holds other samples)"
        return (
            f"{self._what} gave different values on batch {i} in two passes at the same point "
            f"({float(ref[i, -1]):.10g}, then {float(sig[i, -1]):.10g})"
        )

    _records_value = True

    def _raise_nondeterministic(self, here: bool) -> None:
        why = self._explain() if here else "another rank found its operator changed between two products"
        self._pending, self._mismatch_msg = None, ""
        raise NondeterministicError(
            f"{type(self).__name__}: {why}, so the products are not those of one matrix (Lanczos and CG "
            "would silently go wrong). Usual causes: a DataLoader with shuffle=True (or random augmentation, "
            "or drop_last with shuffling) yields other batches on every pass — use shuffle=False or a list of "
            "batches; the function draws random numbers curvlab does not control (curvlab fixes torch's "
            "default generators per batch, so dropout in train mode is deterministic here; a torch.Generator "
            "of its own, numpy or Python random are not) — make it deterministic, e.g. model.eval(). Pass "
            "check_deterministic=False to accept an operator that changes between products."
        )

    def _pieces(self) -> Iterator[dict[str, Any]]:
        if self.cache:
            if self._cached is None:
                self._cached = [self._build_at(i, b, w) for i, b, w in self._batches()]
            yield from self._cached
            return
        for i, b, w in self._batches():
            piece = self._build_at(i, b, w)
            self._record(i, b, piece.get("value"))
            yield piece
        self._end_pass()

    def _sum_ranks(self, t: Tensor) -> Tensor:
        """All-reduce a sum over this rank's batches (no-op locally) and deliver the determinism verdict.

        The mismatch flag of a checked pass travels with the product's collective (no extra
        collective), so every rank raises together.
        """
        pending, self._pending = self._pending, None
        if self.data.distributed:
            if self._verifies and self._reference is not None:
                flag = pending if pending is not None else t.new_zeros((), dtype=torch.float64)
                both = _dist.all_reduce_sum(torch.cat([t.reshape(-1), flag.to(t.dtype).reshape(1)]))
                t, total = both[:-1].reshape(t.shape), float(both[-1])  # type: ignore[index]
                if total > 0:
                    self._pending = pending
                    self._raise_nondeterministic(here=pending is not None and float(pending) > 0)
                return t
            return _dist.all_reduce_sum(t)  # type: ignore[return-value]
        if pending is not None and float(pending) > 0:
            self._pending = pending
            self._raise_nondeterministic(here=True)
        return t

    def _zeros(self, batched_k: int | None) -> Tensor:
        shape = (self.spec.size,) if batched_k is None else (batched_k, self.spec.size)
        return torch.zeros(shape, dtype=self.spec.dtype, device=self.spec.device)

    def release(self) -> None:
        """Drop the cached graphs (they are rebuilt on the next product)."""
        self._cached = None

    def _reset_point(self) -> None:
        """Forget everything computed at the current point (graphs, value/gradient, determinism records).

        For a copy of the operator rebuilt at other parameters (:func:`curvlab.linops.restrict`):
        :func:`copy.copy` would otherwise share the mutable per-pass records with the original.
        """
        self._cached = None
        self._reference = None
        self._pass = []
        self._pending = None
        self._mismatch_msg = ""
        for attr in ("_value", "_gradient"):
            if hasattr(self, attr):
                setattr(self, attr, None)


def warn_train_mode_dropout(model: Any, what: str, stacklevel: int = 3) -> None:
    """Warn once per call site when an operator is built on a module in train mode with active dropout."""
    if not isinstance(model, nn.Module) or not model.training:
        return
    active = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and float(getattr(m, "p", 0.0)) > 0
    ]
    if active:
        warnings.warn(
            f"{what}: the model is in train mode with active dropout "
            f"({', '.join(n or type(model).__name__ for n in active[:3])}{', …' if len(active) > 3 else ''}): "
            "the operator is the curvature of the loss with dropout masks "
            "fixed per batch (the same in every product). Call model.eval() for the curvature of the "
            "deterministic network.",
            UserWarning,
            stacklevel=stacklevel,
        )
