"""curvlab quickstart: curvature products, a Krylov solve and `solve()` on bundled data.

Run:  python examples/quickstart.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_breast_cancer

import curvlab as cl

torch.manual_seed(0)

# --- Data: scikit-learn's bundled breast-cancer set, standardised -----------------
X, y = load_breast_cancer(return_X_y=True)
X = torch.tensor((X - X.mean(0)) / X.std(0), dtype=torch.float64)
y = torch.tensor(y, dtype=torch.float64)
data = (X, y)


def loss(params, batch):
    """L2-regularised logistic regression, mean over the batch."""
    Xb, yb = batch
    z = Xb @ params["w"] + params["b"]
    return torch.nn.functional.binary_cross_entropy_with_logits(z, yb) + 5e-3 * params["w"] @ params["w"]


params = {"w": torch.zeros(30, dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}

# --- 1. A Hessian-vector product, matrix-free ----------------------------------------
H = cl.linops.hessian(loss, params, data=data)
v = torch.randn(H.shape[0], dtype=torch.float64)
print(f"Hessian operator {H.shape}, ||H v|| = {torch.linalg.norm(H @ v):.4f}, loss = {H.value:.4f}")

# --- 2. A Newton step by conjugate gradients: solve H d = -g --------------------------
res = cl.linalg.cg(H, -H.gradient, tol=1e-10)
print(f"CG: converged={res.converged} in {res.n_iter} iterations, residual {float(res.residual_norm):.2e}")

# --- 3. solve(): Newton-CG versus gradient descent on the same problem ---------------
problem = cl.Minimize(loss, params, data=data)
for solver in (cl.solvers.NewtonCG(), cl.solvers.GradientDescent(lr=1.0, line_search=True)):
    result = cl.solve(problem, solver, max_iter=200, tol=1e-8)
    acc = ((X @ result.params["w"] + result.params["b"] > 0).double() == y).double().mean()
    print(
        f"{type(solver).__name__:>16}: status={result.status}, {result.n_iter} iterations, "
        f"loss={result.value:.6f}, train accuracy={acc:.3f}, matvecs={result.history['matvecs'][-1]}"
    )
