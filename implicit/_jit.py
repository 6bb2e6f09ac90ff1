r"""Traced (``jit=True``) implicit derivatives of small systems: the whole reverse IFT in one replayed graph.

On a small problem an implicit derivative costs a few dozen tensor operations
(``F``, one batched backward pass through it, a factorisation), and in eager
PyTorch each operation pays the dispatcher, autograd and ``torch.func``
wrappers: about 1 ms where the arithmetic takes microseconds, 10x behind
``jax.jit`` (``benchmarks/hypergradient.py``). With ``jit=True`` the function

.. math::
    (y, \theta, \bar v) \mapsto \bigl(A, B, u = A^{-\top}\bar v, -B^\top u, \text{norms for the checks}\bigr)

(built in :mod:`implicit._root`) is traced once per input signature into a
graph of ATen operations (:func:`torch.fx.experimental.proxy_tensor.make_fx`
with fake tensors), simplified (:func:`simplify`, :func:`fold_constants`) and
replayed by :func:`torch.jit.trace`'s interpreter when available (far less
overhead per operation than Python), else by the FX module: no autograd graph,
no ``torch.func`` wrappers, one host sync for the checks. Whenever the traced LU
fails or misses the tolerance the caller redoes the solve with
:func:`curvlab.linalg.solve`.

Semantics are those of ``jax.jit``: tensors and Python values that ``F``
reads other than through its arguments are frozen into the graph at the first
call with a given signature (tensors by reference, so in-place updates are
seen; the signature: shapes, dtypes and devices of the tensors, and the values
of the non-tensor arguments). Data-dependent Python control flow in ``F``
(``if y.norm() > 1``, ``.item()``) cannot be traced: such an ``F`` is detected
while tracing and runs eagerly, as without ``jit``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["FAILED", "TraceCache", "fold_constants", "simplify", "trace"]

#: Cached for a signature whose function could not be traced (it runs eagerly).
FAILED = object()

#: At most this many signatures are traced per decorated function (then eager for new ones).
MAX_SIGNATURES = 32


def _captured(gm: torch.fx.GraphModule) -> list[Tensor]:
    """Tensors the traced function read by closure (the graph's constants)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = getattr(gm, str(node.target), None)
            if isinstance(value, Tensor):
                out.append(value)
    return out


def _is_one(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 1


def _is_eye(node: Any) -> bool:
    """``node`` computes an identity matrix (``eye``, or its transpose)."""
    aten = torch.ops.aten
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        if node.target is aten.eye.default:
            return True
        if node.target is aten.t.default or (node.target is aten.permute.default and list(node.args[1]) == [1, 0]):
            node = node.args[0]
            continue
        return False
    return False


def _same_layout(a: Any, b: Any) -> bool:
    """Two traced values with equal shape, dtype and strides (one may stand in for the other)."""
    va, vb = getattr(a, "meta", {}).get("val"), getattr(b, "meta", {}).get("val")
    return (
        isinstance(va, Tensor)
        and isinstance(vb, Tensor)
        and va.shape == vb.shape
        and va.dtype == vb.dtype
        and va.stride() == vb.stride()
    )


def simplify(gm: torch.fx.GraphModule) -> int:
    """Remove operations that return their input, which ``torch.func`` transforms leave in traced graphs.

    ``x * 1``, ``x / 1``, ``x ** 1``, ``t(t(x))`` and products with an identity matrix (the cotangent
    basis of a batched vjp); a node is replaced only by a value of the same shape, dtype and strides.

    Returns:
        The number of operations removed.
    """
    aten = torch.ops.aten
    scale = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.pow.Tensor_Scalar}
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not node.args:
            continue
        src = None
        if node.target in scale and len(node.args) == 2 and _is_one(node.args[1]) and not node.kwargs:
            src = node.args[0]
        elif node.target is aten.t.default:
            inner = node.args[0]
            if isinstance(inner, torch.fx.Node) and inner.op == "call_function" and inner.target is aten.t.default:
                src = inner.args[0]
        elif node.target is aten.mm.default:
            a, b = node.args[:2]
            src = a if _is_eye(b) else b if _is_eye(a) else None
        if isinstance(src, torch.fx.Node) and _same_layout(src, node):
            node.replace_all_uses_with(src)
            removed += 1
    if removed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return removed


def _shape_only(node: torch.fx.Node) -> bool:
    """``node``'s value depends on the metadata of its inputs only (``ones_like(x)``, ``eye(n)``, ``x ** 0``)."""
    aten = torch.ops.aten
    if node.target in (
        aten.ones_like.default,
        aten.zeros_like.default,
        aten.full_like.default,
        aten.new_ones.default,
        aten.new_zeros.default,
        aten.new_full.default,
        aten.ones.default,
        aten.zeros.default,
        aten.full.default,
        aten.eye.default,
        aten.scalar_tensor.default,
    ):
        return True
    return node.target is aten.pow.Tensor_Scalar and node.args[1] == 0  # x ** 0 == 1, even for inf and nan


def _stand_in(value: Any) -> Any:
    """A real tensor with the metadata of a traced (fake) value, for evaluating shape-only operations."""
    meta = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
    if not isinstance(meta, Tensor):
        raise ValueError("no tensor metadata")
    return torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=meta.device)


