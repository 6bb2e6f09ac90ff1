"""Parameters as flat vectors: ravel any supported structure and back.

Users hand a tensor, a tuple/list/dict of tensors, or an ``nn.Module``. Every
layer above works on one flat vector ``x`` of length ``P`` (the parameters'
own dtype and device) and calls :meth:`ParamSpec.unflatten` to hand the user's
function the structure it expects:

* a tensor            -> a tensor of the same shape
* a tuple / list      -> a tuple / list of tensors
* a dict              -> a dict with the same keys
* an ``nn.Module``    -> a dict ``{name: tensor}`` of its parameters, the form
  :func:`torch.func.functional_call` takes.

``unflatten`` returns *views* of ``x`` so gradients flow back into the flat
vector without copies.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ParamSpec"]


class ParamSpec:
    """Describes a parameter structure and converts it to and from a flat vector.

    Args:
        params: a floating tensor, a tuple/list/dict of floating tensors, or an
            ``nn.Module`` (its parameters, in ``named_parameters`` order).
        name: the argument's name, used in error messages.

    Raises:
        TypeError: if ``params`` is not one of the supported structures or holds
            a non-floating tensor.
        ValueError: if the tensors live on different devices or have different
            dtypes, or the structure is empty.
    """

    def __init__(self, params: Any, name: str = "params") -> None:
        self.module: nn.Module | None = None
        if isinstance(params, nn.Module):
            self.kind = "module"
            self.module = params
            named = [(k, p) for k, p in params.named_parameters() if p.requires_grad]
            self.keys: list[Any] = [k for k, _ in named]
            tensors = [p for _, p in named]
        elif isinstance(params, Tensor):
            self.kind = "tensor"
            self.keys = [None]
            tensors = [params]
        elif isinstance(params, Mapping):
            self.kind = "dict"
            self.keys = list(params.keys())
            tensors = list(params.values())
        elif isinstance(params, (tuple, list)):
            self.kind = "tuple" if isinstance(params, tuple) else "list"
            self.keys = list(range(len(params)))
            tensors = list(params)
        else:
            raise TypeError(
                f"{name} must be a tensor, a tuple/list/dict of tensors or an nn.Module, got {type(params).__name__}"
            )
        if not tensors:
            raise ValueError(f"{name} holds no tensor (an empty structure or a module without trainable parameters)")
        for k, t in zip(self.keys, tensors):
            where = name if k is None else f"{name}[{k!r}]"
            if not isinstance(t, Tensor):
                raise TypeError(f"{where} must be a tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{where} must be a floating-point tensor, got dtype {t.dtype}")
        dtypes = {t.dtype for t in tensors}
        devices = {t.device for t in tensors}
        if len(dtypes) > 1:
            raise ValueError(f"all tensors in {name} must share one dtype, got {sorted(map(str, dtypes))}")
        if len(devices) > 1:
            raise ValueError(f"all tensors in {name} must live on one device, got {sorted(map(str, devices))}")
        self.shapes = [t.shape for t in tensors]
        self.numels = [t.numel() for t in tensors]
        self.size = sum(self.numels)
        self.dtype: torch.dtype = tensors[0].dtype
        self.device: torch.device = tensors[0].device
        self._tensors = tensors

    # ------------------------------------------------------------------ #
    def flatten(self, params: Any = None) -> Tensor:
        """Return a new flat vector (detached copy) of ``params`` (default: the original ones)."""
        if params is None:
            tensors = self._tensors
        else:
            tensors = self._leaves(params)
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    def flatten_tree(self, tree: Any) -> Tensor:
        """Flatten a structure shaped like the parameters *without* detaching (keeps autograd)."""
        return torch.cat([t.reshape(-1) for t in self._leaves(tree)])

    def _leaves(self, params: Any) -> list[Tensor]:
        if isinstance(params, nn.Module):
            d = dict(params.named_parameters())
            return [d[k] for k in self.keys]
        if self.kind == "tensor":
            return [params]
        if self.kind in ("dict", "module"):
            return [params[k] for k in self.keys]
        return list(params)

    def unflatten(self, x: Tensor) -> Any:
        """Views of the flat vector ``x`` in the parameters' structure (a dict for modules)."""
        if x.shape != (self.size,):
            raise ValueError(f"flat parameter vector must have shape ({self.size},), got {tuple(x.shape)}")
        parts = [p.view(s) for p, s in zip(torch.split(x, self.numels), self.shapes)]
        if self.kind == "tensor":
            return parts[0]
        if self.kind in ("dict", "module"):
            return dict(zip(self.keys, parts))
        if self.kind == "tuple":
            return tuple(parts)
        return list(parts)

    def to_user(self, x: Tensor) -> Any:
        """The final parameters as the user handed them in, detached and never aliasing ``x``.

        Modules come back as a deep copy of the original module carrying the new values;
        the user's own module and tensors are never modified.
        """
        x = x.detach().clone()
        if self.kind == "module":
            assert self.module is not None
            mod = copy.deepcopy(self.module)
            with torch.no_grad():
                named = dict(mod.named_parameters())
                for k, v in self.unflatten(x).items():
                    named[k].copy_(v)
            return mod
        return self.unflatten(x)

    def write_(self, x: Tensor, target: Any) -> None:
        """Copy the flat vector ``x`` into the tensors of ``target`` in place (for torch.optim adapters)."""
        with torch.no_grad():
            for t, p in zip(self._leaves(target), torch.split(x.detach(), self.numels)):
                t.copy_(p.view(t.shape))


def tree_map(fn: Any, tree: Any) -> Any:
    """Apply ``fn`` to every tensor leaf of a (nested) tuple/list/dict structure."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return tree


def tree_leaves(tree: Any) -> list[Tensor]:
    """All tensor leaves of a nested tuple/list/dict structure, in order."""
    out: list[Tensor] = []
    if isinstance(tree, Tensor):
        out.append(tree)
    elif isinstance(tree, Mapping):
        for v in tree.values():
            out.extend(tree_leaves(v))
    elif isinstance(tree, Sequence) and not isinstance(tree, (str, bytes)):
        for v in tree:
            out.extend(tree_leaves(v))
    return out
