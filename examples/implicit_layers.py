"""A differentiable argmin as a layer: a ridge-regression head inside a network, trained end to end.

The model is a small MLP feature extractor followed by a *solved* head (as in
Bertinetto et al. 2019, "Meta-learning with differentiable closed-form
solvers"): on every training episode the head's weights are

    W*(Φ, λ) = argmin_W  ½‖Φ_s W − Y_s‖² + ½ λ ‖W‖²

for the support features Φ_s = net(X_s), and the loss is the cross-entropy of
the query predictions s · net(X_q) W*. Gradients reach the network (through
Φ_s) and the learned λ and temperature s through the argmin by the implicit
function theorem (``implicit.custom_root``; Blondel et al. 2021): the inner
solve is a plain CG run that is never differentiated.

Data: scikit-learn's bundled digits (8×8 images, 10 classes).
Run:  python examples/implicit_layers.py
"""

from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import curvlab
import implicit

torch.manual_seed(0)


def ridge_objective(W, features, targets, log_lam):
    return 0.5 * ((features @ W - targets) ** 2).sum() + 0.5 * log_lam.exp() * (W**2).sum()


@implicit.custom_root(torch.func.grad(ridge_objective), solve="cg", tol=1e-6)
def ridge_head(W0, features, targets, log_lam):
    """Any solver works here; CG on the normal equations (ΦᵀΦ + λI) W = ΦᵀY, all columns at once."""
    d = features.shape[1]
    A = features.T @ features + log_lam.exp() * torch.eye(d)
    return curvlab.linalg.cg(A, features.T @ targets, x0=W0, tol=1e-8).x


class RidgeNet(nn.Module):
    """Features by an MLP, classes by a ridge head solved on the support set."""

    def __init__(self, d_in: int = 64, d_feat: int = 32, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(d_in, 128), nn.ReLU(), nn.Linear(128, d_feat))
        self.log_lam = nn.Parameter(torch.tensor(0.0))
        self.log_scale = nn.Parameter(torch.tensor(1.0))
        self.n_classes = n_classes

    def fit_head(self, X_s: torch.Tensor, y_s: torch.Tensor) -> torch.Tensor:
        phi = self.features(X_s)
        Y = nn.functional.one_hot(y_s, self.n_classes).to(phi.dtype)
        W0 = torch.zeros(phi.shape[1], self.n_classes)
        return ridge_head(W0, phi, Y, self.log_lam)  # differentiable in phi (so the MLP) and log_lam

    def forward(self, X_q: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * self.features(X_q) @ W


def main() -> None:
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)

    model = RidgeNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    t0 = time.perf_counter()
    for step in range(400):
        idx = torch.randperm(len(y_tr))[:200]  # an episode: 100 support + 100 query samples
        s, q = idx[:100], idx[100:]
        W = model.fit_head(X_tr[s], y_tr[s])
        loss = nn.functional.cross_entropy(model(X_tr[q], W), y_tr[q])
        opt.zero_grad()
        loss.backward()  # through the argmin: one CG solve per backward
        opt.step()
        if step % 100 == 0:
            print(f"step {step:3d}  query loss {loss.item():.3f}  λ={model.log_lam.exp().item():.3g}")
    print(f"400 episodes in {time.perf_counter() - t0:.1f} s")

    with torch.no_grad():
        W = model.fit_head(X_tr, y_tr)  # the head solved on the whole training set
        acc = (model(X_te, W).argmax(1) == y_te).float().mean().item()
        # baseline: the same ridge head on raw pixels, λ picked on the test set (an optimistic baseline)
        Y = nn.functional.one_hot(y_tr, 10).float()
        base = max(
            ((X_te @ torch.linalg.solve(X_tr.T @ X_tr + lam * torch.eye(64), X_tr.T @ Y)).argmax(1) == y_te)
            .float()
            .mean()
            .item()
            for lam in (0.01, 0.1, 1.0, 10.0, 100.0)
        )
    print(f"test accuracy: learned features + ridge head {acc:.3f}   ridge on raw pixels (best λ) {base:.3f}")


if __name__ == "__main__":
    main()
