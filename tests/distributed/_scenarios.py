"""Computations run identically by one process on the whole data and by each rank of a gloo group on its shard.

:func:`run_all` builds the data, takes this process's shard with :func:`curvlab.distributed.shard`
(the whole data without a process group) and returns every result as CPU tensors, so the
distributed tests compare the ranks' results with the single-process ones entry by entry.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

import curvlab as cl
from curvlab import distributed as cd

DT = torch.float64


def mlp_data(n: int = 41, d: int = 4, h: int = 6, c: int = 3, seed: int = 0) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Parameters of a tanh MLP and a classification dataset (float64)."""
    g = torch.Generator().manual_seed(seed)
    params = {
        "W1": 0.7 * torch.randn(h, d, generator=g, dtype=DT),
        "b1": 0.1 * torch.randn(h, generator=g, dtype=DT),
        "W2": 0.7 * torch.randn(c, h, generator=g, dtype=DT),
        "b2": 0.1 * torch.randn(c, generator=g, dtype=DT),
    }
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (n,), generator=g)
    return params, X, y


def model(p: dict, x: torch.Tensor) -> torch.Tensor:
    """The MLP."""
    return torch.tanh(x @ p["W1"].T + p["b1"]) @ p["W2"].T + p["b2"]


def ce(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy."""
    return F.cross_entropy(o, y, reduction="none")


def batch_loss(p: dict, batch: Any) -> torch.Tensor:
    """Mean cross-entropy of a batch."""
    x, y = batch
    return ce(model(p, x), y).mean()


def _vec(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DT)


def run_all() -> dict[str, Any]:
    """Every scenario's results (this rank's view; the whole data without a process group)."""
    out: dict[str, Any] = {}
    params, X, y = mlp_data()
    # list of batches (strided shards) and one tensor dataset (contiguous shards of unequal sizes: 21 / 20)
    batches = [(X[i : i + 10], y[i : i + 10]) for i in range(0, 40, 10)]
    mine = cd.shard(batches)
    whole = cd.shard((X, y))
    P = sum(v.numel() for v in params.values())
    v, V = _vec(P, 1), torch.randn(P, 3, generator=torch.Generator().manual_seed(2), dtype=DT)

    H = cl.linops.hessian(batch_loss, params, data=mine)
    out["hvp"] = H @ v
    out["hmm"] = H @ V
    out["h_value"], out["h_grad"] = H.value, H.gradient
    Hf = cl.linops.hessian(batch_loss, params, data=mine, mode="forward")
    out["hvp_forward"] = Hf @ v
    Hb = cl.linops.hessian(batch_loss, params, data=whole)  # one batch per rank
    out["hvp_onebatch"] = Hb @ v

    G = cl.linops.ggn(model, ce, params, whole)
    out["ggn"] = G @ v
    out["ggn_mm"] = G @ V
    out["ggn_value"], out["ggn_grad"] = G.value, G.gradient
    Fi = cl.linops.fisher(model, ce, params, mine)
    out["fisher"] = Fi @ v
    Gs = cl.linops.ggn(model, ce, params, mine, reduction="sum")
    out["ggn_sum"] = Gs @ v

    e = cl.spectrum.eigsh(H, 3, tol=1e-13, seed=0)
    out["eigsh"] = e.eigenvalues
    e2 = cl.spectrum.eigsh(G, 2, tol=1e-13)  # no seed: rank 0's seed is broadcast
    out["eigsh_noseed"] = e2.eigenvalues
    out["trace"] = cl.spectrum.trace(H, "hutchinson", budget=12, seed=3).estimate
    out["trace_hpp"] = cl.spectrum.trace(G, "hutch++", budget=15, seed=4).estimate
    out["trace_noseed"] = cl.spectrum.trace(H, "hutchinson", budget=6).estimate  # ranks must agree
    out["diag"] = cl.spectrum.diag(G, "hutchinson", budget=8, seed=5).estimate
    dens = cl.spectrum.density(G, n_probes=2, n_lanczos=12, seed=6, n_grid=50)
    out["density"] = dens.values
    lz = cl.linalg.lanczos(G, 8)  # no generator: synced start vector
    out["lanczos_alpha"] = lz.alpha

    res = cl.linalg.cg(G.damped(0.1), H.gradient, tol=1e-13)
    out["cg"] = res.x
    out["minres"] = cl.linalg.minres(H.damped(0.5), H.gradient, tol=1e-13).x
    J = cl.linops.jacobian(lambda p, b: model(p, b[0]), params, data=[whole])  # rows in rank order
    out["jac_residuals"] = J.residuals
    out["jvp"] = J @ v
    u = _vec(J.shape[0], 7)
    out["vjp"] = J.rmatvec(u)

    # problems over the data (ALL) and on one batch
    prob = cl.SupervisedLoss(model, ce, params, whole)
    x0 = prob.x0
    val, grad = prob.value_and_grad(x0)
    out["prob_value"], out["prob_grad"] = val, grad
    out["prob_value_only"] = prob.value(x0 + 0.01)
    out["prob_hvp"] = prob.hessian(x0) @ v
    closed = cl.Minimize(lambda w: ((w - 1.0) ** 4).sum(), torch.zeros(3, dtype=DT))
    out["closed_value"], out["closed_grad"] = closed.value_and_grad(torch.full((3,), 0.5, dtype=DT))

    # stochastic solvers: global mini-batch k is the union of the ranks' halves of batch k
    global_batches = [(X[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    local_batches = [cd.shard(b) for b in global_batches]
    sprob = cl.SupervisedLoss(model, ce, params, local_batches)
    r = cl.solvers.EGN(lr=1.0, damping=0.5, line_search=True, adaptive_damping=True).solve(sprob, max_iter=3, tol=0.0)
    out["egn_x"], out["egn_value"] = r.flat, torch.tensor(r.value)
    r = cl.solvers.Sven(lr=0.5).solve(sprob, max_iter=3, tol=0.0)
    out["sven_x"] = r.flat
    r = cl.solvers.Sven(lr=0.5, svd="randomized", k=3).solve(sprob, max_iter=2, tol=0.0)
    out["sven_rand_x"] = r.flat
    r = cl.solvers.GradientDescent(lr=0.3, momentum=0.5).solve(sprob, max_iter=4, tol=0.0)
    out["gd_x"] = r.flat
    r = cl.solvers.MFAC(lr=0.1, ngrads=3, damping=0.1, momentum=0.5).solve(sprob, max_iter=5, tol=0.0)
    out["mfac_x"] = r.flat
    optim_scenarios(out, params, local_batches)
    dprob = cl.Minimize(batch_loss, params, whole)  # deterministic: the whole data every step
    r = cl.solvers.NewtonCG(damping=0.1).solve(dprob, max_iter=3, tol=0.0)
    out["newtoncg_x"], out["newtoncg_value"] = r.flat, torch.tensor(r.value)

    # least squares over the whole (sharded) data: EGN on ALL and Gauss-Newton
    t = torch.linspace(0, 1, 30, dtype=DT)
    obs = 2.0 * torch.exp(-1.3 * t) + 0.01 * torch.sin(17 * t)
    tl, ol = cd.shard((t, obs))

    def res_fn(w: torch.Tensor, b: Any) -> torch.Tensor:
        tt, oo = b
        return w[0] * torch.exp(w[1] * tt) - oo

    lsq = cl.LeastSquares(res_fn, torch.tensor([1.0, -0.5], dtype=DT), (tl, ol))
    r = cl.solvers.EGN(damping=1e-3).solve(lsq, max_iter=4, tol=0.0)
    out["egn_lsq_x"] = r.flat
    r = cl.solvers.GaussNewton().solve(lsq, max_iter=4, tol=0.0)
    out["gn_lsq_x"] = r.flat
    bilevel_scenarios(out)
    empty_shard_scenarios(out, params, X, y, v)
    return {
        k: (torch.as_tensor(val).detach().cpu() if not isinstance(val, torch.Tensor) else val.detach().cpu())
        for k, val in out.items()
    }


def empty_shard_scenarios(out: dict[str, Any], params: dict, X: torch.Tensor, y: torch.Tensor, v: Any) -> None:
    """Rank 1's shard is empty (no batch, an empty batch, a batch of 0 rows): it contributes nothing,
    every rank stays in the collectives, and the results are those of one process on the whole data."""
    few = cd.shard([(X[:10], y[:10])])  # rank 1: no batch at all
    with_empty = cd.shard([(X[:10], y[:10]), (X[:0], y[:0])])  # rank 1: one empty batch
    one = cd.shard((X[:1], y[:1]))  # rank 1: a batch of 0 rows
    out["empty_hvp"] = cl.linops.hessian(batch_loss, params, data=few) @ v
    out["empty_ggn"] = cl.linops.ggn(model, ce, params, with_empty) @ v
    J = cl.linops.jacobian(lambda p, b: model(p, b[0]), params, data=few)
    out["empty_jvp"] = J @ v
    prob = cl.SupervisedLoss(model, ce, params, one)
    out["empty_value"], out["empty_grad"] = prob.value_and_grad(prob.x0)
    sprob = cl.SupervisedLoss(model, ce, params, few)
    out["empty_gd_x"] = cl.solvers.GradientDescent(lr=0.3).solve(sprob, max_iter=3, tol=0.0).flat
    out["empty_egn_x"] = cl.solvers.EGN(damping=0.5).solve(sprob, max_iter=2, tol=0.0).flat
    t = torch.linspace(0, 1, 12, dtype=DT)
    lsq = cl.LeastSquares(
        lambda w, b: w[0] * torch.exp(w[1] * b[0]) - b[1], torch.tensor([1.0, -0.5], dtype=DT),
        cd.shard([(t, 2.0 * torch.exp(-1.3 * t))]),
    )  # fmt: skip
    out["empty_gn_x"] = cl.solvers.GaussNewton().solve(lsq, max_iter=3, tol=0.0).flat
    try:  # no sample on any rank: the same clear error everywhere, nobody left waiting
        cl.SupervisedLoss(model, ce, params, cd.shard([(X[:0], y[:0])]))
        out["empty_all_error"] = torch.tensor(0.0)
    except ValueError as e:
        out["empty_all_error"] = torch.tensor(1.0 if "no sample" in str(e) else 2.0)


def optim_scenarios(out: dict[str, Any], params: dict, local_batches: list) -> None:
    """A few steps of the ``curvlab.optim`` adapters, each rank's closure on its half of the global mini-batch."""

    def run(make: Any, closure_for: Any, n: int = 3) -> torch.Tensor:
        ps = [t.clone().requires_grad_(True) for t in params.values()]
        p = dict(zip(params, ps))
        opt = make(ps)
        for b in local_batches[:n]:
            opt.step(closure_for(opt, p, b))
        return torch.cat([t.detach().reshape(-1) for t in ps])

    def rows(opt: Any, p: dict, b: Any) -> Any:
        def closure() -> tuple[torch.Tensor, torch.Tensor]:
            o = model(p, b[0])
            return ce(o, b[1]), o

        return closure

    def backward(opt: Any, p: dict, b: Any) -> Any:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = batch_loss(p, b)
            loss.backward()
            return loss

        return closure

    out["optim_egn_x"] = run(lambda ps: cl.optim.EGN(ps, damping=0.5, line_search=True, momentum=0.3), rows)
    out["optim_sven_x"] = run(lambda ps: cl.optim.Sven(ps, lr=0.5), rows)
    out["optim_mfac_x"] = run(lambda ps: cl.optim.MFAC(ps, lr=0.1, ngrads=2, damping=0.1, momentum=0.5), backward, 4)
    out["optim_sfn_x"] = run(
        lambda ps: cl.optim.SaddleFreeNewton(ps, method="lowrank", k=4, damping=0.1),
        lambda o, p, b: lambda: batch_loss(p, b),
        2,
    )


