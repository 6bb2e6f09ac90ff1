"""Scale-out and speed-up of curvlab (issue 8): processes, torch.compile, peak memory.

Model: an MLP 64-256-256-10 (tanh) on all 1797 scikit-learn digits, cross-entropy.

1. **Processes** (:mod:`curvlab.distributed`, gloo on CPU / nccl on GPUs, spawned with
   :func:`torch.multiprocessing.spawn`): each rank holds its shard of the data; timed are one
   Hessian-vector product over the whole data (graphs cached, products only), the top-5
   eigenvalues (:func:`curvlab.spectrum.eigsh`, seed 0) and one EGN step on a global mini-batch
   of ``--egn-batch`` samples (each rank ``egn_batch / world``). The eigenvalues are printed
   for every world size: they agree.
2. **Compile**: eager versus ``compile=True`` products (:func:`curvlab.linops.hessian`,
   :func:`curvlab.linops.ggn`), as ratios to one eager gradient (forward + backward) at the
   same point. "fresh" builds the operator at a new point (what a Newton step pays),
   "repeated" times products only at one point (what a Krylov solve pays).
3. **Peak memory** of one gradient, one fresh Hessian-vector product and one fresh GGN product,
   as ratios to the gradient's. CUDA: ``torch.cuda.max_memory_allocated``; CPU: the peak of the
   allocation timeline recorded by ``torch.profiler`` (``profile_memory=True``; ``tracemalloc``
   does not see torch's allocator). The data and parameters are allocated beforehand and not counted.

Run:  python benchmarks/scaling.py [--device cuda] [--world 1 2] [--no-compile]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn

import curvlab as cl
from curvlab import distributed as cd


def data_and_model(device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """Digits (pixels / 16) and a fixed-seed MLP 64-256-256-10."""
    X, y = load_digits(return_X_y=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    return (
        torch.tensor(X / 16.0, dtype=dtype, device=device),
        torch.tensor(y, device=device),
        model.to(device, dtype),
    )


def make_loss(model: nn.Module) -> Callable[[dict, Any], torch.Tensor]:
    def loss(p: dict, batch: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(torch.func.functional_call(model, p, (batch[0],)), batch[1])

    return loss


def timeit(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median wall time of ``fn`` (one warm-up call first; CUDA synchronised)."""

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ----------------------------------------------------------------------------- 1. processes
def scaling_worker(rank: int, world: int, init_file: str, out_dir: str, opts: dict) -> None:
    """One rank of the scaling runs (``world == 1``: no process group)."""
    torch.set_num_threads(1)
    device = opts["device"]
    if world > 1:
        backend = "nccl" if device == "cuda" else "gloo"
        torch.distributed.init_process_group(
            backend, init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=300)
        )
    if device == "cuda":
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    dtype = getattr(torch, opts["dtype"])
    X, y, model = data_and_model(device, dtype)
    loss = make_loss(model)
    Xs, ys = cd.shard((X, y))
    H = cl.linops.hessian(loss, model, data=[(Xs, ys)], cache=True)
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    out: dict[str, Any] = {"hvp": timeit(lambda: H @ v, opts["repeats"], device)}
    t0 = time.perf_counter()
    top = cl.spectrum.eigsh(H, 5, tol=1e-5, seed=0)
    out["eigsh"] = time.perf_counter() - t0
    out["eigenvalues"] = [float(t) for t in top.eigenvalues]
    out["eigsh_products"] = top.n_matvecs
    b = opts["egn_batch"]
    batches = [cd.shard((X[i : i + b], y[i : i + b])) for i in range(0, len(X) - b + 1, b)]
    problem = cl.SupervisedLoss(model, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), None, batches)
    solver = cl.solvers.EGN(damping=1.0)
    state = solver.init(problem)
    state = solver.step(problem, state)  # warm-up
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        state = solver.step(problem, state)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    out["egn_step"] = statistics.median(ts)
    out["egn_value"] = float(state["value"])
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "result.pt"))
    if world > 1:
        torch.distributed.destroy_process_group()


def run_scaling(world: int, opts: dict) -> dict:
    with tempfile.TemporaryDirectory() as d:
        torch.multiprocessing.spawn(scaling_worker, args=(world, os.path.join(d, "init"), d, opts), nprocs=world)
        return torch.load(os.path.join(d, "result.pt"))


