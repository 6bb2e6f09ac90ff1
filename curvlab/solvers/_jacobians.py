r"""Dense Jacobians on a batch, shared by the Jacobian-based solvers (GaussNewton, EGN, Sven) and their adapters.

Three ways to materialise a Jacobian :math:`J = \partial y / \partial x` (rows = entries
of ``y``, columns = parameters), each chunked so peak memory stays bounded:

* :func:`rows_jacobian` — batched vector-Jacobian products through an autograd graph
  that is built once (:func:`curvlab.linops.batched_vjp`, the package's one vjp helper, the
  same path as :class:`curvlab.linops.JacobianOperator`), one backward pass per row, ``chunk``
  rows at a time. Works for any graph, including a user's closure; costs one backward
  *of the whole batch* per row.
* :func:`columns_jacobian` — ``vmap`` of ``torch.func.jvp`` over identity columns: one
  forward-mode pass per parameter. Cheapest when there are fewer parameters than rows
  (curve fitting).
* :func:`per_sample_jacobian` — ``vmap`` over the samples of ``torch.func.jacrev`` of a
  one-sample function: each sample's rows cost one backward *of that sample only*, so the
  whole Jacobian costs about ``c`` batch backward passes (``c`` rows per sample). This is
  the fast path for models whose samples do not interact (no batch norm in training
  mode, no cross-sample attention); it is what EGN and Sven use on
  :class:`~curvlab.SupervisedLoss` by default.

On top of these, the problem-level helpers return what the solvers need on one batch:
:func:`supervised_outputs` (model outputs and their Jacobian, for EGN),
:func:`supervised_losses` (per-sample losses and their Jacobian, for Sven),
:func:`residual_rows` (residual rows and their Jacobian, for every solver on
:class:`~curvlab.LeastSquares`) and :func:`output_derivatives` (per-sample gradient and
exact Hessian blocks of the loss with respect to the outputs). A random subset of the
parameters (``index``) restricts the Jacobian's columns (Sven's memory option).

Module state (:mod:`curvlab.params`): every evaluation runs inside the problem's scope for its
batch (:meth:`curvlab.Problem.scope`: the module's buffers a snapshot, the batch's dropout masks,
attention on the math kernel for the forward-mode and double-backward passes).

Empty batches (a data-parallel rank with an empty shard draws :data:`curvlab.data.EMPTY`)
give zero rows; the gathered system is then the other ranks'.

Data-parallel (:mod:`curvlab.distributed`): the batch-sized systems of EGN, Sven and
Gauss-Newton couple all samples of the global mini-batch, so the problem-level helpers
all-gather their per-sample rows (values, Jacobian rows, output derivatives) in rank order;
every rank then holds the rows of the union of the ranks' batches and takes the same step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import distributed as _dist
from ..linops._autodiff import batched_vjp, per_sample_losses, split_supervised_batch
from ..params import batch_key, tree_map
from ..problems import ALL, LeastSquares, Problem, SupervisedLoss
from ._common import batch_for, current_batch

__all__ = [
    "JACOBIAN_MODES",
    "rows_jacobian",
    "columns_jacobian",
    "per_sample_jacobian",
    "output_derivatives",
    "supervised_outputs",
    "supervised_losses",
    "residual_rows",
    "concrete_batches",
    "one_batch",
    "state_batch",
    "next_batch",
    "auto_chunk",
]

#: accepted values of the ``jacobian`` option of EGN and Sven
JACOBIAN_MODES = ("auto", "per_sample", "rows")

#: default budget (tensor entries) of one chunk of Jacobian rows or columns
_CHUNK_ENTRIES = 1 << 24


def auto_chunk(n_vectors: int, entries_per_vector: int, chunk_size: int | None) -> int:
    """Number of products per chunk: ``chunk_size``, or as many as fit in ~16M entries."""
    if chunk_size is not None:
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        return min(chunk_size, max(n_vectors, 1))
    return max(1, min(n_vectors, _CHUNK_ENTRIES // max(entries_per_vector, 1)))


def _eye_rows(n: int, start: int, stop: int, like: Tensor) -> Tensor:
    E = torch.zeros(stop - start, n, dtype=like.dtype, device=like.device)
    E[torch.arange(stop - start, device=like.device), torch.arange(start, stop, device=like.device)] = 1
    return E


def rows_jacobian(out: Tensor, inputs: Tensor | Sequence[Tensor], chunk_size: int | None = None) -> Tensor:
    r"""The dense Jacobian of ``out`` (any shape, flattened to ``M`` rows) w.r.t. ``inputs``.

    Row ``i`` is the vjp :math:`e_iᵀ J`; rows are taken ``chunk_size`` at a time by
    :func:`curvlab.linops.batched_vjp` (one vmapped backward pass, or a loop of passes where
    that is faster — big graphs on CPU — or an op has no batching rule) over the graph of
    ``out``, built once.

    Args:
        out: a tensor computed with autograd from ``inputs``.
        inputs: one tensor or a sequence of tensors (their Jacobians are concatenated
            column-wise in order, each flattened).
        chunk_size: rows per backward pass (default: as many as fit in ~16M entries).

    Returns:
        ``J`` of shape ``(out.numel(), P)``, ``P`` the total size of ``inputs``.
    """
    ins = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    sizes = [t.numel() for t in ins]
    P = sum(sizes)
    flat = out.reshape(-1)
    M = flat.numel()
    J = torch.zeros(M, P, dtype=ins[0].dtype, device=ins[0].device)
    if M == 0:
        return J
    chunk = auto_chunk(M, P, chunk_size)
    needed = [t for t in ins if t.requires_grad]
    for s in range(0, M, chunk):
        e = min(M, s + chunk)
        if not flat.requires_grad or not needed:
            continue
        E = _eye_rows(M, s, e, flat)
        # the graph is kept (for the next chunk); it is freed with ``out``
        gs = batched_vjp(flat, needed, E, batched=True, retain=True)
        grads = dict(zip(map(id, needed), gs))
        cols = 0
        for t, n in zip(ins, sizes):
            g = grads.get(id(t))
            if g is not None:
                J[s:e, cols : cols + n] = g.reshape(e - s, n)
            cols += n
    return J


def columns_jacobian(fn: Callable[[Tensor], Tensor], x: Tensor, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    r"""``fn(x)`` and its dense Jacobian by forward mode: one ``jvp`` per parameter, ``vmap``-ed in chunks.

    Args:
        fn: ``x -> tensor`` (flattened to ``M`` rows).
        x: flat point of size ``P``.
        chunk_size: columns per vectorised pass (default: as many as fit in ~16M entries).

    Returns:
        ``(y, J)``: ``y = fn(x).reshape(-1)`` (detached) and ``J`` of shape ``(M, P)``.
    """
    x = x.detach()
    P = x.numel()
    with torch.no_grad():
        y = fn(x).reshape(-1)
    M = y.numel()
    chunk = auto_chunk(P, M, chunk_size)

    def jv(v: Tensor) -> Tensor:
        return torch.func.jvp(lambda z: fn(z).reshape(-1), (x,), (v,))[1]

    blocks = []
    for s in range(0, P, chunk):
        e = min(P, s + chunk)
        V = _eye_rows(P, s, e, x)
        try:
            blocks.append(torch.func.vmap(jv)(V))
        except (RuntimeError, NotImplementedError):  # an op without a batching rule: one column at a time
            blocks.append(torch.stack([jv(v) for v in V]))
    J = torch.cat(blocks, 0).T.contiguous() if blocks else torch.zeros(M, 0, dtype=x.dtype, device=x.device)
    return y, J


def per_sample_jacobian(
    fn: Callable[[Tensor, Any], Tensor],
    x: Tensor,
    samples: Any,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Per-sample values and Jacobians: ``vmap`` over samples of ``jacrev`` of a one-sample function.

    Args:
        fn: ``fn(x, sample) -> (c,)`` tensor for one sample (``sample`` holds the sample's
            slices of ``samples`` *with* a leading dimension of 1, so a batched model
            sees a batch of one).
        x: flat point of size ``P`` (differentiated).
        samples: a tensor or a (nested) tuple/list/dict of tensors whose leading
            dimension is the sample index.
        chunk_size: samples per vectorised pass (default: as many as fit in ~16M entries).

    Returns:
        ``(values, J)`` of shapes ``(b, c)`` and ``(b, c, P)``.
    """
    x = x.detach()

    def one(z: Tensor, s: Any) -> tuple[Tensor, Tensor]:
        s1 = tree_map(lambda t: t.unsqueeze(0), s)
        v = fn(z, s1).reshape(-1)
        return v, v

    jac = torch.func.jacrev(one, has_aux=True)
    leaves = [t for t in _leaves(samples)]
    b = int(leaves[0].shape[0])
    chunk = auto_chunk(b, 8 * x.numel(), chunk_size)
    J, vals = torch.func.vmap(jac, in_dims=(None, 0), chunk_size=chunk)(x, samples)
    return vals.detach(), J.detach()


