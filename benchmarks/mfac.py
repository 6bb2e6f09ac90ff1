"""Cost of M-FAC's dynamic algorithm against the window size m and the dimension d.

For each (d, m) with a full window of m gradients (float32 window, float64 m x m matrices):

* ``product``  — one inverse-Fisher-vector product ``F⁻¹x`` (:class:`curvlab.linops.MFACInverse`),
  O(dm + m²): two passes over the window plus two m x m triangular products;
* ``update``   — replacing the oldest gradient, including the O(m³) refactorization of the
  m x m structure (Gram row O(dm) + Cholesky / triangular inverse O(m³));
* ``step``     — one M-FAC optimizer step (``update_matvec``: push g, return F⁻¹g; the Gram row
  doubles as Gg, so it is one pass less than update + product);
* ``woodbury`` — the dense reference without M-FAC's structure: F⁻¹x = λ⁻¹(x − Gᵀ(mλI + GGᵀ)⁻¹Gx)
  with GGᵀ built from scratch (O(dm² + m³)), skipped where d·m² exceeds ``--woodbury-max``;
* ``sgd``      — one ``torch.optim.SGD`` step with momentum on a flat d-vector, O(d).

``ns/(d·m)`` is the product time divided by d·m: roughly constant once the window no longer
fits in cache, i.e. the product cost is linear in d·m. Every timing is the median of
``--repeats`` runs. The window is filled with tiled random rows and its Gram matrix is set to its
expectation d·I instead of being computed (O(dm²)); costs do not depend on the values.

Run:  OMP_NUM_THREADS=1 python benchmarks/mfac.py [--threads 1] [--device cpu] [--max-gb 6]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

from curvlab.linops import MFACInverse


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


def window(m: int, d: int, device: torch.device) -> torch.Tensor:
    """An m x d float32 window of tiled random rows (fast to fill at 1e9 entries)."""
    w = min(d, 1 << 16)
    base = torch.randn(m, w, device=device)
    G = torch.empty(m, d, device=device)
    for c in range(0, d, w):
        G[:, c : c + w] = base[:, : min(w, d - c)]
    return G


def measure(
    d: int, m: int, lam: float, x: torch.Tensor, dev: torch.device, args: argparse.Namespace, sync: Callable[[], None]
) -> tuple[float, float, float, float | None]:
    """Timings (product, update, step, woodbury) with a full window of m gradients of dimension d."""
    G = window(m, d, dev)
    gram = torch.eye(m, dtype=torch.float64, device=dev) * d
    state = {"grads": G, "gram": gram, "count": m, "next": 0, "damping": lam}
    op = MFACInverse.from_state(state)
    g = torch.randn(d, device=dev)
    op.matvec(x)  # factor once
    t_prod = timeit(lambda: op.matvec(x), args.repeats, sync)

    def upd() -> None:
        op.update(g)
        op._structure()  # the O(m^3) refactorization, otherwise lazy

    t_upd = timeit(upd, args.repeats, sync)
    t_step = timeit(lambda: op.update_matvec(g), args.repeats, sync)
    t_wood = None
    if d * m * m <= args.woodbury_max:

        def woodbury() -> torch.Tensor:
            K = (G @ G.T).double()
            K.diagonal().add_(m * lam)
            c = torch.linalg.solve(K, (G @ x).double())
            return (x - G.T @ c.float()) / lam

        t_wood = timeit(woodbury, max(1, args.repeats // 2), sync)
    return t_prod, t_upd, t_step, t_wood


def fmt(t: float | None) -> str:
    if t is None:
        return "—"
    return f"{t * 1e3:.3g}" if t * 1e3 < 1000 else f"{t * 1e3:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dims", type=float, nargs="+", default=[1e4, 1e5, 1e6, 1e7])
    ap.add_argument("--ms", type=int, nargs="+", default=[32, 128, 512, 1024])
    ap.add_argument("--max-gb", type=float, default=6.0, help="skip windows larger than this (float32)")
    ap.add_argument("--woodbury-max", type=float, default=1.5e11, help="skip the dense reference above d*m^2")
    ap.add_argument("--damping", type=float, default=1e-5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    lam = args.damping

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"# device {dev} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"window float32, small matrices float64, damping {lam:g}, median of {args.repeats}"
    )
    print()
    print(
        "| d | m | window GB | product ms | update ms | step ms | woodbury ms | sgd ms | product ns/(d·m) "
        "| woodbury / product |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    t_start = time.perf_counter()
    for dfl in args.dims:
        d = int(dfl)
        x = torch.randn(d, device=dev)
        p = torch.zeros(d, device=dev, requires_grad=True)
        p.grad = torch.randn(d, device=dev)
        sgd = torch.optim.SGD([p], lr=1e-3, momentum=0.9)
        t_sgd = timeit(sgd.step, args.repeats, sync)
        for m in args.ms:
            gb = m * d * 4 / 1e9
            if gb > args.max_gb:
                print(f"| {d:.0e} | {m} | {gb:.2g} | skipped (window > {args.max_gb:g} GB) | | | | | | |")
                continue
            t_prod, t_upd, t_step, t_wood = measure(d, m, lam, x, dev, args, sync)
            ratio = f"{t_wood / t_prod:.0f}×" if t_wood is not None else "—"
            print(
                f"| {d:.0e} | {m} | {gb:.2g} | {fmt(t_prod)} | {fmt(t_upd)} | {fmt(t_step)} | {fmt(t_wood)} | "
                f"{fmt(t_sgd)} | {t_prod / (d * m) * 1e9:.2f} | {ratio} |",
                flush=True,
            )
    print()
    print(f"total benchmark time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
