r"""Data-parallel curvlab on :mod:`torch.distributed`: the few helpers every layer uses.

curvlab runs on PyTorch's own distributed engine (launched by ``torchrun`` or
:func:`torch.multiprocessing.spawn`); it adds nothing home-made. The contract:

* When a default process group is initialised (and :func:`local` is not in effect),
  **each rank passes its own shard of the data** (see :func:`shard`) and curvlab
  returns, on every rank, what one process would return on the whole data:

  - operators over a dataset (:func:`~curvlab.linops.hessian`, :func:`~curvlab.linops.ggn`,
    :func:`~curvlab.linops.fisher`, :func:`~curvlab.linops.jacobian`) all-reduce their
    products. Batch weights use the *global* sample count :math:`N = \sum_r N_r` (all-reduced
    once), so a mean over samples stays a mean over all samples:
    :math:`A v = \sum_r \sum_{b \in \text{shard}_r} w_b A_b v` with :math:`w_b = n_b / N`;
  - :class:`~curvlab.Problem` values and gradients over the data (``batch=ALL``) are
    all-reduced the same way; on one batch (a stochastic solver's mini-batch) each rank
    evaluates its own batch and the results are averaged weighted by sample counts, so the
    average is the value/gradient on the union of the ranks' batches (the global mini-batch,
    as DDP averages gradients);
  - batch-sized systems (EGN, Sven, Gauss-Newton on dense Jacobians) all-gather their
    per-sample rows, so every rank solves the global mini-batch's system;
  - random probes (:mod:`curvlab.spectrum`, Lanczos start vectors, randomized sketches)
    come from seeded generators; where no seed or generator is given, rank 0 draws one and
    broadcasts it (:func:`shared_seed`), so no rank disagrees;
  - only rank 0 shows progress bars and writes files (:func:`is_main_process`).

* A loss that closes over its data (``data=None``) has no sample count: its value is
  averaged over ranks with equal weights (identical on every rank when every rank has the
  same closure, e.g. an analytic test function).
* Without a process group, with a world size of 1, or inside :func:`local`, nothing changes:
  every helper here is a no-op and curvlab's single-process path is untouched.

Whether an object is data-parallel is decided when it is *created* (a problem, an
operator, a :class:`~curvlab.data.Data` view): objects built inside :func:`local` stay
process-local for their whole life. Data-parallel objects make every product and every
evaluation a collective: all ranks must call them in the same order (they do when they run
the same script).

Example:
    >>> import torch, curvlab as cl
    >>> cl.distributed.world_size(), cl.distributed.is_main_process()
    (1, True)
    >>> cl.distributed.shard(torch.arange(5.0), rank=1, world_size=2)
    tensor([3., 4.])
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main_process",
    "all_reduce_sum",
    "all_reduce_mean",
    "all_gather_cat",
    "broadcast",
    "shared_seed",
    "synced_generator",
    "shard",
    "local",
    "all_reduce_sum_differentiable",
    "shared_variable",
]

_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("curvlab_distributed_local", default=False)


def _group_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_distributed() -> bool:
    """Whether curvlab objects created now are data-parallel.

    True when a default process group is initialised with more than one rank and
    :func:`local` is not in effect.
    """
    return not _LOCAL.get() and _group_ready() and torch.distributed.get_world_size() > 1


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Opt out: curvlab objects created inside this block ignore the process group.

    Use it to compute per-rank quantities (each rank on its own data, no communication)
    inside a distributed job.

    Example:
        >>> import curvlab as cl
        >>> with cl.distributed.local():
        ...     cl.distributed.is_distributed()
        False
    """
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return torch.distributed.get_rank() if _group_ready() else 0


def world_size() -> int:
    """Number of ranks in the default group (1 without one)."""
    return torch.distributed.get_world_size() if _group_ready() else 1


def is_main_process() -> bool:
    """Whether this process is rank 0 (always true without a process group): it shows progress and writes files."""
    return rank() == 0


def _comm_device(like: Tensor | None = None) -> torch.device:
    """Device collectives run on: CUDA for NCCL, else ``like``'s device (CPU for gloo)."""
    if _group_ready() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device if like is not None else torch.device("cpu")