def _gather_rows(problem: Problem, *tensors: Tensor | None) -> tuple[Any, ...]:
    """The tensors' rows of every rank, concatenated in rank order (unchanged when not data-parallel)."""
    if not problem.distributed:
        return tensors
    return tuple(None if t is None else _dist.all_gather_cat(t, 0) for t in tensors)


def _leaves(tree: Any) -> list[Tensor]:
    from ..params import tree_leaves

    leaves = tree_leaves(tree)
    if not leaves:
        raise ValueError("a batch must hold at least one tensor with a leading sample dimension")
    return leaves


def output_derivatives(losses: Tensor, outputs: Tensor, identity: bool = False) -> tuple[Tensor, Tensor | None]:
    r"""Per-sample gradient :math:`\nabla_f \ell_i` and Hessian blocks :math:`Q_i = \nabla^2_f \ell_i`.

    ``losses[i]`` must depend on ``outputs[i]`` only (per-sample losses), so the Hessian of
    :math:`\sum_i \ell_i` w.r.t. the outputs is block diagonal; its ``c × c`` blocks are
    taken exactly (no diagonal approximation) by ``c`` double-backward passes, column
    :math:`j` of every block at once: :math:`Q_i e_j = \partial (\sum_k \partial\ell_k/\partial f_{kj}) / \partial f_i`.

    Args:
        losses: ``(b,)`` per-sample losses computed with autograd from ``outputs``.
        outputs: ``(b, ...)`` tensor (flattened per sample to ``c`` entries).
        identity: skip the Hessian (the caller knows :math:`Q_i = I`); ``Q`` is then ``None``.

    Returns:
        ``(g, Q)`` with ``g`` of shape ``(b, c)`` and ``Q`` of shape ``(b, c, c)`` (or ``None``).
    """
    b = outputs.shape[0]
    with torch.enable_grad():
        (g,) = torch.autograd.grad(losses.sum(), outputs, create_graph=not identity)
    g2 = g.reshape(b, -1)
    c = g2.shape[1]
    if identity:
        return g2.detach(), None
    Q = torch.zeros(b, c, c, dtype=outputs.dtype, device=outputs.device)
    if not g2.requires_grad:  # the loss is linear in the outputs
        return g2.detach(), Q
    for j in range(c):
        (h,) = torch.autograd.grad(g2[:, j].sum(), outputs, retain_graph=j < c - 1, allow_unused=True)
        if h is not None:
            Q[:, :, j] = h.reshape(b, c)
    Q = 0.5 * (Q + Q.transpose(1, 2))
    return g2.detach(), Q