def fold_constants(gm: torch.fx.GraphModule) -> int:
    """Precompute the operations whose values do not depend on the inputs (per signature).

    A batched vjp starts from constant cotangents (``ones_like`` of the loss, scaled, expanded,
    negated) and an identity basis; those chains are evaluated once and stored in the graph. Inputs
    and tensors read by closure (which their owner may update in place) are never constant, nor are
    random operations; a graph with any in-place operation is left alone.

    Returns:
        The number of operations removed from the graph.
    """
    nodes = list(gm.graph.nodes)
    ops = [n for n in nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]
    if any(n.target._schema.is_mutable for n in ops):
        return 0
    values: dict[torch.fx.Node, Tensor] = {}
    for node in ops:
        if torch.Tag.nondeterministic_seeded in node.target.tags:
            continue
        deps: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), deps.append)
        if _shape_only(node):

            def fill(n: torch.fx.Node) -> Any:
                return values[n] if n in values else _stand_in(n)

        elif deps and all(d in values for d in deps):
            fill = values.__getitem__
        else:
            continue
        try:
            out = node.target(*torch.fx.node.map_arg(node.args, fill), **torch.fx.node.map_arg(node.kwargs, fill))
        except Exception:  # noqa: BLE001 - not foldable here: leave it in the graph
            continue
        if isinstance(out, Tensor):
            values[node] = out
    if not values:
        return 0
    before = len(nodes)
    for i, (node, value) in enumerate(values.items()):
        if all(u in values for u in node.users):
            continue  # only feeds other constants: removed with them
        name = f"_folded_{i}"
        gm.register_buffer(name, value)
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(name)
        const.meta = dict(node.meta)
        node.replace_all_uses_with(const)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return before - len(gm.graph.nodes)


def trace(fn: Callable[..., tuple[Tensor, ...]], inputs: Sequence[Tensor]) -> tuple[Callable[..., Any], list[Tensor]]:
    """Trace ``fn(*inputs) -> tuple of tensors`` into a replayable graph of ATen operations.

    Args:
        fn: a function of tensors, free of data-dependent Python control flow.
        inputs: example inputs (their shapes, dtypes and devices are those of every later call).

    Returns:
        The compiled function (TorchScript when :func:`torch.jit.trace` accepts the graph,
        else the FX graph module) and the tensors ``fn`` read by closure.

    Raises:
        Exception: whatever tracing raised (data-dependent control flow, an unsupported operation,
            an error of ``fn`` itself); the caller then runs ``fn`` eagerly.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    inputs = [t.detach() for t in inputs]

    def build() -> torch.fx.GraphModule:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a failed trace runs F again eagerly, with its warnings
            gm = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*inputs)
        gm.graph.eliminate_dead_code()
        gm.recompile()
        return gm

    gm = build()
    try:
        with torch.no_grad():
            reference = gm(*inputs)
            if simplify(gm) + fold_constants(gm):
                out = gm(*inputs)
                if not all(torch.allclose(a, b, equal_nan=True) for a, b in zip(out, reference)):
                    gm = build()  # cannot happen for the exact rules of simplify; keep the plain graph if it does
    except Exception:  # noqa: BLE001 - the simplification is optional
        gm = build()
    captured = _captured(gm)
    compiled: Callable[..., Any] = gm
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace is deprecated: the FX module is the fallback
            with torch.no_grad():
                compiled = torch.jit.trace(gm, tuple(inputs), check_trace=False, strict=False)
                compiled(*inputs)  # runs once: a graph TorchScript cannot replay falls back here
    except Exception:  # noqa: BLE001 - any failure of the optional TorchScript step: replay the FX graph
        compiled = gm
    return compiled, captured


def signature(tensors: Sequence[Tensor]) -> tuple:
    """The part of a cache key that describes tensors: shape, dtype, device."""
    return tuple((t.shape, t.dtype, t.device) for t in tensors)


class TraceCache:
    """Traced functions of one decorated solver, by input signature (at most :data:`MAX_SIGNATURES`)."""

    def __init__(self) -> None:
        self._graphs: dict[Hashable, Any] = {}
        self.warned = False  # the "cache full" warning is given once

    def get(self, key: Hashable) -> Any:
        """The compiled function for ``key``, :data:`FAILED`, or ``None`` when not traced yet."""
        return self._graphs.get(key)

    def full(self) -> bool:
        """No room for another signature."""
        return len(self._graphs) >= MAX_SIGNATURES

    def put(self, key: Hashable, value: Any) -> None:
        """Store a compiled function (or :data:`FAILED`) for ``key``."""
        self._graphs[key] = value

    def __len__(self) -> int:
        return len(self._graphs)
