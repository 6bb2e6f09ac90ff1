"""Hessian spectrum of a small MLP on scikit-learn's digits: a bulk near zero plus outliers.

Trains a 64-64-10 ReLU network with SGD for a few epochs, then analyses the
Hessian of the training loss over the whole training set with
:mod:`curvlab.spectrum`:

* the top-10 eigenvalues (thick-restart Lanczos) and the smallest one,
* the trace with a standard error (Hutch++),
* the outliers-versus-bulk split — about one outlier per class, as Sagun et al.
  (2017) and Papyan (2020) observed,
* the top eigenvalue and the spectral density of each layer's block of the Hessian
  (block operators: only the layer's own parameters are differentiated),
* the spectral density by stochastic Lanczos quadrature, saved as a log-scale plot
  with the outliers marked and a linear inset of the bulk,
* the 2-D loss landscape along the two top eigenvectors (as in PyHessian's examples).

Three figures are written next to ``--out`` (default: beside this script, whatever
the working directory): ``hessian_spectrum.png`` (density), ``hessian_spectrum_layers.png``
(per-layer densities) and ``hessian_spectrum_landscape.png``. Needs scikit-learn and
matplotlib; about 15 s on a laptop CPU::

    python examples/hessian_spectrum.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import curvlab as cl
from curvlab.linops import blocks
from curvlab.spectrum import density, eigsh, landscape, summary

HERE = Path(__file__).resolve().parent


def train_mlp(
    epochs: int = 5, seed: int = 0, hidden: tuple[int, ...] = (64,)
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 64-(hidden)-10 ReLU MLP trained with SGD (lr 0.1, batch 32) on digits (pixels scaled to [0, 1]).

    Layers are named ``fc1``, ``fc2``, ...; the activations ``relu`` (one hidden layer) or ``relu1``, ``relu2``, ...
    """
    torch.manual_seed(seed)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    model = nn.Sequential()
    widths = (64, *hidden)
    for i in range(len(hidden)):
        model.add_module(f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))
        model.add_module("relu" if len(hidden) == 1 else f"relu{i + 1}", nn.ReLU())
    model.add_module(f"fc{len(hidden) + 1}", nn.Linear(widths[-1], 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), 32):
            idx = perm[i : i + 32]
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, X, y


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--out`` defaults to a path beside this script (any working directory works)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default=str(HERE / "hessian_spectrum.png"), help="the density plot (the other figures go beside it)"
    )
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--grid", type=int, default=21, help="landscape grid points per direction")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    model, X, y = train_mlp(args.epochs)
    with torch.no_grad():
        acc = (model(X).argmax(1) == y).float().mean().item()

    def loss(params, batch):
        xb, yb = batch
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (xb,)), yb)

    H = cl.linops.hessian(loss, model, data=(X, y))  # full-batch Hessian, matrix-free
    print(f"MLP 64-64-10 on digits: {H.shape[0]} parameters, loss {H.value.item():.4f}, train accuracy {acc:.3f}")

    t0 = time.perf_counter()
    s = summary(H, n_classes=10, seed=0)
    elapsed = time.perf_counter() - t0
    print(f"\ncurvlab.spectrum.summary ({elapsed:.1f} s, {s.n_matvecs} Hessian-vector products):")
    print(s)
    print("\ntop-10 eigenvalues:", ", ".join(f"{float(v):.4f}" for v in s.top_eigenvalues[:10]))
    print(f"trace: {float(s.trace.estimate):.4f} ± {float(s.trace.std_error):.4f} (standard error)")
    print(f"outliers above the bulk: {s.n_outliers} (10 classes); bulk edge {s.bulk_edge:.4f}")

    top = s.details["top"]
    v1 = top.as_params(0)  # the top eigenvector, shaped like the model's parameters
    print("top eigenvector's weight per layer:", ", ".join(f"{k}: {float(t.norm()) ** 2:.2f}" for k, t in v1.items()))

    print("\nper-layer blocks of the Hessian (each differentiates only its own parameters):")
    layer_densities = {}
    for name, block in blocks(H).items():
        t0 = time.perf_counter()
        res = eigsh(block, k=1, seed=0)
        dt = time.perf_counter() - t0
        layer_densities[name] = density(block, seed=0)
        print(
            f"  {name}: top eigenvalue {float(res.eigenvalues[0]):.4f}  ({block.shape[0]} parameters, "
            f"{res.n_matvecs} products in {dt:.2f} s)"
        )

    t0 = time.perf_counter()
    land = landscape(H, dim=2, n_points=args.grid, span=0.6, seed=0)
    print(
        f"\n2-D loss landscape along the top-2 eigenvectors (λ = {float(land.eigenvalues[0]):.3f}, "
        f"{float(land.eigenvalues[1]):.3f}): {land.n_evals} full-data losses in {time.perf_counter() - t0:.1f} s, "
        f"loss in [{float(land.values.min()):.4f}, {float(land.values.max()):.4f}]"
    )
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        print("\nmatplotlib is not installed: skipping the plots (pip install matplotlib)")
        return

    # 1. the spectral density: whole peaks, the eigsh outliers marked, the bulk in a linear inset
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    s.density.plot(
        ax=ax, color="C0", label="SLQ density (2 probes × 90 Lanczos steps)", outliers=s.outliers, inset=True
    )
    ax.axvline(s.bulk_edge, color="C2", lw=0.8, ls=":", label="bulk edge")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 30)  # head room for the legend above the bulk's peak
    ax.set_title(f"Hessian spectrum, digits MLP ({H.shape[0]} params): bulk + {s.n_outliers} outliers", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=150)
    print(f"\nsaved the spectral density plot to {out}")

    # 2. per-layer densities on one axis
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    floor = min(d.floor() for d in layer_densities.values())
    for i, (name, d) in enumerate(layer_densities.items()):
        d.plot(ax=ax, color=f"C{i + 1}", label=f"{name} ({d.n} params)", floor=floor, outliers=None)
    hi = max(float(d.values.max()) for d in layer_densities.values())
    ax.set_ylim(floor, 3 * hi)
    lo_x = min(float(d.grid[0]) for d in layer_densities.values())
    hi_x = max(float(d.grid[-1]) for d in layer_densities.values())
    ax.set_xlim(lo_x, hi_x)
    ax.set_title("Per-layer Hessian spectral densities (diagonal blocks)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out.with_name(out.stem + "_layers.png")
    fig.savefig(path, dpi=150)
    print(f"saved the per-layer densities to {path}")

    # 3. the loss landscape along the top-2 eigenvectors
    path = out.with_name(out.stem + "_landscape.png")
    land.save(str(path), title="Training loss along the top-2 Hessian eigenvectors", figsize=(5.6, 4.4))
    print(f"saved the 2-D loss landscape to {path}")


if __name__ == "__main__":
    main()
