"""Iterations to 1e-8 relative error versus the condition number κ in matrix sensing (issue 5).

Tong, Ma & Chi (2021, Fig. 1) show ScaledGD's iteration count independent of κ and gradient
descent's growing with κ; Xu et al. (2023) show the same for the overparameterized ScaledGD(λ)
from a small random start. This script counts iterations (and wall time) to
‖XXᵀ − M⋆‖_F/‖M⋆‖_F ≤ 1e-8 for the three setups of ``examples/matrix_sensing.py`` (same
instances and hyperparameters) over κ ∈ {1, 5, 10, 20, 100, 1000}, n = 200, r⋆ = 10,
m = 5nr⋆ (structured SRHT design, see :func:`curvlab.problems.matrix_sensing`).

Run: ``OMP_NUM_THREADS=2 python benchmarks/matrix_sensing.py [--max-iter 2000] [--quick]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("_ms_example", os.path.join(HERE, "..", "examples", "matrix_sensing.py"))
assert _spec is not None and _spec.loader is not None
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kappas", type=float, nargs="+", default=[1.0, 5.0, 10.0, 20.0, 100.0, 1000.0])
    ap.add_argument("--max-iter", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="n = 60, r⋆ = 4")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n, r = (60, 4) if args.quick else (200, 10)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; n = {n}, r⋆ = {r}, m = {5 * n * r}, budget {args.max_iter}"
    )
    names = ("ScaledGD(λ)", "ScaledGD", "GD")
    header = "| κ | " + " | ".join(f"{nm} iters (s)" for nm in names) + " |"
    print(header)
    print("|" + "---|" * (len(names) + 1))
    t_all = time.perf_counter()
    for kappa in args.kappas:
        cells = []
        for _name, (inst, solver) in example.methods(n, r, kappa, args.seed).items():
            errs, t = example.run(inst, solver, args.max_iter)
            cells.append(
                f"{len(errs) - 1} ({t:.2f})" if errs[-1] <= 1e-8 else f"> {args.max_iter} (err {errs[-1]:.1e})"
            )
        print(f"| {kappa:g} | " + " | ".join(cells) + " |")
    print(f"total {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