# ----------------------------------------------------------------------------- 2. + 3. single process
def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    acts = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts, profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def single_process(opts: dict) -> dict:
    device, dtype = opts["device"], getattr(torch, opts["dtype"])
    X, y, model = data_and_model(device, dtype)
    loss = make_loss(model)
    params = {k: p.detach() for k, p in model.named_parameters()}
    batch = (X, y)
    ce = lambda o, t: nn.functional.cross_entropy(o, t, reduction="none")  # noqa: E731
    P = sum(p.numel() for p in params.values())
    v = torch.randn(P, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    r = opts["repeats"]

    def gradient() -> object:
        ps = {k: p.requires_grad_(True) for k, p in ((k, p.clone()) for k, p in params.items())}
        return torch.autograd.grad(loss(ps, batch), list(ps.values()))

    res: dict[str, Any] = {}
    tg = timeit(gradient, r, device)
    res["gradient_s"] = tg
    H = cl.linops.hessian(loss, params, data=[batch], cache=True)
    G = cl.linops.ggn(model, ce, params, [batch], cache=True)
    rows = {
        "HVP eager reverse, repeated": lambda: H @ v,
        "HVP eager reverse, fresh": lambda: cl.linops.hessian(loss, params, data=[batch], cache=False) @ v,
        "HVP eager forward (jvp of grad), fresh": lambda: (
            cl.linops.hessian(loss, params, data=[batch], mode="forward") @ v
        ),
        "GGN eager, repeated": lambda: G @ v,
        "GGN eager, fresh": lambda: cl.linops.ggn(model, ce, params, [batch], cache=False) @ v,
    }
    if opts["compile"]:
        Hc = cl.linops.hessian(loss, params, data=[batch], compile=True)
        Gc = cl.linops.ggn(model, ce, params, [batch], compile=True)
        for name, op in (("HVP", Hc), ("GGN", Gc)):
            t0 = time.perf_counter()
            op @ v
            res[f"{name} compile time (s)"] = time.perf_counter() - t0
            err = float((op @ v - (H if name == "HVP" else G) @ v).norm() / ((H if name == "HVP" else G) @ v).norm())
            res[f"{name} compiled vs eager rel. difference"] = err
        rows["HVP compiled (forward over reverse)"] = lambda: Hc @ v
        rows["GGN compiled (functional jvp/vjp)"] = lambda: Gc @ v
    res["time ratios to one gradient"] = {k: timeit(fn, r, device) / tg for k, fn in rows.items()}
    mg = peak_bytes(gradient, device)
    res["gradient peak MB"] = mg / 2**20
    res["peak memory ratios to one gradient"] = {
        "HVP reverse, fresh": peak_bytes(rows["HVP eager reverse, fresh"], device) / mg,
        "HVP forward, fresh": peak_bytes(rows["HVP eager forward (jvp of grad), fresh"], device) / mg,
        "GGN, fresh": peak_bytes(rows["GGN eager, fresh"], device) / mg,
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--egn-batch", type=int, default=128)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    args = ap.parse_args()
    opts = vars(args)
    torch.set_num_threads(1)
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"# device {args.device}, {args.dtype}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, 1 thread/rank")
    print("\n## processes (seconds; speed-up vs 1 process)")
    print(f"{'world':>5} {'HVP':>9} {'top-5 eigsh':>12} {'EGN step':>9}  top-5 eigenvalues")
    base = None
    for w in args.world:
        r = run_scaling(w, opts)
        base = base or r
        print(
            f"{w:>5} {r['hvp']:>9.4f} {r['eigsh']:>12.3f} {r['egn_step']:>9.4f}  "
            + " ".join(f"{e:.6f}" for e in r["eigenvalues"])
            + f"   (speed-up x{base['hvp'] / r['hvp']:.2f} / x{base['eigsh'] / r['eigsh']:.2f}"
            f" / x{base['egn_step'] / r['egn_step']:.2f})"
        )
    print("\n## single process: compile and memory")
    res = single_process(opts)
    print(f"gradient: {res['gradient_s'] * 1e3:.2f} ms, peak {res['gradient peak MB']:.2f} MB")
    for k, v in res.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for name, ratio in v.items():
                print(f"  {name:45s} {ratio:6.2f}x")
        elif k not in ("gradient_s", "gradient peak MB"):
            print(f"{k}: {v:.3g}")


if __name__ == "__main__":
    main()
