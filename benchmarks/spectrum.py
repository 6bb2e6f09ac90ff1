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
  spectral width (from the quadrature nodes, and from the smoothed density on its grid);
* per-layer blocks (``--sections blocks``): the Hessian restricted to one layer, on the
  example's MLP and on a 3-layer 64-128-128-10 MLP: time per block product and for the
  top eigenvalue of curvlab's block operator (``restrict(H, layer)``: only the layer's
  parameters are differentiated), curvlab's embedding into full products
  (``restrict(H, layer, block=False)``, the behaviour before issue 15), curvlinops'
  ``HessianLinearOperator`` over the layer's parameters (+ scipy ``eigsh``) and PyHessian
  with the other layers frozen (``requires_grad=False``, its per-layer recipe);
* product modes (``--sections modes``): ``hessian(..., mode="reverse")`` (the default)
  against ``mode="forward"`` per product and per 8-column block.

Wall times include building each library's operator (graph construction for
curvlab and PyHessian; curvlinops with ``check_deterministic=False``). Times
are the median over ``--repeats`` runs with different seeds. PyHessian's
``density`` calls ``torch.eig``, removed in torch 2; the script substitutes
``torch.linalg.eigh`` (its tridiagonal matrix is symmetric) and says so.

Run from the repository root::

    python benchmarks/spectrum.py              # float64, 5 repeats, 30 trace seeds
    python benchmarks/spectrum.py --dtype float32
    python benchmarks/spectrum.py --sections blocks,modes
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
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


def curvlab_hessian(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, mode: str = "auto"
) -> cl.linops.HessianOperator:
    def loss(params: Any, batch: Any) -> torch.Tensor:
        xb, yb = batch
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (xb,)), yb)

    return cl.linops.hessian(loss, model, data=(X, y), mode=mode)


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
    ap.add_argument(
        "--sections", default="eig,trace,density,blocks,modes", help="comma-separated: eig,trace,density,blocks,modes"
    )
    ap.add_argument("--block-products", type=int, default=20, help="products timed per block method")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    sections = {x.strip() for x in args.sections.split(",") if x.strip()}
    unknown = sections - {"eig", "trace", "density", "blocks", "modes"}
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}")
    if not sections & {"eig", "trace", "density"}:
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.set_default_dtype(dtype)
        print(f"# Hessian spectrum benchmark ({args.dtype}), sections {sorted(sections)}")
        print(
            f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, no GPU"
        )
        ph, cv = load_pyhessian(), load_curvlinops()
        if "blocks" in sections:
            block_benchmark(args, dtype, ph, cv)
        if "modes" in sections:
            modes_benchmark(args, dtype)
        return

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

    if "blocks" in sections:
        block_benchmark(args, dtype, ph, cv)
    if "modes" in sections:
        modes_benchmark(args, dtype)


