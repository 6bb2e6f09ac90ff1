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

How a product is taken:

* **Block operator** (the default for a selection by name of a curvature operator —
  :func:`~curvlab.linops.hessian`, :func:`~curvlab.linops.ggn`,
  :func:`~curvlab.linops.fisher` — and sums, scalings and ``damped()`` of them): the
  operator is rebuilt over the selected parameters only, the others entering its
  function as constants. Automatic differentiation then records and differentiates
  only what depends on the block, so a block of the last layer costs a fraction of a
  full product (no backward pass through the earlier layers, no second-order terms of
  their parameters): ``benchmarks/spectrum.py`` measures it. The matrix is the same:
  the Hessian (GGN, Fisher) with respect to the block's parameters with the others
  fixed *is* the principal sub-block.
* **Embedding** (a selection by flat index, or an operator that is not built over
  parameters): one product with :math:`A` on the zero-padded vector, the selected
  entries of the result — a full product per block product.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..params import ParamSpec
from ._autodiff import CurvatureBase
from ._base import IdentityOperator, LinearOperator, _ScaledOperator, _SumOperator

__all__ = ["RestrictedOperator", "BlockSpec", "restrict", "blocks"]


class RestrictedOperator(LinearOperator):
    r"""The principal sub-block :math:`P_I^\top A P_I` of a square operator; build it with :func:`restrict`.

    Attributes:
        parent: the full operator :math:`A`.
        indices: ``(k,)`` long tensor :math:`I` of the selected flat coordinates (on ``A``'s device).
        names: parameter names the block covers (``None`` for a selection by index).
        spec: a :class:`~curvlab.params.ParamSpec` of the selected parameters (names
            selection only), so ``spec.unflatten(v)`` splits a block vector per parameter.
        block: the operator over the block's parameters alone that takes the products
            (``None``: products embed into the parent's, a full product each).
    """

    def __init__(
        self,
        parent: LinearOperator,
        indices: Tensor,
        names: list[Any] | None = None,
        spec: ParamSpec | None = None,
        block: LinearOperator | None = None,
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
        if block is not None and block.shape != (k, k):
            raise ValueError(f"block operator of shape {block.shape} for a block of size {k}")
        self.block = block

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
        if self.block is not None:
            return self.block.matvec(v)
        return self._take(self.parent.matvec(self._embed(v)))

    def _matmat(self, V: Tensor) -> Tensor:
        if self.block is not None:
            return self.block.matmat(V)
        return self._take(self.parent.matmat(self._embed(V)))

    def _rmatvec(self, u: Tensor) -> Tensor:
        if self.block is not None:
            return self.block.rmatvec(u)
        return self._take(self.parent.rmatvec(self._embed(u)))

    def _rmatmat(self, U: Tensor) -> Tensor:
        if self.block is not None:
            return self.block.rmatmat(U)
        return self._take(self.parent.rmatmat(self._embed(U)))


# --------------------------------------------------------------------------- block operators
class BlockSpec(ParamSpec):
    """The parameters of a block (a subset of a :class:`~curvlab.params.ParamSpec`), the others held fixed.

    Flat vectors are the block's (size ``k``); :meth:`unflatten` returns the *whole*
    structure of the parent, with views of the block vector for the block's tensors and
    constants (the parent's point, detached) for all others, so a curvature operator built
    over a ``BlockSpec`` evaluates its function exactly as before and autodiff records only
    what depends on the block. Any attribute it does not define comes from the parent spec
    (the module, its buffers, ...).

    Args:
        parent: the full spec.
        members: positions in ``parent`` of the block's tensors (increasing).
        x: the parent's flat point.
    """

    def __init__(self, parent: ParamSpec, members: list[int], x: Tensor) -> None:
        self.parent = parent
        self.members = list(members)
        self.kind = parent.kind
        self.module = parent.module
        self.keys = [parent.keys[i] for i in self.members]
        self.shapes = [parent.shapes[i] for i in self.members]
        self.numels = [parent.numels[i] for i in self.members]
        self.size = sum(self.numels)
        self.dtype = parent.dtype
        self.device = parent.device
        self._tensors = [parent._tensors[i] for i in self.members]
        offs = _param_offsets(parent)
        pieces = [x[o : o + k].detach() for o, k in zip(offs, parent.numels)]
        self._point = [p.view(s) for p, s in zip(pieces, parent.shapes)]
        self._x = torch.cat([pieces[i] for i in self.members])

    def __getattr__(self, name: str) -> Any:
        if name == "parent" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.parent, name)

    def flatten(self, params: Any = None) -> Tensor:
        """The block's flat point (a copy); ``params``: a full structure to take the block's tensors from."""
        if params is None:
            return self._x.clone()
        full = self.parent.flatten(params)
        offs = _param_offsets(self.parent)
        return torch.cat([full[offs[i] : offs[i] + self.parent.numels[i]] for i in self.members])

    def unflatten(self, x: Tensor) -> Any:
        """The parent's structure at the block vector ``x`` (the other tensors: the fixed point)."""
        if x.shape != (self.size,):
            raise ValueError(f"flat block vector must have shape ({self.size},), got {tuple(x.shape)}")
        parts = list(self._point)
        for i, piece, shape in zip(self.members, torch.split(x, self.numels), self.shapes):
            parts[i] = piece.view(shape)
        kind, keys = self.parent.kind, self.parent.keys
        if kind == "tensor":
            return parts[0]
        if kind in ("dict", "module"):
            return dict(zip(keys, parts))
        return tuple(parts) if kind == "tuple" else list(parts)


