"""Parameters as flat vectors, and the module state a function of them reads.

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

Module state: the contract
--------------------------
A function of the parameters may read more than them: a module's buffers (BatchNorm
running statistics), torch's random number generator (dropout masks) and the attention
kernel torch picks. :class:`ModuleState` makes each of these a *functional input*, and
every curvlab layer above (operators, problems, ``solve()``, spectra through their
operators, the ``torch.optim`` adapters) evaluates user functions inside
:meth:`ModuleState.scope`:

* **Buffers.** When the state knows the module (``params`` is an ``nn.Module``, or
  ``module=`` was given), it snapshots the module's buffers once, at creation, and
  each scope swaps private copies of that snapshot into the module for the duration
  of the call. Whatever the function writes into them in place (a train-mode
  BatchNorm's running statistics, ``num_batches_tracked``) lands in the copies and is
  discarded; the user's tensors are never written to and the module comes out exactly
  as it went in (``state_dict()`` bit-identical). Every evaluation therefore sees the
  same buffers: those of the snapshot.
* **BatchNorm policy.** The curvature is that of the function the module computes in
  its current mode. In train mode BatchNorm normalises with the *batch* statistics
  (differentiated through, so curvature couples the samples of a batch); the running
  statistics are neither read nor updated. In eval mode BatchNorm uses the running
  statistics of the snapshot, as constants. Results of a solve carry the user's own
  buffers (``buffers="keep"``, the default of the problems); ``buffers="update"``
  recomputes them at the final parameters by one pass over the data
  (:meth:`ModuleState.recompute`, BatchNorm as a cumulative average like
  :func:`torch.optim.swa_utils.update_bn`).
* **Random numbers.** ``scope(key)`` runs the function on torch's default generators
  (CPU, and the parameters' CUDA device) seeded from ``(seed, key)`` and restores the
  user's generator state afterwards: the same key gives the same random numbers, so the
  dropout masks of a batch are fixed — the same at a step's starting point, its trial
  points and its curvature products — and curvlab never consumes the user's random
  stream. Problems key a drawn batch by its draw number (new masks for the next
  mini-batch) and batch ``i`` of a pass over the data by :func:`batch_key` ``(i)``
  (fixed masks for a deterministic solve: put the model in eval mode to train without
  dropout). ``scope(rng=snapshot)`` replays a saved state instead (the optim adapters'
  trial points, see :func:`rng_snapshot`). Randomness from other sources (a
  ``torch.Generator`` of the user's own, numpy, Python's ``random``) is not controlled;
  the operators' determinism check catches it.
* **Attention.** ``scope(math_attention=True)`` selects torch's math kernel for
  :func:`torch.nn.functional.scaled_dot_product_attention`: the fused CPU/GPU kernels have
  no second derivative ("derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward
  is not implemented"). The curvature operators and dense Jacobians use it; plain values and
  gradients keep torch's fast kernel.

Other packages (``bilevel``, user code) adopt the same contract by creating one
:class:`ModuleState` per module and calling their functions inside its scope::

    state = ModuleState(model)                 # snapshot of model's buffers, a seed
    with state.scope(key=draw_number):         # buffers swapped, RNG seeded
        loss = f(params, batch)                # model's own buffers untouched
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ParamSpec",
    "ModuleState",
    "batch_key",
    "rng_snapshot",
    "restore_rng",
    "math_attention",
    "tree_map",
    "tree_leaves",
]

_MASK63 = (1 << 63) - 1


def batch_key(i: int) -> int:
    """The random-number key of batch ``i`` of a pass over the data (negative; draw numbers are the keys ``>= 0``)."""
    return -1 - int(i)


def _mix(seed: int, key: int) -> int:
    """A 63-bit seed from ``(seed, key)`` (splitmix64 finaliser: nearby keys give unrelated streams)."""
    z = (seed * 0x9E3779B97F4A7C15 + (key & ((1 << 64) - 1)) + 0x632BE59BD9B4E019) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK63


def _generators(device: torch.device | None) -> list[torch.Generator]:
    """torch's default generators a computation on ``device`` draws from (CPU, plus that CUDA device)."""
    gens = [torch.random.default_generator]
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.init()
        gens.append(torch.cuda.default_generators[idx])
    return gens


