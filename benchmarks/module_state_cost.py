"""What the module-state contract and the determinism check cost (issue 13).

Every evaluation of a user function runs inside a :class:`curvlab.params.ModuleState` scope
(buffers swapped for a snapshot, torch's generators seeded per batch and restored; the operators
also select the math attention kernel), and operators whose products re-evaluate the function
compare each pass with the first. This script times, in one run, each of these against the same
computation without it:

1. a tiny least-squares problem (2 parameters, 50 residuals: the NIST StRD regime where loop
   overhead matters): ``problem.value_and_grad`` versus a bare ``torch.autograd.grad``;
2. a small BatchNorm + Dropout MLP (train mode) on one batch: ``SupervisedLoss.value_and_grad``
   versus a bare ``functional_call`` + ``autograd.grad`` (which *does* write the running statistics);
3. an uncached Hessian over 8 batches of the digits MLP: products with ``check_deterministic=True``
   (the default) versus ``False``;
4. one scope on its own (no module / a BatchNorm module / with math attention), in microseconds.

Run:  OMP_NUM_THREADS=1 python benchmarks/module_state_cost.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from sklearn.datasets import load_digits

import curvlab as cl
from curvlab.params import ModuleState


def timeit(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    R = args.repeats
    torch.manual_seed(0)
    rows: list[tuple[str, float, float]] = []

    # 1. tiny least squares
    t = torch.linspace(0, 1, 50, dtype=torch.float64)
    obs = 2.0 * torch.exp(-1.3 * t)

    def res(w: torch.Tensor) -> torch.Tensor:
        return w[0] * torch.exp(w[1] * t) - obs

    lsq = cl.LeastSquares(res, torch.tensor([1.0, -0.5], dtype=torch.float64))
    x = lsq.x0

    def bare_lsq() -> object:
        z = x.detach().requires_grad_(True)
        r = res(z)
        v = 0.5 * (r * r).sum() / r.shape[0]
        return torch.autograd.grad(v, z)

    rows.append(
        ("least squares value_and_grad (2 params)", timeit(lambda: lsq.value_and_grad(x), R), timeit(bare_lsq, R))
    )

    # 2. BatchNorm + Dropout MLP, train mode, one batch
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.BatchNorm1d(32),
        torch.nn.Tanh(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(32, 4),
    )
    X, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    sup = cl.SupervisedLoss(net, F.cross_entropy, data=(X, y))
    xs = sup.x0
    names = list(sup.spec.keys)

    def bare_sup() -> object:
        z = xs.detach().requires_grad_(True)
        p = dict(zip(names, (v.view(s) for v, s in zip(torch.split(z, sup.spec.numels), sup.spec.shapes))))
        loss = F.cross_entropy(torch.func.functional_call(net, p, (X,)), y)
        return torch.autograd.grad(loss, z)

    rows.append(
        ("BN+dropout MLP value_and_grad (1,348 params)", timeit(lambda: sup.value_and_grad(xs), R), timeit(bare_sup, R))
    )

    # 3. determinism check on an uncached Hessian over 8 batches
    Xd, yd = load_digits(return_X_y=True)
    Xd = torch.tensor(Xd / 16.0, dtype=torch.float32)
    yd = torch.tensor(yd)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
    batches = [(Xd[i : i + 224], yd[i : i + 224]) for i in range(0, 1792, 224)]
    H_on = cl.linops.hessian(mlp, F.cross_entropy, data=batches)
    H_off = cl.linops.hessian(mlp, F.cross_entropy, data=batches, check_deterministic=False)
    v = torch.randn(H_on.shape[0])
    r3 = max(5, R // 20)
    rows.append(
        (
            "uncached Hessian product, 8 batches (checked vs not)",
            timeit(lambda: H_on @ v, r3),
            timeit(lambda: H_off @ v, r3),
        )
    )

    # 4. one scope on its own
    plain, bn = ModuleState(None), ModuleState(net)

    def enter(st: ModuleState, **kw: object) -> Callable[[], None]:
        def f() -> None:
            with st.scope(0, **kw):  # type: ignore[arg-type]
                pass

        return f

    us = [
        ("scope: RNG only", timeit(enter(plain), 5 * R)),
        ("scope: RNG + BatchNorm buffers", timeit(enter(bn), 5 * R)),
        ("scope: RNG + buffers + math attention", timeit(enter(bn, math_attention=True), 5 * R)),
    ]

    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, repeats={R}")
    print(f"{'computation':58s} {'curvlab ms':>11s} {'bare ms':>9s} {'ratio':>7s}")
    for name, a, b in rows:
        print(f"{name:58s} {a * 1e3:11.3f} {b * 1e3:9.3f} {a / b:7.2f}")
    for name, s in us:
        print(f"{name:58s} {s * 1e6:9.1f} us")


if __name__ == "__main__":
    main()