# --------------------------------------------------------------------------- per-layer blocks
def train_mlp3(epochs: int = 5, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 3-layer 64-128-128-10 ReLU MLP, trained as the example's (SGD lr 0.1, batch 32, 5 epochs on digits)."""
    return train_mlp(epochs, seed, hidden=(128, 128))


def _trained_models() -> list[tuple[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]]:
    """The example's MLP and the 3-layer MLP, trained in float32 whatever the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        return [("MLP 64-64-10", train_mlp()), ("MLP 64-128-128-10", train_mlp3())]
    finally:
        torch.set_default_dtype(old)


Prep = tuple[float, Callable[[torch.Tensor], Any]]  # setup + first product [s], the product
Eig = tuple[float, int, float]  # top eigenvalue, matvecs, wall [s]


def _prep_curvlab(model: nn.Module, X: torch.Tensor, y: torch.Tensor, layer: str, block: bool) -> Prep:
    from curvlab.linops import restrict

    t0 = time.perf_counter()
    R = restrict(curvlab_hessian(model, X, y), layer, block=block)
    R.matvec(torch.zeros(R.shape[0], dtype=X.dtype))
    return time.perf_counter() - t0, R.matvec


def _eig_curvlab(model: nn.Module, X: torch.Tensor, y: torch.Tensor, layer: str, block: bool) -> Eig:
    from curvlab.linops import restrict

    t0 = time.perf_counter()
    res = eigsh(restrict(curvlab_hessian(model, X, y), layer, block=block), k=1, seed=0)
    return float(res.eigenvalues[0]), res.n_matvecs, time.perf_counter() - t0


def _layer_params(model: nn.Module, layer: str) -> list[torch.Tensor]:
    return [p for name, p in model.named_parameters() if name.split(".")[0] == layer]


def _prep_curvlinops(cv: Any, model: nn.Module, X: torch.Tensor, y: torch.Tensor, layer: str) -> Prep:
    params = _layer_params(model, layer)
    t0 = time.perf_counter()
    A, _ = curvlinops_hessian_params(cv, model, X, y, params)
    A @ torch.zeros(sum(p.numel() for p in params), dtype=X.dtype)
    return time.perf_counter() - t0, lambda v: A @ v


def _eig_curvlinops(cv: Any, model: nn.Module, X: torch.Tensor, y: torch.Tensor, layer: str) -> Eig:
    from scipy.sparse.linalg import eigsh as scipy_eigsh

    params = _layer_params(model, layer)
    t0 = time.perf_counter()
    A, counter = curvlinops_hessian_params(cv, model, X, y, params)
    v0 = np.random.default_rng(0).standard_normal(sum(p.numel() for p in params))
    val = scipy_eigsh(A.to_scipy(), k=1, which="LA", v0=v0, return_eigenvectors=False)
    return float(val[0]), counter["mv"], time.perf_counter() - t0


def _frozen(model: nn.Module, layer: str) -> nn.Module:
    import copy

    frozen = copy.deepcopy(model)
    for name, p in frozen.named_parameters():
        p.requires_grad_(name.split(".")[0] == layer)
    return frozen


def _prep_pyhessian(ph: Any, model: nn.Module, X: torch.Tensor, y: torch.Tensor, layer: str) -> Prep:
    mod, _ = ph
    frozen = _frozen(model, layer)
    t0 = time.perf_counter()
    hess = mod.hessian(frozen, nn.CrossEntropyLoss(), data=(X, y), cuda=False)
    shapes = [p.shape for p in hess.params]
    sizes = [int(np.prod(sh)) for sh in shapes]

    def mv(v: torch.Tensor) -> Any:
        parts = [q.view(sh) for q, sh in zip(torch.split(v, sizes), shapes)]
        return mod.hessian_vector_product(hess.gradsH, hess.params, parts)

    mv(torch.zeros(sum(sizes), dtype=X.dtype))
    return time.perf_counter() - t0, mv


def _eig_pyhessian(ph: Any, model: nn.Module, X: torch.Tensor, y: torch.Tensor, layer: str) -> Eig:
    mod, counter = ph
    frozen = _frozen(model, layer)  # a fresh copy: PyHessian accumulates into .grad
    torch.manual_seed(0)
    counter["hvp"] = 0
    t0 = time.perf_counter()
    hess = mod.hessian(frozen, nn.CrossEntropyLoss(), data=(X, y), cuda=False)
    vals, _ = hess.eigenvalues(top_n=1)
    return float(vals[0]), counter["hvp"], time.perf_counter() - t0


def block_benchmark(args: Any, dtype: torch.dtype, ph: Any, cv: Any) -> None:
    """Per-layer blocks: curvlab block operator vs embedding vs curvlinops vs PyHessian (frozen layers).

    Products are timed in rounds (a few products of each method in turn), so load changes on a shared
    machine hit the methods alike; the per-product time is the median.
    """
    from curvlab.linops import restrict

    print("\n## Per-layer blocks of the Hessian (time per block product, and the block's top eigenvalue)\n")
    print(
        "| model | block (params) | method | setup + 1st product [s] | per product [ms] | top eigenvalue "
        "| rel. diff. to reference | matvecs | eigsh wall [s] |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ratios: list[str] = []
    names = {
        "block": "curvlab restrict (block operator, default)",
        "embed": "curvlab restrict(block=False) (embedding, before)",
        "cv": "curvlinops HessianLinearOperator(params=layer) (+ scipy eigsh)",
        "ph": "PyHessian, other layers frozen (eigenvalues(top_n=1), defaults)",
    }
    for mname, (model, X, y) in _trained_models():
        model = model.to(dtype)
        X = X.to(dtype)
        layers = [name for name, mod in model.named_children() if isinstance(mod, nn.Linear)]
        for layer in (layers[-1], layers[0]):
            ref_block = restrict(curvlab_hessian(model, X, y), layer, block=False)
            ref = float(eigsh(ref_block, k=1, tol=1e-12, seed=123).eigenvalues[0])  # full products: independent path
            k = ref_block.shape[0]
            preps: dict[str, Prep] = {
                "block": _prep_curvlab(model, X, y, layer, True),
                "embed": _prep_curvlab(model, X, y, layer, False),
            }
            eig_runs: dict[str, Callable[[], Eig]] = {
                "block": partial(_eig_curvlab, model, X, y, layer, True),
                "embed": partial(_eig_curvlab, model, X, y, layer, False),
            }
            if not isinstance(cv, str):
                preps["cv"] = _prep_curvlinops(cv, model, X, y, layer)
                eig_runs["cv"] = partial(_eig_curvlinops, cv, model, X, y, layer)
            if not isinstance(ph, str):
                preps["ph"] = _prep_pyhessian(ph, model, X, y, layer)
                eig_runs["ph"] = partial(_eig_pyhessian, ph, model, X, y, layer)
            runs: dict[str, list[Eig]] = {key: [] for key in eig_runs}
            for _ in range(3):  # the methods in turn; the median wall time
                for key, fn in eig_runs.items():
                    runs[key].append(fn())
            eigs = {key: (r[0][0], r[0][1], statistics.median(x[2] for x in r)) for key, r in runs.items()}
            g = torch.Generator().manual_seed(0)
            times: dict[str, list[float]] = {key: [] for key in preps}
            rounds = 4  # methods in turn, a few products each: load changes hit all, caches stay warm per method
            vs = [torch.randn(k, generator=g, dtype=dtype) for _ in range(max(1, args.block_products // rounds))]
            for _ in range(rounds):
                for key, (_, mv) in preps.items():
                    mv(vs[0])
                    for v in vs:
                        t0 = time.perf_counter()
                        mv(v)
                        times[key].append(time.perf_counter() - t0)
            per = {key: statistics.median(ts) for key, ts in times.items()}
            for key in preps:
                val, mv_count, wall = eigs[key]
                print(
                    f"| {mname} | {layer} ({k}) | {names[key]} | {preps[key][0]:.3f} | {1e3 * per[key]:.2f} | "
                    f"{val:.6f} | {fmt(abs(val - ref) / abs(ref))} | {mv_count} | {wall:.2f} |"
                )
            line = f"- {mname}, {layer}: per product, the block operator is {per['embed'] / per['block']:.1f}x faster"
            line += " than the embedding"
            for key, label in (("cv", "curvlinops"), ("ph", "PyHessian")):
                if key in per:
                    line += f"; {label} takes {per[key] / per['block']:.2f}x its time"
            line += f"; its eigsh is {eigs['embed'][2] / eigs['block'][2]:.1f}x faster than the embedding's"
            ratios.append(line)
    print()
    for line in ratios:
        print(line)


def curvlinops_hessian_params(
    curvlinops: Any, model: nn.Module, X: torch.Tensor, y: torch.Tensor, params: list
) -> tuple[Any, dict]:
    A = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False)
    counter = {"mv": 0}
    original = A._matmat

    def counted(M: list[torch.Tensor]) -> list[torch.Tensor]:
        counter["mv"] += int(M[0].shape[-1])
        return original(M)

    A._matmat = counted
    return A, counter


# --------------------------------------------------------------------------- product modes
def modes_benchmark(args: Any, dtype: torch.dtype) -> None:
    """hessian(mode="reverse") (default) vs mode="forward": time per product and per 8-column block, interleaved."""
    print("\n## Hessian-vector product modes (median per product; the two modes timed in turn)\n")
    print("| model | mode | 1 vector [ms] | 8-column block, per column [ms] |")
    print("|---|---|---|---|")
    for mname, (model, X, y) in _trained_models():
        model = model.to(dtype)
        X = X.to(dtype)
        ops = {mode: curvlab_hessian(model, X, y, mode=mode) for mode in ("reverse", "forward")}
        n = ops["reverse"].shape[0]
        g = torch.Generator().manual_seed(1)
        for H in ops.values():  # warm-up (the reverse mode builds its graph here)
            H.matvec(torch.randn(n, generator=g, dtype=dtype))
            H.matmat(torch.randn(n, 8, generator=g, dtype=dtype))
        t1: dict[str, list[float]] = {m: [] for m in ops}
        t8: dict[str, list[float]] = {m: [] for m in ops}
        for _ in range(args.block_products):
            v = torch.randn(n, generator=g, dtype=dtype)
            V = torch.randn(n, 8, generator=g, dtype=dtype)
            for mode, H in ops.items():
                t0 = time.perf_counter()
                H.matvec(v)
                t1[mode].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                H.matmat(V)
                t8[mode].append((time.perf_counter() - t0) / 8)
        med = {m: (statistics.median(t1[m]), statistics.median(t8[m])) for m in ops}
        for mode in ops:
            print(f"| {mname} | {mode} | {1e3 * med[mode][0]:.2f} | {1e3 * med[mode][1]:.2f} |")
        r = med["forward"][0] / med["reverse"][0], med["forward"][1] / med["reverse"][1]
        print(f"| {mname} | forward / reverse | {r[0]:.1f}x | {r[1]:.1f}x |")


if __name__ == "__main__":
    main()
