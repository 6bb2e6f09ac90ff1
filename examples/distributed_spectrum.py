"""Data-parallel Hessian spectrum of an MLP on scikit-learn's digits, identical to one process.

Every rank loads digits, trains the same small MLP (same seed, a few full-batch epochs),
takes *its shard* of the data with :func:`curvlab.distributed.shard` and builds the Hessian
of the training loss over it. Because the Hessian operator all-reduces its products (with
the batch weights of the global sample count) and the probes are seeded, every rank gets
the Hessian over the whole training set: the printed top eigenvalues, trace, density
moments and the last layer's top eigenvalue (its block operator, which differentiates only
that layer) are the single-process numbers (to rounding), and only rank 0 prints, shows the
progress bar (``--progress``) and writes.

Run from the repository root, on 2 processes (gloo on CPU; nccl when each rank has a GPU)::

    torchrun --nproc_per_node=2 examples/distributed_spectrum.py

or as one process (no process group: nothing is sharded)::

    python examples/distributed_spectrum.py
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import curvlab as cl
from curvlab import distributed as cd


def setup() -> torch.device:
    """Join the process group when launched by torchrun; pick this rank's device."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_mlp(X: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> nn.Module:
    """A 64-32-10 tanh MLP, full-batch gradient descent (the same on every rank: no data parallelism needed)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(X.device, X.dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--k", type=int, default=5, help="number of top eigenvalues")
    parser.add_argument("--batch", type=int, default=300, help="batch size of the operator's passes per rank")
    parser.add_argument("--progress", action="store_true", help="tqdm bars (rank 0 only)")
    args = parser.parse_args()
    device = setup()
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64, device=device)
    y = torch.tensor(y, device=device)
    model = train_mlp(X, y, args.epochs)

    Xs, ys = cd.shard((X, y))  # this rank's contiguous slice (everything without a process group)
    batches = [(Xs[i : i + args.batch], ys[i : i + args.batch]) for i in range(0, len(Xs), args.batch)]

    def loss(p: dict, batch: tuple) -> torch.Tensor:
        return nn.functional.cross_entropy(torch.func.functional_call(model, p, (batch[0],)), batch[1])

    t0 = time.perf_counter()
    H = cl.linops.hessian(loss, model, data=batches, cache=True)
    top = cl.spectrum.eigsh(H, args.k, tol=1e-10, seed=0, progress=args.progress)
    tr = cl.spectrum.trace(H, "hutch++", budget=60, seed=1, progress=args.progress)
    dens = cl.spectrum.density(H, n_probes=3, n_lanczos=40, seed=2, progress=args.progress)
    last = cl.spectrum.eigsh(cl.linops.restrict(H, "2"), 1, tol=1e-10, seed=3)  # the last Linear layer's block
    value = float(H.value)  # a collective too: every rank evaluates it, not only the one that prints
    elapsed = time.perf_counter() - t0
    if cd.is_main_process():
        print(f"processes: {cd.world_size()}   samples: {len(X)} (this rank: {len(Xs)})   params: {H.shape[0]}")
        print(f"loss over the whole training set: {value:.12f}")
        print("top eigenvalues: " + "  ".join(f"{float(v):.10f}" for v in top.eigenvalues) + f"  ({top.status})")
        print(f"last layer's block ({last.n_matvecs} block products): top eigenvalue {float(last.eigenvalues[0]):.10f}")
        print(f"trace (Hutch++, 60 products, seed 1): {float(tr.estimate):.10f} +- {float(tr.std_error):.2e}")
        print(f"density moments (SLQ, seed 2): mean {dens.moment(1):.10f}  second {dens.moment(2):.10f}")
        print(f"time: {elapsed:.2f} s   products: {H.n_matvecs}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
