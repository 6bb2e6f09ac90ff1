"""M-FAC versus SGD and Adam: training an MLP on scikit-learn's digits.

M-FAC (Frantar, Kurtic & Alistarh 2021) preconditions each mini-batch gradient with the
inverse of the damped empirical Fisher over a sliding window of the last ``ngrads`` gradients
(:class:`curvlab.solvers.MFAC`, built on :class:`curvlab.linops.MFACInverse`). All three
optimizers run through the same ``curvlab.solve`` loop on the same mini-batches; the script
then shows the ``torch.optim`` form (:class:`curvlab.optim.MFAC`) in a hand-written loop.
Runs in well under a minute on a laptop CPU.

    python examples/mfac_training.py [--epochs 15] [--ngrads 256]
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn.functional import cross_entropy

import curvlab as cl


def data(seed: int = 0):
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return t(Xtr, torch.float32), t(ytr, torch.long), t(Xte, torch.float32), t(yte, torch.long)


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))


def batches(X, y, bs: int, epochs: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        out += [(X[perm[i : i + bs]], y[perm[i : i + bs]]) for i in range(0, len(y) - bs + 1, bs)]
    return out


def accuracy(net: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(X).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ngrads", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    Xtr, ytr, Xte, yte = data()
    train = batches(Xtr, ytr, args.batch_size, args.epochs)
    steps = len(train)
    ce = lambda o, t: cross_entropy(o, t, reduction="none")  # noqa: E731
    solvers = {
        "SGD (momentum 0.9)": cl.solvers.GradientDescent(lr=0.1, momentum=0.9),
        "Adam": cl.solvers.Adam(lr=3e-3),
        f"M-FAC (m={args.ngrads})": cl.solvers.MFAC(lr=1e-2, ngrads=args.ngrads, damping=1e-2, momentum=0.9),
    }
    print(f"digits: {len(ytr)} train / {len(yte)} test, MLP 64-64-10, {steps} steps of batch {args.batch_size}")
    print(f"{'optimizer':<22} {'train loss':>10} {'train acc':>9} {'test acc':>8} {'time [s]':>8}")
    for name, solver in solvers.items():
        net = mlp()
        problem = cl.SupervisedLoss(net, ce, None, train)
        t0 = time.perf_counter()
        res = solver.solve(problem, max_iter=steps, tol=0.0)
        dt = time.perf_counter() - t0
        loss = float(problem.value(res.flat, (Xtr, ytr)))
        print(
            f"{name:<22} {loss:>10.4f} {accuracy(res.params, Xtr, ytr):>9.3f} "
            f"{accuracy(res.params, Xte, yte):>8.3f} {dt:>8.1f}"
        )

    # the same optimizer in a plain torch training loop
    net = mlp()
    opt = cl.optim.MFAC(net.parameters(), lr=1e-2, ngrads=args.ngrads, damp=1e-2, momentum=0.9)
    for xb, yb in train:
        opt.zero_grad()
        cross_entropy(net(xb), yb).backward()
        opt.step()
    print(f"torch.optim loop with curvlab.optim.MFAC: test accuracy {accuracy(net, Xte, yte):.3f}")


if __name__ == "__main__":
    main()
