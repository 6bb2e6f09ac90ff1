"""One-shot pruning with M-FAC's static algorithm (OBS) versus magnitude pruning, on digits.

Frantar, Kurtic & Alistarh (2021), Section 5.1: the inverse empirical Fisher of ``m`` mini-batch
gradients (:class:`curvlab.linops.MFACStatic`, optionally block-diagonal) gives the Optimal Brain
Surgeon scores :math:`w_q^2 / (2[F^{-1}]_{qq})` and the compensating update of the remaining
weights (:func:`curvlab.linops.obs_prune`). As in the paper, the target sparsity is reached in
``nrecomps`` steps along a geometric schedule, recollecting the gradients (on the kept weights,
at the current pruned point) before each step. No fine-tuning afterwards: the table shows the
test accuracy right after pruning the weight matrices of a trained 64-128-10 MLP.

    python examples/mfac_pruning.py [--ngrads 64] [--damping 1e-4] [--nrecomps 8] [--block-size 0]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn.functional import cross_entropy

from curvlab.linops import MFACStatic, obs_prune


def data(seed: int = 0):
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.25, random_state=seed, stratify=y)
    t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
    return t(Xtr, torch.float32), t(ytr, torch.long), t(Xte, torch.float32), t(yte, torch.long)


def trained_mlp(X, y, epochs: int = 60, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            cross_entropy(net(X[idx]), y[idx]).backward()
            opt.step()
    return net


def weights_of(net: torch.nn.Module) -> list[torch.Tensor]:
    """The pruned tensors: the weight matrices (biases are kept dense, as usual)."""
    return [m.weight for m in net if isinstance(m, torch.nn.Linear)]


def flat(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in ts])


def write(net: torch.nn.Module, w: torch.Tensor) -> None:
    i = 0
    with torch.no_grad():
        for t in weights_of(net):
            t.copy_(w[i : i + t.numel()].reshape(t.shape))
            i += t.numel()


def accuracy(net: torch.nn.Module, X, y) -> float:
    with torch.no_grad():
        return float((net(X).argmax(1) == y).float().mean())


def minibatch_grads(net, X, y, m: int, bs: int, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """``m`` mini-batch gradients w.r.t. the kept weights, one per row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(m):
        idx = torch.randint(0, len(y), (bs,), generator=g)
        net.zero_grad()
        cross_entropy(net(X[idx]), y[idx]).backward()
        rows.append(flat([t.grad for t in weights_of(net)])[mask])
    net.zero_grad()
    return torch.stack(rows)


def magnitude_prune(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    out = w.clone()
    out[torch.topk(w.abs(), int(w.numel() * sparsity), largest=False).indices] = 0
    return out


def mfac_prune(net0, X, y, sparsity: float, args) -> torch.nn.Module:
    net = copy.deepcopy(net0)
    w = flat(weights_of(net))
    mask = torch.ones_like(w, dtype=torch.bool)
    # geometric schedule of densities from 1 to 1 - sparsity (the paper's nrecomps)
    fac = (1.0 - sparsity) ** (1.0 / args.nrecomps)
    for j in range(1, args.nrecomps + 1):
        target = 1.0 - fac**j if j < args.nrecomps else sparsity
        G = minibatch_grads(net, X, y, args.ngrads, args.grad_batch, mask, seed=j)
        finv = MFACStatic(G.double(), args.damping, block_size=args.block_size or None)
        w, mask = obs_prune(w.double(), finv, target, mask=mask)
        w = w.float()
        write(net, w)
    return net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ngrads", type=int, default=64, help="gradients per Fisher (paper: 64 for ResNet-20 one-shot)")
    ap.add_argument("--grad-batch", type=int, default=16, help="samples per gradient")
    ap.add_argument("--damping", type=float, default=1e-4, help="damping lambda (paper: 1e-5)")
    ap.add_argument("--nrecomps", type=int, default=8, help="pruning steps with fresh gradients (paper: 16)")
    ap.add_argument("--block-size", type=int, default=0, help="block-diagonal Fisher (paper: 128); 0 = full")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    Xtr, ytr, Xte, yte = data()
    t0 = time.perf_counter()
    net = trained_mlp(Xtr, ytr)
    w0 = flat(weights_of(net))
    print(
        f"dense MLP 64-128-10: {w0.numel()} prunable weights, test accuracy {accuracy(net, Xte, yte):.3f} "
        f"(trained in {time.perf_counter() - t0:.1f}s)"
    )
    print(
        f"M-FAC: m={args.ngrads} gradients of batch {args.grad_batch}, damping {args.damping:g}, "
        f"{args.nrecomps} steps, block size {args.block_size or 'full'}"
    )
    print(f"{'sparsity':>8} {'magnitude':>10} {'M-FAC 1 step':>13} {'M-FAC OBS':>10} {'time [s]':>8}")
    for s in (0.5, 0.75, 0.9):
        mag = copy.deepcopy(net)
        write(mag, magnitude_prune(w0, s))
        one = mfac_prune(net, Xtr, ytr, s, argparse.Namespace(**{**vars(args), "nrecomps": 1}))
        t0 = time.perf_counter()
        obs = mfac_prune(net, Xtr, ytr, s, args)
        dt = time.perf_counter() - t0
        print(
            f"{s:>8.0%} {accuracy(mag, Xte, yte):>10.3f} {accuracy(one, Xte, yte):>13.3f} "
            f"{accuracy(obs, Xte, yte):>10.3f} {dt:>8.1f}"
        )


if __name__ == "__main__":
    main()
