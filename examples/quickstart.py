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

# --- 4. The Hessian's spectrum: extreme eigenvalues, trace with its standard error -----
s = cl.spectrum.summary(H, seed=0)
print(
    f"spectrum: lambda_max={s.top_eigenvalue:.4f}, lambda_min={s.smallest_eigenvalue:.2e}, "
    f"trace={float(s.trace.estimate):.4f} +- {float(s.trace.std_error):.1e}, "
    f"condition={s.condition:.1f}, {s.n_matvecs} Hessian-vector products"
)

# --- 5. Implicit differentiation: tune a per-feature L2 penalty on validation loss --------
import implicit  # noqa: E402  (the companion package shipped with curvlab)

Xtr, ytr, Xva, yva = X[:400], y[:400], X[400:], y[400:]


def train_loss(w, log_lam):
    z = Xtr @ w
    return torch.nn.functional.binary_cross_entropy_with_logits(z, ytr) + 0.5 * (log_lam.exp() * w * w).sum()


def optimality(w, log_lam):  # F(w, λ) = ∇_w train_loss = 0 at the fitted weights
    return torch.func.grad(train_loss)(w, log_lam)


@implicit.custom_root(optimality, solve="cg", tol=1e-10)
def fit(w0, log_lam):  # any solver: its iterations are not differentiated
    p = cl.Minimize(lambda w: train_loss(w, log_lam), w0)
    return cl.solve(p, cl.solvers.NewtonCG(), max_iter=50, tol=1e-10).params


log_lam = torch.full((30,), -3.0, dtype=torch.float64, requires_grad=True)
opt = torch.optim.Adam([log_lam], lr=0.2)
for it in range(30):
    w = fit(torch.zeros(30, dtype=torch.float64), log_lam)
    val = torch.nn.functional.binary_cross_entropy_with_logits(Xva @ w, yva)
    opt.zero_grad()
    val.backward()  # dval/dλ through the implicit function theorem: one CG solve
    if it in (0, 29):
        print(f"implicit: step {it:2d} validation loss {val.item():.4f}, |grad| {float(log_lam.grad.norm()):.2e}")
    opt.step()
print(f"implicit: last linear solve used {fit.last_solve.n_matvecs} Hessian-vector products")

# --- 6. bilevel: the same hyperparameter problem as a BilevelProblem; switch solvers in one line
import bilevel as bl  # noqa: E402


def val_loss(x, w, batch):
    return torch.nn.functional.binary_cross_entropy_with_logits(Xva @ w, yva)


problem = bl.BilevelProblem(
    val_loss,
    lambda x, w, batch: train_loss(w, x),
    torch.full((30,), -3.0, dtype=torch.float64),
    torch.zeros(30, dtype=torch.float64),
)
for solver in (bl.AID(), bl.IFT()):  # defaults: no step size to tune, each run stops by itself
    r = solver.solve(problem)
    print(
        f"bilevel: {type(solver).__name__} {r.status} after {r.n_iter} iterations, validation loss "
        f"F(x) = {problem.value(r.x):.4f} ({r.state['grads']} gradients, {r.state['hvps']} HVPs)"
    )