def _same_layout(a: ParamSpec, b: ParamSpec) -> bool:
    return a is b or (list(a.keys) == list(b.keys) and list(a.shapes) == list(b.shapes))


def _curvature_block(op: CurvatureBase, members: list[int]) -> LinearOperator:
    """``op`` rebuilt over the parameters ``members`` of its spec, the others held at the operator's point.

    The copy shares the operator's function, data and options; only the parameters it
    differentiates change (and its graphs, built afresh on the first product). Compiled
    products are not carried over (the block runs eagerly).
    """
    assert isinstance(op, LinearOperator)
    spec = BlockSpec(op.spec, members, op.x)
    blk = copy.copy(op)
    blk.spec = spec
    blk.x = spec.flatten()
    blk._reset_point()
    if getattr(blk, "_compiled", None) is not None:
        blk._compiled = None
    LinearOperator.__init__(blk, (spec.size, spec.size), op.dtype, op.device, symmetric=op.is_symmetric, psd=op.is_psd)
    return blk


def _block_of(op: LinearOperator, idx: Tensor, members: list[int], spec: ParamSpec) -> LinearOperator | None:
    """An operator over the block alone equal to ``P_Iᵀ op P_I`` (``None`` when only embedding can give it)."""
    k = int(idx.numel())
    if isinstance(op, IdentityOperator):
        return IdentityOperator(k, op.dtype, op.device, scale=op.scale)
    if isinstance(op, _ScaledOperator):
        inner = _block_of(op.op, idx, members, spec)
        return None if inner is None else _ScaledOperator(inner, op.alpha)
    if isinstance(op, _SumOperator):
        parts = [_block_of(o, idx, members, spec) for o in op.ops]
        if all(p is None or isinstance(p, IdentityOperator) for p in parts):
            return None  # nothing gained over embedding the whole sum
        return _SumOperator([p if p is not None else RestrictedOperator(o, idx) for p, o in zip(parts, op.ops)])
    if isinstance(op, CurvatureBase) and isinstance(getattr(op, "spec", None), ParamSpec):
        if _same_layout(op.spec, spec) and op.shape == (spec.size, spec.size):
            return _curvature_block(op, members)
    return None


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


def restrict(op: LinearOperator, select: Any, *, block: bool = True) -> RestrictedOperator:
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
        block: for a selection by name of a curvature operator (or a sum / scaling /
            ``damped()`` of one), take products with the operator rebuilt over the selected
            parameters only, the others held fixed — the same matrix at a fraction of the
            cost (see the module docstring). ``False`` embeds every product into a full one.

    Returns:
        A :class:`RestrictedOperator` of shape ``(k, k)``, symmetric / PSD when ``op`` is.

    Raises:
        ValueError: ``op`` not square, an unknown name, names on an operator without
            parameters, an empty selection, indices out of range or repeated.
        TypeError: ``op`` not a :class:`LinearOperator`, ``select`` of an unsupported type, a
            non-bool ``block``.

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
        return _named_block(op, spec, chosen, block, "restricted params")
    return RestrictedOperator(op, _as_indices(select, n, op.device))


def _named_block(op: LinearOperator, spec: ParamSpec, chosen: list[int], block: bool, what: str) -> RestrictedOperator:
    if not isinstance(block, bool):
        raise TypeError(f"block must be True or False, got {block!r}")
    offs = _param_offsets(spec)
    idx = torch.cat([torch.arange(offs[i], offs[i] + spec.numels[i]) for i in chosen]).to(op.device)
    sub = ParamSpec({spec.keys[i]: spec._tensors[i] for i in chosen}, name=what)
    fast = _block_of(op, idx, chosen, spec) if block else None
    return RestrictedOperator(op, idx, names=[spec.keys[i] for i in chosen], spec=sub, block=fast)


def blocks(op: LinearOperator, by: str = "module", *, block: bool = True) -> dict[str, RestrictedOperator]:
    """The diagonal blocks of an operator over parameters, one per module or per parameter tensor.

    Args:
        op: a square operator over parameters (see :func:`restrict`).
        by: ``"module"`` groups parameters by the module that owns them (``"fc1.weight"``
            and ``"fc1.bias"`` form block ``"fc1"``; a name without a dot is its own block);
            ``"param"`` gives one block per parameter tensor.
        block: products by the operator rebuilt over each block's parameters (see
            :func:`restrict`); ``False`` embeds them into full products.

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
    return {g: _named_block(op, spec, members, block, "block params") for g, members in groups.items()}
