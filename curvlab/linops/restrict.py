r"""Principal sub-blocks of an operator: curvature restricted to some parameters.

For a square :math:`A \in \mathbb R^{n\times n}` and a selection of coordinates
:math:`I = (i_1, \dots, i_k)`, the restricted operator is

.. math::
    A_{II} = P_I^\top A P_I, \qquad P_I = [e_{i_1}, \dots, e_{i_k}] \in \mathbb R^{n\times k},

the block of rows and columns :math:`I`: for a Hessian, the Hessian of the loss
with respect to those parameters only, all others held fixed. A principal block
of a symmetric (PSD) matrix is symmetric (PSD). This is how per-layer spectra
are taken (the feature PyHessian users asked for in its issues #9 and #10):
``{name: eigsh(B, k=1) for name, B in blocks(H).items()}``.

A product with :math:`A_{II}` is one product with :math:`A` (zero-padded input,
selected output), so it costs a full Hessian-vector product.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..params import ParamSpec
from ._base import LinearOperator

__all__ = ["RestrictedOperator", "restrict", "blocks"]


class RestrictedOperator(LinearOperator):
    r"""The principal sub-block :math:`P_I^\top A P_I` of a square operator; build it with :func:`restrict`.

    Attributes:
        parent: the full operator :math:`A`.
        indices: ``(k,)`` long tensor :math:`I` of the selected flat coordinates (on ``A``'s device).
        names: parameter names the block covers (``None`` for a selection by index).
        spec: a :class:`~curvlab.params.ParamSpec` of the selected parameters (names
            selection only), so ``spec.unflatten(v)`` splits a block vector per parameter.
    """

    def __init__(
        self,
        parent: LinearOperator,
        indices: Tensor,
        names: list[Any] | None = None,
        spec: ParamSpec | None = None,
    ) -> None:
        n = parent.shape[0]
        k = int(indices.numel())
        super().__init__((k, k), parent.dtype, parent.device, symmetric=parent.is_symmetric, psd=parent.is_psd)
        self.parent = parent
        self.indices = indices
        self.names = names
        self.spec = spec
        lo = int(indices[0])
        contiguous = bool((indices == torch.arange(lo, lo + k, device=indices.device)).all())
        self._slice = slice(lo, lo + k) if contiguous else None
        self._n = n

    def _embed(self, V: Tensor) -> Tensor:
        X = V.new_zeros((self._n, *V.shape[1:]))
        if self._slice is not None:
            X[self._slice] = V
        else:
            X[self.indices] = V
        return X

    def _take(self, X: Tensor) -> Tensor:
        return X[self._slice] if self._slice is not None else X[self.indices]

    def _matvec(self, v: Tensor) -> Tensor:
        return self._take(self.parent.matvec(self._embed(v)))

    def _matmat(self, V: Tensor) -> Tensor:
        return self._take(self.parent.matmat(self._embed(V)))

    def _rmatvec(self, u: Tensor) -> Tensor:
        return self._take(self.parent.rmatvec(self._embed(u)))

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self._take(self.parent.rmatmat(self._embed(U)))


def find_spec(op: LinearOperator) -> ParamSpec | None:
    """The parameter spec behind ``op``: its own ``spec``, or that of an operand of a sum / scaling / damping."""
    spec = getattr(op, "spec", None)
    if isinstance(spec, ParamSpec):
        return spec
    for attr in ("ops", "op", "a", "b"):  # operands of the algebra nodes in _base
        child = getattr(op, attr, None)
        for c in child if isinstance(child, list) else [child]:
            if isinstance(c, LinearOperator) and c.shape == op.shape:
                found = find_spec(c)
                if found is not None:
                    return found
    return None


def _param_offsets(spec: ParamSpec) -> list[int]:
    offs, o = [], 0
    for k in spec.numels:
        offs.append(o)
        o += k
    return offs


def _names_to_params(spec: ParamSpec, names: Sequence[str]) -> list[int]:
    """Positions in ``spec`` of the parameters named exactly, or under a module (``"fc1"`` for ``"fc1.weight"``)."""
    keys = ["param" if k is None else str(k) for k in spec.keys]  # a lone tensor is "param", as in blocks()
    chosen: list[int] = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"parameter names must be non-empty strings, got {name!r}")
        hits = [i for i, key in enumerate(keys) if key == name or key.startswith(name + ".")]
        if not hits:
            raise ValueError(f"no parameter named {name!r} or under module {name!r}; the parameters are {keys}")
        chosen.extend(i for i in hits if i not in chosen)
    return sorted(chosen)


def _as_indices(select: Any, n: int, device: torch.device) -> Tensor:
    if isinstance(select, slice):
        idx = torch.arange(n)[select]
    elif isinstance(select, range):
        idx = torch.tensor(list(select), dtype=torch.long)
    elif isinstance(select, Tensor):
        if select.dtype == torch.bool:
            if select.shape != (n,):
                raise ValueError(f"a boolean mask must have shape ({n},), got {tuple(select.shape)}")
            idx = torch.nonzero(select.cpu(), as_tuple=False).reshape(-1)
        elif select.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            if select.ndim != 1:
                raise ValueError(f"indices must be a 1-D tensor, got shape {tuple(select.shape)}")
            idx = select.cpu().long()
        else:
            raise ValueError(f"an index tensor must be integer or boolean, got dtype {select.dtype}")
    elif isinstance(select, Sequence) and all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in select
    ):
        idx = torch.tensor([int(i) for i in select], dtype=torch.long)
    else:
        raise TypeError(
            "select must be a parameter/module name, a list of names, or flat indices "
            f"(a slice, range, list of ints, integer or boolean tensor), got {type(select).__name__}"
        )
    if idx.numel() == 0:
        raise ValueError("the selection is empty")
    if int(idx.min()) < -n or int(idx.max()) >= n:
        raise ValueError(f"indices must lie in [0, {n}), got values from {int(idx.min())} to {int(idx.max())}")
    idx = idx % n
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("indices must not repeat")
    return idx.to(device)


def restrict(op: LinearOperator, select: Any) -> RestrictedOperator:
    r"""The principal sub-block :math:`A_{II} = P_I^\top A P_I` of a square operator.

    Args:
        op: a square :class:`LinearOperator` (for names: one built over parameters —
            :func:`~curvlab.linops.hessian`, :func:`~curvlab.linops.ggn`,
            :func:`~curvlab.linops.fisher` — or a sum / scaling / ``damped()`` of one).
        select: which coordinates to keep:

            * a parameter name, or a module name selecting all its parameters
              (``"fc1"`` selects ``"fc1.weight"`` and ``"fc1.bias"``), or a list of them;
              the block then follows the parameters' own order;
            * flat indices: a ``slice``, ``range``, list of ints, or an integer or
              boolean tensor (kept in the given order).

    Returns:
        A :class:`RestrictedOperator` of shape ``(k, k)``, symmetric / PSD when ``op`` is.

    Raises:
        ValueError: ``op`` not square, an unknown name, names on an operator without
            parameters, an empty selection, indices out of range or repeated.
        TypeError: ``op`` not a :class:`LinearOperator`, ``select`` of an unsupported type.

    Example:
        >>> A = torch.arange(16.0).reshape(4, 4)
        >>> from curvlab.linops import DenseOperator
        >>> restrict(DenseOperator(A), [1, 3]).to_dense()
        tensor([[ 5.,  7.],
                [13., 15.]])
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"op must be a curvlab LinearOperator, got {type(op).__name__}")
    if op.shape[0] != op.shape[1]:
        raise ValueError(f"restrict needs a square operator, got shape {op.shape}")
    n = op.shape[0]
    by_name = isinstance(select, str) or (
        isinstance(select, Sequence) and len(select) > 0 and all(isinstance(s, str) for s in select)
    )
    if by_name:
        names = [select] if isinstance(select, str) else list(select)
        spec = find_spec(op)
        if spec is None:
            raise ValueError(
                f"cannot select parameters by name: {type(op).__name__} carries no parameter spec "
                "(build it with curvlab.linops.hessian/ggn/fisher, or select flat indices)"
            )
        chosen = _names_to_params(spec, names)
        offs = _param_offsets(spec)
        idx = torch.cat([torch.arange(offs[i], offs[i] + spec.numels[i]) for i in chosen]).to(op.device)
        sub = ParamSpec({spec.keys[i]: spec._tensors[i] for i in chosen}, name="restricted params")
        return RestrictedOperator(op, idx, names=[spec.keys[i] for i in chosen], spec=sub)
    return RestrictedOperator(op, _as_indices(select, n, op.device))


