"""Arguments of a solver as autograd inputs, and pytrees as flat vectors.

The implicit-differentiation machinery works on flat vectors and on lists of
tensors: an :class:`torch.autograd.Function` only tracks tensors that arrive
as its own positional inputs. :class:`Arguments` splits a solver's
``(init, *args, **kwargs)`` into

* the tensor leaves (these become the Function's inputs, so autograd,
  ``torch.func.vmap`` and forward-mode AD can see every one of them), and
* everything else (Python numbers, strings, ``None``), kept as constants.

An ``nn.Module`` leaf contributes its parameters as tensor leaves; whenever the
user's function is called the module is temporarily re-parametrised with the
tensors at hand (the mechanism behind :func:`torch.func.functional_call`), so
the module's own ``forward`` sees tensors that autograd tracks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["Arguments", "flat_cat", "split_like"]

_TENSOR = object()  # placeholder for a tensor leaf of init


class Arguments:
    """A solver's ``(init, args, kwargs)`` split into tensor inputs and constants.

    Args:
        init: the solver's starting point (any pytree; never differentiated).
        args: positional ``theta``.
        kwargs: keyword ``theta``.

    Attributes:
        tensors: all tensor leaves, those of ``init`` first, then those of
            ``theta`` (module parameters in ``named_parameters`` order).
        n_init: how many of :attr:`tensors` belong to ``init``.
    """

    def __init__(self, init: Any, args: tuple, kwargs: dict) -> None:
        self._init_tensor = isinstance(init, Tensor)  # the common case, without pytree round trips
        init_leaves, self._init_def = ([init], None) if self._init_tensor else tree_flatten(init)
        theta_leaves, self._theta_def = tree_flatten((tuple(args), dict(kwargs)))
        init_tensors = [t for t in init_leaves if isinstance(t, Tensor)]
        self._init_leaves = [_TENSOR if isinstance(t, Tensor) else t for t in init_leaves]
        self.n_init = len(init_tensors)
        # one slot per theta leaf: ("t", None) tensor | ("m", (module, names)) module | ("c", value) constant
        self._slots: list[tuple[str, Any]] = []
        theta_tensors: list[Tensor] = []
        for leaf in theta_leaves:
            if isinstance(leaf, Tensor):
                self._slots.append(("t", None))
                theta_tensors.append(leaf)
            elif isinstance(leaf, nn.Module):
                named = list(leaf.named_parameters())
                self._slots.append(("m", (leaf, [k for k, _ in named])))
                theta_tensors.extend(p for _, p in named)
            else:
                self._slots.append(("c", leaf))
        self.tensors: list[Tensor] = init_tensors + theta_tensors
        self.n_theta = len(theta_tensors)
        # positional leaves only, no module: (args, kwargs) are rebuilt without pytree or a context stack
        self._flat_args = (
            not kwargs
            and all(kind != "m" for kind, _ in self._slots)
            and len(theta_leaves) == len(args)
            and all(a is leaf for a, leaf in zip(args, theta_leaves))
        )

    # ------------------------------------------------------------------ #
    def init(self, init_tensors: Sequence[Tensor]) -> Any:
        """The ``init`` pytree with its tensor leaves replaced by ``init_tensors``."""
        if self._init_tensor:
            return init_tensors[0]
        it = iter(init_tensors)
        leaves = [next(it) if leaf is _TENSOR else leaf for leaf in self._init_leaves]
        return tree_unflatten(leaves, self._init_def)

    def plain_theta(self, theta_tensors: Sequence[Tensor]) -> tuple[tuple, dict] | None:
        """``(args, kwargs)`` from ``theta_tensors`` when no module needs re-parametrising, else ``None``."""
        if not self._flat_args:
            return None
        it = iter(theta_tensors)
        return tuple(next(it) if kind == "t" else value for kind, value in self._slots), {}

    @contextlib.contextmanager
    def theta(self, theta_tensors: Sequence[Tensor]) -> Iterator[tuple[tuple, dict]]:
        """Context yielding ``(args, kwargs)`` built from ``theta_tensors``.

        Modules among the arguments are re-parametrised with their share of
        ``theta_tensors`` for the duration of the context.
        """
        it = iter(theta_tensors)
        leaves: list[Any] = []
        bindings: list[tuple[nn.Module, dict[str, Tensor]]] = []
        for kind, value in self._slots:
            if kind == "t":
                leaves.append(next(it))
            elif kind == "m":
                module, names = value
                bindings.append((module, {k: next(it) for k in names}))
                leaves.append(module)
            else:
                leaves.append(value)
        args, kwargs = tree_unflatten(leaves, self._theta_def)
        with contextlib.ExitStack() as stack:
            for module, params in bindings:
                stack.enter_context(_reparametrize_module(module, params))
            yield args, kwargs

    def constants_key(self) -> Any:
        """A hashable description of everything but the theta tensors (structure, constants); ``None`` if none.

        ``None`` when a module is among the theta (its buffers and mode are state outside the
        arguments) or a constant is not hashable: such calls are not traced (``jit=True``).
        """
        consts = []
        for kind, value in self._slots:
            if kind == "m":
                return None
            if kind == "c":
                try:
                    hash(value)
                except TypeError:
                    return None
                consts.append((type(value), value))
        spec: Any = len(self._slots)  # positional leaves only: the count is the whole structure
        if not self._flat_args:
            spec = self._theta_def
            try:
                hash(spec)
            except TypeError:
                spec = str(spec)
        return (len(self._slots), spec, tuple(consts))

    def theta_structure(self, values: Sequence[Any]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` shaped like the theta, with ``values`` at the tensor leaves.

        A module's slot becomes a dict ``{parameter name: value}``; constants become ``None``.
        """
        it = iter(values)
        leaves: list[Any] = []
        for kind, value in self._slots:
            if kind == "t":
                leaves.append(next(it))
            elif kind == "m":
                leaves.append({k: next(it) for k in value[1]})
            else:
                leaves.append(None)
        return tree_unflatten(leaves, self._theta_def)

    def theta_tensors_from(self, args: tuple, kwargs: dict, what: str) -> list[Tensor | None]:
        """Tensor leaves (or ``None``) of a structure shaped like the theta (e.g. tangents).

        Raises:
            ValueError: if the structure does not match the theta's.
        """
        leaves, treedef = tree_flatten((tuple(args), dict(kwargs)), is_leaf=lambda x: x is None)
        if len(leaves) != len(self._slots):
            raise ValueError(
                f"{what} must have the structure of theta ({len(self._slots)} leaves), got {len(leaves)} leaves"
            )
        out: list[Tensor | None] = []
        for (kind, value), leaf in zip(self._slots, leaves):
            if kind == "t":
                out.append(leaf)
            elif kind == "m":
                names = value[1]
                if leaf is None:
                    out.extend([None] * len(names))
                elif isinstance(leaf, dict):
                    out.extend(leaf.get(k) for k in names)
                else:
                    raise ValueError(f"{what}: a module's entry must be a dict of parameter tangents or None")
        return out


def flat_cat(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector (keeps autograd)."""
    if len(tensors) == 1:
        return tensors[0].reshape(-1)
    return torch.cat([t.reshape(-1) for t in tensors])


def split_like(x: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Split the flat vector ``x`` (or an ``(n, k)`` block, along dim 0) into pieces shaped like ``like``."""
    numels = [t.numel() for t in like]
    parts = torch.split(x, numels, dim=0)
    if x.ndim == 1:
        return tuple(p.reshape(t.shape) for p, t in zip(parts, like))
    return tuple(p.reshape(*t.shape, x.shape[1]) for p, t in zip(parts, like))