# --------------------------------------------------------------------------- problems
def state_batch(problem: Problem, state: dict[str, Any]) -> Any:
    """The batch the state's value and gradient were computed on (``ALL`` when deterministic).

    ``Problem.draw`` remembers its last batch, so re-drawing it does not restart a stream.
    """
    return current_batch(problem, state)


def next_batch(problem: Problem, draws: int) -> tuple[Any, int]:
    """The next batch and the new draw count (:func:`curvlab.solvers._common.batch_for`)."""
    return batch_for(problem, draws)


def concrete_batches(problem: Problem, batch: Any) -> list[Any]:
    """The batches behind ``batch``: itself, or (``ALL``) every batch of the data (``[None]`` without data).

    Empty batches are left out (an empty ``batch`` gives ``[]``).
    """
    if batch is ALL:
        return list(problem.data.batches())
    return [] if batch is not None and problem.data.is_empty(batch) else [batch]


def _keys(problem: Problem, batch: Any, batches: list[Any]) -> list[int]:
    """Random-number keys of ``concrete_batches(problem, batch)`` (as :meth:`Problem.value` uses them)."""
    if batch is ALL:
        return [batch_key(i) for i in range(len(batches))]
    return [problem.key(b) for b in batches]


def one_batch(problem: Problem, batch: Any) -> Any:
    """``batch`` itself, or the problem's single batch for ``ALL``.

    Raises:
        ValueError: for ``ALL`` over an iterable of several batches.
    """
    if batch is not ALL:
        return batch
    if problem.data.multi:
        raise ValueError("this computation needs one batch; the data is an iterable of several batches")
    return problem.data.raw


