"""Time and accuracy of one implicit hypergradient: curvlab ``implicit`` vs jaxopt vs torchopt.

Problem: logistic regression with one L2 penalty per feature,

    w*(θ) = argmin_w  mean logistic loss(train)  +  ½ Σ_j exp(θ_j) w_j²,
    f(θ)  = mean logistic loss(validation) at w*(θ),

(a) scikit-learn's breast-cancer data (30 features, so 30 hyperparameters) and
(b) a synthetic problem with 10,000 features (10,000 hyperparameters).

Every library differentiates the same precomputed inner solution w* (the
decorated "solver" just returns it), so what is timed is the implicit
differentiation itself: the wrapper, the optimality-condition products and
the linear solve with the inner Hessian. Contestants, side by side in one run:
curvlab's ``custom_root`` with its defaults (``solve="auto"``: the 30×30 system
formed by one batched product and factored; CG for 10k), with ``jit=True`` (the
dense pieces traced once and replayed; 10k falls back to eager CG) and with CG at
``tol=1e-10`` (the tolerance every peer gets), ``implicit.hypergradient``,
Neumann (K = 100, α estimated by power iterations), jaxopt (``jax.jit`` and
eager), torchopt, and a hypergradient written out by hand in eager torch
(explicit Hessian and ``torch.linalg.solve`` for (a), a plain CG loop on the
closed-form Hessian-vector product for (b)).
The exact hypergradient -(λ ⊙ w*) ⊙ H⁻¹ ∇_w f is computed densely for (a) and
by the Woodbury identity for (b), in float64. All computations are float64
on CPU; the process is pinned to ``--threads`` CPUs (default 1) and every library
to as many threads, so that runs on a shared machine are comparable. Each
contestant is timed warm: the median of many single calls, in interleaved
rounds (see ``time_interleaved``).

Run:  python benchmarks/hypergradient.py [--threads 1] [--repeats 7] [--skip-large] [--profile]

``--profile`` also prints where the time of curvlab's default call goes (cProfile).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np

warnings.filterwarnings("ignore", category=FutureWarning)  # torchopt still calls the deprecated functorch.vjp


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (each: up to 20 timed calls)")
    p.add_argument("--tol", type=float, default=1e-10)
    p.add_argument("--neumann-K", type=int, default=100)
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--forward", action="store_true", help="also time root_jvp against root_vjp (issue 14 item 6)")
    return p.parse_args()


ARGS = parse()
# Pin the process to ARGS.threads CPUs: XLA:CPU runs large dots on its own thread pool whatever
# --xla_cpu_multi_thread_eigen says (measured: jitted jaxopt 2.0x faster on (b) with a second idle core), so
# thread settings alone do not give every library the same hardware.
if hasattr(os, "sched_setaffinity"):
    _cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, _cpus[: max(1, ARGS.threads)])
os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen={'true' if ARGS.threads > 1 else 'false'}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))

import torch  # noqa: E402

import curvlab  # noqa: E402
import implicit  # noqa: E402

torch.set_num_threads(ARGS.threads)
torch.set_default_dtype(torch.float64)


# --------------------------------------------------------------------------- #
# problems (NumPy arrays, float64) and exact hypergradients
# --------------------------------------------------------------------------- #
def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def breast_cancer_problem() -> dict:
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    idx = np.random.default_rng(0).permutation(len(y))
    tr, va = idx[:300], idx[300:450]
    theta = np.random.default_rng(1).uniform(np.log(1e-4), np.log(1e-1), size=30)
    return dict(
        name="(a) breast cancer, 30 hyperparameters",
        Xtr=X[tr],
        ytr=y[tr] * 1.0,
        Xva=X[va],
        yva=y[va] * 1.0,
        theta=theta,
    )


def synthetic_problem(d: int = 10_000, n_tr: int = 1000, n_va: int = 500) -> dict:
    rng = np.random.default_rng(0)
    w_true = np.zeros(d)
    w_true[rng.choice(d, 100, replace=False)] = rng.normal(size=100) * 0.5
    X = rng.normal(size=(n_tr + n_va, d)) / np.sqrt(100)
    y = (rng.uniform(size=n_tr + n_va) < sigmoid(X @ w_true)).astype(float)
    theta = rng.uniform(np.log(1e-2), np.log(1e-1), size=d)
    return dict(
        name=f"(b) synthetic, {d} hyperparameters", Xtr=X[:n_tr], ytr=y[:n_tr], Xva=X[n_tr:], yva=y[n_tr:], theta=theta
    )


def solve_inner(P: dict) -> np.ndarray:
    """Newton-CG in float64 to ‖∇g‖ <= 1e-13 (not timed)."""
    X, y, lam = (torch.from_numpy(P[k]) for k in ("Xtr", "ytr", "theta"))
    lam = lam.exp()
    n = len(y)
    w = torch.zeros(X.shape[1])
    for _ in range(50):
        s = torch.sigmoid(X @ w)
        g = X.T @ (s - y) / n + lam * w
        if g.norm() <= 1e-13:
            break
        D = s * (1 - s) / n
        step = curvlab.linalg.cg(lambda v, D=D: X.T @ (D * (X @ v)) + lam * v, g, tol=1e-14, maxiter=5000).x
        w = w - step
    assert g.norm() <= 1e-12, f"inner solve stalled at ‖∇g‖ = {float(g.norm()):.2e}"
    return w.numpy()


def exact_hypergradient(P: dict, w: np.ndarray) -> np.ndarray:
    X, Xv, yv = P["Xtr"], P["Xva"], P["yva"]
    lam = np.exp(P["theta"])
    n, d = X.shape
    s = sigmoid(X @ w)
    D = s * (1 - s) / n
    gv = Xv.T @ (sigmoid(Xv @ w) - yv) / len(yv)
    if d <= 2000:
        H = (X.T * D) @ X + np.diag(lam)
        Hinv_gv = np.linalg.solve(H, gv)
    else:  # Woodbury: (XᵀDX + Λ)⁻¹ = Λ⁻¹ - Λ⁻¹Xᵀ(D⁻¹ + XΛ⁻¹Xᵀ)⁻¹XΛ⁻¹
        Li_g = gv / lam
        small = np.diag(1 / D) + (X / lam) @ X.T
        Hinv_gv = Li_g - (X.T @ np.linalg.solve(small, X @ Li_g)) / lam
    return -(lam * w) * Hinv_gv


def lambda_max(P: dict, w: np.ndarray, iters: int = 200) -> float:
    X, lam = P["Xtr"], np.exp(P["theta"])
    s = sigmoid(X @ w)
    D = s * (1 - s) / len(s)
    v = np.random.default_rng(0).normal(size=X.shape[1])
    for _ in range(iters):
        v = X.T @ (D * (X @ v)) + lam * v
        v /= np.linalg.norm(v)
    return float(v @ (X.T @ (D * (X @ v)) + lam * v))


# --------------------------------------------------------------------------- #
# timing helper
# --------------------------------------------------------------------------- #
def time_interleaved(
    fns: list[Callable[[], np.ndarray]], repeats: int, calls: int = 20, budget: float = 0.25
) -> list[tuple[float, np.ndarray]]:
    """Median seconds of one call of each function, over many single calls timed in interleaved rounds.

    Every contestant gets the same treatment: two untimed calls first (compilation for ``jax.jit``), then
    ``repeats`` rounds in turn; in a round each function is called twice untimed (once if slow) (so it runs warm, not
    straight after another library has flushed the caches) and then ``calls`` times, each call timed on its
    own (fewer for a slow function: about ``budget`` seconds per round). The median over all timed calls
    is robust to the preemptions of a shared machine; the round-robin order spreads load drift over all.
    """
    outs = []
    for fn in fns:  # warm-up (and compilation for jax.jit)
        fn()
        outs.append(fn())
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            per = time.perf_counter() - t0
            if per < budget:
                fn()
            for _ in range(max(1, min(calls, int(budget / max(per, 1e-9))))):
                t0 = time.perf_counter()
                outs[i] = fn()
                times[i].append(time.perf_counter() - t0)
    return [(statistics.median(t), o) for t, o in zip(times, outs)]


# --------------------------------------------------------------------------- #
# the contestants: each returns a function () -> hypergradient (NumPy)
# --------------------------------------------------------------------------- #
def t_inner(w, theta, X, y):
    z = X @ w
    return torch.nn.functional.softplus(z).mean() - (y * z).mean() + 0.5 * (theta.exp() * w**2).sum()


def t_outer(w, X, y):
    z = X @ w
    return torch.nn.functional.softplus(z).mean() - (y * z).mean()


def curvlab_custom_root(P: dict, w: np.ndarray, **solve: object) -> Callable[[], np.ndarray]:
    Xtr, ytr, Xva, yva = (torch.from_numpy(P[k]) for k in ("Xtr", "ytr", "Xva", "yva"))
    w_t = torch.from_numpy(w)
    theta0 = torch.from_numpy(P["theta"])
    zeros = torch.zeros_like(w_t)

    @implicit.custom_root(torch.func.grad(t_inner), nonconvergence="ignore", **solve)
    def solver(w0, theta, X, y):
        return w_t

    def run() -> np.ndarray:
        theta = theta0.clone().requires_grad_()
        (h,) = torch.autograd.grad(t_outer(solver(zeros, theta, Xtr, ytr), Xva, yva), theta)
        return h.numpy()

    run.info = lambda: solver.last_solve  # type: ignore[attr-defined]
    if solve.get("jit"):  # the first call traces: report its cost apart from the replayed calls
        t0 = time.perf_counter()
        run()
        run.first = time.perf_counter() - t0  # type: ignore[attr-defined]
    return run


def curvlab_hypergradient(P: dict, w: np.ndarray, **solve: object) -> Callable[[], np.ndarray]:
    Xtr, ytr, Xva, yva = (torch.from_numpy(P[k]) for k in ("Xtr", "ytr", "Xva", "yva"))
    w_t = torch.from_numpy(w)
    theta0 = torch.from_numpy(P["theta"])

    def outer(theta, w, Xtr, ytr, Xva, yva):
        return t_outer(w, Xva, yva)

    def inner(theta, w, Xtr, ytr, Xva, yva):
        return t_inner(w, theta, Xtr, ytr)

    def run() -> np.ndarray:
        return implicit.hypergradient(
            outer, inner, theta0, w_t, args=(Xtr, ytr, Xva, yva), nonconvergence="ignore", **solve
        ).numpy()

    if solve.get("jit"):  # the first call traces: report its cost apart from the replayed calls
        t0 = time.perf_counter()
        run()
        run.first = time.perf_counter() - t0  # type: ignore[attr-defined]
    return run


def hand_written(P: dict, w: np.ndarray, tol: float) -> Callable[[], np.ndarray]:
    """The hypergradient written out in eager torch: -(λ ⊙ w) ⊙ H⁻¹ ∇_w f with the closed-form Hessian."""
    Xtr, Xva, yva = (torch.from_numpy(P[k]) for k in ("Xtr", "Xva", "yva"))
    w_t, theta = torch.from_numpy(w), torch.from_numpy(P["theta"])
    n, d = Xtr.shape

    def run() -> np.ndarray:
        lam = theta.exp()
        s = torch.sigmoid(Xtr @ w_t)
        D = s * (1 - s) / n
        gv = Xva.T @ (torch.sigmoid(Xva @ w_t) - yva) / Xva.shape[0]
        if d <= 2000:
            u = torch.linalg.solve((Xtr.T * D) @ Xtr + torch.diag(lam), gv)
        else:  # plain CG on the Hessian-vector product Xᵀ(D ⊙ X v) + λ ⊙ v
            u = torch.zeros_like(gv)
            r = gv.clone()
            p = r.clone()
            rr = r @ r
            stop = tol**2 * rr
            for _ in range(1000):
                Hp = Xtr.T @ (D * (Xtr @ p)) + lam * p
                a = rr / (p @ Hp)
                u = u + a * p
                r = r - a * Hp
                rr_new = r @ r
                if rr_new <= stop:
                    break
                p = r + (rr_new / rr) * p
                rr = rr_new
        return (-(lam * w_t) * u).numpy()

    return run


def torchopt_custom_root(P: dict, w: np.ndarray, tol: float) -> Callable[[], np.ndarray]:
    import torchopt

    Xtr, ytr, Xva, yva = (torch.from_numpy(P[k]) for k in ("Xtr", "ytr", "Xva", "yva"))
    w_t = torch.from_numpy(w)
    theta0 = torch.from_numpy(P["theta"])
    zeros = torch.zeros_like(w_t)

    @torchopt.diff.implicit.custom_root(
        torch.func.grad(t_inner), argnums=1, solve=torchopt.linear_solve.solve_cg(rtol=tol, maxiter=1000)
    )
    def solver(w0, theta, X, y):
        return w_t

    def run() -> np.ndarray:
        theta = theta0.clone().requires_grad_()
        (h,) = torch.autograd.grad(t_outer(solver(zeros, theta, Xtr, ytr), Xva, yva), theta)
        return h.numpy()

    return run


def jaxopt_custom_root(P: dict, w: np.ndarray, tol: float, jit: bool) -> Callable[[], np.ndarray]:
    import functools

    import jax
    import jax.numpy as jnp
    from jaxopt import implicit_diff, linear_solve

    jax.config.update("jax_enable_x64", True)
    Xtr, ytr, Xva, yva, w_j, theta0 = (jnp.asarray(a) for a in (P["Xtr"], P["ytr"], P["Xva"], P["yva"], w, P["theta"]))

    def inner(w, theta, X, y):
        z = X @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.5 * jnp.sum(jnp.exp(theta) * w**2)

    def outer(w, X, y):
        z = X @ w
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)

    @implicit_diff.custom_root(jax.grad(inner), solve=functools.partial(linear_solve.solve_cg, tol=tol, maxiter=1000))
    def solver(w0, theta, X, y):
        return w_j

    def hyper(theta):
        return jax.grad(lambda th: outer(solver(jnp.zeros_like(w_j), th, Xtr, ytr), Xva, yva))(theta)

    f = jax.jit(hyper) if jit else hyper
    return lambda: np.asarray(f(theta0).block_until_ready())


# --------------------------------------------------------------------------- #
def versions() -> str:
    from importlib import metadata

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for dist in ("jax", "jaxlib", "jaxopt", "torchopt"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return ", ".join(parts)


def run_problem(P: dict) -> list[tuple[str, float, float, str]]:
    t0 = time.perf_counter()
    w = solve_inner(P)
    exact = exact_hypergradient(P, w)
    lmax = lambda_max(P, w)
    print(f"\n{P['name']}: inner solve + exact reference in {time.perf_counter() - t0:.1f} s, λ_max(H) = {lmax:.3g}")
    K = ARGS.neumann_K
    contestants: list[tuple[str, Callable[[], Callable[[], np.ndarray]]]] = [
        ("curvlab custom_root, defaults (solve='auto')", lambda: curvlab_custom_root(P, w)),
        ("curvlab custom_root, jit=True", lambda: curvlab_custom_root(P, w, jit=True)),
        (
            f"curvlab custom_root, cg (tol {ARGS.tol:g})",
            lambda: curvlab_custom_root(P, w, solve="cg", tol=ARGS.tol),
        ),
        ("curvlab implicit.hypergradient, defaults", lambda: curvlab_hypergradient(P, w)),
        ("curvlab implicit.hypergradient, jit=True", lambda: curvlab_hypergradient(P, w, jit=True)),
        (
            f"curvlab custom_root, neumann (K={K}, α by power iterations)",
            lambda: curvlab_custom_root(P, w, solve="neumann", K=K),
        ),
        ("hand-written eager torch", lambda: hand_written(P, w, ARGS.tol)),
        ("jaxopt custom_root, solve_cg, jax.jit", lambda: jaxopt_custom_root(P, w, ARGS.tol, jit=True)),
        ("jaxopt custom_root, solve_cg, eager", lambda: jaxopt_custom_root(P, w, ARGS.tol, jit=False)),
        ("torchopt custom_root, solve_cg", lambda: torchopt_custom_root(P, w, ARGS.tol)),
    ]
    built: list[tuple[str, Callable[[], np.ndarray]]] = []
    rows: list[tuple[str, float, float, str]] = []
    for name, make in contestants:
        try:
            built.append((name, make()))
        except ImportError as e:
            rows.append((name, float("nan"), float("nan"), f"skipped: {e}"))
    for (name, fn), (sec, h) in zip(built, time_interleaved([f for _, f in built], ARGS.repeats)):
        err = float(np.linalg.norm(h - exact) / np.linalg.norm(exact))
        info = getattr(fn, "info", None)
        res = info() if info is not None else None
        note = f"{res.method}: {res.n_matvecs} Hessian products" if res is not None else ""
        first = getattr(fn, "first", None)
        if first is not None:
            note += f"{'; ' if note else ''}first call (trace) {first:.2f} s"
        rows.append((name, sec, err, note))
    for name, sec, err, note in rows:
        print(f"  {name:58s} {sec * 1e3:10.2f} ms   rel. err {err:.2e}  {note}")
    if ARGS.profile:
        for name, fn in built[:2]:
            print(f"  {name}:")
            profile(fn)
    if ARGS.forward:
        forward_vs_reverse(P, w)
    return rows


def forward_vs_reverse(P: dict, w: np.ndarray) -> None:
    """``root_jvp`` (one tangent) against ``root_vjp`` (one cotangent) on the same F; and the dot test."""
    Xtr, ytr = (torch.from_numpy(P[k]) for k in ("Xtr", "ytr"))
    theta, w_t = torch.from_numpy(P["theta"]), torch.from_numpy(w)
    F = torch.func.grad(t_inner)
    v = torch.from_numpy(np.random.default_rng(3).normal(size=w.shape[0]))
    for solve in (dict(solve="auto"), dict(solve="cg", tol=ARGS.tol)):

        def rev(solve: dict = solve) -> np.ndarray:
            return implicit.root_vjp(F, w_t, (theta, Xtr, ytr), v, nonconvergence="ignore", **solve)[0].numpy()

        def fwd(solve: dict = solve) -> np.ndarray:
            return implicit.root_jvp(F, w_t, (theta, Xtr, ytr), (v, None, None), nonconvergence="ignore", **solve)

        (t_r, g_r), (t_f, g_f) = time_interleaved([rev, lambda: fwd().numpy()], ARGS.repeats)
        dot = abs(float(g_f @ v.numpy() - g_r @ v.numpy()))
        print(
            f"  root_jvp vs root_vjp, {solve}: {t_f * 1e3:.2f} ms vs {t_r * 1e3:.2f} ms = {t_f / t_r:.2f}×, "
            f"|<Jv,v> - <v,Jᵀv>| = {dot:.1e}"
        )


def profile(fn: Callable[[], np.ndarray], calls: int = 200) -> None:
    """Where the time of one call goes: cumulative cProfile shares of the main pieces."""
    import cProfile
    import pstats

    t0 = time.perf_counter()
    fn()
    calls = max(3, min(calls, int(5.0 / max(time.perf_counter() - t0, 1e-9))))  # about 5 s of profiling
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    st = pstats.Stats(pr)
    total = st.total_tt
    pieces = {
        "custom_root call (forward: solver, F recorded once)": "_root.py:__call__",
        "  of which: F evaluated and recorded": ":_record",
        "  of which: closure check (graph walk)": ":_check_closure",
        "IFT backward (Function.backward)": "_root.py:backward",
        "  of which: A and B by one batched backward": ":jacobian",
        "  of which: traced F, A, B, then factor + solve (jit)": ":jit_vjp",
        "  of which: factor + solve (curvlab.linalg.solve)": "linalg/solve.py:solve",
        "  of which: Krylov products (large n)": ":matvec",
        "  of which: Bᵀu by one backward (large n)": ":bt",
    }
    print(f"  profile of {calls} calls ({total / calls * 1e3:.2f} ms each under cProfile; the rest is the")
    print("  benchmark's outer loss, its backward through the autograd engine, and NumPy conversion):")
    for label, key in pieces.items():
        file, _, func = key.rpartition(":")  # "file.py:function" or ":function": that function exactly
        cum = max((v[3] for k, v in st.stats.items() if k[0].endswith(file) and k[2] == func), default=0.0)
        print(f"    {label:45s} {100 * cum / total:5.1f} %")


def markdown(title: str, rows: list[tuple[str, float, float, str]]) -> str:
    def ref(prefix: str) -> float:
        return next((r[1] for r in rows if r[0].startswith(prefix)), float("nan"))

    jit, hand = ref("jaxopt custom_root, solve_cg, jax.jit"), ref("hand-written")
    out = [
        f"**{title}**",
        "",
        "| method | time / hypergradient | vs jaxopt jit | vs hand-written torch | rel. error vs exact | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, sec, err, note in rows:
        out.append(f"| {name} | {sec * 1e3:.2f} ms | {sec / jit:.2f}× | {sec / hand:.2f}× | {err:.1e} | {note} |")
    return "\n".join(out)


def main() -> None:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    print(
        f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"threads={ARGS.threads}, pinned to CPUs {cpus}; {versions()}"
    )
    problems = [breast_cancer_problem()] + ([] if ARGS.skip_large else [synthetic_problem()])
    tables = [markdown(P["name"], run_problem(P)) for P in problems]
    print("\n" + "\n\n".join(tables))


if __name__ == "__main__":
    main()
