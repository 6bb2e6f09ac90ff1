"""A small base for closure-driven ``torch.optim.Optimizer`` adapters of curvlab solvers.

**Options are the solver's fields.** An adapter names its solver class (``solver_class``);
its constructor's options, their order, defaults and validation are that dataclass's fields
(generated at class creation, not copied), so an adapter cannot drift from its solver. The few
fields that have no meaning for a closure are listed with the reason (``excluded``), a few are
pinned (``fixed``), and deprecated spellings map to their field (``aliases``, with a
``DeprecationWarning``). :func:`adapter_options` lists them.

The adapters treat all parameters as one flat vector (curvlab's
:class:`~curvlab.params.ParamSpec` over the tensors of every param group, in order), keep
their per-run state as tensors and numbers in ``self.state`` under the first parameter
(as ``torch.optim.LBFGS`` does), so ``state_dict()`` / ``load_state_dict()`` round-trip it,
and get everything they need from a closure that evaluates the model *without* calling
``backward`` (they differentiate its outputs themselves).

**Trial points.** Line searches and damping searches call the closure again at trial points.
Every such call runs from the random-number state of the step's first call (torch's default
generators are reset to it and restored afterwards): dropout draws the same masks at the trial
points as at the starting point, and the user's random stream advances exactly as by one
forward pass per step. What an optimizer cannot do from parameters alone is keep the *module's
buffers* out of the trial calls: a train-mode BatchNorm updates its running statistics at every
call. Pass the module (``module=model``): the step's first call then updates the statistics once,
as an ordinary training step does, and every trial call runs on a copy of the buffers taken at
the step's start (:class:`~curvlab.params.ModuleState`), so rejected trials leave no trace.
Without ``module=`` the random numbers are still fixed but BatchNorm statistics are updated at
every trial call (the behaviour of any ``torch.optim`` optimizer that re-evaluates its closure,
such as ``LBFGS``).

Data-parallel (:mod:`curvlab.distributed`): with ``distributed=True`` — the default ``None``
means :func:`curvlab.distributed.is_distributed` when the optimizer is created — each rank's
closure evaluates the model on its own part of the global mini-batch and the optimizers
combine the ranks' information so that every rank takes the same step, the one a single
process takes on the union of the batches: M-FAC and saddle-free Newton average gradients,
Hessian-vector products and losses over the ranks (equal weights, as DDP does: give the
ranks equal batch sizes); EGN and Sven all-gather the per-sample rows of their batch-sized
systems (losses, Jacobian rows, output derivatives) in rank order. Every step is then a
collective: all ranks must call it in the same order. The parameters must start equal on
every rank (e.g. broadcast from rank 0, as DDP does at construction).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed as _dist
from ..linops._autodiff import batched_vjp
from ..params import ModuleState, ParamSpec, rng_snapshot
from ..solvers._jacobians import rows_jacobian

__all__ = ["ClosureOptimizer", "adapter_options"]

_ADAPTER_KWARGS = ("distributed", "module")


def adapter_options(cls: type) -> list[tuple[str, Any]]:
    """``[(name, default), ...]``: the options of an adapter class (its solver's fields, in order)."""
    return [(f.name, _default(f)) for f in _fields(cls)]


def _fields(cls: Any) -> list[dataclasses.Field]:
    skip = set(cls.excluded) | set(cls.fixed)
    return [f for f in dataclasses.fields(cls.solver_class) if f.init and f.name not in skip]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return inspect.Parameter.empty


class ClosureOptimizer(torch.optim.Optimizer):
    """Base class of curvlab's closure-driven optimizers.

    Subclasses set ``solver_class`` (and optionally ``excluded``, ``fixed``, ``aliases``) and
    implement :meth:`step`; the constructor — ``Adapter(params, *options, distributed=None,
    module=None)`` with the solver's fields as options — is generated. All param groups must
    share the hyperparameters (the update couples every parameter, so per-group settings have no
    meaning); the parameters must share dtype and device.

    Args:
        params: an iterable of tensors or of param-group dicts (``torch.optim`` convention).
        *options, **options: the solver's fields (positional in field order, or by name).
        distributed: combine the ranks' gradients / rows in a data-parallel run (see the module
            docstring); ``None`` (default) means :func:`curvlab.distributed.is_distributed` at
            creation. Without a process group of several ranks it has no effect.
        module: the ``nn.Module`` the closure evaluates: its buffers are then kept out of the
            trial calls of a step (see the module docstring).

    Raises:
        ValueError: if param groups set different hyperparameters, or the parameters
            mix dtypes or devices, or an option is invalid for the solver.
        TypeError: an unknown option, or a parameter that is not a floating-point tensor.
    """

    #: the curvlab solver whose fields are the options
    solver_class: ClassVar[type]
    #: solver fields that are no adapter option, with the reason (for the docs)
    excluded: ClassVar[dict[str, str]] = {}
    #: solver fields pinned to a value in the adapter
    fixed: ClassVar[dict[str, Any]] = {}
    #: deprecated option names -> field names
    aliases: ClassVar[dict[str, str]] = {}
    #: whether the step differentiates the closure's graph twice (the closure then runs on the math
    #: attention kernel: the fused ones have no second derivative)
    second_order: ClassVar[bool] = False

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "solver_class" not in cls.__dict__:
            return
        names = {f.name for f in dataclasses.fields(cls.solver_class)}
        stale = sorted((set(cls.excluded) | set(cls.fixed) | set(cls.aliases.values())) - names)
        if stale:  # a renamed solver field: fail at import, not silently
            raise TypeError(f"{cls.__name__}: {stale} are not fields of {cls.solver_class.__name__}")
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        params.append(inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD))
        for name, default in adapter_options(cls):
            params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
        for name in _ADAPTER_KWARGS:
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))
        if "__init__" not in cls.__dict__:

            def __init__(self: Any, params: Iterable[Any], *args: Any, **kwargs: Any) -> None:  # noqa: N807
                ClosureOptimizer.__init__(self, params, *args, **kwargs)

            __init__.__qualname__ = f"{cls.__name__}.__init__"
            cls.__init__ = __init__  # type: ignore[method-assign]
        cls.__init__.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        opts = ", ".join(f"``{n}={d!r}``" for n, d in adapter_options(cls))
        extra = "".join(f"\n    ``{k}`` is no option here: {why}." for k, why in cls.excluded.items())
        alias = "".join(f"\n    ``{old}=`` is a deprecated alias of ``{new}=``." for old, new in cls.aliases.items())
        cls.__doc__ = (cls.__doc__ or "") + (
            f"\n    Options (generated from the fields of :class:`curvlab.solvers.{cls.solver_class.__name__}`, "
            f"same names, order and defaults; see there for their meaning): {opts}.{extra}{alias}\n"
        )

    def __init__(self, params: Iterable[Any], *args: Any, **kwargs: Any) -> None:
        opts, distributed, module = self._bind(args, kwargs)
        if distributed is not None and not isinstance(distributed, bool):
            raise TypeError(f"distributed must be True, False or None, got {distributed!r}")
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"module must be the nn.Module the closure evaluates or None, got {type(module).__name__}")
        self.solver_class(**opts, **self.fixed)  # validates, with the solver's own messages
        self._validate(opts)
        #: whether steps combine the ranks' information (fixed at creation; False without a group)
        self.distributed = _dist.is_distributed() if distributed is None else distributed and _dist.is_distributed()
        self._option_names = list(opts)
        super().__init__(params, opts)
        for g in self.param_groups[1:]:
            diff = sorted(k for k in opts if g[k] != self.param_groups[0][k])
            if diff:
                raise ValueError(
                    f"{type(self).__name__} updates all parameters jointly; param groups may not set different {diff}"
                )
        self._params: list[Tensor] = [p for g in self.param_groups for p in g["params"]]
        self._spec = ParamSpec(list(self._params), "params")
        #: the module whose buffers trial calls leave alone (``module=``), or ``None``
        self.module = module
        self._mstate = ModuleState(module, device=self._spec.device)
        self._rng0: tuple[Any, ...] | None = None

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
        names = [n for n, _ in adapter_options(type(self))]
        defaults = dict(adapter_options(type(self)))
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional options, got {len(args)}")
        opts = dict(zip(names, args))
        for old, new in self.aliases.items():
            if old in kwargs:
                warnings.warn(
                    f"{type(self).__name__}({old}=...) is deprecated; use {new}=", DeprecationWarning, stacklevel=4
                )
                if new in kwargs or new in opts:
                    raise TypeError(f"{type(self).__name__} got both {old}= and its new name {new}=")
                kwargs[new] = kwargs.pop(old)
        special = {k: kwargs.pop(k) for k in _ADAPTER_KWARGS if k in kwargs}
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown option(s) {unknown}; valid options: {names + list(_ADAPTER_KWARGS)}"
            )
        dup = sorted(set(kwargs) & set(opts))
        if dup:
            raise TypeError(f"{type(self).__name__} got multiple values for {dup}")
        opts.update(kwargs)
        for n in names:
            if n not in opts:
                if defaults[n] is inspect.Parameter.empty:
                    raise TypeError(f"{type(self).__name__} needs the option {n}")
                opts[n] = defaults[n]
        return {n: opts[n] for n in names}, special.get("distributed"), special.get("module")

    def _validate(self, opts: dict[str, Any]) -> None:
        """Adapter-specific checks of the options (beyond the solver's own)."""

    # ------------------------------------------------------------------ options
    @property
    def options(self) -> dict[str, Any]:
        """The hyperparameters (of the first param group, which all groups share)."""
        return {k: self.param_groups[0][k] for k in self._option_names}

    def solver(self) -> Any:
        """The curvlab solver with the current options (the update it implements)."""
        return self.solver_class(**self.options, **self.fixed)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``; param groups saved under deprecated option names load too."""
        if self.aliases:
            state_dict = dict(state_dict)
            groups = []
            for g in state_dict.get("param_groups", []):
                g = dict(g)
                for old, new in self.aliases.items():
                    if old in g and new not in g:
                        g[new] = g.pop(old)
                groups.append(g)
            state_dict["param_groups"] = groups
        super().load_state_dict(state_dict)

    @property
    def global_state(self) -> dict[str, Any]:
        """The optimizer's per-run state (kept under the first parameter, saved by ``state_dict``)."""
        return self.state[self._params[0]]

    # ------------------------------------------------------------------ flat view
    def _flat(self) -> Tensor:
        """The parameters as one detached flat vector."""
        return self._spec.flatten(list(self._params))

    def _write(self, x: Tensor) -> None:
        """Copy the flat vector ``x`` into the parameters in place."""
        self._spec.write_(x, list(self._params))

    def _jacobian(self, out: Tensor, chunk_size: int | None = None) -> Tensor:
        """Dense Jacobian ``(out.numel(), P)`` of a closure output w.r.t. the parameters (batched vjps)."""
        return rows_jacobian(out, self._params, chunk_size)

    def _vjp(self, out: Tensor, cotangent: Tensor) -> list[Tensor]:
        """``cotangentᵀ ∂out/∂params`` (one vjp through the closure's graph, kept)."""
        return batched_vjp(out, self._params, cotangent, batched=False, retain=True)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ closure calls
    def _start(self, closure: Callable[[], Any] | None, name: str) -> Any:
        """The step's first closure call: snapshot the random-number state and (``module=``) the buffers first."""
        if closure is None:
            raise ValueError(f"{name}.step needs a closure that evaluates the model (it must not call backward)")
        self._rng0 = rng_snapshot(self._spec.device)
        self._mstate.refresh()
        with torch.enable_grad(), self._mstate.scope(buffers=False, math_attention=self.second_order):
            return closure()

    def _trial(self, closure: Callable[[], Any], grad: bool = False) -> Any:
        """A closure call at a trial point: the step's random numbers, the step's buffers (``module=``)."""
        scope = self._mstate.scope(rng=self._rng0, math_attention=self.second_order and grad)
        with torch.set_grad_enabled(grad), scope:
            return closure()

    def _value_at(self, closure: Callable[[], Any], pick: Callable[[Any], Tensor]) -> Callable[[Tensor], Tensor]:
        """``z -> mean loss at flat parameters z`` (writes ``z`` into the parameters, no graph; over all ranks)."""

        def f(z: Tensor) -> Tensor:
            self._write(z)
            return self._mean(pick(self._trial(closure)))

        return f

    def _mean(self, t: Tensor) -> Tensor:
        """Mean of the entries of ``t`` (per-sample losses or a scalar loss), over every rank's entries when
        data-parallel (gathered in rank order, so the mean is exactly the one-process mean)."""
        t = t.detach().reshape(-1)
        return (_dist.all_gather_cat(t) if self.distributed else t).mean()

    def _gather(self, *tensors: Tensor | None) -> tuple[Any, ...]:
        """The tensors' rows of every rank concatenated in rank order (unchanged when not data-parallel)."""
        if not self.distributed:
            return tensors
        return tuple(None if t is None else _dist.all_gather_cat(t.detach(), 0) for t in tensors)

    def _average(self, t: Tensor) -> Tensor:
        """Mean of ``t`` over the ranks, as DDP averages gradients (``t`` itself when not data-parallel)."""
        return _dist.all_reduce_mean(t) if self.distributed else t  # type: ignore[return-value]

    @staticmethod
    def _call(closure: Callable[[], Any] | None, name: str) -> Any:
        if closure is None:
            raise ValueError(f"{name}.step needs a closure that evaluates the model (it must not call backward)")
        with torch.enable_grad():
            return closure()
