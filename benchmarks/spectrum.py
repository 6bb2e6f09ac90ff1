"""Hessian spectrum: curvlab vs PyHessian vs curvlinops (+ scipy eigsh), one model, one dataset, one seed.

The model is the example's (``examples/hessian_spectrum.py``): a 64-64-10 ReLU MLP
trained with SGD for 5 epochs on scikit-learn's digits (4810 parameters); the
operator is the Hessian of the mean cross-entropy over all 1797 samples. The
reference is the dense Hessian (float64, built column by column) and its
``torch.linalg.eigvalsh``. For each task the script reports the error against
dense, the Hessian-vector products used and the wall time:

* top-5 eigenvalues: ``curvlab.spectrum.eigsh(H, k=5)`` (defaults, and ``tol=1e-4``),
  PyHessian's ``hessian.eigenvalues(top_n=5)`` (power iteration with deflation, its
  defaults maxIter=100, tol=1e-3, and tol=1e-5, the loosest that reaches 1e-4
  relative error here), and scipy's ``eigsh(k=5, which="LA")`` on curvlinops'
  ``HessianLinearOperator(...).to_scipy()`` (ARPACK, default tol);
* trace at a budget of 100 products: curvlab's Hutchinson / Hutch++ / XTrace,
  PyHessian's ``trace(maxIter=100, tol=0)`` (Hutchinson, 100 products), curvlinops'
  ``hutchinson_trace`` / ``hutchpp_trace`` (99) / ``xtrace``; RMS relative error
  over ``--trace-seeds`` seeds;
* density: curvlab's ``density`` at PyHessian's default budget (1 probe × 100
  Lanczos steps) and at its own default (2 × 90), PyHessian's ``density(iter=100,
  n_v=1)``, curvlinops' ``lanczos_approximate_spectrum(ncv=100)`` (Papyan 2020);
  error = Wasserstein-1 distance to the dense eigenvalue distribution over the
  spectral width (from the quadrature nodes, and from the smoothed density on its grid).

Wall times include building each library's operator (graph construction for
curvlab and PyHessian; curvlinops with ``check_deterministic=False``). Times
are the median over ``--repeats`` runs with different seeds. PyHessian's
``density`` calls ``torch.eig``, removed in torch 2; the script substitutes
``torch.linalg.eigh`` (its tridiagonal matrix is symmetric) and says so.

Run from the repository root::

    python benchmarks/spectrum.py              # float64, 5 repeats, 30 trace seeds
    python benchmarks/spectrum.py --dtype float32
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import wasserstein_distance
from torch import nn

import curvlab as cl
from curvlab.spectrum import density, eigsh, trace

# --------------------------------------------------------------------------- model
# The example's model (64-64-10 ReLU MLP, SGD lr 0.1, batch 32, digits scaled to [0, 1]), imported so the two
# cannot drift apart.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from hessian_spectrum import train_mlp  # noqa: E402


def curvlab_hessian(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> cl.linops.HessianOperator:
    def loss(params: Any, batch: Any) -> torch.Tensor:
        xb, yb = batch
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (xb,)), yb)

    return cl.linops.hessian(loss, model, data=(X, y))


def dense_eigenvalues(model: nn.Module, X: torch.Tensor, y: torch.Tensor, block: int = 256) -> torch.Tensor:
    """All eigenvalues (ascending) of the float64 dense Hessian, built by blocks of Hessian-vector products."""
    import copy

    m64 = copy.deepcopy(model).double()
    H = curvlab_hessian(m64, X.double(), y)
    n = H.shape[0]
    cols = []
    for i in range(0, n, block):
        E = torch.zeros(n, min(block, n - i), dtype=torch.float64)
        E[torch.arange(i, i + E.shape[1]), torch.arange(E.shape[1])] = 1.0
        cols.append(H.matmat(E))
    Hd = torch.cat(cols, dim=1)
    return torch.linalg.eigvalsh(0.5 * (Hd + Hd.T))


# --------------------------------------------------------------------------- peers
def load_pyhessian() -> tuple[Any, dict[str, int]] | str:
    try:
        import importlib

        ph = importlib.import_module("pyhessian.hessian")  # the module (the package re-exports a class of that name)
    except Exception as e:  # noqa: BLE001 - report any import failure
        return f"import failed: {type(e).__name__}: {e}"
    counter = {"hvp": 0}
    original = ph.hessian_vector_product

    def counted(gradsH: Any, params: Any, v: Any) -> Any:
        counter["hvp"] += 1
        return original(gradsH, params, v)

    ph.hessian_vector_product = counted
    original_dl = ph.hessian.dataloader_hv_product

    def counted_dl(self: Any, v: Any) -> Any:
        counter["hvp"] += 1
        return original_dl(self, v)

    ph.hessian.dataloader_hv_product = counted_dl
    # torch.eig was removed in torch 2 (it now raises); PyHessian.density calls it on its
    # symmetric tridiagonal matrix, so give it the symmetric solver in the old return format

    def eig(T: torch.Tensor, eigenvectors: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        w, V = torch.linalg.eigh(T)
        return torch.stack([w, torch.zeros_like(w)], dim=1), V

    torch.eig = eig  # type: ignore[attr-defined]
    return ph, counter


def load_curvlinops() -> Any | str:
    try:
        import curvlinops
    except Exception as e:  # noqa: BLE001
        return f"import failed: {type(e).__name__}: {e}"
    return curvlinops


def curvlinops_hessian(curvlinops: Any, model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[Any, dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    A = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False)
    counter = {"mv": 0}
    original = A._matmat

    def counted(M: list[torch.Tensor]) -> list[torch.Tensor]:
        counter["mv"] += int(M[0].shape[-1])
        return original(M)

    A._matmat = counted
    return A, counter


# --------------------------------------------------------------------------- metrics
def w1_nodes(nodes: np.ndarray, weights: np.ndarray, eig: np.ndarray) -> float:
    return float(wasserstein_distance(nodes, eig, weights / weights.sum()))


def w1_grid(grid: np.ndarray, values: np.ndarray, eig: np.ndarray) -> float:
    """W1 between a density on a grid (normalised by its trapezoid integral) and the eigenvalues' distribution."""
    inc = 0.5 * (values[1:] + values[:-1]) * np.diff(grid)
    cdf_hat = np.concatenate([[0.0], np.cumsum(inc)]) / inc.sum()
    cdf = np.searchsorted(np.sort(eig), grid, side="right") / eig.size
    inside = float(np.trapezoid(np.abs(cdf_hat - cdf), grid))
    # eigenvalue mass outside the grid (a grid that misses part of the spectrum)
    outside = float(np.sum(np.clip(grid[0] - eig, 0, None)) + np.sum(np.clip(eig - grid[-1], 0, None))) / eig.size
    return inside + outside


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def fmt(x: float, digits: int = 2) -> str:
    if isinstance(x, str):
        return x
    if x == 0:
        return "0"
    return f"{x:.{digits}e}" if (abs(x) < 1e-2 or abs(x) >= 1e4) else f"{x:.{digits + 1}g}"


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trace-seeds", type=int, default=30)
    ap.add_argument("--density-seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--dense-cache", default=None, help="file to keep the dense eigenvalues in between runs")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    model, X, y = train_mlp()  # before set_num_threads: the weights do not depend on --threads
    t_dense = time.perf_counter()
    import os

    if args.dense_cache and os.path.exists(args.dense_cache):
        eig = torch.load(args.dense_cache)
    else:
        eig = dense_eigenvalues(model, X, y)
        if args.dense_cache:
            torch.save(eig, args.dense_cache)
    t_dense = time.perf_counter() - t_dense
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(dtype)  # PyHessian draws its random vectors in the default dtype
    model = model.to(dtype)
    X = X.to(dtype)
    eig_np = eig.numpy()
    n = eig.numel()
    top5 = eig.flip(0)[:5]
    tr_exact = float(eig.sum())
    width = float(eig[-1] - eig[0])
    print(f"# Hessian spectrum benchmark ({args.dtype})")
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, no GPU"
    )
    print(f"model: 64-64-10 ReLU MLP on digits, n = {n} parameters, 1797 samples, full-batch Hessian")
    print(f"dense reference: {t_dense:.1f} s; top-5 = {top5.numpy().round(5).tolist()}, trace = {tr_exact:.6g}, ")
    print(f"  spectrum in [{float(eig[0]):.4g}, {float(eig[-1]):.4g}]")

    ph = load_pyhessian()
    cv = load_curvlinops()
    for name, lib in (("PyHessian", ph), ("curvlinops", cv)):
        if isinstance(lib, str):
            print(f"{name}: {lib}")

    def rel_top5(vals: Any) -> float:
        v = torch.sort(torch.as_tensor(np.asarray(vals, dtype=np.float64)), descending=True).values[:5]
        return float(((v - top5) / top5).abs().max())

    # ----------------------------------------------------------- top-5 eigenvalues
    rows: list[tuple[str, ...]] = []

    def curvlab_top5(seed: int, tol: float | None = None) -> tuple[float, int]:
        H = curvlab_hessian(model, X, y)
        res = eigsh(H, k=5, seed=seed, tol=tol)
        assert res.converged
        return rel_top5(res.eigenvalues.double().numpy()), res.n_matvecs

    def pyhessian_top5(seed: int, tol: float = 1e-3, max_iter: int = 100) -> tuple[float, int]:
        mod, counter = ph
        torch.manual_seed(seed)
        counter["hvp"] = 0
        hess = mod.hessian(model, nn.CrossEntropyLoss(), data=(X, y), cuda=False)
        vals, _ = hess.eigenvalues(top_n=5, tol=tol, maxIter=max_iter)
        model.zero_grad(set_to_none=True)
        return rel_top5(vals), counter["hvp"]

    def curvlinops_top5(seed: int) -> tuple[float, int]:
        from scipy.sparse.linalg import eigsh as scipy_eigsh

        A, counter = curvlinops_hessian(cv, model, X, y)
        v0 = np.random.default_rng(seed).standard_normal(n)
        vals = scipy_eigsh(A.to_scipy(), k=5, which="LA", v0=v0, return_eigenvectors=False)
        return rel_top5(vals), counter["mv"]

    top_results: dict[str, tuple[float, int, float]] = {}
    runners: list[tuple[str, Callable[[int], tuple[float, int]]]] = [
        ("curvlab eigsh(k=5) (thick-restart Lanczos, defaults)", curvlab_top5),
        ("curvlab eigsh(k=5, tol=1e-4)", lambda seed: curvlab_top5(seed, tol=1e-4)),
    ]
    if not isinstance(ph, str):
        runners.append(("PyHessian eigenvalues(top_n=5) (power iteration, defaults: tol=1e-3)", pyhessian_top5))
        runners.append(
            (
                "PyHessian eigenvalues(top_n=5, tol=1e-5, maxIter=1000) (reaches 1e-4)",
                lambda seed: pyhessian_top5(seed, tol=1e-5, max_iter=1000),
            )
        )
    if not isinstance(cv, str):
        runners.append(("curvlinops to_scipy + scipy eigsh (ARPACK)", curvlinops_top5))
    stats: dict[str, list[tuple[float, int, float]]] = {name: [] for name, _ in runners}
    for seed in range(args.repeats):  # interleaved, so load changes hit every method alike
        for name, fn in runners:
            (err, mv), dt = timed(lambda fn=fn, seed=seed: fn(seed))
            stats[name].append((err, mv, dt))
    for name, runs in stats.items():
        err = max(r[0] for r in runs)
        mv = int(statistics.median(r[1] for r in runs))
        dt = statistics.median(r[2] for r in runs)
        top_results[name] = (err, mv, dt)
        rows.append((name, fmt(err), str(mv), f"{dt:.2f}"))
    print("\n## Top-5 eigenvalues (max relative error over the 5, worst of the repeats)\n")
    print("| method | rel. error | matvecs | wall time [s] |")
    print("|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    base = top_results[runners[0][0]]
    for name, (_err, mv, dt) in top_results.items():
        if name != runners[0][0]:
            ratio = f"{mv / base[1]:.1f}x the matvecs and {dt / base[2]:.1f}x the wall time"
            print(f"- {name}: {ratio} of curvlab's defaults")

    # ----------------------------------------------------------- trace
    print(f"\n## Trace at a budget of 100 matvecs (RMS relative error over {args.trace_seeds} seeds)\n")
    trace_runners: list[tuple[str, Callable[[int], tuple[float, int, float]]]] = []
    for method in ("hutchinson", "hutch++", "xtrace"):

        def run(seed: int, method: str = method) -> tuple[float, int, float]:
            H = curvlab_hessian(model, X, y)
            res = trace(H, method, 100, seed=seed)
            return float(res), res.n_matvecs, float(res.std_error)

        trace_runners.append((f"curvlab trace('{method}')", run))
    if not isinstance(ph, str):

        def run_ph(seed: int) -> tuple[float, int, float]:
            mod, counter = ph
            torch.manual_seed(seed)
            counter["hvp"] = 0
            hess = mod.hessian(model, nn.CrossEntropyLoss(), data=(X, y), cuda=False)
            samples = hess.trace(maxIter=100, tol=0.0)
            model.zero_grad(set_to_none=True)
            return float(np.mean(samples)), counter["hvp"], float("nan")

        trace_runners.append(("PyHessian trace() (Hutchinson)", run_ph))
    if not isinstance(cv, str):
        for fname, budget in (("hutchinson_trace", 100), ("hutchpp_trace", 99), ("xtrace", 100)):

            def run_cv(seed: int, fname: str = fname, budget: int = budget) -> tuple[float, int, float]:
                A, counter = curvlinops_hessian(cv, model, X, y)
                torch.manual_seed(seed)
                est = getattr(cv, fname)(A, budget)
                return float(est), counter["mv"], float("nan")

            trace_runners.append((f"curvlinops {fname}", run_cv))
    tstats: dict[str, list[tuple[float, int, float, float]]] = {name: [] for name, _ in trace_runners}
    for seed in range(args.trace_seeds):
        for name, fn in trace_runners:
            (est, mv, se), dt = timed(lambda fn=fn, seed=seed: fn(seed))
            tstats[name].append((est, mv, se, dt))
    print("| method | RMS rel. error | mean reported std. error (rel.) | matvecs | wall time [s] |")
    print("|---|---|---|---|---|")
    trace_err = {}
    for name, runs in tstats.items():
        errs = np.array([(r[0] - tr_exact) / tr_exact for r in runs])
        rms = float(np.sqrt(np.mean(errs**2)))
        trace_err[name] = rms
        se = float(np.mean([r[2] for r in runs])) / abs(tr_exact)
        mv = int(statistics.median(r[1] for r in runs))
        dt = statistics.median(r[3] for r in runs)
        print(f"| {name} | {fmt(rms)} | {'—' if math.isnan(se) else fmt(se)} | {mv} | {dt:.2f} |")
    if "PyHessian trace() (Hutchinson)" in trace_err:
        ref = trace_err["PyHessian trace() (Hutchinson)"]
        for m in ("hutch++", "xtrace"):
            key = f"curvlab trace('{m}')"
            print(f"- curvlab {m} error / PyHessian Hutchinson error: {trace_err[key] / ref:.2f}")

    # ----------------------------------------------------------- density
    print(
        f"\n## Spectral density (W1 distance to the dense eigenvalues / spectral width {width:.4g}, "
        f"mean over {args.density_seeds} seeds)\n"
    )
    dens_runners: list[tuple[str, Callable[[int], tuple[float, float, int]]]] = []
    for probes, steps in ((1, 100), (2, 90)):

        def run_d(seed: int, probes: int = probes, steps: int = steps) -> tuple[float, float, int]:
            H = curvlab_hessian(model, X, y)
            d = density(H, probes, steps, seed=seed)
            wn = w1_nodes(d.nodes.double().numpy(), d.weights.double().numpy(), eig_np)
            wg = w1_grid(d.grid.double().numpy(), d.values.double().numpy(), eig_np)
            return wn, wg, d.n_matvecs

        dens_runners.append((f"curvlab density({probes} probe{'s' if probes > 1 else ''} × {steps})", run_d))
    if not isinstance(ph, str):

        def run_phd(seed: int) -> tuple[float, float, int]:
            mod, counter = ph
            torch.manual_seed(seed)
            counter["hvp"] = 0
            hess = mod.hessian(model, nn.CrossEntropyLoss(), data=(X, y), cuda=False)
            nodes, weights = hess.density(iter=100, n_v=1)
            model.zero_grad(set_to_none=True)
            nd = np.concatenate([np.asarray(v, dtype=np.float64) for v in nodes])
            wt = np.concatenate([np.asarray(v, dtype=np.float64) for v in weights])
            return w1_nodes(nd, wt, eig_np), float("nan"), counter["hvp"]

        dens_runners.append(("PyHessian density(iter=100, n_v=1) [torch.eig shimmed]", run_phd))
    if not isinstance(cv, str):

        def run_cvd(seed: int) -> tuple[float, float, int]:
            A, counter = curvlinops_hessian(cv, model, X, y)
            torch.manual_seed(seed)
            np.random.seed(seed)
            grid, values = cv.lanczos_approximate_spectrum(A, ncv=100)
            wg = w1_grid(grid.double().cpu().numpy(), values.double().cpu().numpy(), eig_np)
            return float("nan"), wg, counter["mv"]

        dens_runners.append(("curvlinops lanczos_approximate_spectrum(ncv=100)", run_cvd))
    dstats: dict[str, list[tuple[float, float, int, float]]] = {name: [] for name, _ in dens_runners}
    for seed in range(args.density_seeds):
        for name, fn in dens_runners:
            try:
                (wn, wg, mv), dt = timed(lambda fn=fn, seed=seed: fn(seed))
            except Exception as e:  # noqa: BLE001 - a peer failing is a result
                print(f"{name}: failed: {type(e).__name__}: {e}")
                continue
            dstats[name].append((wn, wg, mv, dt))
    print("| method | W1/width (nodes) | W1/width (smoothed) | matvecs | wall time [s] |")
    print("|---|---|---|---|---|")
    for name, runs in dstats.items():
        if not runs:
            continue
        wn = float(np.mean([r[0] for r in runs])) / width
        wg = float(np.mean([r[1] for r in runs])) / width
        mv = int(statistics.median(r[2] for r in runs))
        dt = statistics.median(r[3] for r in runs)
        cells = ["—" if math.isnan(w) else fmt(w) for w in (wn, wg)]
        print(f"| {name} | {cells[0]} | {cells[1]} | {mv} | {dt:.2f} |")


if __name__ == "__main__":
    main()