def blocks(op: LinearOperator, by: str = "module") -> dict[str, RestrictedOperator]:
    """The diagonal blocks of an operator over parameters, one per module or per parameter tensor.

    Args:
        op: a square operator over parameters (see :func:`restrict`).
        by: ``"module"`` groups parameters by the module that owns them (``"fc1.weight"``
            and ``"fc1.bias"`` form block ``"fc1"``; a name without a dot is its own block);
            ``"param"`` gives one block per parameter tensor.

    Returns:
        ``{name: RestrictedOperator}`` in parameter order.

    Raises:
        ValueError: an unknown ``by``, or ``op`` without a parameter spec.
    """
    if by not in ("module", "param"):
        raise ValueError(f"by must be 'module' or 'param', got {by!r}")
    if not isinstance(op, LinearOperator):
        raise TypeError(f"op must be a curvlab LinearOperator, got {type(op).__name__}")
    spec = find_spec(op)
    if spec is None:
        raise ValueError(f"{type(op).__name__} carries no parameter spec; use restrict(op, indices) instead")
    keys = ["param" if k is None else str(k) for k in spec.keys]
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        g = key.rsplit(".", 1)[0] if (by == "module" and "." in key) else key
        groups.setdefault(g, []).append(i)
    offs = _param_offsets(spec)
    out: dict[str, RestrictedOperator] = {}
    for g, members in groups.items():
        idx = torch.cat([torch.arange(offs[i], offs[i] + spec.numels[i]) for i in members]).to(op.device)
        sub = ParamSpec({spec.keys[i]: spec._tensors[i] for i in members}, name="block params")
        out[g] = RestrictedOperator(op, idx, names=[spec.keys[i] for i in members], spec=sub)
    return out