def rng_snapshot(device: torch.device | str | None = None) -> tuple[Any, ...]:
    """The state of torch's default generators (CPU, plus ``device``'s when it is a CUDA device).

    Hand it to :meth:`ModuleState.scope` (``rng=``) or :func:`restore_rng` to replay the
    same random numbers (e.g. the dropout masks of a step's starting point at its trial points).
    """
    dev = None if device is None else torch.device(device)
    return tuple((g, g.get_state()) for g in _generators(dev))


def restore_rng(snapshot: tuple[Any, ...]) -> None:
    """Set torch's default generators back to a :func:`rng_snapshot`."""
    for g, s in snapshot:
        g.set_state(s)


def _derive_seed() -> int:
    """A seed drawn from torch's default CPU generator *without advancing it* (reproducible under ``manual_seed``)."""
    g = torch.random.default_generator
    s = g.get_state()
    try:
        return int(torch.randint(0, 1 << 62, (), generator=g))
    finally:
        g.set_state(s)


_MATH_DEPTH = [0]
_SDP = torch.backends.cuda
_SDP_FLAGS = (
    (_SDP.flash_sdp_enabled, _SDP.enable_flash_sdp, False),
    (_SDP.mem_efficient_sdp_enabled, _SDP.enable_mem_efficient_sdp, False),
    (_SDP.cudnn_sdp_enabled, _SDP.enable_cudnn_sdp, False),
    (_SDP.math_sdp_enabled, _SDP.enable_math_sdp, True),
)


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Select torch's math kernel for ``scaled_dot_product_attention`` (twice differentiable) inside the block.

    The fused kernels (flash / memory-efficient / cuDNN; flash is torch's CPU default) implement
    one backward only: Hessian-vector products, GGN and Jacobian-vector products through them
    fail with "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented". The block switches torch's global backend flags (the ones
    :func:`torch.nn.attention.sdpa_kernel` sets) and restores them; nested blocks cost nothing.
    """
    if _MATH_DEPTH[0] > 0:
        yield
        return
    prev = [get() for get, _, _ in _SDP_FLAGS]
    _MATH_DEPTH[0] += 1
    try:
        for _, set_, on in _SDP_FLAGS:
            set_(on)
        yield
    finally:
        for (_, set_, _), was in zip(_SDP_FLAGS, prev):
            set_(was)
        _MATH_DEPTH[0] -= 1


_math_attention = math_attention  # the scope's option shadows the name


class ModuleState:
    """The functional inputs a function of the parameters reads besides them: buffers, random numbers, kernels.

    See the module docstring for the contract. Create one per module (or one without a
    module, which still controls random numbers and the attention kernel) and evaluate the
    function inside :meth:`scope`.

    Args:
        module: the ``nn.Module`` whose buffers the function reads (``None``: no buffers).
        seed: base seed of the keyed random streams (default: drawn from torch's CPU
            generator without advancing it, so ``torch.manual_seed`` makes runs reproducible).
        device: device whose CUDA generator is also seeded (default: the module's first
            parameter or buffer; CPU only when there is none).

    Attributes:
        module: the module (never written to).
        seed: the base seed.

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or ``seed`` not an int.

    Example:
        >>> bn = torch.nn.BatchNorm1d(2)
        >>> st = ModuleState(bn)
        >>> with st.scope(key=0):
        ...     _ = bn(torch.randn(8, 2))          # train mode: running stats updated ... in a copy
        >>> int(bn.num_batches_tracked), bool(bn.running_mean.eq(0).all())
        (0, True)
    """

    def __init__(
        self, module: nn.Module | None = None, *, seed: int | None = None, device: torch.device | str | None = None
    ) -> None:
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module or None, got {type(module).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        self.module = module
        self.seed = _derive_seed() if seed is None else int(seed) & _MASK63
        if device is None and module is not None:
            t = next(iter(module.parameters()), None)
            if t is None:
                t = next(iter(module.buffers()), None)
            device = None if t is None else t.device
        self.device = None if device is None else torch.device(device)
        # (owner module, attribute, index into the unique snapshot tensors)
        self._slots: list[tuple[nn.Module, str, int]] = []
        self._bns: list[nn.Module] = []
        self._pristine: list[Tensor] = []
        self._work: list[Tensor] = []
        self._depth = 0
        self._seed_cache: dict[int, Tensor] = {}
        self._gens = _generators(self.device)
        if module is not None:
            self._take(module)

    def _take(self, module: nn.Module) -> None:
        seen: dict[int, int] = {}
        for _, owner in module.named_modules(remove_duplicate=False):
            for attr, buf in owner._buffers.items():
                if buf is None:
                    continue
                j = seen.get(id(buf))
                if j is None:
                    j = seen[id(buf)] = len(self._pristine)
                    with torch.no_grad():
                        self._pristine.append(buf.detach().clone())
                self._slots.append((owner, attr, j))
        self._work = [b.clone() for b in self._pristine]
        # train-mode BatchNorm layers that track running statistics: inside a scope they normalise with
        # the batch statistics exactly as before, without the in-place update (which would land in the
        # discarded copies anyway, and which torch.func transforms refuse: "mutate a captured Tensor")
        self._bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    # ---------------------------------------------------------------- buffers
    @property
    def buffers(self) -> dict[str, Tensor]:
        """The snapshot of the module's buffers, by name (read-only: do not modify)."""
        if self.module is None:
            return {}
        return {n: self._pristine[self._index(n)] for n, _ in self.module.named_buffers()}

    def _index(self, name: str) -> int:
        owner_name, _, attr = name.rpartition(".")
        owner = self.module.get_submodule(owner_name) if owner_name else self.module  # type: ignore[union-attr]
        for o, a, j in self._slots:
            if o is owner and a == attr:
                return j
        raise KeyError(name)  # pragma: no cover

    def refresh(self) -> None:
        """Take a new snapshot of the module's current buffers (the optim adapters do this at each step's start)."""
        if self.module is None:
            return
        with torch.no_grad():
            for o, a, j in self._slots:
                cur = o._buffers[a]
                if cur is not None and cur.shape == self._pristine[j].shape and cur.dtype == self._pristine[j].dtype:
                    self._pristine[j].copy_(cur)
                    self._work[j] = self._pristine[j].clone()
                else:  # the module's buffers changed structure: start over
                    self._slots, self._pristine, self._work = [], [], []
                    self._take(self.module)
                    return

    def _swap_in(self, work: list[Tensor], freeze: bool = True) -> tuple[Any, ...]:
        olds = [o._buffers[a] for o, a, _ in self._slots]
        versions = [w._version for w in work]
        frozen = [m for m in self._bns if m.training and m.track_running_stats] if freeze else []
        for o, a, j in self._slots:
            o._buffers[a] = work[j]
        for m in frozen:
            m.track_running_stats = False
        return work, olds, versions, frozen

    def _swap_out(self, token: tuple[Any, ...]) -> None:
        work, olds, versions, frozen = token
        for m in frozen:
            m.track_running_stats = True
        for (o, a, _), old in zip(self._slots, olds):
            o._buffers[a] = old
        if work is self._work:  # written to in place: the next scope gets a fresh copy
            for j, v in enumerate(versions):
                if work[j]._version != v:
                    self._work[j] = self._pristine[j].clone()

    @contextlib.contextmanager
    def _swapped(self, work: list[Tensor], freeze: bool = True) -> Iterator[None]:
        token = self._swap_in(work, freeze)
        try:
            yield
        finally:
            self._swap_out(token)

    # ------------------------------------------------------------------ scope
    def scope(
        self,
        key: int | None = None,
        *,
        rng: tuple[Any, ...] | None = None,
        math_attention: bool = False,
        buffers: bool = True,
    ) -> contextlib.AbstractContextManager[None]:
        """Evaluate the block on the snapshot's buffers, keyed random numbers and (optionally) math attention.

        Args:
            key: random-number key: torch's default generators are seeded from
                ``(seed, key)`` inside the block and restored afterwards (``None``: the
                generators are left alone, unless ``rng`` is given).
            rng: a :func:`rng_snapshot` to run the block from instead (restored afterwards too).
            math_attention: select the math attention kernel (see :func:`math_attention`).
            buffers: swap the snapshot's buffers into the module (default; nested scopes of
                one state swap once).

        Returns:
            A context manager (a few microseconds to enter and leave: it runs around every
            evaluation of a user function).
        """
        return _Scope(self, key, rng, math_attention, buffers)

    def _seeded_state(self, key: int) -> Tensor:
        """The CPU generator's state right after seeding with ``(seed, key)`` (cached: set_state is 4x cheaper)."""
        st = self._seed_cache.get(key)
        if st is None:
            g = torch.Generator()
            g.manual_seed(_mix(self.seed, key))
            st = g.get_state()
            if len(self._seed_cache) >= 64:
                self._seed_cache.pop(next(iter(self._seed_cache)))
            self._seed_cache[key] = st
        return st

    def call(self, fn: Callable[..., Any], *args: Any, key: int | None = None, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` inside :meth:`scope` ``(key)``."""
        with self.scope(key):
            return fn(*args, **kwargs)

    def recompute(self, run: Callable[[], Any]) -> dict[str, Tensor]:
        """The module's buffers after ``run()`` from a reset state: updated statistics, the user's module untouched.

        BatchNorm layers that track running statistics start from zero mean / unit variance
        with a cumulative average (``momentum=None``) for the duration of ``run`` — so one
        pass over the data in train mode gives the statistics of the whole data at the current
        parameters, as :func:`torch.optim.swa_utils.update_bn` does. Other buffers start from
        the snapshot and take whatever ``run`` writes.

        Args:
            run: evaluates the model (e.g. one pass over the data), typically in train mode.

        Returns:
            ``{name: tensor}`` of the buffers after the run (new tensors).
        """
        if self.module is None:
            return {}
        work = [b.clone() for b in self._pristine]
        bns = [m for m in self.module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = []
        with torch.no_grad():
            for m in bns:
                momenta.append(m.momentum)
                for attr in ("running_mean", "running_var", "num_batches_tracked"):
                    for o, a, j in self._slots:
                        if o is m and a == attr:
                            if attr == "running_var":
                                work[j].fill_(1)
                            else:
                                work[j].zero_()
        try:
            for m in bns:
                m.momentum = None
            with self._swapped(work, freeze=False), torch.no_grad():
                run()
        finally:
            for m, mom in zip(bns, momenta):
                m.momentum = mom
        return {n: work[self._index(n)] for n, _ in self.module.named_buffers()}

    def __repr__(self) -> str:
        mod = "None" if self.module is None else type(self.module).__name__
        return f"ModuleState(module={mod}, buffers={len(self._pristine)}, seed={self.seed})"


class ParamSpec:
    """Describes a parameter structure and converts it to and from a flat vector.

    Args:
        params: a floating tensor, a tuple/list/dict of floating tensors, or an
            ``nn.Module`` (its trainable parameters, in ``named_parameters`` order).
        name: the argument's name, used in error messages.
        module: the module whose buffers the user's function reads when ``params`` are
            tensors taken from it (e.g. ``dict(model.named_parameters())``); a module
            ``params`` is its own. It goes into :attr:`state`.
        state: a :class:`ModuleState` to share (e.g. a problem's, for the operators it builds);
            default: a new one for the module.

    Attributes:
        state: the :class:`ModuleState` user functions are evaluated under.
        buffer_update: ``None``, or ``x -> {name: buffer}``: the buffers :meth:`to_user` puts into
            the returned module (set by a problem created with ``buffers="update"``).

    Raises:
        TypeError: if ``params`` is not one of the supported structures or holds
            a non-floating tensor, or ``module`` is not an ``nn.Module``.
        ValueError: if the tensors live on different devices or have different
            dtypes, or the structure is empty.
    """

    def __init__(
        self, params: Any, name: str = "params", *, module: nn.Module | None = None, state: ModuleState | None = None
    ) -> None:
        self.module: nn.Module | None = None
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module or None, got {type(module).__name__}")
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
        owner = self.module if self.module is not None else module
        self.state: ModuleState = state if state is not None else ModuleState(owner, device=self.device)
        self.buffer_update: Callable[[Tensor], dict[str, Tensor]] | None = None

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

        Modules come back as a deep copy of the original module carrying the new values and
        the user's own buffers (or, with :attr:`buffer_update` set, the buffers it computes at
        ``x``); the user's own module and tensors are never modified.
        """
        x = x.detach().clone()
        if self.kind == "module":
            assert self.module is not None
            new_buffers = self.buffer_update(x) if self.buffer_update is not None else None
            mod = copy.deepcopy(self.module)
            with torch.no_grad():
                named = dict(mod.named_parameters())
                for k, v in self.unflatten(x).items():
                    named[k].copy_(v)
                if new_buffers:
                    bufs = dict(mod.named_buffers())
                    for k, v in new_buffers.items():
                        if k in bufs:
                            bufs[k].copy_(v)
            return mod
        return self.unflatten(x)

    def write_(self, x: Tensor, target: Any) -> None:
        """Copy the flat vector ``x`` into the tensors of ``target`` in place (for torch.optim adapters)."""
        with torch.no_grad():
            for t, p in zip(self._leaves(target), torch.split(x.detach(), self.numels)):
                t.copy_(p.view(t.shape))


class _Scope:
    """The context manager of :meth:`ModuleState.scope` (a plain class: it runs around every evaluation)."""

    __slots__ = ("st", "key", "rng", "math", "buffers", "_swap", "_saved", "_kernel")

    def __init__(self, st: ModuleState, key: int | None, rng: Any, math: bool, buffers: bool) -> None:
        self.st, self.key, self.rng, self.math, self.buffers = st, key, rng, math, buffers
        self._swap: Any = None
        self._saved: list[Tensor] | None = None
        self._kernel: Any = None

    def __enter__(self) -> None:
        st = self.st
        if self.buffers and (st._slots or st._bns) and st._depth == 0:
            self._swap = st._swap_in(st._work)
        try:
            if self.key is not None or self.rng is not None:
                gens = st._gens
                self._saved = [g.get_state() for g in gens]
                if self.rng is not None:
                    restore_rng(self.rng)
                else:
                    gens[0].set_state(st._seeded_state(int(self.key)))  # type: ignore[arg-type]
                    if len(gens) > 1:
                        s = _mix(st.seed, int(self.key))  # type: ignore[arg-type]
                        for g in gens[1:]:
                            g.manual_seed(s)
            if self.math:
                self._kernel = _math_attention()
                self._kernel.__enter__()
        except BaseException:
            self._undo()
            raise
        st._depth += 1

    def __exit__(self, *exc: Any) -> None:
        self.st._depth -= 1
        self._undo(*exc)

    def _undo(self, *exc: Any) -> None:
        if self._kernel is not None:
            self._kernel.__exit__(*(exc or (None, None, None)))
            self._kernel = None
        if self._saved is not None:
            for g, state in zip(self.st._gens, self._saved):
                g.set_state(state)
            self._saved = None
        if self._swap is not None:
            self.st._swap_out(self._swap)
            self._swap = None


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
