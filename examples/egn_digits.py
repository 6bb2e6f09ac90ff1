"""EGN versus SGD and Adam: an MLP classifier on scikit-learn's bundled digits.

The 1797 8×8 digit images (bundled with scikit-learn, nothing downloaded) are split
60/20/20 into train/validation/test with a fixed seed and standardised with the training
statistics. The model is an MLP 64-32-10 (tanh) trained with softmax cross-entropy on
shuffled mini-batches of 32. EGN (``curvlab.solvers.EGN``, Korbit et al. 2024: the
Duncan-Guttman GGN direction with the exact softmax Hessian blocks, Armijo line search and
adaptive damping, the paper's constants, λ₀ = 1) runs through ``solve()``; SGD (momentum 0.9) and Adam
run in a plain ``torch.optim`` loop. Every method gets the same training wall time
(evaluation excluded); test accuracy is printed against time.

Run:  python examples/egn_digits.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

import curvlab as cl

Curve = list[dict[str, float]]


def make_data(seed: int = 0) -> dict[str, Tensor]:
    """Digits split 60/20/20 (train/val/test), standardised with the training mean and std."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    X = torch.tensor(X, dtype=torch.float32)[perm]
    y = torch.tensor(y)[perm]
    n_tr, n_va = int(0.6 * len(y)), int(0.2 * len(y))
    mu, sd = X[:n_tr].mean(0), X[:n_tr].std(0).clamp_min(1e-3)
    X = (X - mu) / sd
    return {
        "x": X[:n_tr],
        "y": y[:n_tr],
        "xv": X[n_tr : n_tr + n_va],
        "yv": y[n_tr : n_tr + n_va],
        "xt": X[n_tr + n_va :],
        "yt": y[n_tr + n_va :],
    }


def make_model(seed: int = 0, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def per_sample_loss(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


@torch.no_grad()
def accuracy(out: Tensor, y: Tensor) -> float:
    return float((out.argmax(-1) == y).float().mean())


class Shuffled:
    """Re-iterable mini-batches of ``(x, y)``, reshuffled every epoch from a seeded generator."""

    def __init__(self, x: Tensor, y: Tensor, batch: int, seed: int = 0) -> None:
        self.x, self.y, self.batch = x, y, batch
        self.g = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        perm = torch.randperm(len(self.y), generator=self.g)
        for idx in perm.split(self.batch):
            yield self.x[idx], self.y[idx]

    def __len__(self) -> int:
        return (len(self.y) + self.batch - 1) // self.batch


class Clock:
    """Wall time of training only: evaluation runs with the clock paused."""

    def __init__(self) -> None:
        self.elapsed, self._t = 0.0, time.perf_counter()

    def pause(self) -> float:
        self.elapsed += time.perf_counter() - self._t
        return self.elapsed

    def resume(self) -> None:
        self._t = time.perf_counter()


def _record(curve: Curve, t: float, epoch: float, f: Callable[[Tensor], Tensor], data: dict[str, Tensor]) -> None:
    with torch.no_grad():
        ov, ot, otr = f(data["xv"]), f(data["xt"]), f(data["x"])
    curve.append(
        {
            "time": t,
            "epoch": epoch,
            "train_loss": float(per_sample_loss(otr, data["y"]).mean()),
            "val_acc": accuracy(ov, data["yv"]),
            "test_acc": accuracy(ot, data["yt"]),
            "test_loss": float(per_sample_loss(ot, data["yt"]).mean()),
        }
    )


def train_egn(
    data: dict[str, Tensor], seconds: float, batch: int = 32, seed: int = 0, evals_per_epoch: int = 2, **egn: Any
) -> Curve:
    """EGN via ``curvlab.solvers.EGN`` with the paper's Armijo line search and adaptive damping on (λ₀ = 1)."""
    opts = {"line_search": True, "adaptive_damping": True, "damping": 1.0, **egn}
    model = make_model(seed)
    batches = Shuffled(data["x"], data["y"], batch, seed)
    problem = cl.SupervisedLoss(model, per_sample_loss, None, batches)
    every = max(1, len(batches) // evals_per_epoch)
    curve: Curve = []
    _record(curve, 0.0, 0.0, model, data)
    clock = Clock()

    def callback(state: dict[str, Any]) -> bool:
        if state["iter"] % every:
            return False
        t = clock.pause()
        _record(curve, t, state["iter"] / len(batches), lambda x: problem.outputs(state["x"], x), data)
        clock.resume()
        return t >= seconds

    cl.solvers.EGN(**opts).solve(problem, max_iter=10**9, tol=0.0, callback=callback)
    return curve


def train_torch(
    data: dict[str, Tensor],
    seconds: float,
    make_opt: Callable[[Any], torch.optim.Optimizer],
    batch: int = 32,
    seed: int = 0,
    evals_per_epoch: int = 2,
) -> Curve:
    """A plain ``torch.optim`` loop on the mean cross-entropy."""
    model = make_model(seed)
    opt = make_opt(model.parameters())
    batches = Shuffled(data["x"], data["y"], batch, seed)
    every = max(1, len(batches) // evals_per_epoch)
    curve: Curve = []
    _record(curve, 0.0, 0.0, model, data)
    clock, k = Clock(), 0
    while True:
        for xb, yb in batches:
            opt.zero_grad()
            per_sample_loss(model(xb), yb).mean().backward()
            opt.step()
            k += 1
            if k % every == 0:
                t = clock.pause()
                _record(curve, t, k / len(batches), model, data)
                if t >= seconds:
                    return curve
                clock.resume()


def at(curve: Curve, t: float, key: str) -> float:
    """``key`` of the last evaluation at or before training time ``t``."""
    v = curve[0][key]
    for p in curve:
        if p["time"] <= t:
            v = p[key]
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="training wall time per method")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps timings stable on shared CPUs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = make_data()
    runs = {
        "EGN (line search, adaptive λ)": lambda s: train_egn(data, s),
        "SGD (lr 0.1, momentum 0.9)": lambda s: train_torch(
            data, s, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)
        ),
        "Adam (lr 1e-3)": lambda s: train_torch(data, s, lambda p: torch.optim.Adam(p, lr=1e-3)),
    }
    for run in runs.values():  # warm-up (first calls of torch.func / LAPACK), not timed
        run(0.05)
    curves = {name: run(args.seconds) for name, run in runs.items()}
    checkpoints = [args.seconds * f for f in (0.1, 0.25, 0.5, 1.0)]
    print("test accuracy at training time:")
    print(f"{'method':28s}" + "".join(f"{t:>8.1f}s" for t in checkpoints) + "   epochs")
    for name, c in curves.items():
        print(f"{name:28s}" + "".join(f"{at(c, t, 'test_acc'):9.4f}" for t in checkpoints) + f"   {c[-1]['epoch']:.0f}")


if __name__ == "__main__":
    main()