def _reduce(t: Tensor | float, mean: bool) -> Tensor | float:
    if not is_distributed():
        return t
    if isinstance(t, Tensor):
        dev = _comm_device(t)
        buf = t.detach().to(dev, copy=True).contiguous()
        torch.distributed.all_reduce(buf)
        if mean:
            buf = buf / world_size()
        return buf.to(t.device)
    if not isinstance(t, numbers.Number):
        raise TypeError(f"all_reduce expects a tensor or a number, got {type(t).__name__}")
    buf = torch.tensor(float(t), dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(buf)
    out = float(buf) / (world_size() if mean else 1)
    return int(out) if isinstance(t, numbers.Integral) and not mean else out


def all_reduce_sum(t: Tensor | float) -> Tensor | float:
    """Sum of ``t`` over the ranks (``t`` itself without a process group).

    Args:
        t: a tensor (not modified; a new tensor is returned, detached) or a Python number.

    Returns:
        The sum, on ``t``'s device (a Python number for a number).
    """
    return _reduce(t, mean=False)


def all_reduce_mean(t: Tensor | float) -> Tensor | float:
    """Mean of ``t`` over the ranks (``t`` itself without a process group); see :func:`all_reduce_sum`."""
    return _reduce(t, mean=True)


def all_gather_cat(t: Tensor, dim: int = 0) -> Tensor:
    """The ranks' tensors concatenated along ``dim`` in rank order (``t`` itself without a group).

    The tensors may differ in size along ``dim`` (they are padded for the transfer);
    the other dimensions must agree, except on ranks that hold no row (an empty shard),
    whose tensor takes the others' shape.

    Args:
        t: this rank's tensor.
        dim: the dimension to concatenate along.

    Returns:
        The concatenation, on ``t``'s device.

    Raises:
        ValueError: ranks with rows disagree on the other dimensions.
    """
    if not is_distributed():
        return t
    dev = _comm_device(t)
    d = dim % t.ndim if t.ndim else 0
    x = t.detach().to(dev).movedim(d, 0).contiguous() if t.ndim else t.detach().to(dev).reshape(1)
    W = world_size()
    # one small collective carries every rank's shape (rows first), so empty ranks can adopt the others'
    shape = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.int64, device=dev)
    if x.ndim > _MAX_DIMS:
        raise ValueError(f"all_gather_cat supports up to {_MAX_DIMS} dimensions, got {x.ndim}")
    shape[0] = x.ndim
    shape[1 : 1 + x.ndim] = torch.tensor(x.shape, dtype=torch.int64)
    shapes_l = [torch.zeros_like(shape) for _ in range(W)]
    torch.distributed.all_gather(shapes_l, shape)
    shapes = [[int(v) for v in s[1 : 1 + int(s[0])].tolist()] for s in shapes_l]
    counts = [s[0] for s in shapes]
    full = [s[1:] for s in shapes if s[0] > 0]
    if any(f != full[0] for f in full):
        raise ValueError(f"all_gather_cat: the ranks' tensors differ beyond dimension {dim}: {shapes}")
    trailing = full[0] if full else list(x.shape[1:])
    if x.shape[0] == 0 and list(x.shape[1:]) != trailing:
        x = x.new_zeros((0, *trailing))
    m = max(counts)
    if m == 0:
        return x.movedim(0, d).to(t.device) if t.ndim else t
    if x.shape[0] < m:
        x = torch.cat([x, x.new_zeros((m - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in range(W)]
    torch.distributed.all_gather(parts, x)
    out = torch.cat([p[:c] for p, c in zip(parts, counts)])
    return out.movedim(0, d).to(t.device)


_MAX_DIMS = 8


def broadcast(t: Tensor, src: int = 0) -> Tensor:
    """A copy of rank ``src``'s ``t`` on every rank (``t`` itself without a group)."""
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device(t), copy=True).contiguous()
    torch.distributed.broadcast(buf, src)
    return buf.to(t.device)


def shared_seed(seed: int | None = None) -> int | None:
    """A seed every rank agrees on.

    Returns ``seed`` when given. Otherwise, in a data-parallel run, rank 0 draws one from
    its global torch RNG and broadcasts it; without a group it returns ``None`` (keep using
    the global RNG, as a single process always did).
    """
    if seed is not None or not is_distributed():
        return seed
    s = torch.randint(0, 2**62, (1,), dtype=torch.int64) if is_main_process() else torch.zeros(1, dtype=torch.int64)
    return int(broadcast(s.to(_comm_device(s)))[0])


def synced_generator(generator: torch.Generator | None, device: torch.device | str) -> torch.Generator | None:
    """``generator``, or in a data-parallel run without one a fresh generator seeded by :func:`shared_seed`.

    Random probes drawn from it are the same on every rank. Without a process group
    (or when a generator is given) nothing changes.
    """
    if generator is not None or not is_distributed():
        return generator
    return torch.Generator(device=device).manual_seed(shared_seed())  # type: ignore[arg-type]


def _split_sizes(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def shard(data: Any, rank: int | None = None, world_size: int | None = None) -> Any:  # noqa: A002
    """This rank's part of ``data``.

    * A tensor, or a tuple / dict of tensors sharing a leading (sample) dimension (one
      batch holding the whole dataset): contiguous slices of the samples, sizes differing
      by at most one (rank 0 first), so concatenating the shards in rank order gives
      ``data`` back.
    * A list of batches: every ``world_size``-th batch starting at ``rank``
      (``data[rank::world_size]``, as :class:`torch.utils.data.DistributedSampler` deals
      indices). Draw ``k`` of a stochastic solver on rank ``r`` is then batch
      ``k·world_size + r``, and the global mini-batch of draw ``k`` is the union of batches
      ``k·world_size … k·world_size + world_size - 1``. Give every rank the same number of
      batches (a length divisible by ``world_size``) for an exact correspondence.
    * A map-style :class:`torch.utils.data.Dataset` (with ``__len__``): a contiguous
      :class:`torch.utils.data.Subset`.

    Args:
        data: the whole dataset (see above).
        rank: this rank (default: the process group's, 0 without one).
        world_size: number of ranks (default: the process group's, 1 without one).

    Returns:
        The shard, of the same kind as ``data``.

    Raises:
        ValueError: a rank outside ``[0, world_size)``, or tensors whose leading
            dimensions differ.
        TypeError: data of another kind.
    """
    W = globals()["world_size"]() if world_size is None else int(world_size)
    r = globals()["rank"]() if rank is None else int(rank)
    if W < 1 or not 0 <= r < W:
        raise ValueError(f"shard needs 0 <= rank < world_size, got rank={r}, world_size={W}")
    if isinstance(data, Tensor):
        return torch.tensor_split(data, _cumsum(_split_sizes(data.shape[0], W)), dim=0)[r]
    if isinstance(data, tuple) and data and all(isinstance(v, Tensor) for v in data):
        _same_length([v.shape[0] for v in data])
        return tuple(shard(v, r, W) for v in data)
    if isinstance(data, Mapping) and data and all(isinstance(v, Tensor) for v in data.values()):
        _same_length([v.shape[0] for v in data.values()])
        return type(data)((k, shard(v, r, W)) for k, v in data.items())  # type: ignore[call-arg]
    if isinstance(data, list):
        return data[r::W]
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        sizes = _split_sizes(len(data), W)  # type: ignore[arg-type]
        start = sum(sizes[:r])
        return torch.utils.data.Subset(data, range(start, start + sizes[r]))
    raise TypeError(
        "shard expects a tensor, a tuple/dict of tensors, a list of batches or a map-style Dataset, "
        f"got {type(data).__name__}"
    )


def _cumsum(sizes: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for s in sizes[:-1]:
        acc += s
        out.append(acc)
    return out


def _same_length(lengths: list[int]) -> None:
    if len(set(lengths)) > 1:
        raise ValueError(f"shard: the tensors of a dataset must share their leading dimension, got {lengths}")


# --------------------------------------------------------------------------- #
# differentiable collectives (unrolled differentiation through data-parallel objectives)
# --------------------------------------------------------------------------- #
class _CopyToRanks(torch.autograd.Function):
    """Identity forward on a variable every rank shares; backward sums its gradient over the ranks."""

    @staticmethod
    def forward(t: Tensor) -> Tensor:
        return t.view_as(t)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _SumOverRanks.apply(grad)

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor) -> Tensor:
        return tangent.view_as(tangent)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) forward of this rank's part; backward passes the (shared) gradient through."""

    @staticmethod
    def forward(t: Tensor) -> Tensor:
        return all_reduce_sum(t)  # type: ignore[return-value]

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _CopyToRanks.apply(grad)

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor) -> Tensor:
        return all_reduce_sum(tangent)  # type: ignore[return-value]


def all_reduce_sum_differentiable(t: Tensor) -> Tensor:
    """Sum ``t`` over the ranks; the backward passes the (shared) gradient back to every rank's part.

    Use it on a rank's part of a global objective whose inputs went through
    :func:`shared_variable`: derivatives of any order through the pair are then those of the
    global objective. A no-op without a process group.
    """
    if not is_distributed():
        return t
    return _SumOverRanks.apply(t)


def shared_variable(t: Tensor) -> Tensor:
    """Identity on a variable every rank holds alike; its backward sums the gradient over the ranks.

    The partner of :func:`all_reduce_sum_differentiable` (see there). A no-op without a process group.
    """
    if not is_distributed():
        return t
    return _CopyToRanks.apply(t)