def _subset_fn(x: Tensor, index: Tensor | None) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The differentiated variable (``x`` or ``x[index]``) and the map back to the full vector."""
    x = x.detach()
    if index is None:
        return x, lambda z: z
    return x[index], lambda z: x.index_put((index,), z)


def _check_mode(mode: str) -> None:
    if mode not in JACOBIAN_MODES:
        raise ValueError(f"jacobian mode must be one of {JACOBIAN_MODES}, got {mode!r}")


def _supervised(
    problem: SupervisedLoss,
    x: Tensor,
    batch: Any,
    kind: str,
    mode: str,
    chunk_size: int | None,
    index: Tensor | None,
) -> tuple[Tensor, Tensor, Any]:
    """Rows (outputs or losses) on one batch and their Jacobian, per-sample or by rows."""
    _check_mode(mode)
    batch = one_batch(problem, batch)
    z0, full = _subset_fn(x, index)
    if problem.data.is_empty(batch):
        return x.new_zeros(0, 0), x.new_zeros(0, z0.numel()), None
    with problem.scope(batch, math_attention=True):
        return _supervised_rows(problem, batch, kind, mode, chunk_size, z0, full)


def _supervised_rows(
    problem: SupervisedLoss,
    batch: Any,
    kind: str,
    mode: str,
    chunk_size: int | None,
    z0: Tensor,
    full: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor, Any]:
    inputs, y = split_supervised_batch(batch)
    if mode == "auto" and _couples_samples(problem.model):
        mode = "rows"
    if mode in ("auto", "per_sample"):

        def fn(z: Tensor, s: Any) -> Tensor:
            xi, yi = s
            o = problem.outputs(full(z), xi)
            return o if kind == "outputs" else problem.loss(o, yi)

        try:
            vals, J = per_sample_jacobian(fn, z0, (inputs, y), chunk_size)
            return vals, J.reshape(-1, z0.numel()), y
        except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError):
            if mode == "per_sample":
                raise
    with torch.enable_grad():
        zl = z0.clone().requires_grad_(True)
        o = problem.outputs(full(zl), inputs)
        rows = o if kind == "outputs" else per_sample_losses(problem.loss, o, y)
        b = rows.shape[0]
        J = rows_jacobian(rows, zl, chunk_size)
    return rows.detach().reshape(b, -1), J, y


def _couples_samples(model: Any) -> bool:
    """Whether a module normalises over the batch (train-mode BatchNorm): one-sample Jacobians would be wrong."""
    if not isinstance(model, torch.nn.Module):
        return False
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def supervised_outputs(
    problem: SupervisedLoss,
    x: Tensor,
    batch: Any,
    mode: str = "auto",
    chunk_size: int | None = None,
    index: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    r"""Outputs, output Jacobian and the loss derivatives w.r.t. the outputs on one batch.

    Args:
        problem: a :class:`~curvlab.SupervisedLoss`.
        x: flat parameters.
        batch: one ``(inputs, targets)`` batch.
        mode: ``"per_sample"`` (vmap over samples), ``"rows"`` (batched vjps over the batch)
            or ``"auto"`` (per-sample, falling back to rows if the model cannot be vmapped).
        chunk_size: products per vectorised pass.
        index: optional subset of the flat parameters (columns of ``J``).

    Returns:
        ``(outputs (b, c), J (b·c, P'), g (b, c), Q (b, c, c))`` with ``g`` and ``Q`` the
        per-sample gradient and Hessian blocks of the loss w.r.t. the outputs.
    """
    batch = one_batch(problem, batch)
    out, J, y = _supervised(problem, x, batch, "outputs", mode, chunk_size, index)
    b = out.shape[0]
    if y is None:  # an empty batch: no rows
        g, Q = out.new_zeros(0, 0), out.new_zeros(0, 0, 0)
        return _gather_rows(problem, out, J, g, Q)  # type: ignore[return-value]
    with torch.enable_grad(), problem.scope(batch):
        inputs, _ = split_supervised_batch(batch)
        o = problem.outputs(x.detach(), inputs).detach().requires_grad_(True)
        losses = per_sample_losses(problem.loss, o, y)
        g, Q = output_derivatives(losses, o)
    return _gather_rows(problem, out.reshape(b, -1), J, g, Q)  # type: ignore[return-value]


def supervised_losses(
    problem: SupervisedLoss,
    x: Tensor,
    batch: Any,
    mode: str = "auto",
    chunk_size: int | None = None,
    index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Per-sample losses :math:`\ell_i` on one batch and their Jacobian :math:`\partial\ell_i/\partial x` (``b × P'``).

    Args: as :func:`supervised_outputs`.

    Returns:
        ``(losses (b,), J (b, P'))``.
    """
    vals, J, _ = _supervised(problem, x, batch, "losses", mode, chunk_size, index)
    return _gather_rows(problem, vals.reshape(-1), J)  # type: ignore[return-value]


def residual_rows(
    problem: LeastSquares,
    x: Tensor,
    batch: Any,
    chunk_size: int | None = None,
    index: Tensor | None = None,
    mode: str = "auto",
) -> tuple[Tensor, Tensor, int]:
    r"""Residuals (stacked over the batches behind ``batch``) and their dense Jacobian.

    With ``mode="auto"`` (or ``"rows"``) the Jacobian is taken by forward mode
    (:func:`columns_jacobian`) when there are fewer parameters than residual entries, else
    by batched vjps (:func:`rows_jacobian`); both are exact for any residual function.
    ``mode="per_sample"`` asserts that the residual rows of sample ``i`` depend on sample
    ``i`` of the batch only (row count = batch size, as in data fitting) and takes them by
    ``vmap`` over the samples (:func:`per_sample_jacobian`), usually far cheaper; the rows
    are checked against the batch residuals.

    Args:
        problem: a :class:`~curvlab.LeastSquares`.
        x: flat parameters.
        batch: one batch, or ``ALL`` (every batch, residuals concatenated).
        chunk_size: products per vectorised pass.
        index: optional subset of the flat parameters (columns of ``J``).
        mode: ``"auto"``, ``"rows"`` or ``"per_sample"``.

    Returns:
        ``(r, J, n)``: ``r`` of shape ``(M,)``, ``J`` of shape ``(M, P')`` and ``n`` the number
        of residual *rows* (the ``n`` of the objective :math:`\|r\|^2 / 2n`).

    Raises:
        ValueError: ``mode="per_sample"`` on data without batches, or residuals that do not
            split into per-sample rows.
    """
    _check_mode(mode)
    batches = concrete_batches(problem, batch)
    keys = _keys(problem, batch, batches)
    z0, full = _subset_fn(x, index)
    state = problem.state

    def fn(z: Tensor) -> Tensor:
        parts = []
        for b, k in zip(batches, keys):
            with state.scope(k, math_attention=True):
                parts.append(problem.batch_residuals(full(z), b).reshape(-1))
        return torch.cat(parts)

    n = 0
    with torch.no_grad():
        rs = []
        for b, k in zip(batches, keys):
            with state.scope(k):
                rs.append(problem.batch_residuals(x.detach(), b))
    for r in rs:
        n += r.shape[0] if r.ndim > 0 else 1
    M = sum(r.numel() for r in rs)
    if not batches:  # an empty batch: no rows
        return _rows_result(problem, x.new_zeros(0), x.new_zeros(0, z0.numel()), 0)
    if mode == "per_sample":
        if any(b is None for b in batches):
            raise ValueError("jacobian='per_sample' needs data batches whose leading dimension indexes the samples")
        Js = []
        for b, r, k in zip(batches, rs, keys):
            with state.scope(k, math_attention=True):
                vals, Jb = per_sample_jacobian(lambda z, s: problem.batch_residuals(full(z), s), z0, b, chunk_size)
            if vals.numel() != r.numel() or not torch.allclose(vals.reshape(-1), r.reshape(-1), rtol=1e-4, atol=1e-6):
                raise ValueError(
                    "jacobian='per_sample': the residuals of a one-sample batch are not the rows of the batch "
                    "residuals; the residual rows must belong to the samples (use jacobian='auto')"
                )
            Js.append(Jb.reshape(-1, z0.numel()))
        return _rows_result(problem, torch.cat([r.reshape(-1) for r in rs]), torch.cat(Js), n)
    if z0.numel() < M:
        r, J = columns_jacobian(fn, z0, chunk_size)
        return _rows_result(problem, r, J, n)
    with torch.enable_grad():
        zl = z0.clone().requires_grad_(True)
        out = fn(zl)
        J = rows_jacobian(out, zl, chunk_size)
    return _rows_result(problem, out.detach(), J, n)


def _rows_result(problem: Problem, r: Tensor, J: Tensor, n: int) -> tuple[Tensor, Tensor, int]:
    if not problem.distributed:
        return r, J, n
    r, J = _gather_rows(problem, r, J)
    return r, J, int(_dist.all_reduce_sum(n))
