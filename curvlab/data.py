"""Data handling shared by operators, problems and solvers.

``data`` is one of:

* ``None`` — the function closes over its data and is called without a batch;
* one batch — a tensor, or a *tuple* or dict whose items are all tensors
  (e.g. ``(X, y)``);
* an iterable of batches — a ``DataLoader``, a *list* of batches (``[(X1, y1),
  (X2, y2)]`` or ``[X1, X2]``), … It must be re-iterable (each pass over it is
  one epoch).

Over an iterable of batches the dataset objective is the *mean over samples*:
batch ``b`` with ``n_b`` samples enters with weight ``n_b / N`` (its function
returns the batch mean), unless ``reduction="sum"`` (weight 1). ``n_b`` is the
leading dimension of the batch's first tensor, or ``batch_size_fn(batch)``.

Empty batches (no samples) are skipped everywhere: they add nothing to a mean or a sum,
and evaluating a model on them gives NaN (a mean over nothing) or fails (BatchNorm). Data
whose every batch is empty is an error — except for one rank's shard of a data-parallel
run, which then contributes nothing and still takes part in every collective (a rank's
stream of an empty shard yields :data:`EMPTY`).

Data-parallel (see :mod:`curvlab.distributed`): a :class:`Data` created while a process
group is active holds this rank's shard; ``N`` is the global sample count (all-reduced
once), one batch on a rank weighs ``n_b / N`` too, and ``None`` data weighs ``1/world_size``
(each rank's closure counts equally). The weighted sums are then all-reduced by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from . import distributed as _dist
from .params import tree_leaves

Batch = Any


class _Empty:
    """The batch of a data-parallel rank whose shard holds no sample (it contributes nothing)."""

    def __repr__(self) -> str:
        return "EMPTY"

    def __reduce__(self) -> str:
        return "EMPTY"


EMPTY: Any = _Empty()
"""The batch a data-parallel rank with an empty shard draws: no samples, zero weight."""


def is_single_batch(data: Any) -> bool:
    """True when ``data`` is one batch: a tensor, or a tuple / dict of tensors (a list means several batches)."""
    if isinstance(data, Tensor):
        return True
    if isinstance(data, Mapping):
        return len(data) > 0 and all(isinstance(v, Tensor) for v in data.values())
    if isinstance(data, tuple):
        return len(data) > 0 and all(isinstance(v, Tensor) for v in data)
    return False


def default_batch_size(batch: Batch) -> int:
    """Leading dimension of the first tensor in ``batch``."""
    leaves = tree_leaves(batch)
    if not leaves or leaves[0].ndim == 0:
        raise ValueError(
            "cannot infer the batch size: the batch holds no tensor with a leading (sample) dimension; "
            "pass batch_size_fn"
        )
    return int(leaves[0].shape[0])


class Data:
    """Uniform view of ``data`` (None, one batch, or an iterable of batches).

    Args:
        data: see the module docstring.
        reduction: ``"mean"`` (weight each batch by its share of the samples) or
            ``"sum"`` (weight 1 per batch).
        batch_size_fn: number of samples in a batch; default: leading dimension
            of its first tensor.

    Raises:
        ValueError: on an unknown reduction, an empty iterable, or a one-shot
            iterator (it could be read only once).
    """

    def __init__(
        self,
        data: Any,
        reduction: str = "mean",
        batch_size_fn: Callable[[Batch], int] | None = None,
    ) -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction
        self.batch_size_fn = batch_size_fn or default_batch_size
        self.raw = data
        if data is None:
            self.kind = "none"
        elif data is EMPTY or is_single_batch(data):
            self.kind = "batch"
        elif isinstance(data, Iterable):
            if isinstance(data, Iterator):
                raise ValueError(
                    "data is a one-shot iterator; pass a re-iterable collection of batches "
                    "(a list or a DataLoader) so it can be read more than once"
                )
            self.kind = "iterable"
        else:
            raise TypeError(
                f"data must be None, a batch (tensor or tuple/list/dict of tensors) or an iterable of "
                f"batches, got {type(data).__name__}"
            )
        self._n_total: int | None = None
        #: whether this data is one rank's shard of a data-parallel run (fixed at creation)
        self.distributed = _dist.is_distributed()

    @property
    def multi(self) -> bool:
        """Whether the data is an iterable of several batches."""
        return self.kind == "iterable"

    def is_empty(self, batch: Batch) -> bool:
        """Whether ``batch`` holds no sample (:data:`EMPTY`, or a batch of size 0)."""
        if batch is EMPTY:
            return True
        if batch is None:
            return False
        try:
            return int(self.batch_size_fn(batch)) == 0
        except (ValueError, TypeError, IndexError, AttributeError):
            return False

    def batches(self) -> Iterator[Batch]:
        """One pass over the data (``None`` once when there is no data); empty batches are skipped.

        Raises:
            ValueError: (not data-parallel) every batch is empty.
        """
        if self.kind == "none":
            yield None
            return
        found = False
        for b in [self.raw] if self.kind == "batch" else self.raw:
            if self.is_empty(b):
                continue
            found = True
            yield b
        if not found and not self.distributed:
            raise ValueError("data holds no sample: every batch is empty")

    def n_total(self) -> int:
        """Total number of samples (one pass over the data, cached; summed over the ranks when data-parallel)."""
        if self._n_total is None:
            if self.kind == "none":
                self._n_total = 1
            else:
                n = sum(self.batch_size_fn(b) for b in self.batches())
                if self.distributed:
                    n = int(_dist.all_reduce_sum(n))
                self._n_total = n
                if self._n_total == 0:
                    raise ValueError("data holds no sample: every batch is empty (on every rank)")
        return self._n_total

    def weighted_batches(self) -> Iterator[tuple[Batch, float]]:
        """Pairs ``(batch, weight)`` whose weighted sum is the dataset objective (this rank's part of it)."""
        if self.distributed:
            yield from self._distributed_weighted_batches()
            return
        if self.kind != "iterable" or self.reduction == "sum":
            for b in self.batches():
                yield b, 1.0
            return
        n = self.n_total()
        for b in self.batches():
            yield b, self.batch_size_fn(b) / n

    def _distributed_weighted_batches(self) -> Iterator[tuple[Batch, float]]:
        if self.kind == "none":
            yield None, 1.0 / _dist.world_size()
            return
        if self.reduction == "sum":
            for b in self.batches():
                yield b, 1.0
            return
        n = self.n_total()
        for b in self.batches():
            yield b, self.batch_size_fn(b) / n

    def local_size(self, batch: Batch) -> int:
        """Samples in ``batch`` (1 for ``None``, 0 for :data:`EMPTY`): its weight in a cross-rank mean."""
        if batch is None:
            return 1
        if batch is EMPTY:
            return 0
        return int(self.batch_size_fn(batch))

    def stream(self, start: int = 0) -> Iterator[Batch]:
        """Endless stream of non-empty batches, epoch after epoch, skipping the first ``start`` draws.

        Raises:
            ValueError: (not data-parallel) every batch is empty. A data-parallel rank whose
                shard is empty draws :data:`EMPTY` instead.
        """
        if self.kind != "iterable":
            while True:
                yield self.raw
        count = 0
        while True:
            empty = True
            for b in self.raw:
                if self.is_empty(b):
                    continue
                empty = False
                if count >= start:
                    yield b
                count += 1
            if empty:
                if not self.distributed:
                    raise ValueError("data holds no sample: every batch is empty")
                while True:
                    yield EMPTY


class Stream:
    """Batches by draw number from one :class:`Data`: the endless epoch-after-epoch stream solvers draw from.

    ``draw(k)`` is the ``k``-th batch counted from the start of the run, so a resumed solver
    (its state stores the count) sees the same batches as an uninterrupted one, as long as
    iterating over the data is deterministic. Drawing the same position twice in a row returns
    the same batch without advancing a ``DataLoader`` (a line search re-evaluating its batch);
    drawing out of order restarts the stream and skips ahead. Without several batches every draw
    is the data itself (``None`` without data).

    Args:
        data: a :class:`Data` view.

    Example:
        >>> s = Stream(Data([torch.zeros(2), torch.ones(3)]))
        >>> [s.draw(k).shape[0] for k in range(3)]
        [2, 3, 2]
    """

    def __init__(self, data: Data) -> None:
        self.data = data
        self._it: Iterator[Batch] | None = None
        self._pos = 0
        self._last: tuple[int, Batch] | None = None
        self._full: list[Batch] | None = None  # the non-empty batches of a list

    def draw(self, position: int) -> Batch:
        """The batch at draw number ``position``."""
        if not self.data.multi:
            return self.data.raw
        raw = self.data.raw
        if isinstance(raw, (list, tuple)):
            if self._full is None:
                self._full = [b for b in raw if not self.data.is_empty(b)]
            if not self._full:
                if self.data.distributed:
                    return EMPTY
                raise ValueError("data holds no sample: every batch is empty")
            return self._full[position % len(self._full)]
        if self._last is not None and self._last[0] == position:
            return self._last[1]
        if self._it is None or self._pos != position:
            self._it = self.data.stream(position)
            self._pos = position
        self._pos += 1
        batch = next(self._it)
        self._last = (position, batch)
        return batch

    def __getstate__(self) -> dict[str, Any]:  # a live iterator cannot be pickled or deep-copied
        return {"data": self.data, "_it": None, "_pos": 0, "_last": None, "_full": None}


def call(fn: Callable[..., Any], params: Any, batch: Batch, nargs_hint: int | None = None) -> Any:
    """Call ``fn(params, batch)``, or ``fn(params)`` when there is no batch."""
    if batch is None:
        return fn(params)
    return fn(params, batch)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move the tensors of a batch to ``device`` (no copy when already there)."""
    from .params import tree_map

    return tree_map(lambda t: t.to(device), batch)
