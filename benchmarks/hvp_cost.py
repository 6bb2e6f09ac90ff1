"""Cost of curvature products relative to one gradient, curvlab versus curvlinops.

Model: an MLP 64-256-256-10 (tanh) on all 1797 scikit-learn digits, full batch,
cross-entropy. Every timing is the median of ``--repeats`` runs, reported as a
ratio to one autograd gradient (forward + backward) measured in the same run.

Krylov methods take many products at one point, so the "repeated" rows build
the operator once and time products only (curvlab reuses the gradient's graph);
the "fresh" rows include building the operator at a new point.

Run:  python benchmarks/hvp_cost.py [--device cuda] [--dtype float32] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits

import curvlab as cl


def timeit(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)

    Xn, yn = load_digits(return_X_y=True)
    X = torch.tensor(Xn / 16.0, dtype=dt, device=dev)
    y = torch.tensor(yn, device=dev)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)
    ).to(dev, dt)
    n_params = sum(p.numel() for p in net.parameters())

    def loss_fn(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(o, t, reduction="none")

    def f(p: dict, batch: tuple) -> torch.Tensor:
        return loss_fn(torch.func.functional_call(net, p, (batch[0],)), batch[1]).mean()

    params = list(net.parameters())

    def grad() -> object:
        loss = torch.nn.functional.cross_entropy(net(X), y)
        return torch.autograd.grad(loss, params)

    t_grad = timeit(grad, args.repeats, sync)
    v = torch.randn(n_params, dtype=dt, device=dev)
    V = torch.randn(n_params, 16, dtype=dt, device=dev)
    rows: list[tuple[str, float]] = []

    H = cl.linops.hessian(f, net, data=(X, y))
    rows.append(("curvlab hessian, repeated (reverse, cached graph)", timeit(lambda: H @ v, args.repeats, sync)))
    rows.append(
        (
            "curvlab hessian, fresh point (graph + 1 product)",
            timeit(lambda: cl.linops.hessian(f, net, data=(X, y)) @ v, args.repeats, sync),
        )
    )
    Hf = cl.linops.hessian(f, net, data=(X, y), mode="forward")
    rows.append(("curvlab hessian, forward-over-reverse (torch.func)", timeit(lambda: Hf @ v, args.repeats, sync)))
    Hn = cl.linops.hessian(f, net, data=(X, y), cache=False)
    rows.append(("curvlab hessian, no cache (fresh double backward)", timeit(lambda: Hn @ v, args.repeats, sync)))
    G = cl.linops.ggn(net, loss_fn, None, (X, y))
    rows.append(("curvlab GGN, repeated", timeit(lambda: G @ v, args.repeats, sync)))
    rows.append(
        ("curvlab GGN, fresh point", timeit(lambda: cl.linops.ggn(net, loss_fn, None, (X, y)) @ v, args.repeats, sync))
    )
    F = cl.linops.fisher(net, loss_fn, None, (X, y))
    rows.append(("curvlab empirical Fisher, repeated", timeit(lambda: F @ v, args.repeats, sync)))
    rows.append(
        ("curvlab hessian matmat 16 vectors (per vector)", timeit(lambda: H @ V, max(3, args.repeats // 4), sync) / 16)
    )
    rows.append(
        ("curvlab GGN matmat 16 vectors (per vector)", timeit(lambda: G @ V, max(3, args.repeats // 4), sync) / 16)
    )

    try:
        from curvlinops import GGNLinearOperator, HessianLinearOperator

        lf = torch.nn.CrossEntropyLoss(reduction="mean")
        ch = HessianLinearOperator(net, lf, params, [(X, y)], check_deterministic=False)
        cgn = GGNLinearOperator(net, lf, params, [(X, y)], check_deterministic=False)
        vs = [t.reshape(p.shape) for t, p in zip(torch.split(v, [p.numel() for p in params]), params)]
        rows.append(("curvlinops HessianLinearOperator", timeit(lambda: ch @ vs, args.repeats, sync)))
        rows.append(("curvlinops GGNLinearOperator", timeit(lambda: cgn @ vs, args.repeats, sync)))
        Vs = [t.reshape(*p.shape, 16) for t, p in zip(torch.split(V, [p.numel() for p in params]), params)]
        rows.append(
            (
                "curvlinops Hessian matmat 16 vectors (per vector)",
                timeit(lambda: ch @ Vs, max(3, args.repeats // 4), sync) / 16,
            )
        )
        # agreement check
        ref = torch.cat([t.reshape(-1) for t in ch @ vs])
        err = float((H @ v - ref).norm() / ref.norm())
    except ImportError as e:  # pragma: no cover - optional peer
        print(f"curvlinops not available ({e}); skipping its rows")
        err = float("nan")

    print(f"device={dev} dtype={dt} params={n_params} samples={len(y)} threads={torch.get_num_threads()}")
    print(f"gradient: {t_grad * 1e3:.2f} ms (= 1.00x)")
    print(f"{'product':58s} {'ms':>8s} {'x grad':>7s}")
    for name, t in rows:
        print(f"{name:58s} {t * 1e3:8.2f} {t / t_grad:7.2f}")
    print(f"relative difference curvlab vs curvlinops Hessian product: {err:.1e}")


if __name__ == "__main__":
    main()