def _logreg(w: torch.Tensor, batch: Any) -> torch.Tensor:
    x, t = batch
    return F.binary_cross_entropy_with_logits(x @ w, t)


def bilevel_scenarios(out: dict[str, Any]) -> None:
    """Bilevel oracles and a few F2SA / AID / IFT / BO-REP steps on sharded logistic-regression hyperparameters."""
    import bilevel as bl

    g = torch.Generator().manual_seed(11)
    d = 5
    w_true = torch.randn(d, generator=g, dtype=DT)
    Xtr, Xval = torch.randn(32, d, generator=g, dtype=DT), torch.randn(21, d, generator=g, dtype=DT)
    ttr = (Xtr @ w_true + 0.5 * torch.randn(32, generator=g, dtype=DT) > 0).to(DT)
    tval = (Xval @ w_true > 0).to(DT)

    def inner(x: torch.Tensor, y: torch.Tensor, b: Any) -> torch.Tensor:  # per-feature log ridge penalties
        return _logreg(y, b) + 0.5 * (torch.exp(x) * y * y).sum()

    def outer(x: torch.Tensor, y: torch.Tensor, b: Any) -> torch.Tensor:
        return _logreg(y, b) + 1e-3 * (x * x).sum()

    x0, y0 = torch.full((d,), -1.0, dtype=DT), torch.zeros(d, dtype=DT)
    # deterministic: one contiguous shard of each dataset per rank (unequal sizes on the outer side)
    det = bl.BilevelProblem(outer, inner, x0, y0, outer_data=cd.shard((Xval, tval)), inner_data=cd.shard((Xtr, ttr)))
    # over all the data, as a list of batches dealt to the ranks
    tr_batches = [(Xtr[i : i + 8], ttr[i : i + 8]) for i in range(0, 32, 8)]
    allp = bl.BilevelProblem(outer, inner, x0, y0, outer_data=[cd.shard((Xval, tval))], inner_data=cd.shard(tr_batches))
    xs, ys, v = x0 + 0.3, _vec(d, 12), _vec(d, 13)
    out["bl_f"], out["bl_g"] = allp.f(xs, ys), allp.g(xs, ys)
    out["bl_f_grads"] = torch.cat([t.reshape(-1) for t in allp.f_and_grad(xs, ys)])
    out["bl_g_grad_y"] = allp.grad_g_y(xs, ys)
    out["bl_second_g"] = torch.cat(allp.second_g(xs, ys, v))  # type: ignore[arg-type]
    out["bl_hvp_op"] = allp.hvp_yy_operator(xs, ys)(v)
    out["bl_onebatch_grads"] = torch.cat(det.g_and_grad(xs, ys, det.draw_inner(0))[1:])
    closed = bl.BilevelProblem(lambda x, y, b: ((y - 1) ** 2).sum(), lambda x, y, b: ((y - x) ** 2).sum(), x0, y0)
    out["bl_closed_g"] = closed.g(xs, ys)

    with torch.enable_grad():  # differentiable global values (unrolled differentiation)
        xg, yg = xs.clone().requires_grad_(True), ys.clone().requires_grad_(True)
        (gyd,) = torch.autograd.grad(allp.g_diff(xg, yg), yg, create_graph=True)
        (gxd,) = torch.autograd.grad((gyd * v).sum() + allp.f_diff(xg, yg), xg)
        out["bl_diff_grads"] = torch.cat([gyd.detach(), gxd])
    # and through torch.func (forward-over-reverse HVP of the differentiable global inner value)
    out["bl_diff_hvp"] = cl.linops.hessian(lambda yv: allp.g_diff(xs, yv), ys.clone()) @ v
    r = bl.AID(lr=0.5, inner_steps=20, solve_tol=1e-12).solve(det, max_iter=3, tol=0.0)
    out["aid_x"], out["aid_y"] = r.x_flat, r.y_flat
    # stochastic: global mini-batch k is the union of the ranks' halves of batch k
    gtr = [(Xtr[i : i + 8], ttr[i : i + 8]) for i in range(0, 32, 8)]
    gval = [(Xval[i : i + 7], tval[i : i + 7]) for i in range(0, 21, 7)]
    sto = bl.BilevelProblem(
        outer, inner, x0, y0, outer_data=[cd.shard(b) for b in gval], inner_data=[cd.shard(b) for b in gtr]
    )
    r = bl.F2SA(lr_y=0.1, lr_z=0.5, n_inner_steps=3).solve(sto, max_iter=3, tol=0.0)
    out["f2sa_x"], out["f2sa_y"] = r.x_flat, r.y_flat
    r = bl.IFT(lr=0.5, T=4, K=8, optimizer="adam").solve(sto, max_iter=2, tol=0.0)
    out["ift_x"] = r.x_flat
    r = bl.ITD(lr=0.5, K=4).solve(sto, max_iter=2, tol=0.0)
    out["itd_x"] = r.x_flat
    r = bl.F2SA(lr_y=0.1, lr_z=0.5, n_inner_steps=2, momentum=True).solve(det, max_iter=3, tol=0.0)
    out["f2sa_mom_x"] = r.x_flat
    r = bl.BOREP(lr=0.1, n_inner_steps=3, init_epochs=2, init_steps=2).solve(sto, max_iter=4, tol=0.0)
    out["borep_x"], out["borep_y"] = r.x_flat, r.y_flat


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Entry point of a spawned rank: join the gloo group, run every scenario, save the results."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.manual_seed(1000 + rank)  # different global RNG per rank: unseeded probes must still agree
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        res = run_all()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def spawn_all(world: int = 2) -> list[dict[str, Any]]:
    """Run :func:`run_all` on ``world`` gloo ranks (spawned processes) and return every rank's results."""
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        torch.multiprocessing.spawn(worker, args=(world, init_file, d), nprocs=world, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(world)]
